"""Every loss of the project, each written once as a per-token formula, and the masked mean over them.

A loss here is a ``TokenLoss``: a per-token function ``l(x_i, aux_i)`` of one variable ``x`` (the
token log-probs, or the values for the value loss) plus the per-token tensors it reads, reduced as

    L = sum_i m_i * l(x_i, aux_i) / n,      n = max(sum_i m_i, 1)

It is used two ways: called on ``x`` (plain autograd: ``ppo_loss(logprobs, ...)`` and the Triton path),
or handed to the fused log-prob ops, which ask it for ``(L_chunk, dL/dx_chunk)`` one chunk of tokens at
a time (``value_and_grad``) and turn ``dL/dlogp`` into the logits' gradient in the same pass. Masked
positions read zeros instead of whatever the caller left there (padding may hold NaN), so they add
exactly nothing to the loss or its gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from . import _checks as C


# ---- the per-token formulas (paper symbols; x is logp unless said otherwise) ----------------------


def apa(logp: Tensor, ref_logprobs: Tensor, advantages: Tensor, *, lam: float) -> Tensor:
    """APA: ``(logp - logp_init - A/lam)^2``, the regression of logp onto the target policy's log-prob."""
    return (logp - ref_logprobs - advantages / lam) ** 2


def ppo(logp: Tensor, old_logprobs: Tensor, advantages: Tensor, *, clip: float) -> Tensor:
    """PPO's clipped surrogate: ``max(-A*r, -A*clip(r, 1-eps, 1+eps))`` with ``r = exp(logp - logp_old)``."""
    ratio = torch.exp(logp - old_logprobs)
    return torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1.0 - clip, 1.0 + clip))


def k3(logp: Tensor, ref_logprobs: Tensor) -> Tensor:
    """The k3 estimator of KL(pi || pi_init) per token: ``exp(x) - x - 1`` with ``x = logp_init - logp``."""
    x = ref_logprobs - logp
    return torch.exp(x) - x - 1


def grpo(logp: Tensor, old_logprobs: Tensor, advantages: Tensor, ref_logprobs: Tensor | None = None, *, clip: float,
         beta: float) -> Tensor:
    """GRPO (DeepSeekMath): PPO's clipped surrogate plus ``beta * k3`` to the initial policy."""
    loss = ppo(logp, old_logprobs, advantages, clip=clip)
    return loss if ref_logprobs is None else loss + beta * k3(logp, ref_logprobs)


def awr(logp: Tensor, weights: Tensor) -> Tensor:
    """AWR: ``-logp * w`` with the fixed weight ``w = exp(A/lam)`` (``awr_weights``)."""
    return -logp * weights


def value(values: Tensor, returns: Tensor, old_values: Tensor | None = None, *, clip: float | None = None) -> Tensor:
    """``0.5 (V - R)^2``; with ``old_values`` and ``clip`` trlx's ``0.5 max((V-R)^2, (clip(V, V_old±c) - R)^2)``."""
    loss = (values - returns) ** 2
    if clip is not None:
        clipped = torch.maximum(torch.minimum(values, old_values + clip), old_values - clip)
        loss = torch.maximum(loss, (clipped - returns) ** 2)
    return 0.5 * loss


# ---- the reduction ---------------------------------------------------------------------------------


