"""``python -m train.experiments.sweep``: the reward-KL frontier (Gao et al. 2022): gold reward reached against KL spent.

A grid of algorithms x values of each one's KL knob x seeds, on the offline task with the learned proxy
reward (``--reward-model offline-proxy``: trained on, over-optimisable) and the exact-sum checker as gold
(logged, never trained on). Each run is its own ``python -m train.run`` process with the same budget:
64 sequences sampled and 4 gradient steps (2 epochs x 2 minibatches of 32 sequences) per iteration.

A run is complete when its directory holds ``DONE``; a re-run of the sweep skips complete runs and
resumes interrupted ones from their latest checkpoint, so a killed sweep continues where it stopped.
Outputs in ``--out``: ``runs/<arm>-<knob><value>-s<seed>/`` (the runs), ``frontier.png``, ``curves.png``,
``results.json`` and ``results.md``.

A run's figures are means over its last 10% of iterations (``tail``): ``gold_reward`` (the checker's mean),
``proxy_reward`` (the proxy's mean score: logits, its own units) and ``kl`` (k1 per sequence, to the initial
policy). Across seeds: the mean and a 95% Student-t interval, mean +- t(0.975, n-1) * sd / sqrt(n).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ..metrics import read_metrics, smooth
from .jobs import run_jobs

# every arm: 64 sequences per iteration, minibatches of 32 sequences, 2 epochs (4 gradient steps)
GAE = ("--batch-size", "64", "--minibatch-size", "32", "--epochs", "2")
GROUP = ("--samples-per-prompt", "4", "--batch-size", "16", "--minibatch-size", "8", "--epochs", "2")


@dataclass(frozen=True)
class Arm:
    """One line of the frontier: an algorithm, the train.run flag that is its KL knob, and that knob's values."""

    label: str
    flags: tuple[str, ...]
    knob: str  # a train.run flag without its dashes, e.g. "lam"
    values: tuple[float, ...]
    default: float  # the value drawn in curves.png
    lr: float  # chosen by the learning-rate search (docs/experiments.md: "The reward-KL frontier")


# Knob values, the same rule for every arm: its usual default (the APA paper's lambda, PPO's usual beta, GRPO's
# DeepSeekMath beta, AWR's own lambda) and 3x, 10x, 30x more regularisation, toward the initial policy; where an
# arm's best gold reward sat at an end of that range, one more 3x step beyond it (PPO: beta 3; AWR: lambda 0.3). The
# learning rates are the winners of `--search-lr 3e-5,1e-4,3e-4,1e-3`: 1e-4 for every arm (docs/experiments.md: "The
# reward-KL frontier").
ARMS: dict[str, Arm] = {
    "apa": Arm("APA (GAE, critic)", ("--algo", "apa", *GAE), "lam", (0.1, 0.3, 1.0, 3.0), 0.1, 1e-4),
    "apa-group": Arm("APA (group, no critic)", ("--algo", "apa", "--advantage", "group", *GROUP), "lam",
                     (0.1, 0.3, 1.0, 3.0), 0.1, 1e-4),
    "ppo": Arm("PPO (fixed beta)", ("--algo", "ppo", "--kl-target", "0", *GAE), "kl_init",
               (0.03, 0.1, 0.3, 1.0, 3.0), 0.03, 1e-4),
    "grpo": Arm("GRPO", ("--algo", "grpo", *GROUP), "kl_loss_coef", (0.04, 0.12, 0.4, 1.2), 0.04, 1e-4),
    "awr": Arm("AWR", ("--algo", "awr", *GAE), "lam", (0.3, 1.0, 3.0, 10.0, 30.0), 1.0, 1e-4),
}
QUICK = dict(arms="apa,apa-group,ppo,grpo", seeds="0,1", steps=150, values=2)
FULL = dict(arms=",".join(ARMS), seeds="0,1,2", steps=200, values=0)

