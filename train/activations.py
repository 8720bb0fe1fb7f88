"""Activation memory of the update: gated MLPs and RMSNorms that keep less for backward.

A transformers Llama-style block saves, per token, about 4 x I floats in its MLP ``down(act(gate(x)) * up(x))``
(``gate(x)``, ``act(gate(x))``, ``up(x)`` and their product) and 2 x H in each RMSNorm (its float32 input and the
normalised output). On the ~162M Llama of ``bench.peers`` job b (H = 768, I = 2048) that is 11.3k of the 16k
floats a block saves per token (counted with ``torch.autograd.graph.saved_tensors_hooks``). The functions here
compute the same forward from the same weights and keep only ``gate(x)`` and ``up(x)`` (the MLP) and the input
and ``1/rms`` (the norm); backward recomputes the elementwise parts, never a matmul. Liger-Kernel's SwiGLU and
RMSNorm do the same in Triton on GPU; this is the torch form, for any device.

``fuse_layers(model)`` swaps in a ``GatedMLP`` / ``RMSNorm`` for each submodule they reproduce, with the same
parameters under the same names (state dicts and ``save_pretrained`` are unchanged). Whether a module matches is
decided by what it computes, not its class: a candidate (``gate_proj``/``up_proj``/``down_proj`` plain
``nn.Linear`` layers without bias and an ``act_fn``; or a class named ``*RMSNorm`` with a ``weight`` of size H)
is run on a small random input both ways and swapped only when the outputs agree. LoRA layers, biases and norms
such as Gemma's ``(1 + w)`` therefore stay as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _GatedMLP(torch.autograd.Function):
    """``y = (act(x Wg^T) * (x Wu^T)) Wd^T``; saves x, g = x Wg^T and u = x Wu^T."""

    @staticmethod
    def forward(ctx, x: Tensor, wg: Tensor, wu: Tensor, wd: Tensor, act) -> Tensor:  # type: ignore[override]
        g, u = F.linear(x, wg), F.linear(x, wu)
        ctx.act = act
        ctx.save_for_backward(x, wg, wu, wd, g, u)
        return F.linear(act(g) * u, wd)

    @staticmethod
    def backward(ctx, dy: Tensor):  # type: ignore[override]
        x, wg, wu, wd, g, u = ctx.saved_tensors
        need_x, need_g, need_u, need_d = ctx.needs_input_grad[:4]
        with torch.enable_grad():  # act'(g) by autograd: any elementwise activation
            g_ = g.detach().requires_grad_(True)
            s_ = ctx.act(g_)
        s = s_.detach()
        da = dy @ wd  # d(act(g) * u)
        dwd = _outer(dy, s * u) if need_d else None
        du = da * s
        (dg,) = torch.autograd.grad(s_, g_, da * u)
        dx = dg @ wg + du @ wu if need_x else None
        return dx, _outer(dg, x) if need_g else None, _outer(du, x) if need_u else None, dwd, None


class _RMSNorm(torch.autograd.Function):
    """``y = w * (x / rms(x))`` with ``rms(x) = sqrt(mean(x^2) + eps)`` in float32 at least; saves x and 1/rms."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, w, r)
        return w * (xf * r).to(x.dtype)

    @staticmethod
    def backward(ctx, dy: Tensor):  # type: ignore[override]
        x, w, r = ctx.saved_tensors
        xhat = x.to(r.dtype) * r
        dw = (dy * xhat.to(x.dtype)).reshape(-1, w.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        g = (dy * w).to(r.dtype)  # d xhat
        dx = r * (g - xhat * (g * xhat).mean(-1, keepdim=True))
        return dx.to(x.dtype), None if dw is None else dw.to(w.dtype), None


def _outer(dy: Tensor, x: Tensor) -> Tensor:
    """``sum over tokens of dy^T x``: a weight's gradient, (out, in)."""
    return dy.reshape(-1, dy.shape[-1]).T @ x.reshape(-1, x.shape[-1])


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` (Llama, Mistral, Qwen, Gemma MLPs) saving only gate(x) and up(x)."""

    def __init__(self, gate_proj: nn.Linear, up_proj: nn.Linear, down_proj: nn.Linear, act_fn: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = gate_proj, up_proj, down_proj, act_fn

    def forward(self, x: Tensor) -> Tensor:
        return _GatedMLP.apply(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight, self.act_fn)


class RMSNorm(nn.Module):
    """``w * x / sqrt(mean(x^2) + eps)`` (in float32, the weight applied in the input's dtype) saving x and 1/rms."""

    def __init__(self, weight: nn.Parameter, eps: float):
        super().__init__()
        self.weight, self.eps = weight, eps

    def forward(self, x: Tensor) -> Tensor:
        return _RMSNorm.apply(x, self.weight, self.eps)


def _candidate(mod: nn.Module) -> nn.Module | None:
    """The lean module that may replace ``mod`` (to be checked by running both), or None."""
    lin = [getattr(mod, k, None) for k in ("gate_proj", "up_proj", "down_proj")]
    if all(type(m) is nn.Linear and m.bias is None for m in lin) and isinstance(getattr(mod, "act_fn", None), nn.Module):
        return GatedMLP(*lin, mod.act_fn)
    w = getattr(mod, "weight", None)
    eps = getattr(mod, "variance_epsilon", getattr(mod, "eps", None))
    if type(mod).__name__.endswith("RMSNorm") and isinstance(w, nn.Parameter) and w.dim() == 1 and isinstance(eps, float):
        return RMSNorm(w, eps)
    return None


@torch.no_grad()
def _same(a: nn.Module, b: nn.Module, width: int, like: Tensor) -> bool:
    x = torch.randn(2, 3, width, generator=torch.Generator().manual_seed(0)).to(like.device, like.dtype)
    ya, yb = a(x), b(x)
    return ya.shape == yb.shape and bool(torch.allclose(ya.float(), yb.float(), rtol=1e-4, atol=1e-5))


def fuse_layers(model: nn.Module) -> int:
    """Replace each gated MLP and RMSNorm of ``model`` that the lean modules reproduce; returns how many."""
    n = 0
    for name, mod in list(model.named_modules()):
        new = _candidate(mod)
        if new is None:
            continue
        width = new.gate_proj.in_features if isinstance(new, GatedMLP) else new.weight.shape[0]
        ref = next(mod.parameters())
        if not _same(mod, new, width, ref):
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        n += 1
    return n
