"""Models: the policy with a fused LM head, the frozen initial policy, the critic, FSDP2 sharding.

The LM head is where apa_fast meets the model. ``FusedLMHead`` replaces the policy's ``lm_head``
(same parameter names, so ``save_pretrained`` and FSDP see an ordinary Linear). Called plainly (as
``generate`` does) it returns logits. Inside ``with head.fused(...)`` the model's ordinary forward
hands it the final hidden states, and it returns the response tokens' log-probs (and entropy, and
values when the critic is shared) or the APA loss, computed by ``apa_fast.linear_*`` from the hidden
states and its weight: the logits are never materialised. Because the op runs in the head's own
forward, FSDP2 has gathered the full weight for it exactly as for any forward; a shard is never read
as the whole weight.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import apa_fast
from apa_fast import reference


class LoadError(RuntimeError):
    """A model, dataset or reward that cannot be loaded; the message is one line saying what to do."""


@dataclass
class HeadRequest:
    """What the next forward of a ``FusedLMHead`` computes, for the positions ``start .. start+R-1``."""

    labels: Tensor  # (B, R) next tokens of the response; ignore_index where not trained
    start: int  # hidden position predicting labels[:, 0] (prompt length - 1)
    temperature: float = 1.0
    entropy: bool = False
    values: bool = False
    apa: dict | None = None  # {"ref_logprobs", "advantages", "mask", "lam"}: return the APA loss instead
    backend: str = "auto"


class FusedLMHead(nn.Linear):
    """``nn.Linear`` LM head that computes log-probs / the APA loss from hidden states when asked."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, value_head: bool = False):
        super().__init__(in_features, out_features, bias=bias)
        self.v_head = ValueHead(in_features) if value_head else None
        self._request: HeadRequest | None = None

    @contextlib.contextmanager
    def fused(self, request: HeadRequest):
        self._request = request
        try:
            yield self
        finally:
            self._request = None

    def forward(self, hidden: Tensor) -> Tensor:
        req = self._request
        if req is None:
            return super().forward(hidden)
        R = req.labels.shape[1]
        h = hidden[:, req.start : req.start + R]
        out: dict = {}
        if req.values:
            out["values"] = self.v_head(h)
        if req.apa is not None:
            out["loss"] = _apa_loss(h, self.weight, self.bias, req)
        else:
            r = _logprobs(h, self.weight, self.bias, req)
            out["logprobs"], out["entropy"] = r if req.entropy else (r, None)
        # Returned through the forward (the model's output carries it as `logits`) so that FSDP2 hooks the
        # backward of these tensors and re-gathers the weight for it.
        return out


def _logprobs(h: Tensor, w: Tensor, b: Tensor | None, req: HeadRequest):
    if req.backend == "eager":  # materialise the logits (the eager log_softmax of apa_fast.reference): the baseline
        return reference.token_logprobs(F.linear(h, w, b), req.labels, req.temperature, return_entropy=req.entropy)
    return apa_fast.linear_token_logprobs(
        h, w, req.labels, bias=b, temperature=req.temperature, return_entropy=req.entropy, backend=req.backend
    )


def _apa_loss(h: Tensor, w: Tensor, b: Tensor | None, req: HeadRequest) -> Tensor:
    a = req.apa
    labels = torch.where(a["mask"], req.labels, 0)
    if req.backend == "eager":
        lp = reference.token_logprobs(F.linear(h, w, b), labels, req.temperature)
        resid = lp - a["ref_logprobs"] - a["advantages"] / a["lam"]
        return torch.where(a["mask"], resid**2, 0.0).sum() / a["mask"].sum().clamp(min=1)
    return apa_fast.linear_apa_loss(
        h, w, labels, a["ref_logprobs"], a["advantages"], a["mask"],
        bias=b, lam=a["lam"], temperature=req.temperature, backend=req.backend,
    )


