"""Peak extra memory of one case.

CUDA: in process, on the case the harness has just timed (``measure_case``; already warmed up):
``torch.cuda.max_memory_allocated`` during one step, minus what was allocated before it (the
inputs), minus the result the step returns (the gradient, or the outputs).

CPU: in a separate process running just that case (``python -m bench.memory '<json>'``): it builds
the inputs, runs one warm-up step (so lazy initialisation and ``torch.compile`` are not counted;
skipped for steps slower than 3 s that need no compilation, where lazy initialisation is noise),
drops the result, takes its resident memory (VmRSS), resets the kernel's peak-RSS counter
(``/proc/self/clear_refs``), runs one step and reads the peak (VmHWM). Extra = peak - before - result.
Large buffers are mmap'ed by glibc and returned to the OS on free, so the warm-up leaves no slack
behind that would hide a later peak.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys

import torch


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_case(case, device: str) -> dict:
    """Peak extra memory of one step of ``case``, already built, warmed up and reset (its result dropped)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        case.step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        method = "torch.cuda.max_memory_allocated"
    else:
        before = _status_kb("VmRSS")
        if not _reset_peak_rss():
            raise RuntimeError("cannot reset peak RSS (/proc/self/clear_refs)")
        case.step()
        peak = _status_kb("VmHWM")
        method = "peak RSS (VmHWM) of a separate process"
    return dict(
        extra_bytes=peak - before - case.result_bytes,
        peak_minus_before=peak - before,
        result_bytes=case.result_bytes,
        input_bytes=case.input_bytes,
        method=method,
    )


def measure_here(op: str, impl: str, shape: dict, device: str, warmup: bool = True) -> dict:
    """Build the case in this process, warm it up (always under torch.compile), measure one step."""
    from . import cases

    case = cases.build(op, impl, shape, device)
    if warmup or impl == "compile":
        case.step()  # warm-up: lazy init, compilation, allocator pools
        case.reset()
    return measure_case(case, device)


def measure(op: str, impl: str, shape: dict, device: str, warmup: bool = True, timeout: float = 900) -> dict:
    """Measure in a fresh process (what CPU needs: peak RSS is per process). On CUDA the harness
    calls ``measure_case`` on the case it has already built and timed."""
    spec = json.dumps(dict(op=op, impl=impl, shape=shape, device=device, warmup=warmup))
    p = subprocess.run(
        [sys.executable, "-m", "bench.memory", spec],
        capture_output=True, text=True, timeout=timeout,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        return dict(error=(p.stderr or p.stdout)[-800:])
    return json.loads(lines[-1])


if __name__ == "__main__":
    a = json.loads(sys.argv[1])
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    print(json.dumps(measure_here(a["op"], a["impl"], a["shape"], a["device"], a.get("warmup", True))))
