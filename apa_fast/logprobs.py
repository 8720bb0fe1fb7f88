"""Token log-probs, entropy and any per-token loss of them, straight from logits.

    logp = z[y]/tau - logsumexp(z/tau)              H = logsumexp(z/tau) - sum(softmax(z/tau) * z/tau)
    softcap c (optional, Gemma 2's final soft-capping): z -> c tanh(z / c) before the temperature
    token_loss:  L = sum_i m_i l(logp_i) / n         (l from apa_fast.losses; apa_loss is l = APA's)

No (N, V) softmax, log-softmax or float32 copy of the logits is ever built by the ``torch`` or
``triton`` backends: both stream the vocabulary in chunks/blocks; the torch backend forms a loss's
logits gradient in the forward pass, and backward of the log-probs recomputes from the saved lse.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _checks as C
from . import _dispatch, reference
from .losses import TokenLoss, apa_token_loss, check_per_token


def _as_rows(x: Tensor) -> Tensor:
    """A (B, T, V) view of (..., V) with unit stride on V, without a copy whenever strides allow."""
    V = x.shape[-1]
    if x.stride(-1) != 1 and V > 1:
        x = x.contiguous()  # a transposed vocab axis: rare, and no kernel can stream it
    if x.dim() == 1:
        return x.view(1, 1, V)
    for shape in ((1, -1, V), (-1, x.shape[-2], V)):
        try:
            return x.view(shape)
        except RuntimeError:
            continue
    return x.reshape(1, -1, V)  # >3-D with non-collapsible strides: the one case that copies


class _TokenLogprobs(torch.autograd.Function):
    """logp (and H) per row; backward recomputes p from the saved lse (any upstream gradient)."""

    @staticmethod
    def forward(ctx, logits, labels, tau, ignore_index, return_entropy, ops):  # type: ignore[override]
        flat = labels.reshape(-1).long().contiguous()
        logp, lse, ent = ops.fwd(_as_rows(logits), flat, tau, ignore_index, return_entropy)
        ctx.save_for_backward(logits, flat, lse, ent)
        ctx.cfg = (tau, ignore_index, ops)
        lead = logits.shape[:-1]
        return (logp.view(lead), ent.view(lead)) if return_entropy else logp.view(lead)

    @staticmethod
    def backward(ctx, g_logp, g_ent=None):  # type: ignore[override]
        logits, flat, lse, ent = ctx.saved_tensors
        tau, ignore_index, ops = ctx.cfg
        if not ctx.needs_input_grad[0]:
            return (None,) * 6
        g_logp = None if g_logp is None else g_logp.reshape(-1).contiguous()
        g_ent = None if g_ent is None else g_ent.reshape(-1).contiguous()
        grad = ops.bwd(_as_rows(logits), flat, lse, ent, g_logp, g_ent, tau, ignore_index)
        return grad.view(logits.shape), None, None, None, None, None


class _FusedLoss(torch.autograd.Function):
    """A scalar ``TokenLoss`` of the log-probs whose logits gradient is formed in the forward pass."""

    @staticmethod
    def forward(ctx, logits, labels, tau, loss, ops):  # type: ignore[override]
        value, grad = ops.loss_fwd(_as_rows(logits), labels, tau, loss, ctx.needs_input_grad[0])
        ctx.save_for_backward(grad)
        ctx.shape = logits.shape
        return value

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return rescale(grad, g).view(ctx.shape), None, None, None, None


def rescale(grad: Tensor | None, g: Tensor) -> Tensor | None:
    """A gradient formed for an upstream gradient of 1, times the actual one (skipped when it is 1 on CPU,
    where the test costs no device sync)."""
    if grad is None or (g.device.type == "cpu" and float(g) == 1.0):
        return grad
    return grad * g.to(grad.dtype) if grad.dtype == g.dtype else (grad.to(g.dtype) * g).to(grad.dtype)


def token_logprobs(
    logits: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    backend: str = "auto",
    softcap: float | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Per-token log-probs of ``labels`` under ``softmax(logits / temperature)``.

    ``logp = z[y]/tau - logsumexp(z/tau)``; with ``return_entropy`` also
    ``H = logsumexp(z/tau) - sum(softmax(z/tau) * z/tau)`` from the same pass. Returns float32
    (float64 for float64 logits) of shape ``logits.shape[:-1]``; positions whose label is
    ``ignore_index`` give 0 and no gradient. Differentiable w.r.t. ``logits``. ``softcap`` c > 0 (None: off)
    soft-caps the logits first, ``z -> c tanh(z / c)``, then divides by the temperature (every backend, with
    the chain rule ``1 - tanh^2(z / c)`` in the gradient).
    """
    V = C.check_logits_labels(logits, labels)
    tau = C.check_positive("temperature", temperature)
    softcap = None if softcap is None else C.check_positive("softcap", softcap)
    ignore_index = int(ignore_index)
    name = _dispatch.resolve(backend, logits.device)
    C.check_label_range(labels, V, ignore_index)
    if name == "reference":
        return reference.token_logprobs(logits, labels, tau, ignore_index, return_entropy, softcap)
    if logits.numel() == 0:
        z = logits.sum(-1).to(C.out_dtype(logits)) * 0.0
        return (z, z.clone()) if return_entropy else z
    return _TokenLogprobs.apply(logits, labels, tau, ignore_index, bool(return_entropy),
                                _dispatch.logits_ops(name, softcap))