# two-sided 95% Student-t quantiles t(0.975, df) for df = 1..30; beyond, the normal's 1.96
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def mean_ci(xs: list[float]) -> dict:
    """Mean and the half-width of its 95% Student-t interval (0 for one value)."""
    n = len(xs)
    m = sum(xs) / n
    if n < 2:
        return {"mean": m, "ci95": 0.0, "n": n}
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    t = _T975[n - 2] if n - 1 <= len(_T975) else 1.96
    return {"mean": m, "ci95": t * sd / math.sqrt(n), "n": n}


def run_name(arm: str, knob: str, value: float, seed: int) -> str:
    return f"{arm}-{knob}{value:g}-s{seed}"


def run_summary(run_dir: Path, tail: float = 0.1) -> dict:
    """A run's final figures: means of gold reward, proxy reward and KL over its last ``tail`` of iterations."""
    rows = read_metrics(run_dir / "metrics.jsonl")
    k = max(1, int(round(len(rows) * tail)))
    last = rows[-k:]

    def avg(key: str) -> float:
        vals = [r[key] for r in last if key in r and math.isfinite(r[key])]
        return sum(vals) / len(vals) if vals else math.nan

    return {"gold_reward": avg("gold_reward_mean"), "proxy_reward": avg("reward_mean"), "kl": avg("kl"),
            "kl_sqrt_k3": avg("kl_sqrt_k3"), "steps": rows[-1]["step"] if rows else 0, "tail_iterations": k,
            "gold_reward_first": rows[0].get("gold_reward_mean", math.nan) if rows else math.nan}


