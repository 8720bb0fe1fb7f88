"""The records one iteration hands from stage to stage, built by keyword and never changed afterwards.

    Batch       token ids of prompts + responses and the one response mask that every later stage uses
    Rollout     a Batch plus the text the policy saw, its completions and (when asked) the sampler's log-probs
    Experience  a Batch (its mask narrowed to rows with a finite score) plus the per-token tensors of the update
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import Tensor


def _rows(record, idx: Tensor):
    """The same record restricted to rows ``idx`` of every batched tensor (nested records too)."""
    pick = {}
    for f in dataclasses.fields(record):
        v = getattr(record, f.name)
        if isinstance(v, Tensor) and v.dim() > 0:
            pick[f.name] = v[idx]
        elif dataclasses.is_dataclass(v):
            pick[f.name] = _rows(v, idx)
    return dataclasses.replace(record, **pick)


@dataclass(frozen=True)
class Batch:
    """Left-padded prompts followed by responses. Position ``prompt_len - 1 + t`` predicts ``response[:, t]``."""

    input_ids: Tensor  # (B, P+R)
    attention_mask: Tensor  # (B, P+R)
    position_ids: Tensor  # (B, P+R)
    prompt_len: int  # P
    response: Tensor  # (B, R) sampled tokens (pad after the first EOS)
    mask: Tensor  # (B, R) bool: the response tokens that count (up to and including the first EOS)

    def rows(self, idx: Tensor) -> "Batch":
        return _rows(self, idx)


@dataclass(frozen=True)
class Rollout:
    """Sampled responses to a batch of prompts."""

    batch: Batch
    prompts: list[str]  # the text the policy saw (chats rendered with its chat template, truncated as it was)
    completions: list[str]  # the responses decoded, without the EOS
    messages: list  # each chat prompt's messages (None: a plain-string prompt)
    logp_sample: Tensor | None = None  # (B, R) the sampler's own log-probs, when asked for
    truncated: int = 0  # prompts longer than --max-prompt-len, cut from the left (``prompts`` holds what was kept)


@dataclass(frozen=True)
class Experience:
    """One iteration's training data over the R response positions. ``batch.mask`` holds the response tokens of
    rows whose score is a finite number. ``on_policy``: the behaviour log-probs ``logp_old`` (and ``entropy``) are
    not computed ahead; the update's first forward is the behaviour policy and returns them."""

    batch: Batch
    scores: Tensor  # (B,) raw scores (NaN where the reward was not a number)
    advantages: Tensor  # (B, R) GAE, whitened; or each sequence's group advantage on all its tokens
    on_policy: bool = False
    logp_old: Tensor | None = None  # (B, R) behaviour policy (None when on_policy)
    entropy: Tensor | None = None  # (B, R) the behaviour policy's (None when on_policy)
    logp_init: Tensor | None = None  # (B, R) frozen initial policy (None: nothing reads it, GRPO without KL)
    rewards: Tensor | None = None  # (B, R) GAE's token rewards: the scaled score on the last token, PPO's KL penalty
    values: Tensor | None = None  # (B, R) the critic's (None: no critic)
    returns: Tensor | None = None  # (B, R) GAE's returns, the critic's targets
    group_zero_std_frac: float | None = None  # groups whose scores were all equal (group advantages)

    @property
    def mask(self) -> Tensor:
        return self.batch.mask

    def rows(self, idx: Tensor) -> "Experience":
        return _rows(self, idx)
