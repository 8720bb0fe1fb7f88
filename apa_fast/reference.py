"""The oracle: plain eager PyTorch, short enough to check against the paper by eye.

Every backend is tested against these functions in float64. They materialise the full
log-softmax, so they are for tests and small inputs only. No input checks here: the public API
checks before it dispatches.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _upcast(x: Tensor) -> Tensor:
    return x.double() if x.dtype == torch.float64 else x.float()


def token_logprobs(
    logits: Tensor,
    labels: Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    softcap: float | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """logp = z[y]/tau - logsumexp(z/tau);  H = logsumexp(z/tau) - sum(softmax(z/tau) * z/tau);
    ``softcap`` c: z is first replaced by c * tanh(z / c) (Gemma 2's final soft-capping)."""
    z = _upcast(logits)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    u = z / temperature
    logsm = u - torch.logsumexp(u, -1, keepdim=True)  # a cascaded sum: ATen's CPU log_softmax drifts at large V
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0).long()
    logp = logsm.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(valid, logp, 0.0)
    if not return_entropy:
        return logp
    entropy = -(logsm.exp() * logsm).sum(-1)
    return logp, torch.where(valid, entropy, 0.0)


def apa_loss(
    logits: Tensor,
    labels: Tensor,
    ref_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    lam: float = 0.1,
    temperature: float = 1.0,
    softcap: float | None = None,
) -> Tensor:
    """L = sum(m * (logp - logp_init - A/lam)^2) / sum(m); 0 when the mask is empty (logp as in token_logprobs)."""
    m = mask.bool()
    logp = token_logprobs(logits, torch.where(m, labels, 0), temperature, softcap=softcap)
    target = _upcast(ref_logprobs) + _upcast(advantages) / lam
    resid = torch.where(m, logp - torch.where(m, target, 0.0), 0.0)
    return (resid**2).sum() / m.sum().clamp(min=1)


def gae(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
    last_values: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Reverse GAE with skip semantics: masked steps output 0 and let the carries pass through.

    delta_t = r_t + gamma * V_next - V_t;  A_t = delta_t + gamma * lam * A_next;  R_t = A_t + V_t.
    """
    B, T = rewards.shape
    dtype = torch.promote_types(_upcast(rewards).dtype, _upcast(values).dtype)
    A = torch.zeros(B, T, dtype=dtype, device=rewards.device)
    R = torch.zeros(B, T, dtype=dtype, device=rewards.device)
    m = mask.bool()
    for b in range(B):
        carry_v = float(last_values[b]) if last_values is not None else 0.0
        carry_a = 0.0
        for t in reversed(range(T)):
            if m[b, t]:
                v = float(values[b, t])
                delta = float(rewards[b, t]) + gamma * carry_v - v
                carry_a = delta + gamma * lam * carry_a
                A[b, t] = carry_a
                R[b, t] = carry_a + v
                carry_v = v
    return A, R


def linear_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    softcap: float | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """The logits ops on z = hidden @ weight.T + bias, with the logits materialised."""
    logits = torch.nn.functional.linear(_upcast(hidden), _upcast(weight), None if bias is None else _upcast(bias))
    return token_logprobs(logits, labels, temperature, ignore_index, return_entropy, softcap)


def linear_apa_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    ref_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    bias: Tensor | None = None,
    lam: float = 0.1,
    temperature: float = 1.0,
    softcap: float | None = None,
) -> Tensor:
    """apa_loss on z = hidden @ weight.T + bias, with the logits materialised."""
    logits = torch.nn.functional.linear(_upcast(hidden), _upcast(weight), None if bias is None else _upcast(bias))
    return apa_loss(logits, labels, ref_logprobs, advantages, mask, lam, temperature, softcap)


def group_advantages(scores: Tensor, group_size: int, std: bool = True, baseline: str = "mean") -> Tensor:
    """Per sample i of a group of G: A_i = (s_i - b_i) / (std(s) + 1e-6) (or without the division), b_i the
    group mean or the leave-one-out mean of the other samples; NaN scores count for nothing and get 0, and
    so does every sample of a group with fewer than two finite scores or with all of them equal."""
    out = torch.zeros(scores.shape, dtype=torch.float64)
    for g0 in range(0, len(scores), group_size):
        idx = [i for i in range(g0, g0 + group_size) if math.isfinite(float(scores[i]))]
        vals = [float(scores[i]) for i in idx]
        if len(vals) < 2 or max(vals) == min(vals):
            continue
        mean = sum(vals) / len(vals)
        sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
        for i, v in zip(idx, vals):
            b = mean if baseline == "mean" else (sum(vals) - v) / (len(vals) - 1)
            out[i] = (v - b) / (sd + 1e-6) if std else v - b
    return out


def grpo_loss(logprobs: Tensor, old_logprobs: Tensor, ref_logprobs: Tensor, advantages: Tensor, mask: Tensor,
              clip: float = 0.2, beta: float = 0.04) -> Tensor:
    """sum(m * [max(-A r, -A clip(r, 1-eps, 1+eps)) + beta * (exp(x) - x - 1)]) / sum(m),
    r = exp(logp - logp_old), x = logp_init - logp."""
    m = mask.bool()
    lp, old, ref, A = (torch.where(m, _upcast(t), 0.0) for t in (logprobs, old_logprobs, ref_logprobs, advantages))
    r = torch.exp(lp - old)
    x = ref - lp
    per = torch.maximum(-A * r, -A * r.clamp(1 - clip, 1 + clip)) + beta * (torch.exp(x) - x - 1)
    return torch.where(m, per, 0.0).sum() / m.sum().clamp(min=1)