def token_loss(logits: Tensor, labels: Tensor, loss: TokenLoss, *, temperature: float = 1.0,
               backend: str = "auto", softcap: float | None = None) -> Tensor:
    """A per-token loss of the log-probs, ``L = sum_i m_i l(logp_i) / n``, straight from logits.

    ``loss`` (``apa_fast.losses``) carries the formula, its per-token tensors and the mask, all shaped like
    ``labels``. The ``torch`` backend forms the logits gradient in the forward pass, one chunk at a time;
    ``triton`` and ``reference`` compose ``token_logprobs`` with the loss (backward recomputes). Labels
    are read only where the mask is 1. ``softcap``: as in ``token_logprobs``.
    """
    V = C.check_logits_labels(logits, labels)
    if loss.mask is None or loss.mask.shape != logits.shape[:-1]:
        raise ValueError(f"loss must carry a mask of shape {tuple(logits.shape[:-1])} (the leading dims of logits)")
    tau = C.check_positive("temperature", temperature)
    softcap = None if softcap is None else C.check_positive("softcap", softcap)
    name = _dispatch.resolve(backend, logits.device)
    valid = loss.mask
    C.check_label_range(labels, V, None, valid=valid)
    acc = C.out_dtype(logits)
    masked = torch.where(valid, labels, -100)
    if name == "reference":
        lp = reference.token_logprobs(logits, masked, tau, softcap=softcap)
        return loss.cast(lp.dtype)(lp)
    ops = _dispatch.logits_ops(name, softcap)
    if ops.loss_fwd is None:  # composed: log-probs, then the loss under autograd (backward recomputes)
        lp = _TokenLogprobs.apply(logits, masked, tau, -100, False, ops)
        return loss.cast(lp.dtype)(lp)
    if logits.numel() == 0:
        return (logits.sum() * 0.0).to(acc)
    flat = torch.where(valid, labels, 0).reshape(-1).long().contiguous()
    return _FusedLoss.apply(logits, flat, tau, loss.flat().cast(acc), ops)


def apa_loss(
    logits: Tensor,
    labels: Tensor,
    ref_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    lam: float = 0.1,
    temperature: float = 1.0,
    backend: str = "auto",
    softcap: float | None = None,
) -> Tensor:
    """APA loss ``sum(m * (logp - logp_init - A/lam)^2) / sum(m)`` straight from logits, fused.

    ``ref_logprobs`` is ``log pi_init`` (the frozen initial policy), not the behaviour policy's.
    Returns a float32 scalar (float64 for float64 logits); an all-masked batch gives 0 with zero
    gradient. Values of labels, ``ref_logprobs`` and ``advantages`` at masked positions are unused.
    ``softcap``: as in ``token_logprobs`` (logp of the soft-capped logits).
    """
    C.check_logits_labels(logits, labels)
    check_per_token(logits.shape[:-1], "the leading dims of logits", ref_logprobs=ref_logprobs, advantages=advantages)
    C.check_mask("mask", mask)
    C.check_shape("mask", mask, logits.shape[:-1], "the leading dims of logits")
    C.check_same_device({"logits": logits, "ref_logprobs": ref_logprobs, "advantages": advantages, "mask": mask})
    softcap = None if softcap is None else C.check_positive("softcap", softcap)
    loss = apa_token_loss(ref_logprobs, advantages, mask, lam=lam)
    if _dispatch.resolve(backend, logits.device) == "reference":
        return reference.apa_loss(logits, labels, ref_logprobs, advantages, mask, loss.consts["lam"], temperature,
                                  softcap)
    return token_loss(logits, labels, loss, temperature=temperature, backend=backend, softcap=softcap)
