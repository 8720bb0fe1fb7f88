"""The ``torch`` backend of GAE: a closed-form scan with no Python loop over time steps.

With skip semantics the advantage carry obeys a first-order linear recurrence,
``c_t = a_t * c_{t+1} + b_t`` with ``a_t = gamma*lam, b_t = delta_t`` at valid steps and
``a_t = 1, b_t = 0`` at masked ones (the carry passes through). Its solution is

    c_t = (1 / W_t) * sum_{s >= t} W_s * b_s,      W_t = (gamma*lam) ** (valid steps before t),

i.e. one cumulative count, one ``exp``, one suffix sum (flip, cumsum, flip) and one division: about
twenty vectorised passes over (B, T) instead of T rounds of small kernels. It runs in float64 (exact
to ~1e-13 for float32 and float64 inputs alike). The suffix sum adds from the end, smallest weights
first, and holds only terms s >= t, so its error stays relative to the result. ``W`` decays geometrically; to keep it
far from float64 underflow, the time axis is cut into blocks over which ``(gamma*lam)**K`` stays above
1e-250 (a single block for the paper's gamma*lam = 0.95 up to T = 11,000), and the carry crosses
block boundaries in a loop over blocks, not steps. ``gamma*lam == 0`` needs no scan at all.

The value of the next valid step (``last_values`` past the end) comes from a reverse running
minimum over valid indices and one gather.
"""

from __future__ import annotations

import math
import threading

import torch
from torch import Tensor

_MIN_WEIGHT_LOG10 = -250.0  # smallest (gamma*lam)**k a block may need, far from fp64 underflow


def _block_len(gl: float, T: int) -> int:
    if gl >= 1.0 or gl <= 0.0:
        return T
    return max(1, min(T, int(_MIN_WEIGHT_LOG10 / math.log10(gl))))


def _suffix_sum(b: Tensor) -> Tensor:
    """``S[..., t] = sum_{s >= t} b[..., s]``, adding from the end (smallest weights first).

    (A blocked matmul against a triangular matrix avoids the flips but leaves MKL's worker threads
    spinning against ATen's for the ops that follow: many times slower on a busy 2-core machine.)"""
    return b.flip(-1).cumsum_(-1).flip(-1)


_WS = threading.local()
_WS_MAX_BYTES = 64 << 20


def _workspace(n: int, B: int, T: int, device: torch.device) -> Tensor:
    """``n`` float64 (B, T) buffers, reused across calls of the same shape (per thread).

    Fresh multi-MiB tensors come from mmap and pay a page fault per 4 KiB on first touch, which
    on CPU costs more than the arithmetic of this whole function; a reused workspace does not.
    """
    key = (n, B, T, str(device))
    ws = getattr(_WS, "buf", None)
    if ws is not None and ws[0] == key:
        return ws[1]
    buf = torch.empty(n, B, T, dtype=torch.float64, device=device)
    if device.type == "cpu" and buf.numel() * 8 <= _WS_MAX_BYTES:
        _WS.buf = (key, buf)
    return buf


def _mask_u8(mask: Tensor) -> Tensor:
    """The mask as 0/1 uint8 (converting a uint8 view is several times faster than a bool tensor)."""
    m = mask if mask.dtype == torch.bool else mask != 0
    return m.contiguous().view(torch.uint8)


def gae_fwd(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float, last_values: Tensor | None
) -> tuple[Tensor, Tensor]:
    B, T = rewards.shape
    out_dtype = torch.float64 if torch.float64 in (rewards.dtype, values.dtype) else torch.float32
    gl = float(gamma) * float(lam)
    K = _block_len(gl, T)
    if gl > 0.0 and lam >= 0.05 and K >= T:  # (small lam: V/lam would cancel digits)
        return _single_block(rewards, values, mask, gl, float(lam), last_values, out_dtype)
    f64 = torch.float64
    mf = _mask_u8(mask).to(f64)
    # masked rewards/values may hold anything (NaN, inf, 1e6): zero them before any arithmetic
    r = torch.mul(rewards, mf).nan_to_num_(0.0, 0.0, 0.0)
    v = torch.mul(values, mf).nan_to_num_(0.0, 0.0, 0.0)
    A = _blocked(r, v, mf, float(gamma), gl, K, last_values)
    R = A + v  # both are 0 at masked steps
    return A.to(out_dtype), R.to(out_dtype)


