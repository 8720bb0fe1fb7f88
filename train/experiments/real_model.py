"""``python -m train.experiments.real_model``: SmolLM2-135M-Instruct (LoRA) on the chat-sums task, one budget, several
methods and seeds; held-out accuracy before and after, KL to the initial policy, entropy, tokens/s, peak RSS.

    python -m train.experiments.real_model --search-lr 5e-5,1e-4,2e-4 --seeds 100    # the learning-rate search
    python -m train.experiments.real_model --lr 1e-4,apa-gae=2e-4,ppo=2e-4 --seeds 0,1,2   # each at its searched lr

Every run is the README's command (``BASE``, ``--algo apa --advantage group --critic none``) with the method's flags;
each is its own ``python -m train.run`` process (``train/experiments/jobs.py``), resumable, marked ``DONE`` when
complete. The same budget for all: ``--steps`` iterations of 4 prompts x 4 samples.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from ..metrics import read_metrics
from ..tasks import chat_sums
from .jobs import run_jobs

BASE = ["--model", "smollm2-135m-instruct", *chat_sums.flags(), "--eval-dataset", str(chat_sums.EVAL_FILE),
        "--lora-rank", "8", "--samples-per-prompt", "4", "--batch-size", "4", "--minibatch-size", "4", "--epochs", "1",
        "--temperature", "0.7", "--max-new-tokens", "8", "--eval-k", "4", "--lr-schedule", "constant"]
METHODS = {
    "apa-group": ["--algo", "apa", "--advantage", "group", "--critic", "none"],  # critic-free APA
    "apa-gae": ["--algo", "apa", "--advantage", "gae", "--critic", "shared"],  # the paper's: GAE, a value head
    "grpo": ["--algo", "grpo", "--advantage", "group", "--critic", "none"],
    "ppo": ["--algo", "ppo", "--advantage", "gae", "--critic", "shared"],
}


def summary(run_dir: Path) -> dict:
    """A finished run's figures: held-out accuracy of the initial and the final policy (greedy and sampled), KL (k1) and
    entropy over the last quarter of iterations, median tokens/s and the peak RSS."""
    rows = read_metrics(run_dir / "metrics.jsonl")
    last = rows[-max(1, len(rows) // 4) :]
    mean = lambda k: statistics.fmean(r[k] for r in last) if k in last[0] else float("nan")  # noqa: E731
    acc = [r for r in rows if "eval_accuracy" in r][-1]
    return {"acc_initial": rows[0]["eval_accuracy_initial"], "acc": acc["eval_accuracy"],
            "acc_sampled_initial": rows[0]["eval_accuracy_sampled_initial"], "acc_sampled": acc["eval_accuracy_sampled"],
            "kl": mean("kl"), "entropy": mean("entropy"), "reward_last": mean("reward_mean"),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows[1:] or rows),
            "peak_rss_gb": max(r.get("max_rss_gb", 0.0) for r in rows), "steps": len(rows)}


def table(results: list[dict]) -> str:
    """Mean (min-max over seeds) of each figure per method and learning rate."""
    keys = [("acc_initial", "greedy acc. before"), ("acc", "greedy acc. after"), ("acc_sampled", "sampled acc. after"),
            ("kl", "KL (k1)"), ("entropy", "entropy"), ("tokens_per_s", "tokens/s"), ("peak_rss_gb", "peak RSS GB")]
    lines = ["| method | lr | seeds | " + " | ".join(h for _, h in keys) + " |", "|---|---|---|" + "---|" * len(keys)]
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["method"], r["lr"]), []).append(r)
    for (method, lr), rs in sorted(groups.items()):
        cells = []
        for k, _ in keys:
            xs = [r[k] for r in rs]
            cells.append(f"{statistics.fmean(xs):.3f}" + (f" ({min(xs):.3f}-{max(xs):.3f})" if len(xs) > 1 else ""))
        lines.append(f"| {method} | {lr:g} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], png: Path) -> None:
    """Held-out greedy accuracy before and after, per method (one point per seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({r["method"] for r in results})
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, m in enumerate(methods):
        rs = [r for r in results if r["method"] == m]
        for r in rs:
            ax.plot([i - 0.15, i + 0.15], [r["acc_initial"], r["acc"]], "o-", color=f"C{i}", alpha=0.7)
    ax.set_xticks(range(len(methods)), methods)
    ax.set_ylabel("held-out greedy accuracy")
    ax.set_title("before -> after, one line per seed")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def method_lrs(spec: str, methods: list[str]) -> dict[str, list[float]]:
    """``1e-4`` (every method) or ``1e-4,apa-gae=2e-4`` (a default, then per-method values) -> {method: [lr]}."""
    default, per = None, {}
    for item in spec.split(","):
        name, _, value = item.rpartition("=")
        if name and name not in METHODS:
            raise ValueError(f"unknown method {name!r}; choose from {list(METHODS)}")
        if name:
            per[name] = float(value)
        else:
            default = float(value)
    if missing := [m for m in methods if m not in per and default is None]:
        raise ValueError(f"no learning rate for {missing}: give a default (e.g. 1e-4,apa-gae=2e-4)")
    return {m: [per.get(m, default)] for m in methods}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.experiments.real_model", description=__doc__, allow_abbrev=False,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/real-model", help="experiment directory (runs, results)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {list(METHODS)}")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    ap.add_argument("--steps", type=int, default=30, help="iterations per run (the budget)")
    ap.add_argument("--lr", default="1e-4", help="learning rate of every method, or per method: "
                                                 "1e-4,apa-gae=2e-4 (the searched ones)")
    ap.add_argument("--search-lr", default="", metavar="LRS", help="comma-separated learning rates, each run per method")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once (each a 1-thread process)")
    ap.add_argument("--report-only", action="store_true", help="only aggregate the runs of the grid that are DONE")
    args, extra = ap.parse_known_args(argv)
    methods = args.methods.split(",")
    if unknown := [m for m in methods if m not in METHODS]:
        print(f"error: --methods: unknown {unknown}; choose from {list(METHODS)}", file=sys.stderr)
        return 2
    try:
        grid_lrs = [float(x) for x in args.search_lr.split(",")] if args.search_lr else None
        lrs = {m: grid_lrs for m in methods} if grid_lrs else method_lrs(args.lr, methods)
    except ValueError as e:
        print(f"error: {'--search-lr' if args.search_lr else '--lr'}: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    grid = [(m, lr, int(s)) for m in methods for lr in lrs[m] for s in args.seeds.split(",")]
    todo = [(out / "runs" / f"{m}-lr{lr:g}-s{s}",
             [sys.executable, "-m", "train.run", *BASE, *METHODS[m], "--lr", f"{lr:g}", "--seed", str(s),
              "--steps", str(args.steps), "--eval-every", str(args.steps), "--threads", "1", "--no-progress",
              "--no-export", "--no-tensorboard", "--no-plot", *extra]) for m, lr, s in grid]
    failed = [] if args.report_only else run_jobs(todo, args.jobs)
    results = [{"method": m, "lr": lr, "seed": s, **summary(d)}
               for (m, lr, s), (d, _) in zip(grid, todo) if (d / "DONE").exists()]
    (out / "results.json").write_text(json.dumps({"argv": argv or sys.argv[1:], "results": results}, indent=1))
    md = table(results)
    (out / "results.md").write_text(md)
    if results:
        plot(results, out / "accuracy.png")
    print(md, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
