"""Triton kernels: token log-probs, entropy and the APA loss from hidden states and the LM head.

``token_fwd`` / ``token_bwd`` have the torch backend's signatures; ``apa_fast.linear`` holds the autograd
Functions and composes losses on these log-probs. No autograd here.

Maths, per token row ``i`` (label ``y_i``) and vocabulary column ``v``:

    z_iv = h_i . W_v + b_v,   u = z / tau   (softcap c: u = c tanh(z / c) / tau),   lse_i = logsumexp_v u_iv,   logp_i = u_iy - lse_i
    H_i  = lse_i - sum_v p_iv u_iv          (p = exp(u - lse))
    du_iv = g_i (onehot_iv - p_iv) - ge_i p_iv (u_iv - lse_i + H_i),   dz = du / tau
    grad_h = dz @ W,   grad_W = dz^T @ h,   grad_b = sum_i dz_i    (softcap: dz gains 1 - tanh^2(z / c))

Every kernel tiles tokens (BLOCK_N rows) x vocabulary (BLOCK_V columns) and builds its logits
tile with ``tl.dot`` over BLOCK_H slices of the hidden size, fp32 accumulation. No logits tile
ever leaves the chip: the forward keeps an online log-sum-exp per row

    m' = max(m, max_blk u);   s' = s e^(m - m') + sum_blk e^(u - m')
    w' = e^(m - m') (w + (m - m') s) + sum_blk e^(u - m') (u - m')     (so H = log s - w / s)

and the backward kernels recompute the tile from the saved ``lse`` and turn it straight into
``dz`` (fp32, exact: no gradient filtering or skipping of small probabilities):

- ``_grad_h_kernel``: one program per (token block, vocab split); ``dz @ W`` is added into an fp32
  partial ``grad_h`` per split (summed afterwards), so long vocabularies still fill the GPU.
- ``_grad_w_kernel``: one program per vocab block, looping over all token blocks;
  ``grad_W[block] += dz^T @ h`` and ``grad_b[block] += sum dz`` into fp32 buffers that this
  program alone owns: deterministic, no atomics, fp32 accumulation whatever the input dtype.

The forward can likewise split the vocabulary across programs; the per-split (m, s, w, u_y) are
merged by the same recurrence in PyTorch (N x splits numbers). Backward recomputes the logits
twice (once per kernel): five matmul-equivalents in all, against four for a single kernel with
atomic adds, bought for determinism.

Kernel rules (docs/design.md): row/column offsets in int64; vocab columns past V are -inf in the
forward and give p = 0 in backward; rows past N are masked; everything accumulates in fp32; each
load is cast to fp32 right away except the two matmul operands, which stay in bf16/fp16 (tensor
cores, fp32 accumulation); fp32 operands use ``input_precision="ieee"`` (no TF32) so that fp32 results match an
fp32 reference. ``tau`` reaches the kernels as a constexpr.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import interpreter
from .logprobs import cap_args, dlogits, softcap_tile


def _check(h: Tensor) -> None:
    if h.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(
            f"backend='triton' supports float32, bfloat16 and float16, got {h.dtype}; "
            "use backend='torch' or backend='reference' for float64"
        )


def _blocks(N: int, V: int, H: int, h: Tensor) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_V, BLOCK_H, num_warps): powers of two >= 16 (tl.dot's minimum)."""
    if interpreter.on():
        return interpreter.linear_blocks(N, V, H)
    bn = max(16, min(64, triton.next_power_of_2(N)))
    bh = 64 if h.element_size() == 2 else 32
    return bn, 128, bh, 8


# Tests force several vocab splits to run that path under the interpreter.
FORCE_SPLITS: int | None = None
# Most bytes of fp32 partial grad_h (splits x N x H) the vocab split of _grad_h_kernel may use.
MAX_PARTIAL_BYTES = 64 << 20