class ValueHead(nn.Module):
    """Scalar value per position; zero-initialised so the first values are 0."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.v_head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.v_head.weight)
        nn.init.zeros_(self.v_head.bias)

    def forward(self, h: Tensor) -> Tensor:
        return self.v_head(h).squeeze(-1).float().clone()  # not a view: FSDP hooks its backward


class Critic(nn.Module):
    """A separate copy of the policy's transformer with a scalar head (as the APA authors did)."""

    def __init__(self, body: nn.Module, hidden_size: int):
        super().__init__()
        self.body = body
        self.head = ValueHead(hidden_size)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, start: int, length: int):
        h = self.body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        h = h.last_hidden_state if hasattr(h, "last_hidden_state") else h[0]
        return self.head(h[:, start : start + length])


def install_fused_head(lm: nn.Module, value_head: bool = False) -> FusedLMHead:
    """Replace ``lm``'s output Linear by a ``FusedLMHead`` holding the same weights."""
    old = lm.get_output_embeddings()
    if not isinstance(old, nn.Linear):
        raise LoadError(f"{type(lm).__name__}: its output layer is {type(old).__name__}, not a Linear LM head")
    if old.weight is lm.get_input_embeddings().weight:
        raise LoadError(f"{type(lm).__name__} ties lm_head to the input embeddings; the trainer needs an untied head "
                        "(GPT-J style). Untie it (config.tie_word_embeddings=False) and retry")
    with torch.device("meta"):  # no V x H init and copy: the head takes over the old parameters
        head = FusedLMHead(old.in_features, old.out_features, bias=old.bias is not None)
    head.weight, head.bias = old.weight, old.bias
    if value_head:  # float32 even under a bf16 policy
        head.v_head = ValueHead(old.in_features).to(old.weight.device)
    lm.set_output_embeddings(head)
    return head


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks (GPT-J: transformer.h; Llama-like: model.layers)."""
    best = None
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0 and (best is None or len(m) > len(best)):
            best = m
    if best is None:
        raise LoadError(f"{type(model).__name__}: found no list of transformer blocks to shard/freeze")
    return best


def freeze_bottom(lm: nn.Module, unfrozen_layers: int) -> None:
    """Train only the top ``unfrozen_layers`` blocks, the final norm and the heads (-1: everything)."""
    if unfrozen_layers < 0:
        return
    blocks = transformer_blocks(lm)
    for p in lm.parameters():
        p.requires_grad_(False)
    keep = list(blocks)[len(blocks) - unfrozen_layers :] if unfrozen_layers > 0 else []
    for m in keep:
        m.requires_grad_(True)
    for base in (lm, getattr(lm, "base_model", None), getattr(lm, "body", None)):  # LM, HF base, or Critic
        for name in ("ln_f", "norm", "final_layer_norm"):
            if base is not None and isinstance(getattr(base, name, None), nn.Module):
                getattr(base, name).requires_grad_(True)
    if hasattr(lm, "get_output_embeddings"):
        lm.get_output_embeddings().requires_grad_(True)
    if isinstance(lm, Critic):
        lm.head.requires_grad_(True)


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions count valid tokens only (left padding), as ``generate`` computes them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def shard(model: nn.Module, mesh, mp_policy=None, extra: tuple[nn.Module, ...] = ()) -> nn.Module:
    """FSDP2, torchtitan style: ``fully_shard`` each transformer block, then ``extra`` modules, then the root."""
    from torch.distributed.fsdp import fully_shard

    kw = {"mesh": mesh}
    if mp_policy is not None:
        kw["mp_policy"] = mp_policy
    for block in transformer_blocks(model):
        fully_shard(block, **kw)
    for m in extra:
        fully_shard(m, **kw)
    fully_shard(model, **kw)
    return model


def make_critic(body: nn.Module, config) -> Critic:
    """A critic on ``body`` (the transformer of the SFT model): values from its final hidden states."""
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    return Critic(body, hidden).to(next(body.parameters()).device)
