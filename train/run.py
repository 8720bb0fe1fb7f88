"""The APA trainer: ``python -m train.run [flags]`` (``--help`` lists them); ``torchrun`` for FSDP2.

One iteration (``train``'s loop, each step a function below):

    prompts -> rollout          generate from left-padded prompts (sampled)               -> Rollout
            -> score            reward on the decoded text (NaN kept, reported)            -> scores (B,)
            -> make_experience  logp_old, logp_init, values from hidden states via apa_fast; then
                                advantages: token rewards, GAE, whitening over all ranks (--advantage gae)
                                or each score against its group's (--advantage group)     -> Experience
            -> update           epochs x minibatches of the APA / PPO / AWR / GRPO loss (+ value loss)
            -> metrics, samples, checkpoint
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

import apa_fast
from apa_fast import losses, reference
from apa_fast.gae import group_stats

from . import checkpoint as ckpt
from .config import Config, parse_args, preset_name
from .dist import Dist, setup_dist
from .errors import LoadError
from .loading import Prompt, as_messages, check_chat_prompts, check_model_source, load_prompts, load_tokenizer, render_prompt
from .metrics import MetricsLog, peak_rss_gb, plot_runs, read_metrics, release_freed_memory
from .models import Models, TokenScores, build_models
from .sampling import position_ids_from_mask
from .offline import DATA_DIR, build_tokenizer
from .rewards import RewardScaler

# --------------------------------------------------------------------------------------------------
# the records each stage hands to the next


@dataclass
class Rollout:
    """Left-padded prompts and sampled responses."""

    input_ids: Tensor  # (B, P+R)
    attention_mask: Tensor  # (B, P+R): the prompt's mask, then the response's
    position_ids: Tensor  # (B, P+R)
    prompt_len: int  # P: position P-1 predicts the first response token
    response: Tensor  # (B, R) sampled tokens (pad after the first EOS)
    mask: Tensor  # (B, R) bool: tokens up to and including the first EOS
    prompts: list[str]  # the text the policy saw (chats rendered with its chat template)
    completions: list[str]
    logp_sample: Tensor | None = None  # (B, R) the sampler's own log-probs, when asked for
    messages: list[list[dict] | None] | None = None  # each chat prompt's messages (None: a plain-string prompt)


@dataclass
class Experience:
    """One iteration's training data: per-token tensors over the R response positions, all filled, except
    ``logp_old`` and ``entropy`` of an on-policy batch, which the update's first forward fills."""

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    prompt_len: int
    labels: Tensor  # (B, R) response tokens, -100 where not trained
    mask: Tensor  # (B, R) bool: response tokens of rows whose score is a finite number
    scores: Tensor  # (B,) raw scores (NaN where the reward was not a number)
    logp_old: Tensor | None  # behaviour policy (None until the update's first forward: see ``on_policy``)
    logp_init: Tensor | None  # frozen initial policy (None: not needed, GRPO with --kl-loss-coef 0)
    entropy: Tensor | None  # the behaviour policy's, filled with logp_old
    advantages: Tensor  # GAE, whitened; or the sequence's group advantage on each of its tokens
    rewards: Tensor | None  # GAE's token rewards: the scaled score on the last token, PPO's KL penalty
    values: Tensor | None  # the critic's (None: --critic none)
    returns: Tensor | None
    group_zero_std_frac: float | None = None  # groups whose scores were all equal (group advantages)

    def rows(self, idx: Tensor) -> "Experience":
        return Experience(**{k: v[idx] if isinstance(v, Tensor) and v.dim() > 0 else v for k, v in vars(self).items()})

    def forward_args(self) -> tuple:
        """What a policy forward on these rows needs: ids, mask, positions, labels, start."""
        return self.input_ids, self.attention_mask, self.position_ids, self.labels, self.prompt_len - 1


# --------------------------------------------------------------------------------------------------
# rollout -> score -> experience


