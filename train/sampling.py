"""Sampling the rollout's responses: a KV-cached loop over the policy's body and head.

It replaces transformers' ``generate`` for the few options a rollout uses (temperature, top-k, top-p,
min_new_tokens, EOS, greedy) and differs where the time goes on a CPU: the next token is drawn by inverse CDF,
``searchsorted(cumsum(p), u * sum(p))`` with one uniform per row, where ``torch.multinomial`` draws an
exponential variate for every vocabulary entry (about 40 ms a step for 32 rows x 50,400 here, a fifth of a
162M model's decoding step). The logits are the ones the trainer scores, ``s * cap(h W^T + b) / T`` (the
policy's logit scale and soft-cap, ``models.head_transform``), so the sampler and the training forward agree.
``--hf-generate`` switches back to ``generate``.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable

import torch
from torch import Tensor
import torch.nn.functional as F


def preallocated_cache(config, capacity: int):
    """A ``DynamicCache`` whose layers write each step's keys and values into buffers of ``capacity`` positions
    and attend over a view of the filled part, where ``DynamicLayer`` concatenates the whole cache with the new
    step (re-copying all of it, every layer, every step: 31% of the profiled self time of a 162M model's decoding
    on this CPU, about 8% of its wall time). None when the model's cache holds other kinds of layers (sliding windows, linear attention, ...) or this
    transformers has no such API: the model then builds its default cache."""
    try:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer
        cache = DynamicCache(config=config)
    except (ImportError, TypeError):  # no per-layer caches in this transformers
        return None
    layers = getattr(cache, "layers", None)
    if not layers or any(type(x) is not DynamicLayer for x in layers):
        return None
    cache.layers = [_preallocated_layer()(capacity) for _ in layers]
    return cache


@functools.cache
def _preallocated_layer() -> type:
    """The layer class, built once (on first use: transformers is imported only then)."""
    from transformers.cache_utils import DynamicLayer

    class Preallocated(DynamicLayer):
        def __init__(self, capacity: int):
            super().__init__()
            self.capacity = capacity

        def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
            super().lazy_initialization(key_states, value_states)
            B, H, _, D = key_states.shape
            cap = self.capacity
            self.buffers = (key_states.new_empty(B, H, cap, D), value_states.new_empty(B, H, cap, D))
            self.length = 0

        def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n, m = self.length, key_states.shape[-2]
            if n + m > self.capacity:  # never in sample(); kept correct for any other caller
                return super().update(key_states, value_states, *args, **kwargs)
            (kb, vb), self.length = self.buffers, n + m
            kb[:, :, n : n + m], vb[:, :, n : n + m] = key_states, value_states
            self.keys, self.values = kb[:, :, : n + m], vb[:, :, : n + m]
            return self.keys, self.values

    return Preallocated


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions count valid tokens only (left padding), as ``generate`` computes them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def filter_logits(z: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Top-k, then nucleus filtering of (B, V) logits: removed entries become -inf. Top-p keeps the most likely
    tokens while the mass strictly above each is below ``top_p`` (at least one), as transformers' warper."""
    if 0 < top_k < z.shape[-1]:
        z = z.masked_fill(z < z.topk(top_k, dim=-1).values[:, -1:], float("-inf"))
    if top_p < 1.0:
        zs, idx = z.sort(dim=-1, descending=True)
        p = zs.softmax(-1)
        drop = p.cumsum(-1) - p >= top_p
        z = z.scatter(-1, idx, zs.masked_fill(drop, float("-inf")))
    return z


def draw(z: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One token per row from ``softmax(z)`` (B, V) by inverse CDF; entries at -inf are never drawn."""
    c = torch.softmax(z.float(), -1).cumsum_(-1)
    total = c[:, -1:]
    u = torch.rand(total.shape, device=z.device, generator=generator) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # u < total: a token of p > 0
    return torch.searchsorted(c, u, right=True).squeeze(1)


@torch.no_grad()
def sample(body: torch.nn.Module, logits: Callable[[Tensor], Tensor], input_ids: Tensor, attention_mask: Tensor, *,
           max_new_tokens: int, eos_token_id: int | None, pad_token_id: int, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, min_new_tokens: int = 0, greedy: bool = False, keep_logits: bool = False,
           all_done: Callable[[bool], bool] = lambda done: done) -> tuple[Tensor, Tensor | None]:
    """``(B, R)`` response tokens from left-padded prompts (pad after a row's first EOS) and, with
    ``keep_logits``, the model's (B, R, V) logits at each step before temperature and filtering.

    ``body``: the transformer returning ``last_hidden_state`` and ``past_key_values``; ``logits``: the head on
    the last hidden states. ``all_done(done_here)``: whether every process is done (several processes must run
    the same number of forwards under FSDP); one process stops when its rows are.
    """
    mask = attention_mask.long()
    pos = position_ids_from_mask(mask)
    past = preallocated_cache(body.config, input_ids.shape[1] + max_new_tokens)
    ids, tokens, kept = input_ids, [], []
    done = torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)
    # transformers >= 5.2x names the KV cache ``cache`` (``past_key_values`` before, deprecated now)
    key = "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"
    for t in range(max_new_tokens):
        out = body(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{key: past})
        past = getattr(out, key)
        z = logits(out.last_hidden_state[:, -1]).float()
        if keep_logits:
            kept.append(z)
            z = z.clone()
        # in place from here: each (B, V) temporary would be fresh memory to fault in, every step
        if eos_token_id is not None and t < min_new_tokens:
            z.index_fill_(-1, torch.tensor([eos_token_id], device=z.device), float("-inf"))
        tok = z.argmax(-1) if greedy else draw(filter_logits(z.div_(temperature) if temperature != 1.0 else z, top_k, top_p))
        tok = torch.where(done, pad_token_id, tok)
        tokens.append(tok)
        if eos_token_id is not None:
            done |= tok == eos_token_id
        if all_done(bool(done.all())):
            break
        ids, pos = tok.unsqueeze(1), pos[:, -1:] + 1
        mask = torch.cat([mask, mask.new_ones(len(mask), 1)], 1)
    return torch.stack(tokens, 1), torch.stack(kept, 1) if keep_logits else None


def head_logits(head: torch.nn.Linear, scale: float, softcap: float | None) -> Callable[[Tensor], Tensor]:
    """The model's logits from its last hidden states: ``s * cap(h W^T + b)`` (``models.head_transform``)."""

    def f(h: Tensor) -> Tensor:
        z = F.linear(h, head.weight, head.bias).float()
        if softcap is not None:
            z = z.div_(softcap).tanh_().mul_(softcap)
        return z.mul_(scale) if scale != 1.0 else z

    return f
