"""The oracle: plain eager PyTorch, short enough to check against the paper by eye.

Every backend is tested against these functions in float64. They materialise the full
log-softmax, so they are for tests and small inputs only. No input checks here: the public API
checks before it dispatches.
"""

from __future__ import annotations

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
) -> Tensor | tuple[Tensor, Tensor]:
    """logp = z[y]/tau - logsumexp(z/tau);  H = logsumexp(z/tau) - sum(softmax(z/tau) * z/tau)."""
    logsm = torch.log_softmax(_upcast(logits) / temperature, dim=-1)
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
) -> Tensor:
    """L = sum(m * (logp - logp_init - A/lam)^2) / sum(m); 0 when the mask is empty."""
    m = mask.bool()
    logp = token_logprobs(logits, torch.where(m, labels, 0), temperature)
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
) -> Tensor | tuple[Tensor, Tensor]:
    """The logits ops on z = hidden @ weight.T + bias, with the logits materialised."""
    logits = torch.nn.functional.linear(_upcast(hidden), _upcast(weight), None if bias is None else _upcast(bias))
    return token_logprobs(logits, labels, temperature, ignore_index, return_entropy)


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
) -> Tensor:
    logits = torch.nn.functional.linear(_upcast(hidden), _upcast(weight), None if bias is None else _upcast(bias))
    return apa_loss(logits, labels, ref_logprobs, advantages, mask, lam, temperature)
