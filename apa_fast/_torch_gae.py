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

from . import _checks as C

_MIN_WEIGHT_LOG10 = -250.0  # smallest (gamma*lam)**k a block may need, far from fp64 underflow


_MIN_WEIGHT_LOG10_FP32 = -30.0  # the same for a float32 scan (normal floats end at 1.2e-38)


def _block_len(gl: float, T: int, min_log10: float | None = None) -> int:
    if gl >= 1.0 or gl <= 0.0:
        return T
    lim = _MIN_WEIGHT_LOG10 if min_log10 is None else min_log10
    return max(1, min(T, int(lim / math.log10(gl))))


def _suffix_sum(b: Tensor) -> Tensor:
    """``S[..., t] = sum_{s >= t} b[..., s]``, adding from the end (smallest weights first).

    (A blocked matmul against a triangular matrix avoids the flips but leaves MKL's worker threads
    spinning against ATen's for the ops that follow: many times slower on a busy 2-core machine.)"""
    return b.flip(-1).cumsum_(-1).flip(-1)


_WS = threading.local()
_WS_MAX_BYTES = 64 << 20
_SERIAL_ELEMS = 32767  # below ATen's parallel grain (32768): one thread, no fork/join


def _workspace(n: int, B: int, T: int, device: torch.device, dtype: torch.dtype = torch.float64) -> Tensor:
    """``n`` (B, T) buffers of ``dtype``, reused across calls of the same shape (per thread).

    Fresh multi-MiB tensors come from mmap and pay a page fault per 4 KiB on first touch, which
    on CPU costs more than the arithmetic of this whole function; a reused workspace does not.
    """
    key = (n, B, T, str(device), dtype)
    cache = getattr(_WS, "bufs", None)
    if cache is None:
        cache = _WS.bufs = {}
    if key in cache:
        return cache[key]
    buf = torch.empty(n, B, T, dtype=dtype, device=device)
    if device.type == "cpu" and buf.numel() * buf.element_size() <= _WS_MAX_BYTES:
        if len(cache) >= 4:  # a float and a count workspace per shape: keep the last two shapes' worth
            cache.clear()
        cache[key] = buf
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
        # float32 inputs scan in float32 where gl**T stays a normal float32 (T <= 1346 at gl = 0.95)
        fp32_ok = out_dtype == torch.float32 and _block_len(gl, T, _MIN_WEIGHT_LOG10_FP32) >= T
        cdt = torch.float32 if fp32_ok else torch.float64
        return _single_block(rewards, values, mask, gl, float(lam), last_values, out_dtype, cdt)
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
    out_dtype: torch.dtype, cdt: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """No gather for V_next: with w_s = W_s / W_t,  gamma * sum_s w_s V_next(s) = sum_{s'>t} w_s' V_s' / lam
    (+ the last_values term), so, at valid t and with the inclusive count W'_t = gl**(valid steps <= t)
    (= gl * W_t there),  A_t = [sum_{s>=t} W'_s (r_s + V_s (1/lam - 1)) + gl W_T last / lam] / W'_t - V_t / lam.

    In place in a reused workspace (float32 for float32 inputs when gl**T allows, else float64), over
    groups of rows small enough (< ATen's 32768-element grain) that every op runs on one thread with
    its operands in L1/L2: sixteen passes per group and no OpenMP fork/join, which on a busy machine
    costs more than the arithmetic.
    """
    B, T = rewards.shape
    rows = max(1, min(B, _SERIAL_ELEMS // T))
    ws = _workspace(4, rows, T, rewards.device, cdt)
    cnt = _workspace(1, rows, T, rewards.device, torch.int64)[0]
    m8 = _mask_u8(mask)
    A = torch.empty(B, T, dtype=out_dtype, device=rewards.device)
    R = torch.empty(B, T, dtype=out_dtype, device=rewards.device)
    direct = out_dtype == cdt
    powers = torch.arange(T + 1, dtype=torch.float64, device=rewards.device).mul_(math.log(gl)).exp_().to(cdt)
    lv = None
    if last_values is not None:  # gl * W_T * last / lam, W_T = gl ** (valid steps in the row)
        n_valid = m8.sum(-1, dtype=torch.float64)
        lv = (torch.pow(gl, n_valid) * last_values.to(torch.float64) * (gl / lam)).to(cdt).view(-1, 1)
    # no NaN/inf anywhere (one read each; on CPU only, where it costs no device sync): then a
    # multiply by the 0/1 mask already zeroes the masked steps
    finite = rewards.device.type == "cpu" and C.all_finite(rewards) and C.all_finite(values)
    for b0 in range(0, B, rows):
        b1 = min(B, b0 + rows)
        mf, r, v, W = ws[:, : b1 - b0].unbind(0)
        mf.copy_(m8[b0:b1])
        # masked rewards/values may hold anything (NaN, inf, 1e6): zero them before any arithmetic
        torch.mul(rewards[b0:b1], mf, out=r)
        torch.mul(values[b0:b1], mf, out=v)
        if not finite:
            r.nan_to_num_(0.0, 0.0, 0.0)
            v.nan_to_num_(0.0, 0.0, 0.0)
        # gl ** (valid steps in [0, t]), looked up in a table (ATen's exp forks threads from 2048
        # elements, pow(scalar, tensor) is scalar code: both are slower than an index_select here)
        torch.cumsum(m8[b0:b1], -1, dtype=torch.int64, out=cnt[: b1 - b0])
        torch.index_select(powers, 0, cnt[: b1 - b0].view(-1), out=W.view(-1))
        S = _suffix_sum(r.add_(v, alpha=1.0 / lam - 1.0).mul_(W))
        if lv is not None:
            S.add_(lv[b0:b1])
        a = torch.div(S, W, out=A[b0:b1]) if direct else S.div_(W)
        a.sub_(v, alpha=1.0 / lam).mul_(mf)
        if direct:
            torch.add(a, v, out=R[b0:b1])  # both 0 at masked steps
        else:
            A[b0:b1].copy_(a)
            R[b0:b1].copy_(a.add_(v))
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