def _single_block(
    rewards: Tensor, values: Tensor, mask: Tensor, gl: float, lam: float, last_values: Tensor | None,
    out_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """No gather for V_next: with w_s = W_s / W_t,  gamma * sum_s w_s V_next(s) = sum_{s'>t} w_s' V_s' / lam
    (+ the last_values term), so A_t = [sum_{s>=t} W_s (r_s + V_s (1/lam - 1)) + W_T last / lam] / W_t - V_t / lam.
    In place in a reused float64 workspace: a dozen passes, two fresh tensors (the outputs).
    """
    B, T = rewards.shape
    mf, r, v, W = _workspace(4, B, T, rewards.device).unbind(0)
    mf.copy_(_mask_u8(mask))
    # masked rewards/values may hold anything (NaN, inf, 1e6): zero them before any arithmetic
    torch.mul(rewards, mf, out=r).nan_to_num_(0.0, 0.0, 0.0)
    torch.mul(values, mf, out=v).nan_to_num_(0.0, 0.0, 0.0)
    log_gl = math.log(gl)
    torch.cumsum(mf, -1, out=W)  # valid steps in [0, t]
    total = W[:, -1:].clone()
    W.sub_(mf).mul_(log_gl).exp_()  # gl ** (valid steps before t)
    S = _suffix_sum(r.add_(v, alpha=1.0 / lam - 1.0).mul_(W))
    if last_values is not None:
        S.add_(total.mul_(log_gl).exp_().mul_(last_values.to(S.dtype).view(-1, 1)).div_(lam))
    S.div_(W).sub_(v, alpha=1.0 / lam).mul_(mf)
    A = torch.empty(B, T, dtype=out_dtype, device=S.device).copy_(S)
    R = torch.empty(B, T, dtype=out_dtype, device=S.device).copy_(S.add_(v))  # both 0 at masked steps
    return A, R


def _blocked(
    r: Tensor, v: Tensor, mf: Tensor, gamma: float, gl: float, K: int, last_values: Tensor | None
) -> Tensor:
    """General path (gl == 0, or gl ** T near underflow): explicit V_next, blocks of K steps."""
    B, T = r.shape
    f64 = r.dtype
    dev = r.device
    m = mf.bool()
    last = torch.zeros(B, 1, dtype=f64, device=dev) if last_values is None else last_values.to(f64).view(B, 1)
    # V of the next valid step strictly after t: first valid index in (t, T], T meaning last_values
    idx = torch.where(m, torch.arange(T, device=dev), T)
    nxt = idx.flip(-1).cummin(-1).values.flip(-1)
    nxt = torch.cat([nxt[:, 1:], torch.full((B, 1), T, device=dev, dtype=nxt.dtype)], 1)
    v_next = torch.cat([v, last], 1).gather(1, nxt)
    delta = r.add(v_next, alpha=gamma).sub_(v).mul_(mf)  # 0 at masked steps (all finite there)
    if gl == 0.0:
        return delta
    nb = -(-T // K)
    pad = nb * K - T
    if pad:
        delta = torch.nn.functional.pad(delta, (0, pad))
        mf = torch.nn.functional.pad(mf, (0, pad))
    d3 = delta.view(B, nb, K)
    m3 = mf.view(B, nb, K)
    log_gl = math.log(gl)
    cnt = m3.cumsum(-1)
    total = cnt[..., -1].clone()  # valid steps in each block: (B, nb)
    W = cnt.sub_(m3).mul_(log_gl).exp_()  # gl ** (valid steps in the block before t)
    S = _suffix_sum(W * d3)
    if nb > 1:
        decay = total.mul_(log_gl).exp_()  # weight of the carry crossing a block: (B, nb)
        head = S[..., 0].clone()  # the carry at each block's start for a zero carry in: (B, nb)
        carry_in = torch.empty(B, nb, dtype=f64, device=dev)
        carry = torch.zeros(B, dtype=f64, device=dev)
        for j in range(nb - 1, -1, -1):
            carry_in[:, j] = carry
            carry = head[:, j] + decay[:, j] * carry
        S.add_(decay.mul_(carry_in).unsqueeze(-1))
    return S.div_(W).mul_(m3).view(B, nb * K)[:, :T].contiguous()