@torch.no_grad()
def rollout(m: Models, prompts: list[Prompt], cfg: Config, d: Dist, greedy: bool = False,
            sampling_logprobs: bool = False) -> Rollout:
    """Sample responses (``train.sampling``, or transformers' ``generate`` with ``--hf-generate``) from
    left-padded prompts (strings, or chats rendered with the policy tokenizer's chat template).
    ``sampling_logprobs``: also keep the log-probs of the sampled tokens under the distribution they were drawn
    from, to check against the training forward's."""
    tok = m.tokenizer
    tok.padding_side, tok.truncation_side = "left", "left"
    texts = [render_prompt(p, tok) for p in prompts]
    chat = any(not isinstance(p, str) for p in prompts)  # a rendered template holds its own special tokens (BOS)
    enc = tok(texts, padding=True, truncation=True, max_length=cfg.max_prompt_len, return_tensors="pt",
              add_special_tokens=not chat).to(d.device)
    P = enc["input_ids"].shape[1]
    sample = {} if greedy else dict(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
    if cfg.min_new_tokens:  # EOS suppressed until then (a benchmark's fixed response length)
        sample["min_new_tokens"] = min(cfg.min_new_tokens, cfg.max_new_tokens)
    m.policy.eval()
    if cfg.hf_generate:
        gen = m.policy.generate(
            **enc, do_sample=not greedy, max_new_tokens=cfg.max_new_tokens, pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id, synced_gpus=d.world > 1, return_dict_in_generate=True,
            output_logits=sampling_logprobs, **sample,
        )
        response, logits = gen.sequences[:, P:], torch.stack(gen.logits, 1) if sampling_logprobs else None
    else:  # every rank runs forwards until all are done (FSDP gathers weights in each)
        response, logits = m.policy.sample(
            enc["input_ids"], enc["attention_mask"], max_new_tokens=cfg.max_new_tokens, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id, greedy=greedy, keep_logits=sampling_logprobs, **sample,
            **({"all_done": lambda done: d.sum(float(not done))[0] == 0} if d.world > 1 else {}))
    if response.shape[1] == 0:
        raise RuntimeError("generate returned no new tokens")
    is_eos = response == tok.eos_token_id
    mask = (is_eos.long().cumsum(-1) - is_eos.long()) == 0  # up to and including the first EOS
    response = torch.where(mask, response, tok.pad_token_id)
    attn = torch.cat([enc["attention_mask"].bool(), mask], 1).long()
    completions = tok.batch_decode(torch.where(mask & ~is_eos, response, tok.pad_token_id), skip_special_tokens=True)
    logp_sample = None
    if sampling_logprobs:
        logp_sample = reference.token_logprobs(logits, torch.where(mask, response, -100),
                                               1.0 if greedy else cfg.temperature)
    return Rollout(torch.cat([enc["input_ids"], response], 1), attn, position_ids_from_mask(attn), P, response, mask,
                   texts, completions, logp_sample, [as_messages(p) for p in prompts])


def score(reward, ro: Rollout, d: Dist, log, flag: str = "--reward-model") -> Tensor:
    """``reward``'s scores of the decoded text, (B,) float32; a NaN or non-number score is reported (and left NaN)."""
    raw = reward(ro.prompts, ro.completions, ro.messages)
    if len(raw) != len(ro.prompts):
        raise RuntimeError(f"{flag} returned {len(raw)} scores for {len(ro.prompts)} completions")
    scores = torch.tensor(raw, dtype=torch.float32, device=d.device)
    bad = ~torch.isfinite(scores)
    if bad.any():
        i = int(bad.nonzero()[0])
        log(f"warning: {flag} is not a finite number for {int(bad.sum())}/{len(raw)} samples on rank {d.rank} "
            f"(e.g. prompt {ro.prompts[i]!r} -> {ro.completions[i]!r}: {raw[i]!r}); they are left out of the "
            f"{'loss' if flag == '--reward-model' else 'mean'}")
    return scores


def on_policy(cfg: Config, n_rows: int, d: Dist) -> bool:
    """Critic-free advantages and one gradient step per epoch: the first step's forward sees exactly the policy
    that sampled, so its own detached log-probs are the behaviour policy's (TRL's GRPO does the same when it
    takes one step per batch) and the experience pass need not run the policy at all."""
    return cfg.advantage == "group" and cfg.minibatch_size * cfg.samples_per_prompt // d.world >= n_rows


@torch.no_grad()
def make_experience(m: Models, ro: Rollout, scores: Tensor, scaled: Tensor, cfg: Config, beta: float,
                    d: Dist) -> Experience:
    """logp_old (policy; left to the update when ``on_policy``), logp_init (initial policy), values (critic), and
    the advantages from the ``scaled`` scores. Rows whose score is not a number leave the mask (and the loss)."""
    mask = ro.mask & torch.isfinite(scores).unsqueeze(1)
    labels = torch.where(mask, ro.response, -100)
    args = (ro.input_ids, ro.attention_mask, ro.position_ids, labels, ro.prompt_len - 1)
    shared = cfg.critic == "shared"
    if on_policy(cfg, len(labels), d):
        pol = TokenScores()
    else:
        pol = m.policy(*args, entropy=True, values=shared, temperature=cfg.temperature, backend=cfg.kernel_backend)
    values = pol.values if shared else None if m.critic is None else m.critic(*args)
    logp_init = None if m.ref is None else m.ref(*args, temperature=cfg.temperature, backend=cfg.kernel_backend).logprobs
    rewards, returns, zero_frac = None, None, None
    if cfg.advantage == "group":  # critic-free: each sequence's score against its group's, on all its tokens
        G = cfg.samples_per_prompt
        A = apa_fast.group_advantages(scaled, G, std=cfg.group_std, baseline=cfg.group_baseline)
        A = A.unsqueeze(1) * mask
        if cfg.group_whiten:
            A = apa_fast.masked_whiten(A, mask, process_group=d.group)
        n_flat, n_groups = d.sum(group_stats(scaled, G)[3].sum(), len(scaled) // G)
        zero_frac = n_flat / max(n_groups, 1.0)
    else:
        # r_t = -beta * (logp_old - logp_init), plus the scaled score on the last valid token
        rewards = -beta * (pol.logprobs - logp_init) * mask
        last = (mask.long().cumsum(-1) * mask).argmax(-1)
        rewards[torch.arange(len(scaled), device=rewards.device), last] += torch.where(mask.any(-1), scaled, 0.0)
        A, returns = apa_fast.gae(rewards, values, mask, gamma=cfg.gamma, lam=cfg.gae_lam)
        A = apa_fast.masked_whiten(A, mask, process_group=d.group)  # over the valid tokens of all ranks
    return Experience(*args[:3], ro.prompt_len, labels, mask, scores, pol.logprobs, logp_init, pol.entropy, A, rewards,
                      values, returns, zero_frac)


# --------------------------------------------------------------------------------------------------
# the update


class KLController:
    """PPO's adaptive KL coefficient (Ziegler et al.): beta *= 1 + clip(KL/target - 1, -0.2, 0.2) * n/horizon;
    fixed at its initial value when ``target`` <= 0."""

    def __init__(self, init: float, target: float, horizon: float):
        self.beta, self.target, self.horizon = init, target, horizon

    def update(self, kl: float, n_steps: int) -> None:
        if self.target <= 0:  # a fixed beta
            return
        err = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + err * n_steps / self.horizon


def token_loss(mb: Experience, cfg: Config) -> losses.TokenLoss:
    """The algorithm's per-token loss of the policy's log-probs logp, in the papers' symbols."""
    A, m = mb.advantages, mb.mask
    if cfg.algo == "apa":  # (logp - logp_init - A/lam)^2
        return losses.apa_token_loss(mb.logp_init, A, m, lam=cfg.lam)
    if cfg.algo == "ppo":  # max(-A r, -A clip(r, 1-eps, 1+eps)),  r = exp(logp - logp_old)
        return losses.ppo_token_loss(mb.logp_old, A, m, clip=cfg.ppo_clip)
    if cfg.algo == "grpo":  # PPO's surrogate + beta * k3,  k3 = exp(logp_init - logp) - (logp_init - logp) - 1
        return losses.grpo_token_loss(mb.logp_old, mb.logp_init, A, m, clip=cfg.ppo_clip, beta=cfg.kl_loss_coef)
    return losses.awr_token_loss(A, m, lam=cfg.lam, max_weight=cfg.awr_max_weight or None)  # -logp exp(A/lam)


def policy_loss(m: Models, mb: Experience, cfg: Config) -> TokenScores:
    """The algorithm's loss on a minibatch (a masked mean over its local tokens, fused from hidden states)
    and the shared critic's values. Without behaviour log-probs yet (``on_policy``), this forward's own are
    they (``logp_old`` None: PPO's ratio is 1 with gradient dlogp), returned with their entropy."""
    return m.policy(*mb.forward_args(), loss=token_loss(mb, cfg), entropy=mb.logp_old is None,
                    values=cfg.critic == "shared", temperature=cfg.temperature, backend=cfg.kernel_backend)


def lr_at(cfg: Config, step: int) -> float:
    """The learning rate of iteration ``step`` (0-based): linear warm-up over ``warmup_steps``, then constant, or
    linear or cosine decay that reaches 0 after the last iteration. A function of the step alone, so a resumed
    run continues on the same curve."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    x = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)  # in [0, 1)
    if cfg.lr_schedule == "linear":
        return cfg.lr * (1.0 - x)
    if cfg.lr_schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * x))
    return cfg.lr


def micro_batch_tokens(cfg: Config, m: Models, d: Dist) -> int:
    """``--micro-batch-tokens``; by default (-1) the tokens whose activations fit an estimated 0.5 GiB on CPU (8 GiB on
    a GPU) at 64 bytes per token, layer and hidden unit (about what a fused Llama block keeps for backward), so a
    small model takes its whole minibatch in one pass and a large one splits it."""
    if cfg.micro_batch_tokens >= 0:
        return cfg.micro_batch_tokens
    tc = m.policy.config.get_text_config()
    per_token = 64 * tc.num_hidden_layers * tc.hidden_size
    return max(1, int((0.5 if d.device.type == "cpu" else 8.0) * 2**30 // per_token))


def update(m: Models, b: Experience, cfg: Config, d: Dist, opt: torch.optim.Optimizer, params: list,
           gen: torch.Generator) -> dict:
    """Epochs x minibatches of (policy loss + vf_coef * value loss), normalised by the global token count; each
    minibatch's gradient accumulated over micro-batches of at most ``--micro-batch-tokens`` tokens."""
    m.policy.train()
    if m.critic is not None:
        m.critic.train()
    B = b.input_ids.shape[0]
    L = int(d.gather(torch.tensor([b.input_ids.shape[1]], device=d.device)).max())  # FSDP: one micro count on all ranks
    mb_size = cfg.minibatch_size * cfg.samples_per_prompt // d.world  # sequences per rank and gradient step
    budget = micro_batch_tokens(cfg, m, d)
    micro = max(1, budget // L) if budget > 0 else mb_size  # sequences per micro-batch, at most
    sums = {"loss": 0.0, "policy_loss": 0.0, "value_loss": 0.0}
    n_total = 0.0  # valid tokens seen over all ranks and epochs
    for _ in range(cfg.epochs):
        perm = torch.randperm(B, generator=gen).to(d.device)
        starts = range(0, B, mb_size)
        counts = [float(b.mask[perm[i : i + mb_size]].sum()) for i in starts]
        global_counts = d.sum(*counts)  # one all-reduce per epoch for every minibatch's token count
        n_total += sum(global_counts)
        for i, n_global in zip(starts, global_counts):
            own = b.logp_old is None  # on-policy: this (only) step's log-probs are the behaviour policy's
            kept: list[tuple[Tensor, Tensor, Tensor]] = []  # rows, their log-probs and entropy
            rows = perm[i : i + mb_size]
            for j, part in enumerate(rows.tensor_split(-(-len(rows) // micro))):  # as few as fit, of even sizes
                if j:  # the last micro-batch's activations, freed by its backward, would stay resident under these
                    release_freed_memory()
                mb = b.rows(part)
                n_local = float(mb.mask.sum())
                # each rank's loss is a mean over its own tokens; FSDP averages gradients over ranks, so this
                # rescaling makes the update sum(token losses) / n_global, the same for any number of ranks
                scale = n_local * d.world / n_global if n_global > 0 else 0.0
                out = policy_loss(m, mb, cfg)
                pg, values = out.loss, out.values
                if own:
                    kept.append((part, out.logprobs, out.entropy))
                vf = pg.new_zeros(())
                if mb.returns is not None:  # a critic to train
                    if values is None:
                        values = m.critic(*mb.forward_args())
                    clip = dict(old_values=mb.values, clip=cfg.value_clip) if cfg.algo == "ppo" else {}
                    vf = apa_fast.value_loss(values, mb.returns, mb.mask, **clip)
                loss = pg + cfg.vf_coef * vf
                (loss * scale).backward()
                for k, v in (("loss", loss), ("policy_loss", pg), ("value_loss", vf)):
                    sums[k] += float(v.detach()) * n_local
            if own:  # back in row order: kept's rows are a permutation of all of them
                done, lp, ent = (torch.cat(x) for x in zip(*kept))
                order = done.argsort()
                b.logp_old, b.entropy = lp[order], ent[order]
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
    tot = d.sum(*sums.values())
    return {k: v / max(n_total, 1.0) for k, v in zip(sums, tot)}


# --------------------------------------------------------------------------------------------------
# data position and the trainer's checkpointed scalars


class PromptSampler:
    """Global batches from a seeded permutation per epoch; rank r takes its contiguous share."""

    def __init__(self, prompts: list[Prompt], batch: int, seed: int, d: Dist):
        self.prompts, self.batch, self.seed, self.d = prompts, batch, seed, d
        self.epoch, self.pos = 0, 0

    def next(self) -> list[Prompt]:
        out: list[int] = []
        while len(out) < self.batch:
            perm = torch.randperm(len(self.prompts), generator=torch.Generator().manual_seed(self.seed * 100003 + self.epoch))
            take = perm[self.pos : self.pos + self.batch - len(out)].tolist()
            out += take
            self.pos += len(take)
            if self.pos >= len(self.prompts):
                self.epoch, self.pos = self.epoch + 1, 0
        per = self.batch // self.d.world
        return [self.prompts[i] for i in out[self.d.rank * per : (self.d.rank + 1) * per]]


class Progress:
    """The trainer's scalars a checkpoint carries (a DCP Stateful through ``ckpt.TrainState``): the step,
    the data position, the KL controller and the reward scaler."""

    def __init__(self, sampler: PromptSampler, kl: KLController, scaler: RewardScaler):
        self.step, self.sampler, self.kl, self.scaler = 0, sampler, kl, scaler

    def state_dict(self) -> dict:
        return {"step": self.step, "epoch": self.sampler.epoch, "pos": self.sampler.pos, "beta": self.kl.beta,
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        self.step, self.sampler.epoch, self.sampler.pos = int(sd["step"]), int(sd["epoch"]), int(sd["pos"])
        self.kl.beta = float(sd["beta"])
        self.scaler.load_state_dict(sd["scaler"])


def iteration_metrics(b: Experience, cfg: Config, d: Dist) -> dict:
    """Global (all-rank) reward, KL and entropy of one rollout batch, over the response tokens only.

    ``kl`` (k1): per sequence ``sum_t (logp - logp_init)``, averaged over sequences. ``kl_sqrt_k3``:
    ``sqrt(mean_t k3)``, ``k3 = exp(x) - 1 - x``, ``x = logp_init - logp``, the mean over all response tokens
    (k3 is an unbiased, non-negative per-token estimator of KL(pi || pi_init)).

    Neither is the APA authors' plotted ``policy/sqrt_kl``: that is the square root of the mean of
    ``exp(lr) - 1 - lr`` with ``lr = logp - logp_init`` (the other ratio: its expectation under pi is
    chi^2(pi || pi_init) - KL(pi || pi_init), not a KL) over every position of the (B, T-1) tensor, prompt
    tokens and padding (0 there) included, so it also moves with prompt length and padding. It is not
    computed here: it needs both models' log-probs at the prompt positions, which the fused head never forms.
    """
    finite = torch.isfinite(b.scores)
    scores = torch.where(finite, b.scores, 0.0)
    m = b.mask.float()
    logp_init = b.logp_old if b.logp_init is None else b.logp_init  # no initial policy: KL not measured
    x = (logp_init - b.logp_old) * m  # log(pi_init / pi), 0 at masked steps
    k3 = torch.exp(x) - 1 - x
    seq_kl = ((b.logp_old - logp_init) * m).sum(-1)
    has = b.mask.any(-1).float()
    s = d.sum(
        scores.sum(), finite.sum(), (seq_kl * has).sum(), has.sum(), k3.sum(), m.sum(),
        (b.entropy * m).sum(), (~finite).sum(), scores.pow(2).sum(), len(b.scores),
    )
    n = max(s[1], 1.0)
    mean = s[0] / n
    extra = {"sequences": int(s[9])}
    if b.group_zero_std_frac is not None:
        extra["group_zero_std_frac"] = b.group_zero_std_frac
    if cfg.algo == "grpo":  # the loss's KL term at the start of the update: beta * mean k3(logp_old, logp_init)
        extra["kl_loss"] = cfg.kl_loss_coef * s[4] / max(s[5], 1.0)
    out = {
        "reward_mean": mean,
        "reward_std": math.sqrt(max(s[8] / n - mean * mean, 0.0)),
        "kl": s[2] / max(s[3], 1.0),
        "kl_sqrt_k3": math.sqrt(max(s[4] / max(s[5], 1.0), 0.0)),
        "entropy": s[6] / max(s[5], 1.0),
        "reward_nan": int(s[7]),
        "response_tokens": int(s[5]),
        "response_len": s[5] / max(s[3], 1.0),
    }
    if b.logp_init is None:
        del out["kl"], out["kl_sqrt_k3"]
    return {**out, **extra}


# --------------------------------------------------------------------------------------------------
# the run


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
    cfg = _resume_config(cfg, argv) if cfg.resume else cfg
    d = setup_dist()
    log = (lambda s: print(s, flush=True)) if d.main else (lambda s: None)
    run = setup_run(cfg, d, log)
    m, p, opt, params = run.models, run.progress, run.opt, run.params
    done_here, t_ckpt = 0, 0.0
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
        stats = update(m, exp, cfg, d, opt, params, torch.Generator().manual_seed(cfg.seed * 7919 + p.step))
        release_freed_memory()  # the update's activations and gradients
        t.append(time.perf_counter())
        row = {"step": p.step + 1, **iteration_metrics(exp, cfg, d), **stats}
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
            evaluate(m, run.eval_prompts, cfg, d, run.out, p.step, run.bar)
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
        finish(run, cfg, d, log)
    run.close()
    d.close()
    return 0


def _resume_config(cfg: Config, argv: list[str] | None) -> Config:
    """A resumed run uses its saved config; only run-length and output flags given now override it."""
    if not (Path(cfg.resume) / "config.json").exists():
        raise LoadError(f"--resume {cfg.resume!r}: no run directory there (config.json missing)")
    saved = json.loads((Path(cfg.resume) / "config.json").read_text())
    given = {a.split("=")[0][2:].replace("-", "_") for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--")}
    overridable = {"steps", "stop_after", "progress", "save_every", "eval_every", "threads", "plot", "export",
                   "tensorboard", "keep_checkpoints"}
    for k in given & overridable:
        saved[k] = getattr(cfg, k)
    saved["resume"], saved["out"] = cfg.resume, cfg.resume
    return Config(**saved)


@dataclass
class Run:
    """Everything the loop uses besides the config: models, optimiser, checkpointed state, outputs."""

    models: Models
    opt: torch.optim.Optimizer
    params: list
    progress: Progress
    state: ckpt.TrainState
    out: Path
    eval_prompts: list[Prompt]
    metrics: MetricsLog | None
    bar: object

    def log_row(self, row: dict, dt: float) -> None:
        row["tokens_per_s"] = row["response_tokens"] / dt
        row["iter_s"] = dt
        if torch.cuda.is_available():
            row["max_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        else:
            row["max_rss_gb"] = peak_rss_gb()
        if self.metrics is not None:
            self.metrics.log(row)
        if self.bar is not None:
            post = {"reward": f"{row['reward_mean']:.3f}", **({"kl": f"{row['kl']:.3f}"} if "kl" in row else {}),
                    "s": "/".join(f"{row[f'time_{k}']:.2f}" for k in ("rollout", "experience", "update"))}
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.metrics is not None:
            self.metrics.close()


def setup_run(cfg: Config, d: Dist, log) -> Run:
    """Checks, prompts, models, optimiser and state (resumed when asked); the run directory."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    check_flags(cfg, d)
    out = Path(cfg.out or f"runs/{cfg.algo}-{time.strftime('%Y%m%d-%H%M%S')}")
    cfg.out = str(out)
    if not cfg.resume and (out / "checkpoints").exists():
        raise LoadError(f"{out} already holds a run with checkpoints; continue it with --resume {out} or pick another --out")
    torch.manual_seed(cfg.seed)
    if cfg.model != "offline":
        gptj = cfg.model == "Dahoas/gptj-sft-static"
        check_model_source(cfg.model, "policy", " (about 24 GB; the GPT-J setup also needs `huggingface-cli download "
                           "Dahoas/gptj-rm-static hf_ckpt.pt` and `huggingface-cli download --repo-type dataset "
                           "Dahoas/rm-static`)" if gptj else "")
    prompts = load_prompts(cfg.dataset, cfg.dataset_split, cfg.prompt_column)
    if preset_name(cfg.model) == "offline" and cfg.dataset is None:  # a fixed few sums
        eval_prompts = load_prompts(str(DATA_DIR / "arith_eval.jsonl"), "train", "prompt")
    else:
        eval_prompts = prompts
    if any(not isinstance(q, str) for q in prompts):  # chats need the policy tokenizer's template: checked first
        tok = build_tokenizer() if cfg.model == "offline" else load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
        check_chat_prompts(prompts, tok, cfg.model, cfg.prompt_column)
    m = build_models(cfg, d, log)
    _fit_positions(cfg, m, log)
    torch.manual_seed(cfg.seed + 100_003 * d.rank)  # sampling: each rank its own stream
    params = [p for mod in (m.policy, m.critic) if mod is not None for p in mod.parameters() if p.requires_grad]
    # one process: the fused kernel (one pass over each tensor, the default of TRL and transformers on torch >= 2.8;
    # 2-5x faster steps than the per-tensor loop on a 162M model here); FSDP2's sharded DTensors keep the loop
    fused = d.mesh is None and all(p.dtype in (torch.float32, torch.bfloat16) for p in params)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                            **({"fused": True} if fused else {"foreach": False}))
    progress = Progress(PromptSampler(prompts, cfg.batch_size, cfg.seed, d),
                        KLController(cfg.kl_init, cfg.kl_target, cfg.kl_horizon), RewardScaler(cfg.reward_scale, cfg.reward_clip))
    models = nn.ModuleDict({"policy": m.policy, **({"critic": m.critic} if m.critic is not None else {})})
    state = ckpt.TrainState(models, opt, progress)
    resumed_from = None
    if cfg.resume:
        path = ckpt.latest(out / "checkpoints")
        if path is None:
            raise LoadError(f"--resume {cfg.resume!r}: no complete checkpoint under {out / 'checkpoints'}")
        ckpt.load(path, state)
        resumed_from = progress.step
        log(f"resumed from {path} (step {progress.step})")
    bar = None
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
        log(f"run directory: {out}  ({cfg.algo}, {d.world} process(es) on {d.device.type}, kernels: "
            f"{cfg.kernel_backend}, {sum(p.numel() for p in params) / 1e6:.2f}M trainable parameters)")
        if cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=progress.step, desc=cfg.algo, dynamic_ncols=True)
    metrics = MetricsLog(out, resumed_from, cfg.tensorboard) if d.main else None
    return Run(m, opt, params, progress, state, out, eval_prompts[: cfg.eval_samples], metrics, bar)


def check_flags(cfg: Config, d: Dist) -> None:
    """Flag combinations that cannot run, each refused with one line naming the flag."""
    if cfg.batch_size % d.world or cfg.minibatch_size % d.world:
        raise LoadError(f"--batch-size {cfg.batch_size} and --minibatch-size {cfg.minibatch_size} must be multiples "
                        f"of the number of processes ({d.world})")
    if cfg.samples_per_prompt < 1:
        raise LoadError(f"--samples-per-prompt must be >= 1, got {cfg.samples_per_prompt}")
    if cfg.advantage == "group" and cfg.samples_per_prompt < 2:
        raise LoadError(f"--advantage group needs --samples-per-prompt >= 2 (a group to compare within), got "
                        f"{cfg.samples_per_prompt}")
    if cfg.critic == "none" and cfg.advantage == "gae":
        raise LoadError("--critic none needs --advantage group: GAE needs a critic's values")
    if cfg.critic != "none" and cfg.advantage == "group":
        raise LoadError(f"--critic {cfg.critic} has nothing to learn with --advantage group (no GAE returns); use "
                        "--critic none")
    if cfg.kl_coef and cfg.advantage == "group":
        raise LoadError("--kl-coef puts a KL penalty into GAE's token rewards, which --advantage group does not use; "
                        "GRPO's KL term is --kl-loss-coef")
    if not cfg.kl_target >= 0:
        raise LoadError(f"--kl-target must be >= 0 (0: a fixed beta of --kl-init), got {cfg.kl_target}")
    if not cfg.kl_loss_coef >= 0:
        raise LoadError(f"--kl-loss-coef must be >= 0, got {cfg.kl_loss_coef}")
    if not 0 <= cfg.warmup_steps < max(cfg.steps, 1):
        raise LoadError(f"--warmup-steps must be in [0, --steps) = [0, {cfg.steps}), got {cfg.warmup_steps}")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise LoadError(f"--lr must be a positive number, got {cfg.lr}")
    if cfg.lora_rank < 0:
        raise LoadError(f"--lora-rank must be >= 1 for LoRA (or 0: off, full fine-tuning), got {cfg.lora_rank}")
    if cfg.lora_rank > 0 and importlib.util.find_spec("peft") is None:
        raise LoadError("--lora-rank needs peft, which is not installed: pip install -e '.[lora]' -c constraints.txt")
    if cfg.lora_rank > 0 and not (cfg.lora_alpha >= 0 and 0 <= cfg.lora_dropout < 1):
        raise LoadError(f"--lora-alpha must be >= 0 (0: 2 * rank) and --lora-dropout in [0, 1), got "
                        f"{cfg.lora_alpha} and {cfg.lora_dropout}")


def _fit_positions(cfg: Config, m: Models, log) -> None:
    """Truncate prompts further when prompt + response would not fit the model's positions."""
    c = m.policy.config
    n_pos = getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None)
    if n_pos and cfg.max_prompt_len + cfg.max_new_tokens > n_pos:
        if cfg.max_new_tokens >= n_pos:
            raise LoadError(f"--max-new-tokens {cfg.max_new_tokens} does not fit the model's {n_pos} positions")
        log(f"note: prompts truncated to {n_pos - cfg.max_new_tokens} tokens so that prompt + {cfg.max_new_tokens} new "
            f"tokens fit the model's {n_pos} positions")
        cfg.max_prompt_len = n_pos - cfg.max_new_tokens


def finish(run: Run, cfg: Config, d: Dist, log) -> None:
    """At the last step: export the policy (save_pretrained), plot, and print the run's summary."""
    if cfg.export:
        ckpt.export_pretrained(run.models.policy, run.models.tokenizer, run.out / "final")
        log(f"final policy: {run.out / 'final'} (AutoModelForCausalLM.from_pretrained)")
    if d.main and cfg.plot and (run.out / "metrics.jsonl").exists():
        rows = read_metrics(run.out / "metrics.jsonl")
        plot_runs({cfg.algo: rows}, run.out / "plot.png", title=f"{cfg.algo} on {cfg.model}")
        k = max(1, len(rows) // 10)  # the first / last 10% of iterations (as train.sweep reads a run)
        avg = lambda key, w: sum(r[key] for r in w) / len(w)  # noqa: E731
        kl = (f"KL over the last {k}: k1 {avg('kl', rows[-k:]):.3f}, sqrt(mean k3) {avg('kl_sqrt_k3', rows[-k:]):.3f}; "
              if "kl" in rows[-1] else "")
        gold = (f"gold reward {avg('gold_reward_mean', rows[:k]):.3f} -> {avg('gold_reward_mean', rows[-k:]):.3f}; "
                if "gold_reward_mean" in rows[-1] else "")
        log(f"reward (mean of the first / last {k} iterations) {avg('reward_mean', rows[:k]):.3f} -> "
            f"{avg('reward_mean', rows[-k:]):.3f}; {gold}{kl}plot: {run.out / 'plot.png'}")
        phases = ("rollout", "score", "experience", "update", "checkpoint")
        mean = {ph: sum(r.get(f"time_{ph}", 0.0) for r in rows) / len(rows) for ph in phases}
        log("time per iteration (mean s): " + ", ".join(f"{ph} {mean[ph]:.3f}" for ph in phases)
            + f" of {sum(r['iter_s'] for r in rows) / len(rows):.3f} s")


@torch.no_grad()
def logp_mismatch(m: Models, prompts: list[Prompt], cfg: Config, d: Dist) -> float:
    """Largest |log-prob the sampler used - log-prob the training forward computes| over the sampled tokens
    of a few prompts (all ranks): ~1e-6 in fp32; a head or position handled wrongly shows here at once. The
    sampling runs on a forked RNG, so the run's own random stream is untouched."""
    devices = [d.device] if d.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        ro = rollout(m, (prompts * d.world)[d.rank :: d.world] or prompts[:1], cfg, d, sampling_logprobs=True)
    labels = torch.where(ro.mask, ro.response, -100)
    lp = m.policy(ro.input_ids, ro.attention_mask, ro.position_ids, labels, ro.prompt_len - 1,
                  temperature=cfg.temperature, backend=cfg.kernel_backend).logprobs
    worst = torch.where(ro.mask, (lp - ro.logp_sample).abs(), 0.0).max()
    return float(d.gather(worst.reshape(1)).max())


@torch.no_grad()
def evaluate(m: Models, prompts: list[Prompt], cfg: Config, d: Dist, out: Path, step: int, bar) -> None:
    """Greedy completions of the evaluation prompts (printed and appended to samples.jsonl)."""
    if not prompts:
        return
    per = math.ceil(len(prompts) / d.world)
    mine = (prompts * d.world)[d.rank * per : (d.rank + 1) * per] if d.world > 1 else prompts
    ro = rollout(m, mine, cfg, d, greedy=True)
    rows = list(zip(ro.prompts, ro.completions, m.reward(ro.prompts, ro.completions, ro.messages)))
    if d.world > 1:
        import torch.distributed as dist

        parts = [None] * d.world
        dist.all_gather_object(parts, rows)
        rows = [r for part in parts for r in part][: len(prompts)]
    if not d.main:
        return
    lines = [f"  {p!r} -> {c!r}  (reward {r:.3g})" for p, c, r in rows]
    msg = f"step {step} samples (greedy):\n" + "\n".join(lines)
    (bar.write if bar is not None else print)(msg)
    with open(out / "samples.jsonl", "a") as f:
        for p, c, r in rows:
            f.write(json.dumps({"step": step, "prompt": p, "completion": c, "reward": r}) + "\n")


if __name__ == "__main__":
    sys.exit(main())
