"""Shared by the pytest-benchmark suites: run one case, time it, measure its memory, record both.

Settings come from the environment (``python -m bench.run`` sets them):
``BENCH_PROFILE`` quick|full, ``BENCH_DEVICE`` cpu|cuda, ``BENCH_MEMORY`` 1|0,
``BENCH_SECONDS`` (time budget per case for the timed rounds), ``BENCH_THREADS``.
"""

from __future__ import annotations

import gc
import os
import time

import pytest
import torch

from . import cases, memory

PROFILE = os.environ.get("BENCH_PROFILE", "quick")
DEVICE = os.environ.get("BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
MEASURE_MEMORY = os.environ.get("BENCH_MEMORY", "1") == "1"
SECONDS = float(os.environ.get("BENCH_SECONDS", "6"))
if os.environ.get("BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["BENCH_THREADS"]))


def params(op: str):
    """(impl, shape) pairs for pytest.mark.parametrize, shapes outermost so that one shape's
    implementations run back to back (their ratios are then taken under the same machine load)."""
    out = []
    for shape in cases.shapes(op, PROFILE, DEVICE):
        for impl in cases.IMPLS[op]:
            out.append(pytest.param(impl, shape, id=f"{cases.shape_id(shape)}-{impl}"))
    return out


def run_case(benchmark, op: str, impl: str, shape: dict) -> None:
    reason = cases.unavailable(op, impl, DEVICE)
    if reason:
        pytest.skip(reason)
    case = cases.build(op, impl, shape, DEVICE)
    t0 = time.perf_counter()
    try:
        case.step()  # warm-up (compiles under torch.compile)
    except Exception as e:  # noqa: BLE001 - a baseline that cannot run here is skipped, with why
        case.reset()
        if impl in cases.SKIP_ON_FAILURE:
            pytest.skip(f"{impl} failed here: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        raise
    first = time.perf_counter() - t0
    case.reset()
    est = first
    if impl == "compile" or first < 5.0:  # the first step compiled, or paid first-touch page faults:
        t0 = time.perf_counter()  # time a second one for the round count (else 3 rounds, one spike = the median)
        case.step()
        est = time.perf_counter() - t0
        case.reset()
    # at least 3 rounds (a median), 2 for steps slower than 5 s in the quick profile, at most 50
    floor = 2 if (PROFILE == "quick" and est > 5.0) else 3
    rounds = int(max(floor, min(50, SECONDS / max(est, 1e-6))))
    benchmark.pedantic(case.step, setup=case.reset, rounds=rounds, iterations=1, warmup_rounds=0)
    case.reset()
    info = dict(
        op=op, impl=impl, device=DEVICE, threads=torch.get_num_threads(), first_call_s=first,
        tokens=case.tokens, bytes_moved=case.bytes_moved, input_bytes=case.input_bytes,
        result_bytes=case.result_bytes, **{f"shape_{k}": v for k, v in shape.items()},
    )
    if MEASURE_MEMORY and DEVICE == "cuda":  # on the case already built and warmed up
        mem = memory.measure_case(case, DEVICE)
        case.reset()
        info.update({f"mem_{k}": v for k, v in mem.items()})
    del case
    gc.collect()
    if MEASURE_MEMORY and DEVICE != "cuda":  # peak RSS needs a process of its own
        mem = memory.measure(op, impl, shape, DEVICE, warmup=est < 3.0)
        info.update({f"mem_{k}": v for k, v in mem.items()})
    benchmark.extra_info.update(info)
