"""Triton kernel: GAE with skip-mask semantics (the same ``gae_fwd`` as the torch backend's).

One program owns BLOCK_B sequences and walks time backwards, carrying per sequence the value of
the next valid step and the advantage of the next valid step (docs/design.md, "GAE"):

    carry_v = last_values (default 0), carry_a = 0
    for t = T-1 .. 0:
        if m[t]: delta = r[t] + gamma * carry_v - V[t];  carry_a = delta + gamma * lam * carry_a
                 A[t] = carry_a;  R[t] = A[t] + V[t];  carry_v = V[t]
        else:    A[t] = R[t] = 0                      (carries pass through unchanged)

Rewards and values are loaded under the mask (masked positions read as 0 and are never touched
arithmetically), so NaN or garbage there cannot leak into any output. Arithmetic runs in the
output dtype: float32, or float64 when rewards or values are float64 (as the torch backend).
``gamma`` and ``lam`` are constexpr. Offsets are int64; inputs may have any strides.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import interpreter


@triton.jit
def _gae_kernel(
    r_ptr,
    v_ptr,
    m_ptr,
    last_ptr,
    a_ptr,
    ret_ptr,
    B,
    T,
    stride_rb,
    stride_rt,
    stride_vb,
    stride_vt,
    stride_mb,
    stride_mt,
    GAMMA: tl.constexpr,
    GAMMA_LAM: tl.constexpr,
    HAS_LAST: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    acc = a_ptr.dtype.element_ty
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    in_b = rows < B
    if HAS_LAST:
        carry_v = tl.load(last_ptr + rows, mask=in_b, other=0.0).to(acc)
    else:
        carry_v = tl.zeros([BLOCK_B], dtype=acc)
    carry_a = tl.zeros([BLOCK_B], dtype=acc)
    r_row = r_ptr + rows * stride_rb
    v_row = v_ptr + rows * stride_vb
    m_row = m_ptr + rows * stride_mb
    out_row = rows * T
    for i in range(0, T):
        t = (T - 1 - i).to(tl.int64)
        valid = in_b & (tl.load(m_row + t * stride_mt, mask=in_b, other=0) != 0)
        r = tl.load(r_row + t * stride_rt, mask=valid, other=0.0).to(acc)
        v = tl.load(v_row + t * stride_vt, mask=valid, other=0.0).to(acc)
        a_new = r + GAMMA * carry_v - v + GAMMA_LAM * carry_a
        carry_a = tl.where(valid, a_new, carry_a)
        carry_v = tl.where(valid, v, carry_v)
        tl.store(a_ptr + out_row + t, tl.where(valid, a_new, 0.0).to(acc), mask=in_b)
        tl.store(ret_ptr + out_row + t, tl.where(valid, a_new + v, 0.0).to(acc), mask=in_b)


# Sequences per program. On a GPU 64 keeps many programs in flight for typical batch sizes; the
# interpreter runs programs one after another, so there one wide block is fastest.
MAX_BLOCK_B = 64


def _block_b(B: int) -> int:
    cap = interpreter.GAE_MAX_BLOCK_B if interpreter.on() else MAX_BLOCK_B
    return max(16, min(triton.next_power_of_2(max(B, 1)), cap))


def gae_fwd(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float, last_values: Tensor | None
) -> tuple[Tensor, Tensor]:
    """(advantages, returns), contiguous (B, T); float32, or float64 when an input is float64."""
    if rewards.dim() != 2 or values.shape != rewards.shape or mask.shape != rewards.shape:
        raise ValueError(
            f"rewards, values and mask must share one (B, T) shape, got {tuple(rewards.shape)}, "
            f"{tuple(values.shape)}, {tuple(mask.shape)}"
        )
    B, T = rewards.shape
    dtype = torch.float64 if torch.float64 in (rewards.dtype, values.dtype) else torch.float32
    dev = rewards.device
    A = torch.empty((B, T), dtype=dtype, device=dev)
    R = torch.empty((B, T), dtype=dtype, device=dev)
    if B * T == 0:
        return A, R
    m = mask if mask.dtype == torch.bool else mask != 0
    m = m.view(torch.uint8)  # same storage and strides as the bool mask
    last = None if last_values is None else last_values.reshape(-1).contiguous()
    BLOCK_B = _block_b(B)
    _gae_kernel[(triton.cdiv(B, BLOCK_B),)](
        rewards,
        values,
        m,
        last if last is not None else A,
        A,
        R,
        B,
        T,
        rewards.stride(0),
        rewards.stride(1),
        values.stride(0),
        values.stride(1),
        m.stride(0),
        m.stride(1),
        GAMMA=float(gamma),
        GAMMA_LAM=float(gamma) * float(lam),
        HAS_LAST=last is not None,
        BLOCK_B=BLOCK_B,
        num_warps=1 if BLOCK_B <= 32 else 2,
    )
    return A, R
