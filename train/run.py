"""The APA trainer: ``python -m train.run [flags]`` (``--help`` lists them); ``torchrun`` for FSDP2.

One iteration, top to bottom in ``train``:

    prompts -> rollout          sample responses to left-padded prompts                   -> Rollout    (train/rollout.py)
            -> score            the reward of the decoded text (NaN kept, reported)       -> scores (B,)
            -> make_experience  logp_old, logp_init, values; advantages by GAE (a critic)
                                or each score against its group's (critic-free)           -> Experience (train/experience.py)
            -> update           epochs x minibatches of the APA / PPO / AWR / GRPO loss    -> losses     (train/algos.py)
            -> log, evaluate, checkpoint
"""

from __future__ import annotations

import math
import sys
import time

import torch

from . import checkpoint as ckpt
from .algos import lr_at, update
from .config import Config, parse_args
from .dist import setup_dist
from .errors import LoadError
from .evaluation import evaluate, heldout_accuracy, logp_mismatch, summarize
from .experience import iteration_metrics, make_experience
from .metrics import plot_runs, read_metrics, release_freed_memory
from .rollout import rollout, score
from .setup import Run, resume_config, setup_run


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    import transformers

    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars: noise next to ours
    try:
        return train(cfg, argv)
    except LoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def train(cfg: Config, argv: list[str] | None = None) -> int:
    cfg = resume_config(cfg, argv) if cfg.resume else cfg
    d = setup_dist()
    log = (lambda s: print(s, flush=True)) if d.main else (lambda s: None)
    run = setup_run(cfg, d, log)
    cfg, m, p, opt = run.cfg, run.models, run.progress, run.opt
    done_here, t_ckpt = 0, 0.0
    initial = {}  # the initial policy's held-out accuracy, logged with the first iteration
    if cfg.eval_k and p.step == 0:
        initial = {f"{k}_initial": v for k, v in heldout_accuracy(m, run.heldout, cfg, d).items()}
    while p.step < cfg.steps:
        t = [time.perf_counter()]  # phase boundaries: rollout | score | experience | update
        ro = rollout(m, [q for q in p.sampler.next() for _ in range(cfg.samples_per_prompt)], cfg, d)
        release_freed_memory()  # the KV cache's pages, before the next phase's allocations pile on them
        t.append(time.perf_counter())

        scores = score(m.reward, ro, d, log)
        gold = None if m.gold is None else score(m.gold, ro, d, log, "--gold-reward")
        finite = d.gather(scores[torch.isfinite(scores)])
        if finite.numel() == 0:
            raise LoadError(f"every reward of iteration {p.step + 1} was NaN or not a number (e.g. "
                            f"{ro.completions[0]!r} for {ro.prompts[0]!r}); check --reward-model {cfg.reward_model}")
        p.scaler.update(finite)
        t.append(time.perf_counter())

        beta = p.kl.beta if cfg.algo == "ppo" else cfg.kl_coef  # APA and AWR: no KL in the reward by default
        exp = make_experience(m, ro, scores, p.scaler(scores), cfg, beta, d)
        t.append(time.perf_counter())

        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, p.step)
        stats, exp = update(m, exp, cfg, d, opt, run.params, torch.Generator().manual_seed(cfg.seed * 7919 + p.step))
        release_freed_memory()  # the update's activations and gradients
        t.append(time.perf_counter())

        row = {"step": p.step + 1, **iteration_metrics(exp, cfg, d), **stats, **initial}
        initial = {}
        if gold is not None:  # the mean over the samples the gold reward could score (all ranks)
            ok = torch.isfinite(gold)
            total, n = d.sum(torch.where(ok, gold, 0.0).sum(), ok.sum())
            row["gold_reward_mean"] = total / n if n else math.nan
        if cfg.algo == "ppo" and "kl" in row:
            p.kl.update(row["kl"], cfg.batch_size)
        row["beta"] = p.kl.beta if cfg.algo == "ppo" else cfg.kl_coef
        row["lr"] = lr_at(cfg, p.step)
        for k, (a, b) in zip(("rollout", "score", "experience", "update"), zip(t, t[1:])):
            row[f"time_{k}"] = b - a
        row["time_checkpoint"] = t_ckpt  # the checkpoint written after the previous iteration (0: none)
        p.step += 1
        done_here += 1
        if cfg.eval_every and (p.step % cfg.eval_every == 0 or p.step == cfg.steps):
            row["logp_mismatch"] = logp_mismatch(m, run.eval_prompts, cfg, d)
            evaluate(m, run.eval_prompts, cfg, d, run.out, p.step, run.show)
            if cfg.eval_k:
                row.update(heldout_accuracy(m, run.heldout, cfg, d))
        run.log_row(row, t[-1] - t[0])

        t_ckpt = 0.0
        if cfg.save_every and p.step % cfg.save_every == 0 or p.step == cfg.steps:
            t_ckpt = time.perf_counter()
            ckpt.save(run.out / "checkpoints", p.step, run.state, cfg.keep_checkpoints)
            t_ckpt = time.perf_counter() - t_ckpt
        if cfg.stop_after and done_here >= cfg.stop_after and p.step < cfg.steps:
            log(f"stopping after {done_here} iterations (--stop-after); continue with --resume {run.out}")
            break
    else:
        finish(run, d, log)
    run.close()
    d.close()
    return 0


def finish(run: Run, d, log) -> None:
    """At the last step: export the policy (save_pretrained), plot, and print the run's summary."""
    cfg = run.cfg
    if cfg.export:
        ckpt.export_pretrained(run.models.policy, run.models.tokenizer, run.out / "final")
        log(f"final policy: {run.out / 'final'} (AutoModelForCausalLM.from_pretrained)")
    if d.main and cfg.plot and (run.out / "metrics.jsonl").exists():
        plot_runs({cfg.algo: read_metrics(run.out / "metrics.jsonl")}, run.out / "plot.png", title=f"{cfg.algo} on {cfg.model}")
        summarize(run.out / "metrics.jsonl", log)


if __name__ == "__main__":
    sys.exit(main())
