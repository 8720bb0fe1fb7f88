"""LoRA: which layers get adapters, peft wrapping them, and the adapted Linear as one autograd op.

An adapted layer computes ``y = x W^T + b + s (x A^T) B^T`` (rank R, scale s = alpha / R, W frozen). peft runs it
as five ops (the base linear, A, B, a multiply by s and an add, each over the full (tokens x out) output, and in
backward the multiply again and the sum of the two input gradients); ``LoRALinear`` adds the low-rank product into
the base output in place (``addmm_``) and its backward forms ``dx = dy W + s (dy B) A`` the same way, so the
full-size elementwise passes are gone and autograd saves only x and x A^T. ``fuse_lora(model)`` routes each peft
``lora.Linear`` that is plain LoRA (one active adapter, no dropout, no DoRA or other variant, not merged) through
it; peft keeps the module, so disabling the adapters (the initial policy), merging and saving behave as before.
"""

from __future__ import annotations

import types
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import LoadError


class LoRALinear(torch.autograd.Function):
    """``y = x W^T + b + s (x A^T) B^T``; saves x and x A^T. W and b get gradients only if they require them."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor | None, a: Tensor, bb: Tensor, s: float) -> Tensor:  # type: ignore[override]
        xa = F.linear(x, a)
        y = F.linear(x, w, b)
        y.view(-1, y.shape[-1]).addmm_(xa.view(-1, xa.shape[-1]), bb.t(), alpha=s)
        ctx.s = s
        ctx.save_for_backward(x, w, a, bb, xa)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):  # type: ignore[override]
        x, w, a, bb, xa = ctx.saved_tensors
        s, need = ctx.s, ctx.needs_input_grad
        g = dy.reshape(-1, dy.shape[-1])
        x2, xa2 = x.reshape(-1, x.shape[-1]), xa.reshape(-1, xa.shape[-1])
        gb = g @ bb  # d(x A^T) / s, (tokens, R)
        dx = None
        if need[0]:
            dx = g @ w
            dx.addmm_(gb, a, alpha=s)
            dx = dx.view(x.shape)
        dw = g.t() @ x2 if need[1] else None
        db = g.sum(0) if need[2] else None
        da = (gb.t() @ x2).mul_(s) if need[3] else None
        dbb = (g.t() @ xa2).mul_(s) if need[4] else None
        return dx, dw, db, da, dbb, None


def _plain_adapter(mod: nn.Module) -> str | None:
    """The name of ``mod``'s one active adapter if it is plain LoRA over an ``nn.Linear`` (else None)."""
    names = list(getattr(mod, "active_adapters", []))
    if mod.disable_adapters or mod.merged or len(names) != 1 or type(mod.base_layer) is not nn.Linear:
        return None
    n = names[0]
    if n not in mod.lora_A or n in getattr(mod, "lora_variant", {}) or mod.use_dora.get(n, False):
        return None
    A, B = mod.lora_A[n], mod.lora_B[n]
    if type(A) is not nn.Linear or type(B) is not nn.Linear or A.bias is not None or B.bias is not None:
        return None
    if not isinstance(mod.lora_dropout[n], nn.Identity):
        return None
    return n


def _fused_forward(self: nn.Module, x: Tensor, *args, **kwargs) -> Tensor:
    n = None if args or kwargs else _plain_adapter(self)
    base = self.base_layer
    if n is None or not (x.dtype == base.weight.dtype == self.lora_A[n].weight.dtype == self.lora_B[n].weight.dtype):
        return type(self).forward(self, x, *args, **kwargs)  # peft's own path
    return LoRALinear.apply(x, base.weight, base.bias, self.lora_A[n].weight, self.lora_B[n].weight, self.scaling[n])


@torch.no_grad()
def _same(mod: nn.Module, like: Tensor) -> bool:
    """Whether the fused forward gives peft's result, with B set to random values for the check (B starts at 0)."""
    n = _plain_adapter(mod)
    B = mod.lora_B[n].weight
    kept = B.clone()
    try:
        B.normal_(generator=torch.Generator(B.device).manual_seed(0))
        x = torch.randn(2, 3, mod.base_layer.in_features, generator=torch.Generator().manual_seed(0)).to(like)
        ya, yb = type(mod).forward(mod, x), _fused_forward(mod, x)
        return ya.shape == yb.shape and bool(torch.allclose(ya.float(), yb.float(), rtol=1e-4, atol=1e-5))
    finally:
        B.copy_(kept)


def fuse_lora(model: nn.Module) -> int:
    """Route each plain peft LoRA Linear of ``model`` through ``LoRALinear`` (checked on a random input first);
    returns how many."""
    try:
        from peft.tuners.lora.layer import Linear as PeftLinear
    except ImportError:
        return 0
    count = 0
    for mod in model.modules():
        if type(mod) is PeftLinear and _plain_adapter(mod) is not None and _same(mod, mod.base_layer.weight):
            mod.forward = types.MethodType(_fused_forward, mod)
            count += 1
    return count


def lora_target_names(model: nn.Module, targets: str = "", unfrozen_layers: int = -1) -> list[str]:
    """Qualified names of the layers LoRA adapts: the Linear (GPT-2: Conv1D) layers inside the transformer blocks
    (attention and MLP; the top ``unfrozen_layers`` blocks when >= 0), those whose name ends with one of the
    comma-separated ``targets`` when given. Found in the model itself, so no list of architectures; a target that
    matches nothing is refused with one line."""
    from transformers.pytorch_utils import Conv1D

    from .models import transformer_blocks

    blocks = list(transformer_blocks(model))
    if unfrozen_layers >= 0:
        blocks = blocks[len(blocks) - unfrozen_layers :] if unfrozen_layers > 0 else []
    prefix = {id(m): n for n, m in model.named_modules()}
    layers = [f"{prefix[id(b)]}.{n}" for b in blocks for n, m in b.named_modules() if isinstance(m, (nn.Linear, Conv1D))]
    wanted = [t.strip() for t in targets.split(",") if t.strip()]
    for t in wanted:
        if not any(n == t or n.endswith("." + t) for n in layers):
            short = sorted({n.rsplit(".", 1)[-1] for n in layers})
            raise LoadError(f"--lora-targets {t!r} matches no Linear layer in the transformer blocks of "
                            f"{type(model).__name__} (its layers: {', '.join(short) or 'none'}); pass some of those")
    if wanted:
        layers = [n for n in layers if any(n == t or n.endswith("." + t) for t in wanted)]
    if not layers:
        raise LoadError(f"LoRA finds no Linear layer to adapt in the transformer blocks of {type(model).__name__} "
                        f"(--unfrozen-layers {unfrozen_layers}); pass --unfrozen-layers -1 or --lora-rank 0")
    return layers


def add_lora(model: nn.Module, cfg, causal_lm: bool) -> nn.Module:
    """``model`` wrapped by peft with LoRA adapters of rank ``cfg.lora_rank`` on ``lora_target_names``; peft freezes
    every base weight. An adapter adds ``(alpha / R) * B A x`` with B = 0 at first, so training starts at the base."""
    from peft import LoraConfig, get_peft_model

    lc = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or 2 * cfg.lora_rank, lora_dropout=cfg.lora_dropout,
                    target_modules=lora_target_names(model, cfg.lora_targets, cfg.unfrozen_layers),
                    task_type="CAUSAL_LM" if causal_lm else None)
    with warnings.catch_warnings():  # peft asks transformers' deprecated is_gradient_checkpointing: not ours to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        return get_peft_model(model, lc)