def aggregate(runs: list[dict]) -> list[dict]:
    """One row per (algo, value): mean and 95% interval over seeds of gold reward, proxy reward and KL."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["algo"], r["knob"], r["value"]), []).append(r)
    out = []
    for (algo, knob, value), rs in sorted(groups.items(), key=lambda kv: (list(ARMS).index(kv[0][0])
                                                                        if kv[0][0] in ARMS else 99, kv[0])):
        out.append({"algo": algo, "knob": knob, "value": value, "seeds": sorted(r["seed"] for r in rs),
                    **{k: mean_ci([r[k] for r in rs]) for k in ("gold_reward", "proxy_reward", "kl")}})
    return out


def at_kl(agg: list[dict], algo: str, kl: float) -> dict | None:
    """Gold reward (mean, and the interval's bounds) of ``algo`` at KL ``kl``, linearly interpolated between the
    two knob settings whose mean KLs bracket it; None outside the KL range the knob covered."""
    pts = sorted((a["kl"]["mean"], a["gold_reward"]) for a in agg if a["algo"] == algo and math.isfinite(a["kl"]["mean"]))
    for (k0, g0), (k1, g1) in zip(pts, pts[1:]):
        if k0 <= kl <= k1:
            w = 0.0 if k1 == k0 else (kl - k0) / (k1 - k0)
            lerp = lambda a, b: a + w * (b - a)  # noqa: E731
            return {"mean": lerp(g0["mean"], g1["mean"]), "ci95": lerp(g0["ci95"], g1["ci95"])}
    if len(pts) == 1 and pts[0][0] == kl:
        return dict(pts[0][1])
    return None


KL_LEVELS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)


def matched_kl_levels(agg: list[dict]) -> list[float]:
    """The levels of ``KL_LEVELS`` inside the KL range of at least two algorithms (where a comparison exists)."""
    ranges: dict[str, tuple[float, float]] = {}
    for a in agg:
        if math.isfinite(a["kl"]["mean"]):
            lo, hi = ranges.get(a["algo"], (math.inf, -math.inf))
            ranges[a["algo"]] = (min(lo, a["kl"]["mean"]), max(hi, a["kl"]["mean"]))
    return [kl for kl in KL_LEVELS if sum(lo <= kl <= hi for lo, hi in ranges.values()) >= 2]


def results_md(agg: list[dict], levels: list[float]) -> str:
    f = lambda s: f"{s['mean']:.3f} ± {s['ci95']:.3f}"  # noqa: E731
    lines = ["| algorithm | knob | value | seeds | gold reward | proxy reward | KL (k1) |", "|---|---|---|---|---|---|---|"]
    for a in agg:
        lines.append(f"| {a['algo']} | {a['knob']} | {a['value']:g} | {len(a['seeds'])} | {f(a['gold_reward'])} | "
                     f"{f(a['proxy_reward'])} | {f(a['kl'])} |")
    algos = list(dict.fromkeys(a["algo"] for a in agg))
    lines += ["", "Gold reward at matched KL (linear interpolation between knob settings; — outside an algorithm's "
              "range):", "", "| KL | " + " | ".join(algos) + " |", "|---|" + "---|" * len(algos)]
    for kl in levels:
        cells = [at_kl(agg, algo, kl) for algo in algos]
        lines.append(f"| {kl:g} | " + " | ".join("—" if c is None else f(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def plot_frontier(agg: list[dict], png: Path, initial: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    for algo in dict.fromkeys(a["algo"] for a in agg):
        # joined along the knob (for most arms also the order of KL; AWR's lambda does not bound its KL)
        pts = sorted(((a["kl"], a["gold_reward"], a["value"]) for a in agg if a["algo"] == algo), key=lambda p: p[2])
        pts = [p for p in pts if math.isfinite(p[0]["mean"])]
        x, y = [p[0]["mean"] for p in pts], [p[1]["mean"] for p in pts]
        bars = ax.errorbar(x, y, xerr=[p[0]["ci95"] for p in pts], yerr=[p[1]["ci95"] for p in pts], marker="o",
                           capsize=3, label=ARMS[algo].label if algo in ARMS else algo)
        for (xi, yi), p in zip(zip(x, y), pts):
            ax.annotate(f"{p[2]:g}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7,
                        color=bars[0].get_color())
    if initial is not None:
        ax.axhline(initial["mean"], color="gray", ls="--", lw=1)
        ax.annotate(f"initial policy: {initial['mean']:.3f}", (1, initial["mean"]), xycoords=("axes fraction", "data"),
                    textcoords="offset points", xytext=(-90, 3), fontsize=7, color="gray")
    ax.set_xlabel("KL to the initial policy (k1 per sequence, last 10% of iterations)")
    ax.set_ylabel("gold reward (exact sum; last 10%)")
    ax.set_title("reward-KL frontier: mean and 95% interval over seeds\n(labels: each algorithm's KL knob)",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def plot_curves(curves: dict[str, list[list[dict]]], png: Path) -> None:
    """Gold reward, proxy reward and KL against steps at each algorithm's default knob: each seed's 10-iteration
    running mean, then their mean and 95% band over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("gold_reward_mean", "gold reward (exact sum)"), ("reward_mean", "proxy reward (trained on)"),
            ("kl", "KL to the initial policy (k1)")]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for algo, seeds in curves.items():
        n = min(len(rows) for rows in seeds)
        steps = [r["step"] for r in seeds[0][:n]]
        for ax, (key, title) in zip(axes, keys):
            per_seed = [smooth([r.get(key, math.nan) for r in rows[:n]], 10) for rows in seeds]  # noisy batch means
            stats = [mean_ci([y[i] for y in per_seed]) for i in range(n)]
            (line,) = ax.plot(steps, [s["mean"] for s in stats], label=ARMS[algo].label if algo in ARMS else algo)
            ax.fill_between(steps, [s["mean"] - s["ci95"] for s in stats], [s["mean"] + s["ci95"] for s in stats],
                            color=line.get_color(), alpha=0.15)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("iteration")
            ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("each algorithm at its default knob: mean over seeds of each seed's 10-iteration running mean, "
                 "with its 95% interval", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def run_cmd(arm: Arm, value: float, seed: int, steps: int, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "train.run", *arm.flags, f"--{arm.knob.replace('_', '-')}", f"{value:g}",
           "--lr", f"{arm.lr:g}", "--lr-schedule", "constant",  # as the learning-rate search and the figures ran
           "--seed", str(seed), "--steps", str(steps), "--reward-model", "offline-proxy",
           "--no-plot", "--no-export", "--no-progress", "--no-tensorboard", "--eval-every", "0", *extra]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.experiments.sweep", description=__doc__, allow_abbrev=False,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/sweep", help="sweep directory (runs, figures, results)")
    ap.add_argument("--quick", action="store_true", help=f"a reduced grid: {QUICK}")
    ap.add_argument("--arms", default=None, help=f"comma-separated, of {list(ARMS)}")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds")
    ap.add_argument("--steps", type=int, default=None, help="iterations per run")
    ap.add_argument("--values", type=int, default=None,
                    help="knob values per arm: 0 all, k the k around each arm's default")
    ap.add_argument("--jobs", type=int, default=max(1, os.cpu_count() or 1),
                    help="runs at once (each a 1-thread process)")
    ap.add_argument("--report-only", action="store_true", help="only aggregate the complete runs in --out")
    ap.add_argument("--search-lr", default="", metavar="LRS",
                    help="instead of the frontier: run each arm at its default knob with each of these comma-separated "
                         "learning rates (seed 100, not a frontier seed) and report the gold reward of each; the arms' "
                         "lr values come from this search (docs/experiments.md)")
    args, extra = ap.parse_known_args(argv)
    preset = QUICK if args.quick else FULL
    arms = (args.arms or preset["arms"]).split(",")
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        print(f"error: --arms: unknown {unknown}; choose from {list(ARMS)}", file=sys.stderr)
        return 2
    try:
        seeds = [int(s) for s in (args.seeds or preset["seeds"]).split(",")]
    except ValueError:
        print(f"error: --seeds must be comma-separated integers, got {args.seeds!r}", file=sys.stderr)
        return 2
    steps = args.steps or preset["steps"]
    nvals = preset["values"] if args.values is None else args.values
    if steps < 10 or args.jobs < 1 or nvals < 0:
        print("error: --steps must be >= 10, --jobs >= 1, --values >= 0", file=sys.stderr)
        return 2
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)

    if args.search_lr:
        return search_lr(arms, [float(x) for x in args.search_lr.split(",")], steps, out, args.jobs, extra)
    grid = []
    for name in arms:
        arm = ARMS[name]
        vals = list(arm.values)
        if nvals:
            i = vals.index(arm.default)
            vals = vals[max(0, min(i - (nvals - 1) // 2, len(vals) - nvals)):][:nvals]
        grid += [(arm, v, s, run_name(name, arm.knob, v, s)) for v in vals for s in seeds]
    todo = [g for g in grid if not (out / "runs" / g[3] / "DONE").exists()]
    print(f"sweep: {len(grid)} runs ({len(grid) - len(todo)} complete), {steps} iterations each, {args.jobs} at once; "
          f"out {out}", flush=True)
    failed = [] if args.report_only else _run_all(todo, steps, out, args.jobs, extra)

    runs = []
    for arm, v, s, name in grid:
        d = out / "runs" / name
        if (d / "DONE").exists():
            key = next(k for k, a in ARMS.items() if a is arm)
            runs.append({"algo": key, "train_algo": arm.flags[1], "knob": arm.knob, "value": v, "seed": s,
                         "lr": arm.lr, "dir": str(d.relative_to(out)), **run_summary(d)})
    if not runs:
        print("error: no complete runs to report", file=sys.stderr)
        return 1
    report(runs, out, {"steps": steps, "seeds": seeds, "arms": {a: ARMS[a].__dict__ for a in arms}, "extra": extra})
    if failed:
        print(f"error: {len(failed)} run(s) failed: {', '.join(failed)} (logs: {out}/runs/<run>/log.txt); "
              f"re-run the same command to retry them", file=sys.stderr)
        return 1
    return 0


def search_lr(arms: list[str], lrs: list[float], steps: int, out: Path, jobs: int, extra: list[str]) -> int:
    """Each arm at its default knob with each learning rate, one seed (100): the same search for every arm."""
    from dataclasses import replace

    grid = [(replace(ARMS[a], lr=lr), ARMS[a].default, 100, f"{a}-lr{lr:g}") for a in arms for lr in lrs]
    print(f"learning-rate search: {len(grid)} runs, {steps} iterations each; out {out}", flush=True)
    failed = _run_all([g for g in grid if not (out / "runs" / g[3] / "DONE").exists()], steps, out, jobs, extra)
    rows = []
    for arm, v, s, name in grid:
        if (out / "runs" / name / "DONE").exists():
            rows.append({"algo": name.rsplit("-lr", 1)[0], "lr": arm.lr, "knob": arm.knob, "value": v, "seed": s,
                         **run_summary(out / "runs" / name)})
    best = {}
    for r in rows:
        if r["algo"] not in best or r["gold_reward"] > best[r["algo"]]["gold_reward"]:
            best[r["algo"]] = r
    (out / "lr_search.json").write_text(json.dumps({"runs": rows, "best": best, "steps": steps}, indent=1))
    lines = ["| algorithm | knob | lr | gold reward | proxy reward | KL (k1) | chosen |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['algo']} | {r['knob']} {r['value']:g} | {r['lr']:g} | {r['gold_reward']:.3f} | "
                     f"{r['proxy_reward']:.3f} | {r['kl']:.3f} | {'yes' if best[r['algo']] is r else ''} |")
    (out / "lr_search.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return 1 if failed else 0


def _run_all(todo: list[tuple], steps: int, out: Path, jobs: int, extra: list[str]) -> list[str]:
    """Run the ``todo`` grid points ``(arm, knob value, seed, name)``, ``jobs`` at once; each marks itself
    ``DONE`` once it exits cleanly."""
    if todo:  # the warm-up and the proxy once, here, rather than raced for by the first runs
        from ..tasks.offline import proxy_reward_model

        cache = extra[extra.index("--cache-dir") + 1] if "--cache-dir" in extra[:-1] else None
        proxy_reward_model(cache, log=lambda s: print(s, flush=True))
    return run_jobs([(out / "runs" / name, run_cmd(arm, v, s, steps, extra))
                     for arm, v, s, name in todo], jobs)


def report(runs: list[dict], out: Path, settings: dict) -> None:
    """results.json, results.md, frontier.png and curves.png from the complete runs."""
    agg = aggregate(runs)
    # the initial policy's gold reward: every run's first iteration (sampled before any update)
    initial = mean_ci([r["gold_reward_first"] for r in runs])
    levels = matched_kl_levels(agg)
    matched = {f"{kl:g}": {a: at_kl(agg, a, kl) for a in dict.fromkeys(r["algo"] for r in runs)} for kl in levels}
    (out / "results.json").write_text(json.dumps({"runs": runs, "aggregates": agg, "matched_kl": matched,
                                                  "initial_gold_reward": initial, "settings": settings},
                                                 indent=1, default=str))
    md = results_md(agg, levels) + (f"\nThe initial policy's gold reward (the first iteration of every run): "
                                    f"{initial['mean']:.3f} ± {initial['ci95']:.3f}.\n")
    (out / "results.md").write_text(md)
    plot_frontier(agg, out / "frontier.png", initial)
    curves = {}
    for r in runs:
        if r["value"] == ARMS[r["algo"]].default:
            curves.setdefault(r["algo"], []).append(read_metrics(out / r["dir"] / "metrics.jsonl"))
    if curves:
        plot_curves(curves, out / "curves.png")
    print(md + f"figures: {out / 'frontier.png'}, {out / 'curves.png'}; {out / 'results.json'}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
