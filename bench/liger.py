"""Fused GRPO and APA losses from hidden states against Liger-Kernel's ``LigerFusedLinearGRPOLoss`` and eager PyTorch.

    python -m bench.liger [--grid 2048x768x50400,...] [--masked both|yes|no] [--rounds R] [--chunks 1,2,4,8]
                          [--sweep 2048x768x50400,...] [--no-compiled] [--eager-limit-gib 8] [--threads T] [--quick]

The cases are ``bench.cases``' ``linear_grpo_loss`` (fp32, forward + backward, B sequences of 256 tokens, the last
56 of each masked or none, on-policy GRPO with beta = 0.04 and clip 0.2; Liger's ``loss_type="dapo"``). Per shape,
every implementation is built on the same inputs and timed in interleaved rounds (the order rotated each round);
the figure is the median over rounds. Liger's chunk size (sequences per chunk) is swept, compiled and not, on the
``--sweep`` shapes; the other shapes run Liger at the chunk size that was fastest on the swept shape with the same
V (else the fastest overall). Peak extra memory is read on the last round in this process: the heap trimmed
(``malloc_trim``), the kernel's peak-RSS counter reset, one step, VmHWM - VmRSS before - the gradients returned.
The floor is ``6 N_valid H V`` FLOP (logits, then the gradients of hidden and weight, unmasked rows only) over the
fp32 matmul rate measured at the shape's H just before and after its rounds (``bench.machine.matmul_gflops``).

Writes ``bench/results/liger-<stamp>.json`` and ``.md`` (rewritten after every shape: a stopped run keeps
what it measured).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.metadata as md
import json
import os
import statistics
import sys
import time

import torch

from . import cases, machine
from .memory import _reset_peak_rss, _status_kb

OP = "linear_grpo_loss"
OURS, OURS_APA = "apa_fast[torch]", "apa_fast[torch]:apa"
GRID = [(n, h, v) for n in (2048, 8192) for h in (768, 2048) for v in (50400, 151936, 262144)]


def parse_shapes(text: str, what: str) -> list[tuple[int, int, int, str | None]]:
    """``"2048x768x50400,8192x768x50400/m"`` -> [(N, H, V, masks), ...]; the suffix /m (masked only) or /u
    (unmasked only) overrides --masked for that shape."""
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        dims, _, m = part.lower().partition("/")
        try:
            n, h, v = (int(x) for x in dims.split("x"))
        except ValueError:
            raise SystemExit(f"error: {what} must list NxHxV[/m|/u] shapes (e.g. 2048x768x50400/m), "
                             f"got {part!r}") from None
        if n <= 0 or h <= 0 or v <= 0 or n % cases.GRPO_T or m not in ("", "m", "u"):
            raise SystemExit(f"error: {what}: N, H, V must be positive, N a multiple of {cases.GRPO_T}, the suffix "
                             f"/m or /u; got {part!r}")
        out.append((n, h, v, m or None))
    return out


def parse_long(text: str) -> list[tuple[float, int]]:
    """``"1e12:2,3e12:1"`` -> [(FLOP threshold, rounds), ...]: shapes past a threshold (6 N H V) get those rounds."""
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            f, r = part.split(":")
            out.append((float(f), int(r)))
        except ValueError:
            raise SystemExit(f"error: --long must list FLOP:rounds pairs (e.g. 1e12:2,3e12:1), got {part!r}") from None
    return sorted(out)


def eager_bytes(N: int, V: int) -> int:
    """Eager's peak extra memory, estimated as three N x V fp32 buffers (logits, log_softmax, a gradient at a time;
    measured 2.5 at N=2048, V=50,400)."""
    return 3 * N * V * 4


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def run_shape(shape: dict, impls: list[str], rounds: int, log) -> dict[str, dict]:
    """Time ``impls`` on one shape in ``rounds`` interleaved rounds; memory on the last. {impl: result}."""
    built, res = {}, {}
    for impl in impls:
        why = cases.unavailable(OP, impl, "cpu")
        if why:
            res[impl] = {"skipped": why}
            continue
        built[impl] = cases.build(OP, impl, shape, "cpu")
        if impl.startswith("liger-compiled"):  # the first call compiles: not timed
            t0 = time.perf_counter()
            built[impl].step()
            built[impl].reset()
            res[impl] = {"compile_call_s": time.perf_counter() - t0, "times": []}
        else:
            res[impl] = {"times": []}
    names = list(built)
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for impl in order:
            case, last = built[impl], r == rounds - 1
            if last:
                _trim()
                before = _status_kb("VmRSS")
                if not _reset_peak_rss():
                    raise RuntimeError("cannot reset peak RSS (/proc/self/clear_refs)")
            t0 = time.perf_counter()
            case.step()
            dt = time.perf_counter() - t0
            if last:
                res[impl]["extra_bytes"] = _status_kb("VmHWM") - before - case.result_bytes
            case.reset()
            res[impl]["times"].append(dt)
            log(f"  {impl:22s} round {r + 1}/{rounds}: {dt:8.2f} s")
    for impl in names:
        t = res[impl]["times"]
        res[impl].update(median_s=statistics.median(t), min_s=min(t))
    del built
    _trim()
    return res


def summarize(shape: dict, res: dict, rate: float) -> dict:
    """The shape's figures: Liger's best (by median time), our ratios to it and to the floor."""
    n_valid = shape["N"] - (shape["N"] // cases.GRPO_T * cases.GRPO_MASKED_TAIL if shape["masked"] else 0)
    flop = 6.0 * n_valid * shape["H"] * shape["V"]
    floor_s = flop / (rate * 1e9)
    for r in res.values():
        if "median_s" in r:
            r.update(gflops=flop / r["median_s"] / 1e9, vs_floor=r["median_s"] / floor_s)
    liger = {k: v for k, v in res.items() if k.startswith("liger") and "median_s" in v}
    out = dict(shape=shape, label=cases.shape_label(shape), flop=flop, matmul_gflops=rate, floor_s=floor_s, impls=res)
    if liger:
        best = min(liger, key=lambda k: liger[k]["median_s"])
        out["liger_best"] = best
        lb = liger[best]
        for ours in (OURS, OURS_APA):
            o = res.get(ours, {})
            if "median_s" not in o:
                continue
            out[ours] = dict(
                time_vs_liger=o["median_s"] / lb["median_s"],
                time_vs_liger_runs=[a / b for a, b in zip(o["times"], lb["times"])],
                mem_vs_liger=(o["extra_bytes"] / lb["extra_bytes"]) if lb.get("extra_bytes") else None,
                mem_vs_liger_least=(o["extra_bytes"] / min(v["extra_bytes"] for v in liger.values()))
                if all(v.get("extra_bytes") for v in liger.values()) else None,
                vs_floor=o["vs_floor"],
            )
    return out


def _mib(b) -> str:
    return "n/a" if b is None else f"{b / 2**20:,.0f}"


def markdown(data: dict) -> str:
    m, v = data["machine"], data["versions"]
    lines = [
        "### Fused GRPO / APA losses from hidden states vs Liger-Kernel's LigerFusedLinearGRPOLoss (CPU, fp32)", "",
        f"Machine: {m['cpu']} ({m['cpu_count']} cores, {data['threads']} torch threads), shared with other jobs; "
        f"{m['date']}; load average at start {', '.join(f'{x:.2f}' for x in m['load_avg'] or [])}, at the end "
        f"{', '.join(f'{x:.2f}' for x in data.get('load_avg_end') or [])}. torch {v['torch']}, liger-kernel "
        f"{v['liger_kernel']}, apa-fast git {m['git']}.", "",
        f"Command: `{data['command']}` ({data.get('wall_s', 0) / 60:.1f} min). Medians over the interleaved "
        "rounds (per shape: " + ", ".join(f"{s['label']} {s.get('rounds', data['rounds'])}" for s in data["shapes"])
        + "); extra memory = peak RSS during one step - RSS before it - the gradients returned.", "",
        "| shape | implementation | median s | min s | GFLOP/s | x floor | extra MiB |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for s in data["shapes"]:
        rs = sorted(((k, r) for k, r in s["impls"].items() if "median_s" in r), key=lambda kv: kv[1]["median_s"])
        for k, r in rs:
            lines.append(f"| {s['label']} | {k} | {r['median_s']:.2f} | {r['min_s']:.2f} | {r['gflops']:.0f} | "
                         f"{r['vs_floor']:.2f} | {_mib(r.get('extra_bytes'))} |")
        for k, r in s["impls"].items():
            if "skipped" in r:
                lines.append(f"| {s['label']} | {k} | skipped: {r['skipped']} | | | | |")
        lines.append(f"| {s['label']} | *floor* (6 N_valid H V at {s['matmul_gflops']:.0f} GFLOP/s) | "
                     f"{s['floor_s']:.2f} | | | 1.00 | |")
    lines += ["", "| shape | ours | Liger's best | time / Liger's best (<= 1) | extra memory / Liger's best (<= 0.5) "
              "| time / floor (<= 1.15) |", "|---|---|---|---:|---:|---:|"]
    for s in data["shapes"]:
        for ours in (OURS, OURS_APA):
            t = s.get(ours)
            if not t:
                continue
            mem = "n/a" if t["mem_vs_liger"] is None else f"{t['mem_vs_liger']:.2f}"
            ok = lambda c: "met" if c else "NOT met"  # noqa: E731
            lines.append(
                f"| {s['label']} | {ours} | {s['liger_best']} | "
                f"{t['time_vs_liger']:.2f} ({ok(t['time_vs_liger'] <= 1)}) "
                f"| {mem} ({ok(t['mem_vs_liger'] is not None and t['mem_vs_liger'] <= 0.5)}) "
                f"| {t['vs_floor']:.2f} ({ok(t['vs_floor'] <= 1.15)}) |")
    if data.get("sweep"):
        lines += ["", "Liger's chunk size (sequences of 256 tokens per chunk), fastest on the swept shapes: "
                  + "; ".join(f"{k}: {v}" for k, v in data["sweep"].items()) + "."]
    if data.get("not_run"):
        lines += ["", "Not run: " + "; ".join(data["not_run"]) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", default=",".join(f"{n}x{h}x{v}" for n, h, v in GRID), help="NxHxV shapes")
    ap.add_argument("--masked", choices=["both", "yes", "no"], default="both",
                    help=f"the last {cases.GRPO_MASKED_TAIL} of every {cases.GRPO_T} positions masked, none, or both")
    ap.add_argument("--sweep", default="2048x768x50400",
                    help="shapes (NxHxV, masked) where Liger's chunk size is swept")
    ap.add_argument("--chunks", default="1,2,4,8", help="Liger chunk sizes (sequences per chunk) for the sweep")
    ap.add_argument("--no-compiled", action="store_true", help="skip Liger's compiled=True rows")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds per shape")
    ap.add_argument("--long", default="", help="fewer rounds for costly shapes: FLOP:rounds pairs on 6 N H V, "
                                                "e.g. 1e12:2,3e12:1")
    ap.add_argument("--eager-limit-gib", type=float, default=8.0,
                    help="skip eager where its estimated extra memory (4 N V fp32) passes this")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="N=2048 H=768 V=50,400, masked, one round")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    a = ap.parse_args(argv)
    if a.rounds < 1:
        raise SystemExit(f"error: --rounds must be >= 1, got {a.rounds}")
    chunks = sorted({int(c) for c in a.chunks.split(",") if c.strip()})
    if not chunks or min(chunks) < 1:
        raise SystemExit(f"error: --chunks must list positive integers, got {a.chunks!r}")
    if a.quick:
        a.grid, a.sweep, a.masked, a.rounds = "2048x768x50400", "2048x768x50400", "yes", 1
    grid, sweep, long = parse_shapes(a.grid, "--grid"), parse_shapes(a.sweep, "--sweep"), parse_long(a.long)
    if a.threads:
        torch.set_num_threads(a.threads)
    masks = {"both": (True, False), "yes": (True,), "no": (False,)}[a.masked]
    try:
        liger_version = md.version("liger-kernel")
    except md.PackageNotFoundError:
        liger_version = None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    os.makedirs(a.out, exist_ok=True)
    base = os.path.join(a.out, f"liger-{stamp}")
    cmd = "python -m bench.liger " + " ".join(argv if argv is not None else sys.argv[1:])
    data = dict(command=cmd.strip(), machine=machine.describe("cpu"), threads=torch.get_num_threads(),
                versions=dict(torch=torch.__version__, liger_kernel=liger_version), rounds=a.rounds,
                settings=dict(T=cases.GRPO_T, masked_tail=cases.GRPO_MASKED_TAIL, beta=cases.GRPO_BETA,
                              clip=cases.GRPO_CLIP, loss_type="dapo", on_policy=True, dtype="fp32"),
                shapes=[], sweep={}, not_run=[])
    t_start = time.time()

    def log(s: str) -> None:
        print(s, flush=True)

    def save() -> None:
        data["wall_s"] = time.time() - t_start
        data["load_avg_end"] = os.getloadavg()
        with open(base + ".json", "w") as f:
            json.dump(data, f, indent=1, default=str)
        with open(base + ".md", "w") as f:
            f.write(markdown(data))

    # lazy initialisation of every implementation at a tiny shape (not timed)
    tiny = dict(N=cases.GRPO_T, H=64, V=512, dtype="fp32", mode="fwd+bwd", masked=True)
    for impl in (OURS, OURS_APA, "liger[c=1]", "eager"):
        if not cases.unavailable(OP, impl, "cpu"):
            c = cases.build(OP, impl, tiny, "cpu")
            c.step()
            c.reset()
    best: dict[tuple, dict[bool, int]] = {}  # (N, H, V) swept -> {compiled: chunk}
    todo = [(s, True) for s in sweep] + [(s, False) for s in grid]
    done = set()
    for (n, h, v, only), swept in todo:
        rounds = a.rounds
        for flop, r in long:
            if 6.0 * n * h * v > flop:
                rounds = r
        for masked in ((True,) if swept else {"m": (True,), "u": (False,), None: masks}[only]):
            if (n, h, v, masked) in done:
                continue
            done.add((n, h, v, masked))
            shape = dict(N=n, H=h, V=v, dtype="fp32", mode="fwd+bwd", masked=masked)
            B = n // cases.GRPO_T
            kinds = [False] if a.no_compiled else [False, True]
            if swept:
                liger = [f"liger{'-compiled' if c else ''}[c={k}]" for c in kinds for k in chunks if k <= B]
            else:
                pick = best.get((n, h, v)) or next((b for (_, _, bv), b in best.items() if bv == v), None) or \
                    next(iter(best.values()), {False: min(4, B), True: min(4, B)})
                liger = [f"liger{'-compiled' if c else ''}[c={pick[c]}]" for c in kinds]
            impls = [OURS, OURS_APA, *liger]
            est = eager_bytes(n, v)
            if est <= a.eager_limit_gib * 2**30:
                impls.append("eager")
            log(f"[liger] {cases.shape_label(shape)}, {rounds} round(s): {', '.join(impls)}")
            rate0 = machine.matmul_gflops(h)
            res = run_shape(shape, impls, rounds, log)
            rate = (rate0 + machine.matmul_gflops(h)) / 2
            if "eager" not in impls:
                res["eager"] = {"skipped": f"its logits and their gradients, ~{est / 2**30:.1f} GiB estimated, pass "
                                           f"the {a.eager_limit_gib:g} GiB limit (--eager-limit-gib)"}
            s = summarize(shape, res, rate)
            s["rounds"] = rounds
            data["shapes"].append(s)
            if swept:
                for c in kinds:
                    cand = {k: r for k, r in res.items() if k.startswith("liger") and "median_s" in r
                            and cases.liger_config(k)[0] == c}
                    if cand:
                        k = min(cand, key=lambda k: cand[k]["median_s"])
                        best.setdefault((n, h, v), {})[c] = cases.liger_config(k)[1]
                        data["sweep"][f"{cases.shape_label(shape)} ({'compiled' if c else 'not compiled'})"] = \
                            f"c={cases.liger_config(k)[1]} (" + ", ".join(
                                f"c={cases.liger_config(kk)[1]} {rr['median_s']:.2f} s"
                                for kk, rr in cand.items()) + ")"
            for ours in (OURS, OURS_APA):
                if ours in s:
                    t = s[ours]
                    log(f"[liger]   {ours}: {t['time_vs_liger']:.2f}x the time of {s['liger_best']}, "
                        f"{t['mem_vs_liger'] or float('nan'):.2f}x its extra memory, {t['vs_floor']:.2f}x the floor")
            save()
    save()
    print(markdown(data))
    print(f"[liger] wrote {base}.json/.md in {data['wall_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
