"""Evaluation during a run (greedy samples, the sampler/trainer log-prob check) and the end-of-run summary."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .config import Config
from .dist import Dist
from .loading import Prompt
from .metrics import read_metrics
from .models import Models
from .rewards import call_reward
from .rollout import reward_name, rollout
from .stopping import agree


@torch.no_grad()
def logp_mismatch(m: Models, prompts: list[Prompt], cfg: Config, d: Dist) -> float:
    """Largest |log-prob the sampler used - log-prob the training forward computes| over the sampled tokens
    of a few prompts (all ranks): ~1e-6 in fp32; a head or position handled wrongly shows here at once. The
    sampling runs on a forked RNG, so the run's own random stream is untouched."""
    devices = [d.device] if d.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        ro = rollout(m, (prompts * d.world)[d.rank :: d.world] or prompts[:1], cfg, d, sampling_logprobs=True)
    b = ro.batch
    out = m.policy(b)
    lp = out.head.logprobs(out.hidden, b.response, b.mask)
    worst = torch.where(b.mask, (lp - ro.logp_sample).abs(), 0.0).max()
    return float(d.gather(worst.reshape(1)).max())


@torch.no_grad()
def evaluate(m: Models, prompts: list[Prompt], cfg: Config, d: Dist, out: Path, step: int, show) -> None:
    """Greedy completions of the evaluation prompts (printed and appended to samples.jsonl; a reward that is not a
    number is written as null). The reward is asked as in training (checked, at most ``--reward-timeout`` s)."""
    if not prompts:
        return
    per = math.ceil(len(prompts) / d.world)
    mine = (prompts * d.world)[d.rank * per : (d.rank + 1) * per] if d.world > 1 else prompts
    ro = rollout(m, mine, cfg, d, greedy=True)
    scores, err = None, None
    try:
        scores = call_reward(m.reward, ro.prompts, ro.completions, ro.messages, cfg.reward_timeout, reward_name(m.reward))
    except Exception as e:  # noqa: BLE001 - every rank stops here alike (agree), before the gather below
        err = e
    err = agree(d, err)
    if err is not None:
        raise err
    rows = list(zip(ro.prompts, ro.completions, scores))
    if d.world > 1:
        import torch.distributed as dist

        parts = [None] * d.world
        dist.all_gather_object(parts, rows)
        rows = [r for part in parts for r in part][: len(prompts)]
    if not d.main:
        return
    lines = [f"  {p!r} -> {c!r}  (reward {r:.3g})" for p, c, r in rows]
    show(f"step {step} samples (greedy):\n" + "\n".join(lines))
    with open(out / "samples.jsonl", "a") as f:
        for p, c, r in rows:
            r = r if math.isfinite(r) else None  # JSON has no NaN: null
            f.write(json.dumps({"step": step, "prompt": p, "completion": c, "reward": r}, allow_nan=False) + "\n")


@torch.no_grad()
def heldout_accuracy(m: Models, prompts: list[Prompt], cfg: Config, d: Dist) -> dict:
    """The evaluation reward (``--gold-reward``, else ``--reward-model``; an accuracy for a 0/1 checker) averaged over
    every held-out prompt: of the greedy completion (``eval_accuracy``) and of ``--eval-k`` completions sampled at the
    run's temperature (``eval_accuracy_sampled``). Prompts are dealt to ranks round-robin, each rank padded to the same
    count (FSDP needs the same forwards on all); the sampling runs on a forked RNG."""
    reward = m.gold or m.reward
    per = math.ceil(len(prompts) / d.world)
    mine = [(prompts[i], 1.0) if i < len(prompts) else (prompts[0], 0.0) for i in range(d.rank, per * d.world, d.world)]
    chunk = max(1, cfg.batch_size * cfg.samples_per_prompt // d.world)  # what a training rollout holds

    def mean_reward(items: list[tuple[Prompt, float]], greedy: bool) -> tuple[float, float]:
        total = n = 0.0
        for i in range(0, len(items), chunk):
            part = items[i : i + chunk]
            ro = rollout(m, [p for p, _ in part], cfg, d, greedy=greedy)
            for (_, w), r in zip(part, reward(ro.prompts, ro.completions, ro.messages)):
                total, n = total + w * (r if math.isfinite(r) else 0.0), n + w
        return total, n

    devices = [d.device] if d.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        g_sum, g_n = mean_reward(mine, greedy=True)
        s_sum, s_n = mean_reward([it for it in mine for _ in range(cfg.eval_k)], greedy=False)
    g_sum, g_n, s_sum, s_n = d.sum(g_sum, g_n, s_sum, s_n)
    return {"eval_accuracy": g_sum / max(g_n, 1.0), "eval_accuracy_sampled": s_sum / max(s_n, 1.0)}


def summarize(metrics_file: Path, log) -> None:
    """The run's summary from its metrics: reward (and gold reward, KL) over the first and last 10% of iterations
    (as ``train.experiments.sweep`` reads a run) and the mean time of each phase."""
    rows = read_metrics(metrics_file)
    k = max(1, len(rows) // 10)
    avg = lambda key, w: sum(r[key] for r in w) / len(w)  # noqa: E731
    kl = (f"KL over the last {k}: k1 {avg('kl', rows[-k:]):.3f}, sqrt(mean k3) {avg('kl_sqrt_k3', rows[-k:]):.3f}; "
          if "kl" in rows[-1] else "")
    gold = (f"gold reward {avg('gold_reward_mean', rows[:k]):.3f} -> {avg('gold_reward_mean', rows[-k:]):.3f}; "
            if "gold_reward_mean" in rows[-1] else "")
    log(f"reward (mean of the first / last {k} iterations) {avg('reward_mean', rows[:k]):.3f} -> "
        f"{avg('reward_mean', rows[-k:]):.3f}; {gold}{kl}plot: {metrics_file.parent / 'plot.png'}")
    acc = [r for r in rows if "eval_accuracy" in r]
    if acc and "eval_accuracy_initial" in rows[0]:
        log(f"held-out accuracy (greedy / mean over --eval-k samples): initial {rows[0]['eval_accuracy_initial']:.3f} / "
            f"{rows[0]['eval_accuracy_sampled_initial']:.3f} -> step {acc[-1]['step']} {acc[-1]['eval_accuracy']:.3f} / "
            f"{acc[-1]['eval_accuracy_sampled']:.3f}")
    phases = ("rollout", "score", "experience", "update", "checkpoint")
    mean = {ph: sum(r.get(f"time_{ph}", 0.0) for r in rows) / len(rows) for ph in phases}
    log("time per iteration (mean s): " + ", ".join(f"{ph} {mean[ph]:.3f}" for ph in phases)
        + f" of {sum(r['iter_s'] for r in rows) / len(rows):.3f} s")
