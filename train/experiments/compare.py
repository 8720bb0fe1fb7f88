"""``python -m train.experiments.compare``: APA, PPO and AWR on the same job, same seed and budget, on one figure.

Each algorithm runs as its own ``python -m train.run`` process (so each gets a fresh interpreter and
the same RNG stream), one after the other; extra flags are passed to every run, e.g.
``python -m train.experiments.compare --steps 100`` or ``python -m train.experiments.compare --model gptj`` (GPUs).
Outputs: ``OUT/<algo>/`` run directories and ``OUT/compare.png`` (reward and KL against steps, the form
of the paper's Figure 1), plus a short table on stdout.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ..metrics import plot_runs, read_metrics


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.experiments.compare", description=__doc__, allow_abbrev=False,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/compare", help="directory for the three runs and compare.png")
    ap.add_argument("--algos", default="apa,ppo,awr", help="comma-separated algorithms to run")
    ap.add_argument("--seed", type=int, default=0, help="the seed every run uses")
    ap.add_argument("--steps", type=int, default=250, help="iterations of every run (-1: the preset's)")
    args, rest = ap.parse_known_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = {}
    for algo in args.algos.split(","):
        t0 = time.time()
        shutil.rmtree(out / algo, ignore_errors=True)  # compare owns OUT/<algo>: a re-run starts afresh
        cmd = [sys.executable, "-m", "train.run", "--algo", algo, "--seed", str(args.seed), "--steps", str(args.steps),
               "--out", str(out / algo), "--no-plot", *rest]
        print(f"== {algo}: {' '.join(cmd[1:])}", flush=True)
        p = subprocess.run(cmd)
        if p.returncode != 0:
            print(f"error: the {algo} run failed (exit {p.returncode})", file=sys.stderr)
            return p.returncode
        runs[algo] = read_metrics(out / algo / "metrics.jsonl")
        print(f"== {algo} done in {time.time() - t0:.0f}s", flush=True)
    plot_runs(runs, out / "compare.png", title="APA vs PPO vs AWR (same seed and budget)")
    print(f"{'algo':6s} {'reward first10':>14s} {'reward last10':>13s} {'KL k1':>7s} {'sqrt k3':>8s}  (KL: last step)")
    for algo, rows in runs.items():
        first, last = rows[:10], rows[-10:]
        print(f"{algo:6s} {sum(r['reward_mean'] for r in first) / len(first):14.3f} "
              f"{sum(r['reward_mean'] for r in last) / len(last):13.3f} {rows[-1]['kl']:7.3f} {rows[-1]['kl_sqrt_k3']:8.3f}")
    print(f"figure: {out / 'compare.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
