"""Small elementwise losses on per-token tensors: AWR, PPO (trlx-faithful) and the value loss.

All are masked means ``sum(m * l) / sum(m)``: 0 with zero gradient when the mask is empty.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _checks as C


def _check_tokens(mask: Tensor, **named: Tensor | None) -> Tensor:
    """Check per-token tensors against ``mask``; return the bool mask."""
    C.check_mask("mask", mask)
    for k, v in named.items():
        if v is not None:
            C.check_floating(k, v)
            C.check_shape(k, v, mask.shape, "the shape of mask")
    C.check_same_device({"mask": mask, **named})
    C.check_mask_values("mask", mask)
    m = mask.bool()
    for k, v in named.items():
        if v is not None:
            C.check_finite_where(k, v, m)
    return m


def _masked_mean(x: Tensor, m: Tensor) -> Tensor:
    return torch.where(m, x, 0.0).sum() / m.sum().clamp(min=1)


def awr_loss(
    logprobs: Tensor, advantages: Tensor, mask: Tensor, *, lam: float = 1.0, max_weight: float | None = None
) -> Tensor:
    """AWR: ``-sum(m * logp * exp(A/lam)) / sum(m)``, weights optionally clamped at ``max_weight``."""
    m = _check_tokens(mask, logprobs=logprobs, advantages=advantages)
    lam = C.check_positive("lam", lam)
    # the weights in the inputs' precision (float32 at least): float64 callers get float64 exactness and range
    dt = torch.promote_types(torch.promote_types(logprobs.dtype, advantages.dtype), torch.float32)
    w = torch.exp(torch.where(m, advantages.detach().to(dt), 0.0) / lam)
    if max_weight is not None:
        w = w.clamp(max=C.check_positive("max_weight", max_weight))
    if C.value_checks_enabled() and not bool(torch.isfinite(torch.where(m, w, 0.0)).all()):
        raise ValueError(f"exp(advantages/lam) overflows at lam={lam}; pass max_weight (AWR used 20) or a larger lam")
    return _masked_mean(-logprobs * w.to(logprobs.dtype), m)


def ppo_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *, clip: float = 0.2) -> Tensor:
    """Clipped PPO: ``r = exp(logp - logp_old)``, ``sum(m * max(-A*r, -A*clip(r, 1-eps, 1+eps))) / sum(m)``."""
    m = _check_tokens(mask, logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages)
    eps = C.check_positive("clip", clip)
    ratio = torch.exp(torch.where(m, logprobs - old_logprobs.detach(), 0.0))
    A = advantages.detach()
    return _masked_mean(torch.maximum(-A * ratio, -A * ratio.clamp(1.0 - eps, 1.0 + eps)), m)


def value_loss(
    values: Tensor,
    returns: Tensor,
    mask: Tensor,
    *,
    old_values: Tensor | None = None,
    clip: float | None = None,
) -> Tensor:
    """``0.5 * sum(m * (V - R)^2) / sum(m)``; with ``old_values`` and ``clip`` the trlx clipped form
    ``0.5 * sum(m * max((V-R)^2, (clip(V, V_old-c, V_old+c) - R)^2)) / sum(m)``."""
    m = _check_tokens(mask, values=values, returns=returns, old_values=old_values)
    # zero every input at masked positions before any arithmetic: a NaN there would otherwise reach the
    # gradient through (V - R) * 0 even though the loss itself masks it out
    V = torch.where(m, values, 0.0)
    R = torch.where(m, returns.detach(), 0.0)
    loss = (V - R) ** 2
    if clip is not None:
        if old_values is None:
            raise ValueError("value_loss: clip needs old_values")
        c = C.check_positive("clip", clip)
        old = torch.where(m, old_values.detach(), 0.0)
        clipped = torch.maximum(torch.minimum(V, old + c), old - c)
        loss = torch.maximum(loss, (clipped - R) ** 2)
    return 0.5 * _masked_mean(loss, m)
