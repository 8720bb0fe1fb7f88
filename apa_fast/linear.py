"""Log-probs and per-token losses from hidden states and the LM head, never materialising the logits.

    z = hidden @ weight.T + bias  (softcap c: z -> c tanh(z / c), Gemma 2's final soft-capping);  u = z / tau;  logp = u[y] - logsumexp(u);  H = logsumexp(u) - sum(softmax(u) * u)
    linear_token_loss:  L = sum_i m_i l(logp_i) / n     (l from apa_fast.losses: APA, PPO, AWR, ...)

Rows whose label is ``ignore_index`` (or whose mask is 0) are dropped before any backend runs, so no
matmul time is spent on them; their outputs are 0 with no gradient. The autograd Functions live here;
the backends (``_torch_linear``, ``kernels.linear``) hold none.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _checks as C
from . import _dispatch, reference
from .logprobs import rescale
from .losses import TokenLoss, apa_token_loss, check_per_token


def _check_linear(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None) -> tuple[int, int]:
    C.check_floating("hidden", hidden)
    C.check_floating("weight", weight)
    C.check_integer("labels", labels)
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape (..., H), got a scalar")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape (V, H), got {tuple(weight.shape)}")
    V, H = weight.shape
    if hidden.shape[-1] != H:
        raise ValueError(f"hidden's last dim ({hidden.shape[-1]}) must equal weight's hidden size H = {H} (weight is (V, H))")
    if V < 1:
        raise ValueError(f"weight must have V >= 1 rows, got {V}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must equal hidden dtype {hidden.dtype}")
    if bias is not None:
        C.check_floating("bias", bias)
        C.check_shape("bias", bias, (V,), "(V,), one per vocabulary row of weight")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias dtype {bias.dtype} must equal hidden dtype {hidden.dtype}")
    C.check_shape("labels", labels, hidden.shape[:-1], "the leading dims of hidden")
    C.check_same_device({"hidden": hidden, "weight": weight, "labels": labels, "bias": bias})
    return V, H


class _LinearTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, labels, tau, return_entropy, ops):  # type: ignore[override]
        need = tuple(ctx.needs_input_grad[:3])
        ctx.cfg = (tau, ops)
        ctx.dh = need == (True, False, False) and not return_entropy and ops.fwd_dh is not None and h.dtype in (torch.float32, torch.float64)
        if ctx.dh:  # a frozen LM head: dlogp/dh per row comes out of the forward; backward only scales it
            logp, dh = ops.fwd_dh(h, weight, bias, labels, tau)
            ctx.save_for_backward(dh)
            return logp
        logp, lse, ent = ops.fwd(h, weight, bias, labels, tau, return_entropy)
        ctx.save_for_backward(h, weight, bias, labels, lse, ent)
        return (logp, ent) if return_entropy else logp

    @staticmethod
    def backward(ctx, g_logp, g_ent=None):  # type: ignore[override]
        tau, ops = ctx.cfg
        if ctx.dh:
            (dh,) = ctx.saved_tensors
            return dh * g_logp.to(dh.dtype).unsqueeze(1), None, None, None, None, None, None
        h, weight, bias, labels, lse, ent = ctx.saved_tensors
        need = tuple(ctx.needs_input_grad[:3])
        if not any(need):
            return (None,) * 7
        gh, gw, gb = ops.bwd(
            h, weight, bias, labels, lse, ent,
            None if g_logp is None else g_logp.contiguous(),
            None if g_ent is None else g_ent.contiguous(),
            tau, need,
        )
        return gh, gw, gb, None, None, None, None


class _LinearFusedLoss(torch.autograd.Function):
    """A scalar ``TokenLoss`` of the log-probs whose (hidden, weight, bias) gradients are formed in forward;
    with ``scores`` also the rows' log-probs and entropy (no gradient)."""

    @staticmethod
    def forward(ctx, h, weight, bias, labels, tau, loss, ops, scores):  # type: ignore[override]
        value, grads, sc = ops.loss_fwd(h, weight, bias, labels, tau, loss, tuple(ctx.needs_input_grad[:3]),
                                        scores=scores)
        ctx.save_for_backward(*(grads or (None, None, None)))
        if scores:
            ctx.mark_non_differentiable(*sc)
            return value, *sc
        return value

    @staticmethod
    def backward(ctx, g, *_):  # type: ignore[override]
        return (*(rescale(x, g) for x in ctx.saved_tensors), None, None, None, None, None)