@dataclass
class TokenLoss:
    """``sum_i m_i * fn(x_i, **aux_i, **consts) / n`` over a flat or shaped set of tokens.

    ``aux`` tensors share the mask's shape; they are detached (no gradient flows to advantages or
    targets) and zeroed where the mask is 0. ``mask`` None means every token counts (the fused linear
    ops drop masked rows before they get here, and pass ``n`` over the original mask). ``own`` names
    arguments of ``fn`` that take the variable itself, detached: on-policy, the behaviour policy's
    log-probs are the ones being differentiated (PPO's ratio is then 1 in value, with gradient ``r * dlogp``).
    """

    fn: Callable[..., Tensor]
    aux: dict[str, Tensor]
    consts: dict = field(default_factory=dict)
    mask: Tensor | None = None
    n: Tensor | float | None = None
    own: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        m = self.mask
        self.aux = {k: (v.detach() if m is None else torch.where(m, v.detach(), 0.0)) for k, v in self.aux.items()}
        if self.n is None:
            self.n = m.sum().clamp(min=1) if m is not None else 1.0

    def part(self, x: Tensor, sl: slice) -> Tensor:
        """The loss's share from the tokens ``sl`` (``x`` holds just those)."""
        aux = {k: v[sl] for k, v in self.aux.items()}
        if self.mask is not None:  # masked positions of x too: a NaN there must not reach the gradient
            x = torch.where(self.mask[sl], x, 0.0)
        aux.update({k: x.detach() for k in self.own})
        l = self.fn(x, **aux, **self.consts)
        if self.mask is not None:
            l = torch.where(self.mask[sl], l, 0.0)
        return l.sum() / self.n

    def __call__(self, x: Tensor) -> Tensor:
        """The loss of ``x`` (same shape as the aux tensors), differentiable w.r.t. ``x``."""
        return self.part(x, slice(None))

    def flat(self, rows: Tensor | None = None) -> "TokenLoss":
        """The same loss over flat tokens (``rows``: keep only these, as the linear ops do), in ``acc``."""
        pick = (lambda v: v.reshape(-1)) if rows is None else (lambda v: v.reshape(-1).index_select(0, rows))
        mask = None if self.mask is None or rows is not None else self.mask.reshape(-1)
        return TokenLoss(self.fn, {k: pick(v) for k, v in self.aux.items()}, self.consts, mask, self.n, self.own)

    def cast(self, dtype: torch.dtype) -> "TokenLoss":
        return TokenLoss(self.fn, {k: v.to(dtype) for k, v in self.aux.items()}, self.consts, self.mask, self.n,
                         self.own)

    def value_and_grad(self, x: Tensor, sl: slice) -> tuple[Tensor, Tensor]:
        """``(L over rows sl, dL/dx for those rows)``: what a fused op needs to finish a chunk's gradient."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            part = self.part(x, sl)
            (g,) = torch.autograd.grad(part, x)
        return part.detach(), g


# ---- the builders: checked inputs -> TokenLoss -------------------------------------------------------


def check_per_token(shape: torch.Size, what: str, **named: Tensor) -> None:
    """Floating per-token tensors of ``shape`` (cheap: no value is read)."""
    for k, v in named.items():
        C.check_floating(k, v)
        C.check_shape(k, v, shape, what)


def check_tokens(mask: Tensor, **named: Tensor | None) -> Tensor:
    """Check per-token tensors against ``mask`` (shape, dtype, device, finite where valid); the bool mask."""
    C.check_mask("mask", mask)
    check_per_token(mask.shape, "the shape of mask", **{k: v for k, v in named.items() if v is not None})
    C.check_same_device({"mask": mask, **named})
    C.check_mask_values("mask", mask)
    m = mask.bool()
    for k, v in named.items():
        if v is not None:
            C.check_finite_where(k, v, m)
    return m


def apa_token_loss(ref_logprobs: Tensor, advantages: Tensor, mask: Tensor, *, lam: float = 0.1) -> TokenLoss:
    """APA: ``L = sum(m * (logp - logp_init - A/lam)^2) / n``; ``logp_init`` is the frozen initial policy's."""
    m = check_tokens(mask, ref_logprobs=ref_logprobs, advantages=advantages)
    return TokenLoss(apa, {"ref_logprobs": ref_logprobs, "advantages": advantages}, {"lam": C.check_positive("lam", lam)}, m)


def _old(old_logprobs: Tensor | None) -> tuple[dict[str, Tensor], tuple[str, ...]]:
    """``old_logprobs`` as an aux tensor, or (None: on-policy) as the log-probs being differentiated."""
    return ({}, ("old_logprobs",)) if old_logprobs is None else ({"old_logprobs": old_logprobs}, ())


def ppo_token_loss(old_logprobs: Tensor | None, advantages: Tensor, mask: Tensor, *, clip: float = 0.2) -> TokenLoss:
    """Clipped PPO: ``L = sum(m * max(-A*r, -A*clip(r, 1-eps, 1+eps))) / n``, ``r = exp(logp - logp_old)``;
    ``old_logprobs`` None: on-policy, ``logp_old`` is ``logp`` itself (detached)."""
    m = check_tokens(mask, old_logprobs=old_logprobs, advantages=advantages)
    old, own = _old(old_logprobs)
    return TokenLoss(ppo, {**old, "advantages": advantages}, {"clip": C.check_positive("clip", clip)}, m, own=own)


