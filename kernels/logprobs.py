"""Triton kernels: token log-probs and entropy straight from logits, and their gradient.

``logprobs_fwd`` / ``logprobs_bwd`` have the torch backend's signatures; ``apa_fast.logprobs`` holds the
autograd Functions (losses such as APA's are composed on these log-probs there, and ``logprobs_bwd``
recomputes p for any upstream gradient). No autograd here.

Maths (per row, i.e. per token; ``u = z / tau``, or ``u = c tanh(z / c) / tau`` with a softcap c; label ``y``):

    lse  = logsumexp(u)                       computed online over vocab blocks:
           m' = max(m, max_blk u);  s' = s * exp(m - m') + sum_blk exp(u - m')
    logp = u[y] - lse
    H    = lse - sum(p * u) = log s - w / s    with w = sum exp(u - m) * (u - m), kept in the same
           pass by  w' = exp(m - m') * (w + (m - m') * s) + sum_blk exp(u - m') * (u - m')
           (shifted by the running max so that large logits do not cancel in fp32)

Backward recomputes p = exp(u - lse) block by block from the saved lse (no softmax is stored):

    dlogp/du = onehot(y) - p                  dH/du = -p * (t + H),  t = u - lse
    dz = (g_logp * (onehot - p) + g_ent * dH/du) / tau     (softcap: times 1 - tanh^2(z / c))

``onehot - p`` is formed in fp32 and rounded once, on store, to the logits' dtype.

Kernel rules (docs/design.md, "Kernel rules"): one row per program on grid axis 0; the row offset
``b * stride_b + t * stride_t`` in int64, so a shifted slice ``logits[:, :-1]`` is read in place;
vocab columns past V load as -inf and the running max starts at -inf; everything accumulates in fp32
(loads are cast right away); ``tau`` and ``ignore_index`` are constexpr; the label logit is loaded only when ``0 <= y < V``. A label outside
``[0, V)`` is treated like ``ignore_index`` (logp 0, entropy 0, no gradient), so a bad label can
never make a kernel read out of bounds even when the public input checks are skipped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import interpreter

# Largest vocab block per loop iteration: a few thousand columns keep registers in check.
MAX_BLOCK_V = 4096


def _config(V: int, x: Tensor) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a vocab of size V: a power of two >= 16, at most one cap."""
    cap = interpreter.LOGITS_MAX_BLOCK_V if interpreter.on() else MAX_BLOCK_V
    if x.element_size() == 2 and not interpreter.on():
        cap *= 2  # half-width loads: twice the columns for the same registers
    block = max(16, min(triton.next_power_of_2(V), cap))
    warps = 4 if block <= 1024 else (8 if block <= 4096 else 16)
    return block, warps


def _check_dtype(x3: Tensor) -> None:
    if x3.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(
            f"backend='triton' supports float32, bfloat16 and float16 logits, got {x3.dtype}; "
            "use backend='torch' or backend='reference' for float64"
        )


@triton.jit
def dlogits(t, p, is_label, g, ge, H, HAS_GE: tl.constexpr):
    """d/du of ``g * logp + ge * H`` from t = u - lse and p = exp(t), in fp32 (also used by kernels.linear):
    ``g (onehot - p) - ge p (t + H)``; where p = 0 (z = -inf) t is not read, so no 0 * -inf is formed."""
    d = g * (tl.where(is_label, 1.0, 0.0) - p)
    if HAS_GE:
        d -= ge * p * (tl.where(p > 0.0, t, 0.0) + H)
    return d


@triton.jit
def softcap_tile(z, SOFTCAP: tl.constexpr):
    """(c tanh(z / c), 1 - tanh^2(z / c)) in fp32 (also used by kernels.linear), from e = exp(-2|z| / c):
    tanh = sign(z) (1 - e) / (1 + e) and 1 - tanh^2 = 4e / (1 + e)^2. e <= 1 never overflows, tanh saturates
    to exactly +-1 for large |z / c| (z = -inf gives -c and a zero derivative), and the derivative keeps its
    relative accuracy where 1 - tanh^2 would cancel."""
    x = z * (1.0 / SOFTCAP)
    e = tl.exp(-2.0 * tl.abs(x))
    r = (1.0 - e) / (1.0 + e)
    th = tl.where(x < 0.0, -r, r)
    return SOFTCAP * th, 4.0 * e / ((1.0 + e) * (1.0 + e))