def _valid_rows(hidden: Tensor, labels: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """Flat (N, H) hidden and (N,) int64 labels restricted to the valid rows (index None: all valid).

    Dropping rows goes through autograd (index_select), so their hidden gradient is exactly 0.
    """
    H = hidden.shape[-1]
    h2 = hidden.reshape(-1, H)
    y = labels.reshape(-1)
    v = valid.reshape(-1)
    if bool(v.all()):
        return h2.contiguous(), y.long().contiguous(), None
    idx = v.nonzero().squeeze(1)
    return h2.index_select(0, idx).contiguous(), y.index_select(0, idx).long().contiguous(), idx


def _scatter(x: Tensor, idx: Tensor | None, N: int) -> Tensor:
    """Per-valid-row values back to all N rows, 0 elsewhere (differentiable)."""
    if idx is None:
        return x
    return torch.zeros(N, dtype=x.dtype, device=x.device).index_copy(0, idx, x)


def linear_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    backend: str = "auto",
    softcap: float | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """``token_logprobs(hidden @ weight.T + bias, labels, ...)`` without building the logits.

    ``hidden`` (..., H), ``weight`` (V, H) (the LM head, ``nn.Linear`` layout), ``bias`` (V,) or None,
    all one dtype. Returns float32 (float64 for float64 input) of shape ``hidden.shape[:-1]``:
    ``logp = u[y] - logsumexp(u)`` with ``u = (hidden @ weight.T + bias) / temperature``, and with
    ``return_entropy`` also ``H = logsumexp(u) - sum(softmax(u) * u)``. ``softcap`` c > 0 (None: off) soft-caps
    the logits first, ``u = c tanh(z / c) / temperature``, exactly and with its chain rule ``1 - tanh^2(z / c)``
    (every backend). Positions whose label is ``ignore_index`` give 0 and no gradient.
    Differentiable w.r.t. hidden, weight and bias.
    """
    V, _ = _check_linear(hidden, weight, labels, bias)
    tau = C.check_positive("temperature", temperature)
    softcap = None if softcap is None else C.check_positive("softcap", softcap)
    ignore_index = int(ignore_index)
    name = _dispatch.resolve(backend, hidden.device)
    C.check_label_range(labels, V, ignore_index)
    if name == "reference":
        return reference.linear_token_logprobs(hidden, weight, labels, bias, tau, ignore_index, return_entropy, softcap)
    ops = _dispatch.linear_ops(name, softcap)
    lead = hidden.shape[:-1]
    N = labels.numel()
    h, y, idx = _valid_rows(hidden, labels, labels != ignore_index)
    out = _LinearTokenLogprobs.apply(h, weight, bias, y, tau, bool(return_entropy), ops)
    if return_entropy:
        logp, ent = out
        return _scatter(logp, idx, N).view(lead), _scatter(ent, idx, N).view(lead)
    return _scatter(out, idx, N).view(lead)


def linear_token_loss(hidden: Tensor, weight: Tensor, labels: Tensor, loss: TokenLoss, *, bias: Tensor | None = None,
                      temperature: float = 1.0, backend: str = "auto", softcap: float | None = None,
                      return_scores: bool = False) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """``token_loss(hidden @ weight.T + bias, labels, loss)`` without building the logits.

    ``L = sum_i m_i l(logp_i) / n`` with ``loss`` from ``apa_fast.losses`` (its tensors and mask shaped
    like ``labels``). The ``torch`` backend forms the gradients of hidden, weight and bias in the forward
    pass; ``triton`` composes ``linear_token_logprobs`` with the loss. Masked rows are not multiplied by
    the head at all. ``softcap``: as in ``linear_token_logprobs``. ``return_scores``: ``(L, logp, H)`` with the
    log-probs and entropies of that same pass, detached, shaped like ``labels`` and 0 where masked (what an
    on-policy step records as its behaviour policy's, with no second pass over the head).
    """
    V, _ = _check_linear(hidden, weight, labels, bias)
    lead = hidden.shape[:-1]
    if loss.mask is None or loss.mask.shape != lead:
        raise ValueError(f"loss must carry a mask of shape {tuple(lead)} (the leading dims of hidden)")
    tau = C.check_positive("temperature", temperature)
    softcap = None if softcap is None else C.check_positive("softcap", softcap)
    name = _dispatch.resolve(backend, hidden.device)
    valid = loss.mask
    C.check_label_range(labels, V, None, valid=valid)
    if name == "reference":
        out = reference.linear_token_logprobs(hidden, weight, torch.where(valid, labels, -100), bias, tau,
                                              return_entropy=return_scores, softcap=softcap)
        lp, ent = out if return_scores else (out, None)
        value = loss.cast(lp.dtype)(lp)
        return (value, lp.detach(), torch.where(valid, ent, 0.0).detach()) if return_scores else value
    ops = _dispatch.linear_ops(name, softcap)
    acc = C.out_dtype(hidden)
    N = labels.numel()
    h, y, idx = _valid_rows(hidden, labels, valid)
    rows = loss.flat(idx).cast(acc)
    if ops.loss_fwd is None:
        out = _LinearTokenLogprobs.apply(h, weight, bias, y, tau, bool(return_scores), ops)
        if not return_scores:
            return rows(out)
        lp, ent = out
        value = rows(lp)
    elif return_scores:
        value, lp, ent = _LinearFusedLoss.apply(h, weight, bias, y, tau, rows, ops, True)
    else:
        return _LinearFusedLoss.apply(h, weight, bias, y, tau, rows, ops, False)
    return value, _scatter(lp.detach(), idx, N).view(lead), _scatter(ent.detach(), idx, N).view(lead)


def linear_apa_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    ref_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    bias: Tensor | None = None,
    lam: float = 0.1,
    temperature: float = 1.0,
    backend: str = "auto",
    softcap: float | None = None,
) -> Tensor:
    """``apa_loss(hidden @ weight.T + bias, ...)`` without building the logits.

    ``L = sum(m * (logp - logp_init - A/lam)^2) / sum(m)`` with ``logp`` as in
    ``linear_token_logprobs``; a float32 scalar (float64 for float64 input). An empty mask gives 0
    with zero gradient; labels, ``ref_logprobs`` and ``advantages`` at masked positions are unused
    (masked rows are not even multiplied by the LM head). ``softcap``: as in ``linear_token_logprobs``.
    """
    _check_linear(hidden, weight, labels, bias)
    check_per_token(hidden.shape[:-1], "the leading dims of hidden", ref_logprobs=ref_logprobs, advantages=advantages)
    C.check_mask("mask", mask)
    C.check_shape("mask", mask, hidden.shape[:-1], "the leading dims of hidden")
    C.check_same_device({"hidden": hidden, "ref_logprobs": ref_logprobs, "advantages": advantages, "mask": mask})
    softcap = None if softcap is None else C.check_positive("softcap", softcap)
    loss = apa_token_loss(ref_logprobs, advantages, mask, lam=lam)
    if _dispatch.resolve(backend, hidden.device) == "reference":
        return reference.linear_apa_loss(hidden, weight, labels, ref_logprobs, advantages, mask, bias,
                                         loss.consts["lam"], temperature, softcap)
    return linear_token_loss(hidden, weight, labels, loss, bias=bias, temperature=temperature, backend=backend,
                             softcap=softcap)