def grpo_token_loss(old_logprobs: Tensor | None, ref_logprobs: Tensor | None, advantages: Tensor, mask: Tensor, *,
                    clip: float = 0.2, beta: float = 0.04) -> TokenLoss:
    """GRPO: ``L = sum(m * [max(-A*r, -A*clip(r, 1-eps, 1+eps)) + beta * k3]) / n``; ``beta = 0`` needs no
    ``ref_logprobs`` (pass None: the initial policy need not run); ``old_logprobs`` None: on-policy, as PPO's."""
    beta = float(beta)
    if not math.isfinite(beta) or beta < 0:
        raise ValueError(f"beta must be a finite number >= 0, got {beta}")
    if beta > 0 and ref_logprobs is None:
        raise ValueError("grpo: beta > 0 needs ref_logprobs (the initial policy's log-probs)")
    ref = ref_logprobs if beta > 0 else None
    m = check_tokens(mask, old_logprobs=old_logprobs, advantages=advantages, ref_logprobs=ref)
    old, own = _old(old_logprobs)
    aux = {**old, "advantages": advantages, **({"ref_logprobs": ref} if ref is not None else {})}
    return TokenLoss(grpo, aux, {"clip": C.check_positive("clip", clip), "beta": beta}, m, own=own)


def awr_weights(advantages: Tensor, m: Tensor, lam: float, max_weight: float | None) -> Tensor:
    """``exp(A/lam)`` (clamped at ``max_weight``) in the advantages' precision, float32 at least."""
    lam = C.check_positive("lam", lam)
    A = advantages.detach()
    A = torch.where(m, A.to(torch.promote_types(A.dtype, torch.float32)), 0.0)
    w = torch.exp(A / lam)
    if max_weight is not None:
        w = w.clamp(max=C.check_positive("max_weight", max_weight))
    if C.value_checks_enabled() and not bool(torch.isfinite(w).all()):
        raise ValueError(f"exp(advantages/lam) overflows at lam={lam}; pass max_weight (AWR used 20) or a larger lam")
    return w


def awr_token_loss(advantages: Tensor, mask: Tensor, *, lam: float = 1.0, max_weight: float | None = None) -> TokenLoss:
    """AWR: ``L = -sum(m * logp * exp(A/lam)) / n``, weights optionally clamped at ``max_weight``."""
    m = check_tokens(mask, advantages=advantages)
    return TokenLoss(awr, {"weights": awr_weights(advantages, m, lam, max_weight)}, {}, m)


def value_token_loss(returns: Tensor, mask: Tensor, *, old_values: Tensor | None = None,
                     clip: float | None = None) -> TokenLoss:
    """The value loss of the values ``V`` (the variable): ``0.5 * sum(m * (V - R)^2) / n`` (or trlx's clipped form)."""
    m = check_tokens(mask, returns=returns, old_values=old_values)
    if clip is not None:
        if old_values is None:
            raise ValueError("value_loss: clip needs old_values")
        aux = {"returns": returns, "old_values": old_values}
        return TokenLoss(value, aux, {"clip": C.check_positive("clip", clip)}, m)
    return TokenLoss(value, {"returns": returns}, {}, m)


# ---- the public losses on per-token log-probs (docs/design.md, "The API contract") -------------------------------------


def awr_loss(
    logprobs: Tensor, advantages: Tensor, mask: Tensor, *, lam: float = 1.0, max_weight: float | None = None
) -> Tensor:
    """AWR: ``-sum(m * logp * exp(A/lam)) / sum(m)``, weights optionally clamped at ``max_weight``."""
    check_tokens(mask, logprobs=logprobs)
    return awr_token_loss(advantages, mask, lam=lam, max_weight=max_weight)(logprobs)


def ppo_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *, clip: float = 0.2) -> Tensor:
    """Clipped PPO: ``r = exp(logp - logp_old)``, ``sum(m * max(-A*r, -A*clip(r, 1-eps, 1+eps))) / sum(m)``."""
    check_tokens(mask, logprobs=logprobs)
    return ppo_token_loss(old_logprobs, advantages, mask, clip=clip)(logprobs)


def grpo_loss(logprobs: Tensor, old_logprobs: Tensor, ref_logprobs: Tensor | None, advantages: Tensor, mask: Tensor,
              *, clip: float = 0.2, beta: float = 0.04) -> Tensor:
    """GRPO: ``sum(m * [max(-A*r, -A*clip(r, 1-eps, 1+eps)) + beta * (exp(x) - x - 1)]) / sum(m)``,
    ``r = exp(logp - logp_old)``, ``x = logp_init - logp``."""
    check_tokens(mask, logprobs=logprobs)
    return grpo_token_loss(old_logprobs, ref_logprobs, advantages, mask, clip=clip, beta=beta)(logprobs)


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
    check_tokens(mask, values=values)
    return value_token_loss(returns, mask, old_values=old_values, clip=clip)(values)