@triton.jit
def _row(x_ptr, labels_ptr, T, V, stride_b, stride_t, IGNORE_INDEX: tl.constexpr):
    """This program's token: its row index, the address of its logits (any (B, T) strides), its label,
    and whether that label is to be scored (not ignore_index, inside [0, V): never read out of bounds)."""
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row - b * T
    base = x_ptr + b * stride_b + t * stride_t  # b, t are int64: no int32 overflow
    y = tl.load(labels_ptr + row).to(tl.int64)
    valid = (y != IGNORE_INDEX) & (y >= 0) & (y < V)
    return row, base, y, valid


@triton.jit
def _lse_fwd_kernel(
    x_ptr,
    labels_ptr,
    logp_ptr,
    lse_ptr,
    ent_ptr,
    T,
    V,
    stride_b,
    stride_t,
    INV_TAU: tl.constexpr,
    IGNORE_INDEX: tl.constexpr,
    HAS_ENT: tl.constexpr,
    BLOCK_V: tl.constexpr,
    SOFTCAP: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    row, base, y, valid = _row(x_ptr, labels_ptr, T, V, stride_b, stride_t, IGNORE_INDEX)

    cols = tl.arange(0, BLOCK_V)
    m = tl.full([], -float("inf"), tl.float32)
    s = tl.zeros([], tl.float32)
    w = tl.zeros([], tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        inb = offs < V
        z = tl.load(base + offs, mask=inb, other=-float("inf")).to(tl.float32)
        if HAS_SOFTCAP:
            z, _ = softcap_tile(z, SOFTCAP)
            z = tl.where(inb, z, -float("inf"))  # columns past V: the cap would lift their -inf to -c
        u = z * INV_TAU
        m_new = tl.maximum(m, tl.max(u, axis=0))
        # shift by 0 while every logit so far is -inf (e.g. top-k-masked logits), never by -inf
        shift = tl.where(m_new == -float("inf"), 0.0, m_new)
        scale = tl.exp(m - shift)  # 0 while m = -inf
        e = tl.exp(u - shift)  # 0 on columns past V and where z = -inf
        s_blk = tl.sum(e, axis=0)
        if HAS_ENT:
            # p*log p -> 0 as p -> 0: columns with e == 0 add nothing (and no 0 * -inf is formed)
            w_blk = tl.sum(e * tl.where(e > 0.0, u - shift, 0.0), axis=0)
            dm = tl.where(m == -float("inf"), 0.0, m - shift)
            w = scale * (w + dm * s) + w_blk
        s = s * scale + s_blk
        m = m_new
    log_s = tl.log(s)
    lse = m + log_s
    tl.store(lse_ptr + row, lse)

    zy = tl.load(base + tl.where(valid, y, 0), mask=valid, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        zy, _ = softcap_tile(zy, SOFTCAP)
    tl.store(logp_ptr + row, tl.where(valid, zy * INV_TAU - lse, 0.0))
    if HAS_ENT:
        tl.store(ent_ptr + row, tl.where(valid, log_s - w / s, 0.0))


@triton.jit
def _lse_bwd_kernel(
    x_ptr,
    labels_ptr,
    lse_ptr,
    ent_ptr,
    g_ptr,
    ge_ptr,
    grad_ptr,
    T,
    V,
    stride_b,
    stride_t,
    INV_TAU: tl.constexpr,
    IGNORE_INDEX: tl.constexpr,
    HAS_G: tl.constexpr,
    HAS_GE: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    BLOCK_V: tl.constexpr,
    SOFTCAP: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    row, base, y, valid = _row(x_ptr, labels_ptr, T, V, stride_b, stride_t, IGNORE_INDEX)
    out = grad_ptr + row * V
    lse = tl.load(lse_ptr + row).to(tl.float32)
    g = 0.0
    if HAS_G:
        g = tl.where(valid, tl.load(g_ptr + row).to(tl.float32), 0.0)
    ge = 0.0
    H = 0.0
    if HAS_GE:
        ge = tl.where(valid, tl.load(ge_ptr + row).to(tl.float32), 0.0)
        H = tl.load(ent_ptr + row).to(tl.float32)

    cols = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        inb = offs < V
        z = tl.load(base + offs, mask=inb, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            z, dcap = softcap_tile(z, SOFTCAP)
        tt = z * INV_TAU - lse
        d = dlogits(tt, tl.exp(tt), offs == y, g, ge, H, HAS_GE) * INV_TAU
        if HAS_SOFTCAP:
            d = d * dcap  # the chain rule through c tanh(z / c)
        d = tl.where(valid, d, 0.0)  # ignored rows: exact zeros even if lse is not finite
        if ROUND_BF16:
            d = interpreter.round_bf16(d)
        tl.store(out + offs, d.to(grad_ptr.dtype.element_ty), mask=inb)


def _as_kernel_args(x3: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    _check_dtype(x3)
    if x3.dim() != 3:
        raise ValueError(f"x3 must be a (B, T, V) view, got shape {tuple(x3.shape)}")
    if x3.shape[-1] > 1 and x3.stride(-1) != 1:
        x3 = x3.contiguous()
    labels = labels.reshape(-1)
    if labels.dtype != torch.int64 or not labels.is_contiguous():
        labels = labels.to(torch.int64).contiguous()
    if labels.numel() != x3.shape[0] * x3.shape[1]:
        raise ValueError(f"labels must have B*T = {x3.shape[0] * x3.shape[1]} elements, got {labels.numel()}")
    return x3, labels


def _flat_f32(x: Tensor) -> Tensor:
    return x.reshape(-1).to(torch.float32).contiguous()


def cap_args(softcap: float | None) -> dict:
    """The softcap constexprs of every kernel here and in kernels.linear: a fixed placeholder when off (one compiled
    variant)."""
    return dict(SOFTCAP=1.0 if softcap is None else float(softcap), HAS_SOFTCAP=softcap is not None)


def logprobs_fwd(
    x3: Tensor, labels: Tensor, tau: float, ignore_index: int, return_entropy: bool, softcap: float | None = None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(logp, lse, entropy | None), each flat (B*T,) float32; ignored rows give logp = entropy = 0; ``softcap`` c:
    the logits are c tanh(z / c) first."""
    x3, labels = _as_kernel_args(x3, labels)
    N = x3.shape[0] * x3.shape[1]
    B, T, V = x3.shape
    f32 = dict(dtype=torch.float32, device=x3.device)
    logp, lse = torch.empty(N, **f32), torch.empty(N, **f32)
    ent = torch.empty(N, **f32) if return_entropy else None
    BLOCK_V, warps = _config(V, x3)
    if N > 0:
        _lse_fwd_kernel[(N,)](
            x3, labels, logp, lse, ent if ent is not None else lse, T, V, x3.stride(0), x3.stride(1),
            INV_TAU=1.0 / float(tau), IGNORE_INDEX=int(ignore_index), HAS_ENT=ent is not None,
            BLOCK_V=BLOCK_V, num_warps=warps, **cap_args(softcap),
        )
    return logp, lse, ent


def logprobs_bwd(
    x3: Tensor,
    labels: Tensor,
    lse: Tensor,
    entropy: Tensor | None,
    g_logp: Tensor | None,
    g_ent: Tensor | None,
    tau: float,
    ignore_index: int,
    softcap: float | None = None,
) -> Tensor:
    """d(sum g_logp*logp + g_ent*H)/dz as a contiguous (B, T, V) tensor in x3's dtype (``softcap``: as in
    ``logprobs_fwd``)."""
    x3, labels = _as_kernel_args(x3, labels)
    B, T, V = x3.shape
    N = B * T
    grad = torch.empty((B, T, V), dtype=x3.dtype, device=x3.device)
    if N == 0:
        return grad
    if g_ent is not None and entropy is None:
        raise ValueError("g_ent needs the entropy saved by logprobs_fwd(return_entropy=True)")
    lse = _flat_f32(lse)
    g = _flat_f32(g_logp) if g_logp is not None else lse
    ge = _flat_f32(g_ent) if g_ent is not None else lse
    ent = _flat_f32(entropy) if g_ent is not None else lse
    BLOCK_V, warps = _config(V, x3)
    _lse_bwd_kernel[(N,)](
        x3,
        labels,
        lse,
        ent,
        g,
        ge,
        grad,
        T,
        V,
        x3.stride(0),
        x3.stride(1),
        INV_TAU=1.0 / float(tau),
        IGNORE_INDEX=int(ignore_index),
        HAS_G=g_logp is not None,
        HAS_GE=g_ent is not None,
        ROUND_BF16=x3.dtype == torch.bfloat16 and interpreter.on(),
        BLOCK_V=BLOCK_V,
        num_warps=warps,
        **cap_args(softcap),
    )
    return grad
