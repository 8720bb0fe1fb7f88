"""Trainer-level figure: tokens/s and peak memory of APA training iterations, fused vs eager.

Runs ``python -m train.run`` (the offline default preset unless ``--model`` is given) once per
kernel path, each in its own process: ``--kernel-backend auto`` (apa_fast: triton on CUDA, the
chunked torch backend on CPU), ``--kernel-backend torch``, and ``--kernel-backend eager`` (lm_head
logits + ``log_softmax``, as trainers write it). Reports the median ``tokens_per_s`` the trainer logs
per iteration (the first iteration, which warms up, is left out when there are more), and the peak
memory: ``max_mem_gb`` from the trainer on CUDA, the process's peak RSS (``wait4``) on CPU.

``python -m bench.trainer [--steps 3] [--model offline]`` prints the table; ``bench.run``
appends it to the benchmark's Markdown (``--no-trainer`` leaves it out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATHS = ("auto", "torch", "eager")


def run_one(backend: str, steps: int, extra: list[str], timeout: float = 900) -> dict:
    out = tempfile.mkdtemp(prefix=f"apa-bench-train-{backend}-")
    cmd = [sys.executable, "-m", "train.run", "--kernel-backend", backend, "--steps", str(steps), "--out", out,
           "--no-progress", "--no-plot", "--no-export", "--no-tensorboard", "--eval-every", "0", *extra]
    log_path = os.path.join(out, "stdout.log")
    with open(log_path, "w") as logf:
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=logf, stderr=subprocess.STDOUT)
        try:
            _, status, ru = os.wait4(p.pid, 0)
        except ChildProcessError:
            p.wait(timeout)
            status, ru = p.returncode, None
    code = os.waitstatus_to_exitcode(status) if isinstance(status, int) and ru is not None else status
    res: dict = dict(backend=backend, command=" ".join(cmd[1:]), returncode=code, out=out)
    mpath = os.path.join(out, "metrics.jsonl")
    if code != 0 or not os.path.exists(mpath):
        with open(log_path) as f:
            res["error"] = f.read()[-1500:]
        return res
    with open(mpath) as f:
        rows = [json.loads(ln) for ln in f if ln.strip()]
    steady = rows[1:] if len(rows) > 1 else rows
    res["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in steady)
    res["iter_s"] = statistics.median(r["iter_s"] for r in steady)
    res["iterations"] = len(rows)
    res["response_tokens"] = rows[-1].get("response_tokens")
    if "max_mem_gb" in rows[-1]:
        res["peak_mem_mib"] = max(r["max_mem_gb"] for r in rows) * 1024
        res["mem_method"] = "torch.cuda.max_memory_allocated"
    elif ru is not None:
        res["peak_mem_mib"] = ru.ru_maxrss / 1024  # Linux: KiB
        res["mem_method"] = "peak RSS of the trainer process"
    return res


def figure(device: str, quick: bool = True, steps: int | None = None, extra: list[str] | None = None) -> str:
    """Markdown for the benchmark report (a note saying what is missing when the trainer cannot run)."""
    try:
        import train.run  # noqa: F401
    except Exception as e:  # the trainer is optional for the kernel benchmarks
        return f"Trainer-level figure: not available (`train.run` does not import: {type(e).__name__}: {e})."
    steps = steps or (3 if quick else 6)
    extra = list(extra or [])
    results = [run_one(b, steps, extra) for b in PATHS]
    model = "offline default" if "--model" not in extra else extra[extra.index("--model") + 1]
    lines = [f"Trainer-level figure (`python -m train.run --steps {steps}` on the {model} preset, {device}; "
             f"median over iterations 2..{steps}):", "",
             "| --kernel-backend | tokens/s | s / iteration | peak memory MiB | vs eager tokens/s |", "|---|---:|---:|---:|---:|"]
    eager = next((r for r in results if r["backend"] == "eager" and "tokens_per_s" in r), None)
    for r in results:
        if "tokens_per_s" not in r:
            lines.append(f"| {r['backend']} | failed: {r.get('error', '')[-200:].strip().splitlines()[-1:] } | | | |")
            continue
        rel = f"{r['tokens_per_s'] / eager['tokens_per_s']:.2f}x" if eager else ""
        lines.append(f"| {r['backend']} | {r['tokens_per_s']:,.1f} | {r['iter_s']:.2f} | "
                     f"{r.get('peak_mem_mib', float('nan')):,.0f} | {rel} |")
    method = next((r.get("mem_method") for r in results if r.get("mem_method")), "")
    lines += ["", f"Peak memory: {method} (whole process: models, optimizer, rollout and update)."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default=None)
    a, extra = ap.parse_known_args(argv)
    import torch

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(figure(device, steps=a.steps, extra=extra))
    return 0


if __name__ == "__main__":
    sys.exit(main())
