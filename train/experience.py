"""Experience: the behaviour, initial-policy and critic scores of a rollout, and its advantages.

    logp_old  = log pi_old(y_t)      (the policy that sampled; on-policy batches leave it to the update)
    logp_init = log pi_init(y_t)     (the frozen initial policy)
    GAE:    r_t = -beta (logp_old - logp_init) + [t = last] s,   A = GAE(r, V), whitened over all ranks' tokens
    group:  A_i = (s_i - mean_G(s)) / std_G(s) on every token of sample i (critic-free; Dr. GRPO, RLOO variants)
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

import apa_fast
from apa_fast.gae import group_stats

from .config import Config
from .dist import Dist
from .models import Models
from .records import Experience, Rollout


def on_policy(cfg: Config, n_rows: int, d: Dist) -> bool:
    """Critic-free advantages and one gradient step per epoch: the first step's forward sees exactly the policy
    that sampled, so its own detached log-probs are the behaviour policy's (TRL's GRPO does the same when it
    takes one step per batch) and the experience pass need not run the policy at all."""
    return cfg.advantage == "group" and cfg.minibatch_size * cfg.samples_per_prompt // d.world >= n_rows


@torch.no_grad()
def make_experience(m: Models, ro: Rollout, scores: Tensor, scaled: Tensor, cfg: Config, beta: float,
                    d: Dist) -> Experience:
    """The per-token tensors of the update from the ``scaled`` scores. Rows whose score is not a number leave
    the mask (and the loss)."""
    b = dataclasses.replace(ro.batch, mask=ro.batch.mask & torch.isfinite(scores).unsqueeze(1))
    mask = b.mask
    own = on_policy(cfg, len(mask), d)
    logp_old = entropy = values = None
    if not own:
        out = m.policy(b, values=cfg.critic == "shared")
        logp_old, entropy = out.head.logprobs(out.hidden, b.response, mask, entropy=True)
        values = out.values
    if m.critic is not None:
        values = m.critic(b)
    logp_init = None
    if m.ref is not None:
        ref = m.ref(b)
        logp_init = ref.head.logprobs(ref.hidden, b.response, mask)
    if cfg.advantage == "group":  # critic-free: each sequence's score against its group's, on all its tokens
        G = cfg.samples_per_prompt
        A = apa_fast.group_advantages(scaled, G, std=cfg.group_std, baseline=cfg.group_baseline).unsqueeze(1) * mask
        if cfg.group_whiten:
            A = apa_fast.masked_whiten(A, mask, process_group=d.group)
        n_flat, n_groups = d.sum(group_stats(scaled, G)[3].sum(), len(scaled) // G)
        return Experience(batch=b, scores=scores, advantages=A, on_policy=own, logp_old=logp_old, entropy=entropy,
                          logp_init=logp_init, group_zero_std_frac=n_flat / max(n_groups, 1.0))
    rewards = -beta * (logp_old - logp_init) * mask
    last = (mask.long().cumsum(-1) * mask).argmax(-1)
    rewards[torch.arange(len(scaled), device=rewards.device), last] += torch.where(mask.any(-1), scaled, 0.0)
    A, returns = apa_fast.gae(rewards, values, mask, gamma=cfg.gamma, lam=cfg.gae_lam)
    A = apa_fast.masked_whiten(A, mask, process_group=d.group)  # over the valid tokens of all ranks
    return Experience(batch=b, scores=scores, advantages=A, logp_old=logp_old, entropy=entropy, logp_init=logp_init,
                      rewards=rewards, values=values, returns=returns)


def iteration_metrics(b: Experience, cfg: Config, d: Dist) -> dict:
    """Global (all-rank) reward, KL and entropy of one rollout batch, over the response tokens only.

    ``kl`` (k1): per sequence ``sum_t (logp - logp_init)``, averaged over sequences. ``kl_sqrt_k3``:
    ``sqrt(mean_t k3)``, ``k3 = exp(x) - 1 - x``, ``x = logp_init - logp``, the mean over all response tokens
    (an unbiased, non-negative per-token estimator of KL(pi || pi_init)). Not the APA authors' plotted
    ``policy/sqrt_kl``, which also counts prompt and padding positions (docs/design.md, "Metrics").
    ``b`` must hold the behaviour log-probs (after the update, for an on-policy batch).
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
