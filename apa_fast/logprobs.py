"""Token log-probs, entropy and the fused APA loss straight from logits.

    logp = z[y]/tau - logsumexp(z/tau)              H = logsumexp(z/tau) - sum(softmax(z/tau) * z/tau)
    L_APA = sum(m * (logp - logp_init - A/lam)^2) / sum(m)

No (N, V) softmax, log-softmax or float32 copy of the logits is ever built by the ``torch`` or
``triton`` backends: both stream the vocabulary in chunks/blocks and recompute what backward needs
from the saved per-token log-sum-exp.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _checks as C
from . import _dispatch, reference


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
    @staticmethod
    def forward(ctx, logits, labels, tau, ignore_index, return_entropy, impl):  # type: ignore[override]
        x3 = _as_rows(logits)
        flat = labels.reshape(-1).long().contiguous()
        logp, lse, ent = impl.logprobs_fwd(x3, flat, tau, ignore_index, return_entropy)
        ctx.save_for_backward(logits, flat, lse, ent)
        ctx.cfg = (tau, ignore_index, impl)
        lead = logits.shape[:-1]
        logp = logp.view(lead)
        return (logp, ent.view(lead)) if return_entropy else logp

    @staticmethod
    def backward(ctx, g_logp, g_ent=None):  # type: ignore[override]
        logits, flat, lse, ent = ctx.saved_tensors
        tau, ignore_index, impl = ctx.cfg
        if not ctx.needs_input_grad[0]:
            return (None,) * 6
        g_logp = None if g_logp is None else g_logp.reshape(-1).contiguous()
        g_ent = None if g_ent is None else g_ent.reshape(-1).contiguous()
        grad = impl.logprobs_bwd(_as_rows(logits), flat, lse, ent, g_logp, g_ent, tau, ignore_index)
        return grad.view(logits.shape), None, None, None, None, None


class _ApaLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ref, adv, n, lam, tau, ignore_index, impl):  # type: ignore[override]
        need_grad = ctx.needs_input_grad[0]
        loss, lse, coef, grad = impl.apa_loss_fwd(
            _as_rows(logits), labels, ref, adv, n, lam, tau, ignore_index, need_grad
        )
        if grad is not None:
            ctx.save_for_backward(grad)
        else:
            ctx.save_for_backward(logits, labels, lse, coef)
        ctx.cfg = (tau, ignore_index, impl, grad is not None)
        ctx.shape = logits.shape
        return loss

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        tau, ignore_index, impl, precomputed = ctx.cfg
        if precomputed:
            (grad,) = ctx.saved_tensors
            # the gradient was written in forward for an upstream gradient of 1 (loss.backward())
            if g.device.type != "cpu" or float(g) != 1.0:
                grad = grad * g.to(grad.dtype)
            return grad.view(ctx.shape), None, None, None, None, None, None, None, None
        logits, labels, lse, coef = ctx.saved_tensors
        grad = impl.logprobs_bwd(_as_rows(logits), labels, lse, None, coef * g, None, tau, ignore_index)
        return grad.view(logits.shape), None, None, None, None, None, None, None, None


def token_logprobs(
    logits: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Per-token log-probs of ``labels`` under ``softmax(logits / temperature)``.

    ``logp = z[y]/tau - logsumexp(z/tau)``; with ``return_entropy`` also
    ``H = logsumexp(z/tau) - sum(softmax(z/tau) * z/tau)`` from the same pass. Returns float32
    (float64 for float64 logits) of shape ``logits.shape[:-1]``; positions whose label is
    ``ignore_index`` give 0 and no gradient. Differentiable w.r.t. ``logits``.
    """
    V = C.check_logits_labels(logits, labels)
    tau = C.check_positive("temperature", temperature)
    ignore_index = int(ignore_index)
    name = _dispatch.resolve(backend, logits.device)
    C.check_label_range(labels, V, ignore_index)
    if name == "reference":
        return reference.token_logprobs(logits, labels, tau, ignore_index, return_entropy)
    if logits.numel() == 0:
        z = logits.sum(-1).to(C.out_dtype(logits)) * 0.0
        return (z, z.clone()) if return_entropy else z
    impl = _dispatch.module(name, "logprobs")
    return _TokenLogprobs.apply(logits, labels, tau, ignore_index, bool(return_entropy), impl)


def _check_per_token(name: str, x: Tensor, logits: Tensor) -> None:
    C.check_floating(name, x)
    C.check_shape(name, x, logits.shape[:-1], "the leading dims of logits")


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
) -> Tensor:
    """APA loss ``sum(m * (logp - logp_init - A/lam)^2) / sum(m)`` straight from logits, fused.

    ``ref_logprobs`` is ``log pi_init`` (the frozen initial policy), not the behaviour policy's.
    Returns a float32 scalar (float64 for float64 logits); an all-masked batch gives 0 with zero
    gradient. Values of labels, ``ref_logprobs`` and ``advantages`` at masked positions are unused.
    """
    V = C.check_logits_labels(logits, labels)
    _check_per_token("ref_logprobs", ref_logprobs, logits)
    _check_per_token("advantages", advantages, logits)
    C.check_mask("mask", mask)
    C.check_shape("mask", mask, logits.shape[:-1], "the leading dims of logits")
    C.check_same_device(
        {"logits": logits, "ref_logprobs": ref_logprobs, "advantages": advantages, "mask": mask}
    )
    lam = C.check_positive("lam", lam)
    tau = C.check_positive("temperature", temperature)
    name = _dispatch.resolve(backend, logits.device)
    C.check_mask_values("mask", mask)
    valid = mask.bool()
    C.check_label_range(labels, V, None, valid=valid)
    C.check_finite_where("advantages", advantages, valid)
    C.check_finite_where("ref_logprobs", ref_logprobs, valid)
    if name == "reference":
        return reference.apa_loss(logits, labels, ref_logprobs, advantages, mask, lam, tau)
    acc = C.out_dtype(logits)
    if logits.numel() == 0:
        return (logits.sum() * 0.0).to(acc)
    ignore = -100
    flat_valid = valid.reshape(-1)
    labels_eff = torch.where(flat_valid, labels.reshape(-1).long(), ignore).contiguous()
    ref = torch.where(flat_valid, ref_logprobs.reshape(-1).to(acc), 0.0).contiguous()
    adv = torch.where(flat_valid, advantages.reshape(-1).to(acc), 0.0).contiguous()
    n = flat_valid.sum().to(acc)
    impl = _dispatch.module(name, "logprobs")
    return _ApaLoss.apply(logits, labels_eff, ref, adv, n, lam, tau, ignore, impl)
