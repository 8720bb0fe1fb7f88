"""The ``torch`` backend of GAE: a blocked scan with no Python loop over time steps.

Within a block of K steps the recurrence A_t = delta_t + gamma*lam*A_next (skipping masked steps)
unrolls to a (K, K) matrix of powers of gamma*lam, applied to every block at once with one batched
matmul; only the carry between blocks runs in a loop of T/K steps.
"""

from __future__ import annotations

import torch
from torch import Tensor

_BLOCK = 32


def gae_fwd(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float, last_values: Tensor | None
) -> tuple[Tensor, Tensor]:
    B, T = rewards.shape
    dtype = torch.float64 if torch.float64 in (rewards.dtype, values.dtype) else torch.float32
    dev = rewards.device
    r, v, m = rewards.to(dtype), values.to(dtype), mask.bool()
    last = torch.zeros(B, dtype=dtype, device=dev) if last_values is None else last_values.to(dtype)

    # value of the next valid step (or last_values past the end): reverse running min of indices
    idx = torch.where(m, torch.arange(T, device=dev), T)
    nxt = torch.cat([idx.flip(-1).cummin(-1).values.flip(-1)[:, 1:], torch.full((B, 1), T, device=dev)], 1)
    v_next = torch.cat([torch.where(m, v, 0.0), last[:, None]], 1).gather(1, nxt)
    delta = torch.where(m, r + gamma * v_next - v, 0.0)

    # pad the end with masked steps (they pass the zero initial carry through unchanged)
    K = _BLOCK
    nb = -(-T // K)
    pad = nb * K - T
    d = torch.nn.functional.pad(delta, (0, pad)).view(B, nb, K)
    mm = torch.nn.functional.pad(m, (0, pad)).view(B, nb, K)
    cnt = mm.flip(-1).cumsum(-1).flip(-1)  # valid steps in [t, end of block)
    gl = gamma * lam
    powers = torch.tensor([gl**k for k in range(K + 1)], dtype=dtype, device=dev)
    E = cnt[..., :, None] - cnt[..., None, :]  # valid steps in [t, s)
    upper = torch.ones(K, K, dtype=torch.bool, device=dev).triu()
    M = torch.where(upper, powers[E.clamp(0, K)], 0.0)
    local = (M @ d.unsqueeze(-1)).squeeze(-1)  # A with a zero carry into the block
    decay = powers[cnt]  # weight of the carry entering the block, per step

    carry_in = torch.zeros(B, nb, dtype=dtype, device=dev)
    carry = torch.zeros(B, dtype=dtype, device=dev)
    for j in range(nb - 1, -1, -1):
        carry_in[:, j] = carry
        carry = local[:, j, 0] + decay[:, j, 0] * carry  # A at the block's first valid step
    A = torch.where(mm, local + decay * carry_in.unsqueeze(-1), 0.0).view(B, nb * K)[:, :T]
    R = torch.where(m, A + v, 0.0)
    return A.contiguous(), R