def _splits(n_blocks_n: int, V: int, block_v: int, h: Tensor, partial_row_bytes: int = 0) -> tuple[int, int]:
    """(S, v_per): S programs share one token block's vocabulary, v_per columns each (a multiple of
    block_v), so that the grid fills the GPU; every split holds at least one column.

    ``partial_row_bytes`` (N x H x 4 for grad_h) caps the splits so their partial sums stay small.
    """
    n_blocks_v = triton.cdiv(V, block_v)
    if FORCE_SPLITS is not None:
        s = max(1, min(FORCE_SPLITS, n_blocks_v))
    elif interpreter.on() or h.device.type != "cuda":
        s = 1
    else:
        sms = torch.cuda.get_device_properties(h.device).multi_processor_count
        s = max(1, min(n_blocks_v, triton.cdiv(2 * sms, max(1, n_blocks_n))))
        if partial_row_bytes:
            s = max(1, min(s, MAX_PARTIAL_BYTES // partial_row_bytes))
    v_per = triton.cdiv(n_blocks_v, s) * block_v
    return triton.cdiv(V, v_per), v_per


@triton.jit
def _logits_tile(
    h_ptr, w_ptr, b_ptr, rows, cols, N, V, H, stride_hn, stride_wv,
    HAS_BIAS: tl.constexpr, LOWP_DOT: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """z[rows, cols] = h[rows] @ W[cols]^T + b[cols] in fp32 (0 on rows past N / cols past V)."""
    rmask = rows < N
    cmask = cols < V
    ks = tl.arange(0, BLOCK_H)
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_H):
        k = k0 + ks
        kmask = k < H
        a = tl.load(h_ptr + rows[:, None] * stride_hn + k[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(w_ptr + cols[None, :] * stride_wv + k[:, None], mask=cmask[None, :] & kmask[:, None], other=0.0)
        if not LOWP_DOT:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _dz_tile(
    h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, g_ptr, ge_ptr, ent_ptr, rows, cols, N, V, H, stride_hn, stride_wv,
    INV_TAU: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GE: tl.constexpr, LOWP_DOT: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):
    """dz tile (fp32): (g (onehot - p) - ge p (t + H)) / tau with t = u - lse, recomputed on chip; with a
    softcap c (u = c tanh(z / c) / tau) times the chain-rule factor 1 - tanh^2(z / c)."""
    rmask = rows < N
    cmask = cols < V
    z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, H, stride_hn, stride_wv,
                     HAS_BIAS, LOWP_DOT, DOT_PREC, BLOCK_N, BLOCK_V, BLOCK_H)
    if HAS_SOFTCAP:
        z, dcap = softcap_tile(z, SOFTCAP)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + rows, mask=rmask, other=-1).to(tl.int64)
    t = z * INV_TAU - lse[:, None]
    valid = rmask[:, None] & cmask[None, :]
    p = tl.where(valid, tl.exp(tl.where(valid, t, 0.0)), 0.0)  # no exp of garbage past N / V
    ge = g * 0.0
    ent = g * 0.0
    if HAS_GE:
        ge = tl.load(ge_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        ent = tl.load(ent_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    d = dlogits(t, p, cols[None, :] == y[:, None], g[:, None], ge[:, None], ent[:, None], HAS_GE) * INV_TAU
    if HAS_SOFTCAP:
        d = d * dcap  # dz = du/dz * (1 - tanh^2), before the matmuls back to h and W
    return tl.where(valid, d, 0.0)


@triton.jit
def _fwd_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr, m_ptr, s_ptr, went_ptr, uy_ptr,
    N, V, H, stride_hn, stride_wv, V_PER_SPLIT,
    INV_TAU: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ENT: tl.constexpr, LOWP_DOT: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):
    """Per row and vocab split: running max m, sum s, entropy term w and label logit u_y."""
    pn = tl.program_id(0).to(tl.int64)
    ps = tl.program_id(1).to(tl.int64)
    rows = pn * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    rmask = rows < N
    y = tl.load(y_ptr + rows, mask=rmask, other=-1).to(tl.int64)
    m = tl.full((BLOCK_N,), -float("inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    w = tl.zeros((BLOCK_N,), tl.float32)
    uy = tl.zeros((BLOCK_N,), tl.float32)
    v_lo = ps * V_PER_SPLIT
    v_hi = tl.minimum(v_lo + V_PER_SPLIT, V)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        cmask = cols < v_hi
        z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, H, stride_hn, stride_wv,
                         HAS_BIAS, LOWP_DOT, DOT_PREC, BLOCK_N, BLOCK_V, BLOCK_H)
        if HAS_SOFTCAP:
            z, _ = softcap_tile(z, SOFTCAP)
        u = tl.where(cmask[None, :], z * INV_TAU, -float("inf"))  # after the cap: tanh would lift -inf to -c
        uy += tl.sum(tl.where(cols[None, :] == y[:, None], u, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(u, axis=1))  # finite: every block has a column < v_hi
        scale = tl.exp(m - m_new)  # 0 while m = -inf
        e = tl.exp(u - m_new[:, None])  # 0 on columns past the split
        if HAS_ENT:
            w_blk = tl.sum(e * tl.where(cmask[None, :], u - m_new[:, None], 0.0), axis=1)  # no 0 * -inf
            dm = tl.where(m == -float("inf"), 0.0, m - m_new)
            w = scale * (w + dm * s) + w_blk
        s = s * scale + tl.sum(e, axis=1)
        m = m_new
    out = ps * N + rows
    tl.store(m_ptr + out, m, mask=rmask)
    tl.store(s_ptr + out, s, mask=rmask)
    tl.store(uy_ptr + out, uy, mask=rmask)
    if HAS_ENT:
        tl.store(went_ptr + out, w, mask=rmask)


@triton.jit
def _grad_h_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, g_ptr, ge_ptr, ent_ptr, gh_ptr,
    N, V, H, stride_hn, stride_wv, V_PER_SPLIT,
    INV_TAU: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GE: tl.constexpr, LOWP_DOT: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):
    """gh_part[split, rows] += dz[rows, split's vocab] @ W[split's vocab] (fp32 partials)."""
    pn = tl.program_id(0).to(tl.int64)
    ps = tl.program_id(1).to(tl.int64)
    rows = pn * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    rmask = rows < N
    ks = tl.arange(0, BLOCK_H).to(tl.int64)
    v_lo = ps * V_PER_SPLIT
    v_hi = tl.minimum(v_lo + V_PER_SPLIT, V)
    out = gh_ptr + ps * N * H
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        cmask = cols < v_hi
        dz = _dz_tile(h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, g_ptr, ge_ptr, ent_ptr, rows, cols, N, V, H,
                      stride_hn, stride_wv, INV_TAU, HAS_BIAS, HAS_GE, LOWP_DOT, DOT_PREC,
                      BLOCK_N, BLOCK_V, BLOCK_H, SOFTCAP, HAS_SOFTCAP)
        dz = tl.where(cmask[None, :], dz, 0.0)
        if LOWP_DOT:
            dz_op = dz.to(w_ptr.dtype.element_ty)  # one rounding, as eager's backward does
        else:
            dz_op = dz
        for k0 in range(0, H, BLOCK_H):
            k = k0 + ks
            kmask = k < H
            wt = tl.load(w_ptr + cols[:, None] * stride_wv + k[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
            if not LOWP_DOT:
                wt = wt.to(tl.float32)
            ptrs = out + rows[:, None] * H + k[None, :]
            omask = rmask[:, None] & kmask[None, :]
            acc = tl.load(ptrs, mask=omask, other=0.0)
            acc = tl.dot(dz_op, wt, acc, input_precision=DOT_PREC)
            tl.store(ptrs, acc, mask=omask)


@triton.jit
def _grad_w_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, g_ptr, ge_ptr, ent_ptr, gw_ptr, gb_ptr,
    N, V, H, stride_hn, stride_wv,
    INV_TAU: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GE: tl.constexpr, NEED_W: tl.constexpr,
    NEED_B: tl.constexpr, LOWP_DOT: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):
    """gW[cols] = sum over token blocks of dz^T @ h;  gb[cols] = sum dz. fp32, owned by this program."""
    pv = tl.program_id(0).to(tl.int64)
    cols = pv * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    cmask = cols < V
    ks = tl.arange(0, BLOCK_H).to(tl.int64)
    gb = tl.zeros((BLOCK_V,), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        rmask = rows < N
        dz = _dz_tile(h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, g_ptr, ge_ptr, ent_ptr, rows, cols, N, V, H,
                      stride_hn, stride_wv, INV_TAU, HAS_BIAS, HAS_GE, LOWP_DOT, DOT_PREC,
                      BLOCK_N, BLOCK_V, BLOCK_H, SOFTCAP, HAS_SOFTCAP)
        if NEED_B:
            gb += tl.sum(dz, axis=0)
        if NEED_W:
            if LOWP_DOT:
                dzt = tl.trans(dz.to(h_ptr.dtype.element_ty))
            else:
                dzt = tl.trans(dz)
            for k0 in range(0, H, BLOCK_H):
                k = k0 + ks
                kmask = k < H
                ht = tl.load(h_ptr + rows[:, None] * stride_hn + k[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
                if not LOWP_DOT:
                    ht = ht.to(tl.float32)
                ptrs = gw_ptr + cols[:, None] * H + k[None, :]
                omask = cmask[:, None] & kmask[None, :]
                acc = tl.load(ptrs, mask=omask, other=0.0)
                acc = tl.dot(dzt, ht, acc, input_precision=DOT_PREC)
                tl.store(ptrs, acc, mask=omask)
    if NEED_B:
        tl.store(gb_ptr + cols, gb, mask=cmask)


def _common(h: Tensor, bias: Tensor | None, tau: float, softcap: float | None) -> dict:
    lowp = h.element_size() == 2 and not interpreter.on()  # the interpreter widens bf16 operands
    return dict(
        INV_TAU=1.0 / float(tau),
        **cap_args(softcap),
        HAS_BIAS=bias is not None,
        LOWP_DOT=lowp,
        DOT_PREC="tf32" if lowp else "ieee",  # tf32 is the default for 16-bit operands (unused there)
    )


def _as_kernel_args(h: Tensor, weight: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    _check(h)
    h = h.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    return h, weight, labels.to(torch.int64).contiguous()


def token_fwd(
    h: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, tau: float, return_entropy: bool,
    softcap: float | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(logp, lse, entropy | None), float32 per row; lse is of u = z / tau (z -> c tanh(z / c) first with a
    ``softcap`` c)."""
    h, weight, labels = _as_kernel_args(h, weight, labels)
    N, H = h.shape
    V = weight.shape[0]
    dev = h.device
    if N == 0:
        z = torch.zeros(0, dtype=torch.float32, device=dev)
        return z, z.clone(), (z.clone() if return_entropy else None)
    BN, BV, BH, warps = _blocks(N, V, H, h)
    nb_n = triton.cdiv(N, BN)
    S, v_per = _splits(nb_n, V, BV, h)
    m = torch.empty(S, N, dtype=torch.float32, device=dev)
    s = torch.empty_like(m)
    uy = torch.empty_like(m)
    went = torch.empty_like(m) if return_entropy else m
    _fwd_kernel[(nb_n, S)](
        h, weight, bias if bias is not None else h, labels, m, s, went, uy,
        N, V, H, h.stride(0), weight.stride(0), v_per,
        HAS_ENT=return_entropy, BLOCK_N=BN, BLOCK_V=BV, BLOCK_H=BH, num_warps=warps,
        **_common(h, bias, tau, softcap),
    )
    # merge the splits: M = max m;  S = sum s e^(m - M);  W = sum e^(m - M) (w + (m - M) s)
    M = m.amax(0)
    a = torch.exp(m - M)
    s_tot = (s * a).sum(0)
    lse = M + s_tot.log()
    logp = uy.sum(0) - lse
    ent = None
    if return_entropy:
        w_tot = (a * (went + (m - M) * s)).sum(0)
        ent = s_tot.log() - w_tot / s_tot
    return logp, lse, ent


def token_bwd(
    h: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    lse: Tensor,
    ent: Tensor | None,
    g_logp: Tensor | None,
    g_ent: Tensor | None,
    tau: float,
    need: tuple[bool, bool, bool],
    softcap: float | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(grad_h, grad_W, grad_b) in the inputs' dtypes; grad_W and grad_b accumulated in fp32 (``softcap``: as in
    ``token_fwd``)."""
    h, weight, labels = _as_kernel_args(h, weight, labels)
    N, H = h.shape
    V = weight.shape[0]
    dev = h.device
    need_h, need_w, need_b = need[0], need[1], need[2] and bias is not None
    f32 = dict(dtype=torch.float32, device=dev)
    lse = lse.to(torch.float32).contiguous()
    g = torch.zeros(N, **f32) if g_logp is None else g_logp.to(torch.float32).contiguous()
    has_ge = g_ent is not None
    ge = g_ent.to(torch.float32).contiguous() if has_ge else g
    en = ent.to(torch.float32).contiguous() if has_ge else g
    BN, BV, BH, warps = _blocks(N, V, H, h)
    nb_n, nb_v = triton.cdiv(max(N, 1), BN), triton.cdiv(V, BV)
    kw = dict(HAS_GE=has_ge, BLOCK_N=BN, BLOCK_V=BV, BLOCK_H=BH, num_warps=warps, **_common(h, bias, tau, softcap))
    bptr = bias if bias is not None else h
    gh = gw = gb = None
    if need_h:
        S, v_per = _splits(nb_n, V, BV, h, N * H * 4)
        part = torch.zeros(S, N, H, **f32)
        if N > 0:
            _grad_h_kernel[(nb_n, S)](
                h, weight, bptr, labels, lse, g, ge, en, part,
                N, V, H, h.stride(0), weight.stride(0), v_per, **kw,
            )
        gh = part.sum(0).to(h.dtype)
    if need_w or need_b:
        gw32 = torch.zeros(V, H, **f32) if need_w else g
        gb32 = torch.zeros(V, **f32) if need_b else g
        if N > 0:
            _grad_w_kernel[(nb_v,)](
                h, weight, bptr, labels, lse, g, ge, en, gw32, gb32,
                N, V, H, h.stride(0), weight.stride(0), NEED_W=need_w, NEED_B=need_b, **kw,
            )
        if need_w:
            gw = gw32.to(weight.dtype)
        if need_b:
            gb = gb32.to(bias.dtype)
    return gh, gw, gb
