"""Log-probs and the APA loss from hidden states and the LM head, never materialising the logits.

    z = hidden @ weight.T + bias;  logp = z[y]/tau - logsumexp(z/tau);  L_APA as in ``apa_loss``.

The ``torch`` backend (``apa_fast._torch_linear``) and the ``triton`` backend (``kernels.linear``)
tile tokens x vocabulary and keep only a tile of logits at a time.
"""

from __future__ import annotations

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
    C.check_shape("labels", labels, hidden.shape[:-1], "the leading dims of hidden")
    C.check_same_device({"hidden": hidden, "weight": weight, "labels": labels, "bias": bias})
    return V, H


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

    Differentiable w.r.t. hidden, weight and bias; float32 outputs of shape ``hidden.shape[:-1]``.
    """
    V, _ = _check_linear(hidden, weight, labels, bias)
    tau = C.check_positive("temperature", temperature)
    name = _dispatch.resolve(backend, hidden.device)
    C.check_label_range(labels, V, int(ignore_index))
    if name == "reference":
        return reference.linear_token_logprobs(hidden, weight, labels, bias, tau, int(ignore_index), return_entropy)
    impl = _dispatch.module(name, "linear")
    return impl.linear_token_logprobs(hidden, weight, labels, bias, tau, int(ignore_index), bool(return_entropy))


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
    """``apa_loss(hidden @ weight.T + bias, ...)`` without building the logits; float32 scalar."""
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
    impl = _dispatch.module(name, "linear")
    return impl.linear_apa_loss(hidden, weight, labels, ref_logprobs, advantages, valid, bias, lam, tau)
