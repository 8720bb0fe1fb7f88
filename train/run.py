"""The APA trainer: ``python -m train.run [flags]`` (``--help`` lists them); ``torchrun`` for FSDP2.

One iteration, top to bottom in ``train``:

    prompts -> rollout          sample responses to left-padded prompts                   -> Rollout    (train/rollout.py)
            -> score            the reward of the decoded text (NaN kept, reported)       -> scores (B,)
            -> make_experience  logp_old, logp_init, values; advantages by GAE (a critic)
                                or each score against its group's (critic-free)           -> Experience (train/experience.py)
            -> update           epochs x minibatches of the APA / PPO / AWR / GRPO loss    -> losses     (train/algos.py)
            -> log, evaluate, checkpoint

A run ends early without losing work (``train/stopping.py``): a SIGTERM / SIGINT lets the iteration finish, then
checkpoints and stops (exit 143 / 130); a reward, evaluation or export that raises or hangs (``--reward-timeout``)
first saves the last complete iteration, then stops with one line (exit 1; 2 for a bad value). Each says where
``--resume`` continues.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
import traceback


def _stop_while_starting(signum: int, frame) -> None:
    os.write(2, f"stopped by {signal.Signals(signum).name} while starting; nothing was trained or saved\n".encode())
    os._exit(128 + signum)


if __name__ == "__main__":  # a signal during the imports below: one line, not an import traceback
    for _s in (signal.SIGTERM, signal.SIGINT):
        if signal.getsignal(_s) is not signal.SIG_IGN:
            signal.signal(_s, _stop_while_starting)

import torch  # noqa: E402

from . import checkpoint as ckpt
from .algos import lr_at, update
from .config import Config, parse_args
from .dist import setup_dist
from .errors import LoadError
from .evaluation import evaluate, heldout_accuracy, logp_mismatch, summarize
from .experience import iteration_metrics, make_experience
from .loading import first_line
from .metrics import plot_runs, read_metrics, release_freed_memory
from .rewards import HUNG, RewardTimeout
from .rollout import reward_name, rollout, score
from .setup import Run, resume_config, setup_run
from .stopping import NAMES, RemoteError, Signals, Stopped, agree


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    import transformers

    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars: noise next to ours
    debug = cfg.debug or os.environ.get("APA_FAST_DEBUG", "0") not in ("", "0")
    try:
        return train(cfg, argv)
    except LoadError as e:
        if debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Stopped as e:
        if debug and e.cause is not None:
            traceback.print_exception(e.cause)
        if os.environ.get("RANK", "0") == "0":
            print(e.line, file=sys.stderr, flush=True)
        return e.code


def train(cfg: Config, argv: list[str] | None = None) -> int:
    cfg = resume_config(cfg, argv) if cfg.resume else cfg
    sig = Signals(main=os.environ.get("RANK", "0") == "0")  # while loading, a signal ends the process at once
    try:
        d = setup_dist()
        log = (lambda s: print(s, flush=True)) if d.main else (lambda s: None)
        run = setup_run(cfg, d, log)
        try:
            code = loop(run, d, log, sig)
        except Stopped:
            d.close()  # every rank got here together (signals and failures are agreed on)
            raise
        d.close()
        return code
    finally:
        if "run" in locals():
            run.close()
        sig.restore()


class Iteration:
    """Where an iteration stands, so that a failure saves only a consistent state: ``before`` holds the data position
    and RNG states at its start (restored when it fails before the update, so that --resume repeats its batch);
    ``updating``: the update has begun and the model no longer matches any step."""

    def __init__(self, run: Run):
        p = run.progress
        self.before = (p.sampler.epoch, p.sampler.pos, ckpt.rng_state())
        self.updating = False
        self.stage = "the rollout"
        self.after = None  # the RNG states right after the update (a failure later restores them before saving)
        self.row = None  # the iteration's metrics row until it is written


def loop(run: Run, d, log, sig: Signals) -> int:
    """The iterations; 0 when the run is done (or stopped by --stop-after); a signal or failure raises Stopped."""
    cfg, m, p = run.cfg, run.models, run.progress
    done_here, t_ckpt, warned = 0, 0.0, False
    sig.where = f"--resume {run.out} continues from the last checkpoint"
    sig.in_loop = True
    if cfg.eval_k and p.step == 0:  # the initial policy's held-out accuracy, logged with the first iteration
        run.carry.update({f"{k}_initial": v for k, v in heldout_accuracy(m, run.heldout, cfg, d).items()})
    while p.step < cfg.steps:
        sig.iteration = p.step + 1
        it = Iteration(run)
        try:
            t_ckpt, warned = iteration(run, d, log, it, t_ckpt, warned)
        except Exception as e:  # noqa: BLE001 - every failure ends in one line, after saving what is consistent
            fail(run, d, it, e)
        done_here += 1
        signum = sig.agreed(d)
        if signum:
            try:
                saved = save_last(run)
            except ckpt.SaveError as e:
                raise Stopped(f"stopped by {NAMES.get(signum, signum)} after iteration {p.step}, but error: {e}; the "
                              f"last complete checkpoint is {ckpt.latest(run.out / 'checkpoints') or 'none'}",
                              128 + signum, cause=e) from None
            raise Stopped(f"stopped by {NAMES.get(signum, signum)} after iteration {p.step} of {cfg.steps}: {saved}; "
                          f"continue with --resume {run.out}", 128 + signum)
        if cfg.stop_after and done_here >= cfg.stop_after and p.step < cfg.steps:
            log(f"stopping after {done_here} iterations (--stop-after); continue with --resume {run.out}")
            return 0
    it = Iteration(run)
    it.stage, it.before, it.after = "the export", None, ckpt.rng_state()
    try:
        e = agree(d, _try(lambda: finish(run, d, log, it)))
    except Exception as x:  # noqa: BLE001
        e = x
    if e is not None:
        fail(run, d, it, e)
    return 0


def _try(fn) -> Exception | None:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - handed to agree(), then to fail()
        return e
    return None


def iteration(run: Run, d, log, it: Iteration, t_ckpt: float, warned: bool) -> tuple[float, bool]:
    """One iteration: rollout, score, experience, update, log, evaluate, checkpoint. Returns the time of its checkpoint
    and whether the over-long prompts were warned about."""
    cfg, m, p, opt = run.cfg, run.models, run.progress, run.opt
    t = [time.perf_counter()]  # phase boundaries: rollout | score | experience | update
    ro = rollout(m, [q for q in p.sampler.next() for _ in range(cfg.samples_per_prompt)], cfg, d)
    release_freed_memory()  # the KV cache's pages, before the next phase's allocations pile on them
    t.append(time.perf_counter())

    it.stage = reward_name(m.reward)
    scores, gold, err = None, None, None
    try:
        scores = score(m.reward, ro, d, log, timeout=cfg.reward_timeout)
        if m.gold is not None:
            it.stage = reward_name(m.gold, "--gold-reward")
            gold = score(m.gold, ro, d, log, "--gold-reward", cfg.reward_timeout)
    except Exception as e:  # noqa: BLE001
        err = e
    err = agree(d, err)  # a reward that fails on one rank stops every rank here
    if err is not None:
        raise err
    it.stage = reward_name(m.reward)
    finite = d.gather(scores[torch.isfinite(scores)])
    if finite.numel() == 0:
        raise LoadError(f"every reward of iteration {p.step + 1} was NaN or not a number (e.g. "
                        f"{ro.completions[0]!r} for {ro.prompts[0]!r}); check --reward-model {cfg.reward_model}")
    p.scaler.update(finite)
    t.append(time.perf_counter())

    it.stage = "the experience pass"
    beta = p.kl.beta if cfg.algo == "ppo" else cfg.kl_coef  # APA and AWR: no KL in the reward by default
    exp = make_experience(m, ro, scores, p.scaler(scores), cfg, beta, d)
    t.append(time.perf_counter())

    it.stage, it.updating = "the update", True
    for g in opt.param_groups:
        g["lr"] = lr_at(cfg, p.step)
    stats, exp = update(m, exp, cfg, d, opt, run.params, torch.Generator().manual_seed(cfg.seed * 7919 + p.step))
    release_freed_memory()  # the update's activations and gradients
    t.append(time.perf_counter())

    row = {"step": p.step + 1, **iteration_metrics(exp, cfg, d), **stats, **run.carry}
    if gold is not None:  # the mean over the samples the gold reward could score (all ranks)
        ok = torch.isfinite(gold)
        total, n = d.sum(torch.where(ok, gold, 0.0).sum(), ok.sum())
        row["gold_reward_mean"] = total / n if n else math.nan
    if cfg.algo == "ppo" and "kl" in row:
        p.kl.update(row["kl"], cfg.batch_size)
    row["beta"] = p.kl.beta if cfg.algo == "ppo" else cfg.kl_coef
    row["lr"] = lr_at(cfg, p.step)
    truncated = int(d.sum(ro.truncated)[0]) if d.world > 1 else ro.truncated
    if truncated:  # only then: the default run's rows stay as they were
        row["prompts_truncated"] = truncated
        if not warned:
            log(f"warning: {truncated} of {cfg.batch_size * cfg.samples_per_prompt} prompts of iteration {p.step + 1} "
                f"are longer than --max-prompt-len {cfg.max_prompt_len} tokens and were cut from the left; the reward "
                f"sees them as the policy did (counted as prompts_truncated in metrics.jsonl; warned once)")
            warned = True
    for k, (a, b) in zip(("rollout", "score", "experience", "update"), zip(t, t[1:])):
        row[f"time_{k}"] = b - a
    row["time_checkpoint"] = t_ckpt  # the checkpoint written after the previous iteration (0: none)
    p.step += 1
    # the model is at step p.step now: a failure from here on saves it (its RNG states as they are now)
    it.updating, it.before, it.row = False, None, row
    it.after = ckpt.rng_state()
    if cfg.eval_every and (p.step % cfg.eval_every == 0 or p.step == cfg.steps):
        it.stage = "the evaluation"
        err = _try(lambda: row.__setitem__("logp_mismatch", logp_mismatch(m, run.eval_prompts, cfg, d)))
        err = err or _try(lambda: evaluate(m, run.eval_prompts, cfg, d, run.out, p.step, run.show))
        if cfg.eval_k:
            err = err or _try(lambda: row.update(heldout_accuracy(m, run.heldout, cfg, d)))
        err = agree(d, err)
        if err is not None:
            raise err
    it.stage = "the metrics log"
    run.log_row(row, t[-1] - t[0])
    it.row = None
    run.carry.clear()

    t_ckpt = 0.0
    if cfg.save_every and p.step % cfg.save_every == 0 or p.step == cfg.steps:
        it.stage = "the checkpoint"
        t_ckpt = time.perf_counter()
        ckpt.save(run.out / "checkpoints", p.step, run.state, cfg.keep_checkpoints)
        t_ckpt = time.perf_counter() - t_ckpt
    return t_ckpt, warned


def save_last(run: Run) -> str:
    """A checkpoint of the current (complete) step unless it exists already; what is on disk, in words."""
    p, ckpt_dir = run.progress, run.out / "checkpoints"
    if p.step == 0:
        return "no iteration had completed, nothing to save"
    path = ckpt_dir / f"step_{p.step:06d}"
    if not (path / "COMPLETE").exists():
        ckpt.save(ckpt_dir, p.step, run.state, run.cfg.keep_checkpoints)
        return f"saved {path}"
    return f"its checkpoint is {path}"


def fail(run: Run, d, it: Iteration, e: BaseException) -> None:
    """End the run after ``e`` in ``it.stage``: save what is consistent, then raise Stopped with one line (exit 2 for
    a bad value such as a reward's wrong answer, else 1)."""
    p, out = run.progress, run.out
    n = p.step + (0 if it.before is None else 1)  # the iteration that failed
    if isinstance(e, ckpt.SaveError):
        head = f"error: {e}"
    elif isinstance(e, (LoadError, RewardTimeout)):  # their message names the reward (or the flag)
        head = f"error: {e} (iteration {n})"
    elif isinstance(e, RemoteError):
        head = f"error: {it.stage} failed {e} (iteration {n})"
    else:
        head = f"error: {it.stage} raised {first_line(e)} (iteration {n})"
    code = 2 if isinstance(e, LoadError) else 1
    try:
        if it.updating:  # the update was cut short: the model is at no step at all
            last = ckpt.latest(out / "checkpoints")
            saved = f"the update was cut short, so nothing was saved; the last checkpoint is {last or 'none'}"
        elif isinstance(e, ckpt.SaveError):
            last = ckpt.latest(out / "checkpoints")
            saved = f"the last complete checkpoint is {last or 'none (nothing to resume)'}"
        else:
            if it.before is not None:  # failed before the update: --resume repeats this iteration's batch
                p.sampler.epoch, p.sampler.pos, rng = it.before
                ckpt.set_rng_state(rng)
            else:
                ckpt.set_rng_state(it.after)
                if it.row is not None and it.stage != "the metrics log":  # the row of the step about to be saved
                    run.log_row(it.row, sum(it.row[f"time_{k}"] for k in ("rollout", "score", "experience", "update")))
            saved = save_last(run)
    except ckpt.SaveError as se:
        saved = f"and then {se}; the last complete checkpoint is {ckpt.latest(out / 'checkpoints') or 'none'}"
    more = f"; continue with --resume {out}" if ckpt.latest(out / "checkpoints") is not None else ""
    raise Stopped(f"{head}; {saved}{more}", code, cause=e) from None


def finish(run: Run, d, log, it: Iteration) -> None:
    """At the last step: export the policy (save_pretrained), plot, and print the run's summary."""
    cfg = run.cfg
    if cfg.export:
        it.stage = "the export"
        ckpt.export_pretrained(run.models.policy, run.models.tokenizer, run.out / "final")
        log(f"final policy: {run.out / 'final'} (AutoModelForCausalLM.from_pretrained)")
    if d.main and cfg.plot and (run.out / "metrics.jsonl").exists():
        it.stage = "the plot"
        plot_runs({cfg.algo: read_metrics(run.out / "metrics.jsonl")}, run.out / "plot.png", title=f"{cfg.algo} on {cfg.model}")
        summarize(run.out / "metrics.jsonl", log)


if __name__ == "__main__":
    code = main()
    if HUNG:  # a reward still running in its thread after --reward-timeout: end without waiting for it
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
