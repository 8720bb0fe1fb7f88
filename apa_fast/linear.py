"""Log-probs and the APA loss from hidden states and the LM head, never materialising the logits.

    z = hidden @ weight.T + bias;  u = z / tau;  logp = u[y] - logsumexp(u);
    H = logsumexp(u) - sum(softmax(u) * u);  L_APA = sum(m * (logp - logp_init - A/lam)^2) / sum(m)

The ``torch`` backend (``apa_fast._torch_linear``) and the ``triton`` backend (``kernels.linear``)
tile tokens x vocabulary and keep only a tile of logits at a time. Both implement

- ``token_fwd(h, W, b, labels, tau, return_entropy) -> (logp, lse, entropy | None)``
- ``token_bwd(h, W, b, labels, lse, entropy, g_logp, g_ent, tau, need) -> (gh, gW, gb)``
- ``apa_fwd(h, W, b, labels, target, n, tau, need) -> (loss, lse, coef, grads | None)``

on a flat (N, H) ``h`` whose rows are all valid: rows whose label is ``ignore_index`` (or whose
mask is 0) are dropped here, before the op, so no backend spends matmul time on them, and their
outputs are 0 with no gradient. ``need`` says which of (hidden, weight, bias) want a gradient.
``apa_fwd`` may return the gradients for an upstream gradient of 1 (the torch backend does: it has
the whole logits row in hand); otherwise backward recomputes via ``token_bwd`` with
``g_logp = coef * g``. A backend may also offer ``token_fwd_dh(h, W, b, labels, tau) ->
(logp, lse, dlogp/dh)``, used when only hidden wants a gradient (a frozen LM head) and no entropy is
asked for: backward is then a row scaling, with no recompute. The autograd Functions live here;
the backends hold no autograd.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from . import _checks as C
from . import _dispatch, reference


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
    def forward(ctx, h, weight, bias, labels, tau, return_entropy, impl):  # type: ignore[override]
        need = tuple(ctx.needs_input_grad[:3])
        ctx.cfg = (tau, impl)
        ctx.dh = None
        if need == (True, False, False) and not return_entropy and hasattr(impl, "token_fwd_dh") and h.dtype in (torch.float32, torch.float64):
            # frozen LM head: dlogp/dh per row comes out of the forward's matmuls; backward only scales it
            logp, lse, dh = impl.token_fwd_dh(h, weight, bias, labels, tau)
            ctx.save_for_backward(dh)
            ctx.dh = True
            return logp
        logp, lse, ent = impl.token_fwd(h, weight, bias, labels, tau, return_entropy)
        ctx.save_for_backward(h, weight, bias, labels, lse, ent)
        return (logp, ent) if return_entropy else logp

    @staticmethod
    def backward(ctx, g_logp, g_ent=None):  # type: ignore[override]
        tau, impl = ctx.cfg
        if ctx.dh:
            (dh,) = ctx.saved_tensors
            return dh * g_logp.to(dh.dtype).unsqueeze(1), None, None, None, None, None, None
        h, weight, bias, labels, lse, ent = ctx.saved_tensors
        need = tuple(ctx.needs_input_grad[:3])
        if not any(need):
            return (None,) * 7
        gh, gw, gb = impl.token_bwd(
            h, weight, bias, labels, lse, ent,
            None if g_logp is None else g_logp.contiguous(),
            None if g_ent is None else g_ent.contiguous(),
            tau, need,
        )
        return gh, gw, gb, None, None, None, None


class _LinearApaLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, labels, target, n, tau, impl):  # type: ignore[override]
        need = tuple(ctx.needs_input_grad[:3])
        loss, lse, coef, grads = impl.apa_fwd(h, weight, bias, labels, target, n, tau, need)
        ctx.precomputed = grads is not None
        ctx.cfg = (tau, impl)
        if grads is not None:
            ctx.save_for_backward(*grads)
        else:
            ctx.save_for_backward(h, weight, bias, labels, lse, coef)
        return loss

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        tau, impl = ctx.cfg
        if ctx.precomputed:
            grads = ctx.saved_tensors
            # gradients were written in forward for an upstream gradient of 1 (loss.backward());
            # only a different upstream gradient costs a rescale
            if g.device.type != "cpu" or float(g) != 1.0:
                grads = tuple(None if x is None else (x * g if x.dtype == g.dtype else (x.to(g.dtype) * g).to(x.dtype)) for x in grads)
            return (*grads, None, None, None, None, None)
        h, weight, bias, labels, lse, coef = ctx.saved_tensors
        need = tuple(ctx.needs_input_grad[:3])
        gh, gw, gb = impl.token_bwd(h, weight, bias, labels, lse, None, coef * g.to(coef.dtype), None, tau, need)
        return gh, gw, gb, None, None, None, None, None


def _rows(hidden: Tensor, labels: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
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


def _impl(name: str) -> ModuleType:
    return _dispatch.module(name, "linear")


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
) -> Tensor | tuple[Tensor, Tensor]:
    """``token_logprobs(hidden @ weight.T + bias, labels, ...)`` without building the logits.

    ``hidden`` (..., H), ``weight`` (V, H) (the LM head, ``nn.Linear`` layout), ``bias`` (V,) or None,
    all one dtype. Returns float32 (float64 for float64 input) of shape ``hidden.shape[:-1]``:
    ``logp = u[y] - logsumexp(u)`` with ``u = (hidden @ weight.T + bias) / temperature``, and with
    ``return_entropy`` also ``H = logsumexp(u) - sum(softmax(u) * u)``. Positions whose label is
    ``ignore_index`` give 0 and no gradient. Differentiable w.r.t. hidden, weight and bias.
    """
    V, _ = _check_linear(hidden, weight, labels, bias)
    tau = C.check_positive("temperature", temperature)
    ignore_index = int(ignore_index)
    name = _dispatch.resolve(backend, hidden.device)
    C.check_label_range(labels, V, ignore_index)
    if name == "reference":
        return reference.linear_token_logprobs(hidden, weight, labels, bias, tau, ignore_index, return_entropy)
    lead = hidden.shape[:-1]
    N = labels.numel()
    h, y, idx = _rows(hidden, labels, labels != ignore_index)
    out = _LinearTokenLogprobs.apply(h, weight, bias, y, tau, bool(return_entropy), _impl(name))
    if return_entropy:
        logp, ent = out
        return _scatter(logp, idx, N).view(lead), _scatter(ent, idx, N).view(lead)
    return _scatter(out, idx, N).view(lead)


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
) -> Tensor:
    """``apa_loss(hidden @ weight.T + bias, ...)`` without building the logits.

    ``L = sum(m * (logp - logp_init - A/lam)^2) / sum(m)`` with ``logp`` as in
    ``linear_token_logprobs``; a float32 scalar (float64 for float64 input). An empty mask gives 0
    with zero gradient; labels, ``ref_logprobs`` and ``advantages`` at masked positions are unused
    (masked rows are not even multiplied by the LM head).
    """
    V, _ = _check_linear(hidden, weight, labels, bias)
    lead = hidden.shape[:-1]
    for k, v in (("ref_logprobs", ref_logprobs), ("advantages", advantages)):
        C.check_floating(k, v)
        C.check_shape(k, v, lead, "the leading dims of hidden")
    C.check_mask("mask", mask)
    C.check_shape("mask", mask, lead, "the leading dims of hidden")
    C.check_same_device({"hidden": hidden, "ref_logprobs": ref_logprobs, "advantages": advantages, "mask": mask})
    lam = C.check_positive("lam", lam)
    tau = C.check_positive("temperature", temperature)
    name = _dispatch.resolve(backend, hidden.device)
    C.check_mask_values("mask", mask)
    valid = mask.bool()
    C.check_label_range(labels, V, None, valid=valid)
    C.check_finite_where("advantages", advantages, valid)
    C.check_finite_where("ref_logprobs", ref_logprobs, valid)
    if name == "reference":
        return reference.linear_apa_loss(hidden, weight, labels, ref_logprobs, advantages, mask, bias, lam, tau)
    acc = C.out_dtype(hidden)
    h, y, idx = _rows(hidden, labels, valid)
    ref = ref_logprobs.reshape(-1)
    adv = advantages.reshape(-1)
    if idx is not None:
        ref, adv = ref.index_select(0, idx), adv.index_select(0, idx)
    # target = logp_init + A / lam: the value logp is pulled towards (the APA paper's eq.)
    target = (ref.to(acc) + adv.to(acc) / lam).contiguous()
    return _LinearApaLoss.apply(h, weight, bias, y, target, h.shape[0], tau, _impl(name))
