"""The update: each algorithm's per-token loss in the papers' symbols, and the gradient steps over a batch.

    APA   l_t = (logp_t - logp_init_t - A_t / lam)^2                                   (Zhu et al. 2023)
    PPO   l_t = max(-A_t r_t, -A_t clip(r_t, 1 - eps, 1 + eps)),  r_t = exp(logp_t - logp_old_t)
    GRPO  PPO's l_t + beta k3_t,  k3_t = exp(logp_init_t - logp_t) - (logp_init_t - logp_t) - 1
    AWR   l_t = -logp_t exp(A_t / lam)
    critic  0.5 (V_t - R_t)^2  (PPO: clipped around the old values)

The policy loss is ``sum_t m_t l_t / n`` over the minibatch's valid tokens, formed by
``apa_fast.linear_token_loss`` from the final hidden states and the LM head: the logits are never built.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import torch
from torch import Tensor

import apa_fast
from apa_fast import losses

from .config import Config
from .dist import Dist
from .metrics import release_freed_memory
from .models import Models
from .records import Experience


def policy_token_loss(cfg: Config, mb: Experience) -> losses.TokenLoss:
    """The algorithm's per-token loss of the policy's log-probs. On-policy, ``logp_old`` is None: PPO's and GRPO's
    ratio then uses the differentiated log-probs themselves (r = 1 in value, gradient dlogp)."""
    A, m = mb.advantages, mb.mask
    if cfg.algo == "apa":
        return losses.apa_token_loss(mb.logp_init, A, m, lam=cfg.lam)
    if cfg.algo == "ppo":
        return losses.ppo_token_loss(mb.logp_old, A, m, clip=cfg.ppo_clip)
    if cfg.algo == "grpo":
        return losses.grpo_token_loss(mb.logp_old, mb.logp_init, A, m, clip=cfg.ppo_clip, beta=cfg.kl_loss_coef)
    return losses.awr_token_loss(A, m, lam=cfg.lam, max_weight=cfg.awr_max_weight or None)


def update(m: Models, b: Experience, cfg: Config, d: Dist, opt: torch.optim.Optimizer, params: list,
           gen: torch.Generator) -> tuple[dict, Experience]:
    """Epochs x minibatches of ``L = L_pi + vf_coef * L_V``, each minibatch normalised by its global token count
    and accumulated over micro-batches. Returns the mean losses and the experience with its behaviour log-probs
    (an on-policy batch gets them from its first step's own forward)."""
    m.policy.train()
    if m.critic is not None:
        m.critic.train()
    sums, n_total = {"loss": 0.0, "policy_loss": 0.0, "value_loss": 0.0}, 0.0
    for parts, n_global in gradient_steps(b.mask, cfg, d, micro_batch_size(b, cfg, m, d), gen):
        n_total += n_global
        kept = []  # on-policy: (rows, logp, entropy) of this step
        for j, rows in enumerate(parts):
            if j:  # the last micro-batch's activations, freed by its backward, would stay resident under these
                release_freed_memory()
            mb = b.rows(rows)
            n_local = float(mb.mask.sum())
            # each rank's loss is a mean over its own tokens; FSDP averages gradients over ranks, so this scale makes
            # the step sum(token losses) / n_global, the same for any number of ranks and micro-batches
            scale = n_local * d.world / n_global if n_global > 0 else 0.0
            out = m.policy(mb.batch, values=cfg.critic == "shared")  # hidden states (B, R, H), head, values
            l_pi, h, W, y = policy_token_loss(cfg, mb), out.hidden, out.head.weight, mb.batch.response
            # the scale inside the policy loss (its normaliser): the fused op then gets an upstream gradient of 1
            # and hands its gradients over as formed, with no (V x H) multiply by the scale
            l_pi.n = n_global / d.world if n_global > 0 else 1.0
            if b.on_policy:  # this forward is the behaviour policy: keep its log-probs and entropy
                pg, logp, H = apa_fast.linear_token_loss(h, W, y, l_pi, return_scores=True, **out.head.kw)
                kept.append((rows, logp, H))
            else:
                pg = apa_fast.linear_token_loss(h, W, y, l_pi, **out.head.kw)
            vf = pg.new_zeros(())
            if mb.returns is not None:  # a critic to train
                V = out.values if out.values is not None else m.critic(mb.batch)
                clip = dict(old_values=mb.values, clip=cfg.value_clip) if cfg.algo == "ppo" else {}
                vf = apa_fast.value_loss(V, mb.returns, mb.mask, **clip)
            (pg + cfg.vf_coef * scale * vf).backward()
            pg = pg.detach() / scale if scale > 0 else pg.detach()  # back to the mean over this micro-batch
            for k, v in (("loss", pg + cfg.vf_coef * vf), ("policy_loss", pg), ("value_loss", vf)):
                sums[k] += float(v.detach()) * n_local
        if kept:  # back in row order; later epochs take these as logp_old
            rows, logp, H = (torch.cat(x) for x in zip(*kept))
            order = rows.argsort()
            b = dataclasses.replace(b, on_policy=False, logp_old=logp[order], entropy=H[order])
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
    tot = d.sum(*sums.values())
    return {k: v / max(n_total, 1.0) for k, v in zip(sums, tot)}, b


def gradient_steps(mask: Tensor, cfg: Config, d: Dist, micro: int,
                   gen: torch.Generator) -> Iterator[tuple[tuple[Tensor, ...], float]]:
    """For each gradient step (epochs x minibatches of a seeded permutation): its rows split into as few micro-batches
    of at most ``micro`` rows as fit, of even sizes, and the step's valid-token count over all ranks."""
    B, size = len(mask), cfg.minibatch_size * cfg.samples_per_prompt // d.world  # sequences per rank and step
    for _ in range(cfg.epochs):
        perm = torch.randperm(B, generator=gen).to(mask.device)
        steps = [perm[i : i + size] for i in range(0, B, size)]
        counts = d.sum(*(float(mask[rows].sum()) for rows in steps))  # one all-reduce per epoch
        for rows, n_global in zip(steps, counts):
            yield rows.tensor_split(-(-len(rows) // micro)), n_global


def micro_batch_size(b: Experience, cfg: Config, m: Models, d: Dist) -> int:
    """Sequences per micro-batch: ``--micro-batch-tokens`` over the longest sequence of any rank (one count on all
    FSDP ranks). By default (-1) the tokens whose activations fit an estimated 0.5 GiB on CPU (8 GiB on a GPU) at 64
    bytes per token, layer and hidden unit (about what a fused Llama block keeps for backward)."""
    budget = cfg.micro_batch_tokens
    if budget < 0:
        tc = m.policy.config.get_text_config()
        budget = max(1, int((0.5 if d.device.type == "cpu" else 8.0) * 2**30 // (64 * tc.num_hidden_layers * tc.hidden_size)))
    if budget == 0:
        return len(b.mask)
    L = int(d.gather(torch.tensor([b.batch.input_ids.shape[1]], device=d.device)).max())
    return max(1, budget // L)


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
