"""The ``torch`` backend of the linear ops: log-probs / APA loss from hidden states and the LM head.

Per token ``i`` (a row of ``hidden``, label ``y``) and vocabulary entry ``v``:

    z_iv = h_i . W_v + b_v          u = z / tau          lse_i = logsumexp_v u_iv
    logp_i = u_iy - lse_i           H_i = lse_i - sum_v p_iv u_iv,   p = exp(u - lse)

and for an upstream gradient ``g_logp`` (and ``g_ent``) per token:

    du_iv = g_logp_i * (onehot_iv - p_iv) - g_ent_i * p_iv * (u_iv - lse_i + H_i)
    dz = du / tau;   grad_h = dz @ W;   grad_W = dz^T @ h;   grad_b = sum_i dz_i

Only a chunk of ``rows x V`` logits exists at any time (an fp32 scratch buffer reused for every
chunk), never the (N, V) logits. A chunk spans the whole vocabulary on purpose: ``dz`` needs the
row's full softmax, so vocab-splitting a token chunk would force a second logits matmul; the chunk's
row count (``rows_per_chunk``) is what bounds memory instead, and it never exceeds
``MAX_CHUNK_BYTES`` of logits however large V is. The work is exactly the three matmuls any method needs
(logits, grad_h, grad_W) plus a few elementwise passes over each chunk:

- ``apa_fwd`` (the scalar APA loss) computes the gradients *during the forward pass*: a row of
  logits is all it needs to know ``p`` and the row's loss coefficient ``c = 2 * resid / n``, so the
  chunk goes logits -> softmax -> dz -> ``grad_h[chunk] = dz @ W`` and ``grad_W += dz^T @ h`` with no
  recompute. Backward only rescales by the upstream gradient (skipped when it is 1).
- ``token_fwd``/``token_bwd`` (vector upstream gradient, unknown in forward) save the per-row
  ``lse`` and recompute each logits chunk in backward: four matmuls instead of three, but no
  (N, V) tensor is kept between forward and backward.

``grad_W`` (and ``grad_b``) are accumulated in fp32 (float64 for float64 input) whatever the input
dtype, and cast to the weight's dtype once at the end. Low-precision (bf16/fp16) logits chunks are
computed by a matmul in the input dtype (as eager ``F.linear`` would), then widened to fp32 before
the softmax; ``dz`` is formed in fp32 and used in fp32 for ``grad_W``.

Interface shared with ``kernels.linear`` (the Triton backend); ``apa_fast.linear`` holds the autograd
Functions. ``h`` is (N, H) contiguous, ``labels`` (N,) int64 with every row valid (the caller drops
ignored/masked rows before calling), ``bias`` (V,) or None.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import out_dtype as _acc_dtype  # fp64 stays fp64, the rest accumulate in fp32

# Rows per token chunk: an eighth of the tokens (so the chunk's fp32 logits stay ~5% of eager's
# logits + log-softmax + gradient, about 2.4 N V floats), at least ROW_MIN rows (below that the
# grad_W update, whose inner dimension is the chunk's rows, re-reads and re-writes all of grad_W
# too often: each chunk streams V x H fp32 through memory) and at most MAX_CHUNK_BYTES of logits.
ROW_MIN = 64
MAX_CHUNK_BYTES = 64 << 20
# Row counts are rounded to a multiple of this, which keeps the matmul's panels aligned.
_ROW_ALIGN = 16


def rows_per_chunk(N: int, V: int, itemsize: int = 4) -> int:
    rows = min(max(ROW_MIN, N // 8), max(1, MAX_CHUNK_BYTES // max(1, V * itemsize)))
    if rows >= 2 * _ROW_ALIGN:
        rows -= rows % _ROW_ALIGN
    return max(1, min(N, rows))


class _Scratch:
    """The per-call chunk buffers: fp32 logits (and a low-precision staging buffer when needed)."""

    def __init__(self, h: Tensor, weight: Tensor, rows: int, second: bool) -> None:
        V = weight.shape[0]
        self.acc = _acc_dtype(h)
        self.z = torch.empty(rows, V, dtype=self.acc, device=h.device)
        self.z2 = torch.empty(rows, V, dtype=self.acc, device=h.device) if second else None
        self.lowp = None if h.dtype == self.acc else torch.empty(rows, V, dtype=h.dtype, device=h.device)


def _logits(h: Tensor, weight: Tensor, bias: Tensor | None, sc: _Scratch, tau: float) -> Tensor:
    """u = (h @ W^T + b) / tau for one token chunk, in the fp32 (float64) scratch."""
    r = h.shape[0]
    z = sc.z[:r]
    dst = z if sc.lowp is None else sc.lowp[:r]
    if bias is None:
        torch.mm(h, weight.t(), out=dst)
    else:
        torch.addmm(bias, h, weight.t(), out=dst)
    if sc.lowp is not None:
        z.copy_(dst)
    if tau != 1.0:
        z.mul_(1.0 / tau)
    return z


def _accumulate(
    dz: Tensor,
    h: Tensor,
    weight: Tensor,
    r0: int,
    gh: Tensor | None,
    gw: Tensor | None,
    gb: Tensor | None,
) -> None:
    """grad_h[chunk] = dz @ W (in h's dtype);  grad_W += dz^T @ h and grad_b += sum dz (fp32)."""
    r = dz.shape[0]
    if gh is not None:
        if dz.dtype == weight.dtype:
            torch.mm(dz, weight, out=gh[r0 : r0 + r])
        else:  # one rounding of dz to the weight dtype, as eager's backward does
            torch.mm(dz.to(weight.dtype), weight, out=gh[r0 : r0 + r])
    if gw is not None:
        hh = h if h.dtype == dz.dtype else h.to(dz.dtype)
        if r0 == 0:  # the first chunk writes grad_W: no zero-fill pass over V x H beforehand
            torch.mm(dz.t(), hh, out=gw)
        else:
            gw.addmm_(dz.t(), hh)
    if gb is not None:
        gb.add_(dz.sum(0))


def _grad_buffers(
    h: Tensor, weight: Tensor, bias: Tensor | None, need: tuple[bool, bool, bool]
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    acc = _acc_dtype(h)
    gh = torch.empty_like(h) if need[0] else None
    # empty, not zeros: the first chunk's matmul writes it (and N = 0 rows means no chunk at all)
    gw = (torch.empty if h.shape[0] > 0 else torch.zeros)(weight.shape, dtype=acc, device=h.device) if need[1] else None
    gb = torch.zeros(weight.shape[0], dtype=acc, device=h.device) if (need[2] and bias is not None) else None
    return gh, gw, gb


def _finish(
    gh: Tensor | None, gw: Tensor | None, gb: Tensor | None, weight: Tensor, bias: Tensor | None
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    if gw is not None and gw.dtype != weight.dtype:
        gw = gw.to(weight.dtype)
    if gb is not None and bias is not None and gb.dtype != bias.dtype:
        gb = gb.to(bias.dtype)
    return gh, gw, gb


def _chunk_exp(
    h: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, sc: _Scratch, tau: float, r0: int, r1: int,
    lse: Tensor, e_out: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Rows [r0, r1): u = h W^T / tau (+ b), t = u - max u (exp(t) <= 1: no overflow), e = exp(t),
    s = sum e; writes lse. e overwrites t in the scratch unless ``e_out`` is given (entropy needs both).

    Returns (labels as a column, u at the labels, t, e, s)."""
    y = labels[r0:r1].unsqueeze(1)
    u = _logits(h[r0:r1], weight, bias, sc, tau)
    uy = u.gather(1, y).squeeze(1)
    m = u.amax(1, keepdim=True)
    t = u.sub_(m)
    e = t.exp_() if e_out is None else torch.exp(t, out=e_out)
    s = e.sum(1)
    lse[r0:r1] = m.squeeze(1) + s.log()
    return y, uy, t, e, s


def token_fwd(
    h: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, tau: float, return_entropy: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(logp, lse, entropy | None) per row; lse is of u = z / tau."""
    N, V = h.shape[0], weight.shape[0]
    acc = _acc_dtype(h)
    logp = torch.empty(N, dtype=acc, device=h.device)
    lse = torch.empty(N, dtype=acc, device=h.device)
    ent = torch.empty(N, dtype=acc, device=h.device) if return_entropy else None
    rows = rows_per_chunk(N, V)
    sc = _Scratch(h, weight, rows, second=return_entropy)
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        e_out = sc.z2[: r1 - r0] if return_entropy else None
        _, uy, t, e, s = _chunk_exp(h, weight, bias, labels, sc, tau, r0, r1, lse, e_out)
        if return_entropy:
            # H = lse - E_p[u] = log s - E_p[t]  (shifted, so no cancellation of large logits)
            ent[r0:r1] = s.log() - torch.linalg.vecdot(e, t) / s
        logp[r0:r1] = uy - lse[r0:r1]
    return logp, lse, ent


def token_fwd_dh(
    h: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, tau: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(logp, lse, D) with D_i = dlogp_i/dh_i = (W_y - sum_v p_iv W_v) / tau, for fp32/fp64 input.

    For a frozen LM head (only hidden wants a gradient) the hidden gradient of sum_i g_i logp_i is
    g_i D_i: D costs the one matmul backward would need anyway, with no logits recompute, and
    backward becomes a row scaling. (grad_W could not be done this way: it needs p and g together.)
    """
    N, V = h.shape[0], weight.shape[0]
    acc = _acc_dtype(h)
    if h.dtype != acc:
        raise TypeError("token_fwd_dh needs fp32 or fp64 input (D would be rounded twice otherwise)")
    logp = torch.empty(N, dtype=acc, device=h.device)
    lse = torch.empty(N, dtype=acc, device=h.device)
    D = torch.empty_like(h)
    rows = rows_per_chunk(N, V)
    sc = _Scratch(h, weight, rows, second=False)
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        y, uy, _, e, s = _chunk_exp(h, weight, bias, labels, sc, tau, r0, r1, lse)
        logp[r0:r1] = uy - lse[r0:r1]
        # (onehot - p) / tau, then D = that @ W
        dz = e.mul_((-1.0 / (s * tau)).unsqueeze(1))
        dz.scatter_add_(1, y, torch.full_like(dz[:, :1], 1.0 / tau))
        torch.mm(dz, weight, out=D[r0:r1])
    return logp, lse, D


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
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Recompute each logits chunk from the saved lse and form dz (see the module docstring)."""
    N, V = h.shape[0], weight.shape[0]
    acc = _acc_dtype(h)
    g = torch.zeros(N, dtype=acc, device=h.device) if g_logp is None else g_logp.to(acc)
    ge = None if g_ent is None else g_ent.to(acc)
    gh, gw, gb = _grad_buffers(h, weight, bias, need)
    rows = rows_per_chunk(N, V)
    sc = _Scratch(h, weight, rows, second=ge is not None)
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        y = labels[r0:r1].unsqueeze(1)
        gr = g[r0:r1].unsqueeze(1)
        u = _logits(h[r0:r1], weight, bias, sc, tau)
        t = u.sub_(lse[r0:r1].unsqueeze(1))  # t = u - lse = log p
        if ge is None:
            dz = t.exp_().mul_(-gr / tau)  # -g p / tau
        else:
            p = torch.exp(t, out=sc.z2[: r1 - r0])
            # -(g + ge * (t + H)) * p / tau
            dz = t.add_(ent[r0:r1].unsqueeze(1)).mul_(ge[r0:r1].unsqueeze(1)).add_(gr).mul_(p).mul_(-1.0 / tau)
        dz.scatter_add_(1, y, gr / tau)
        _accumulate(dz, h[r0:r1], weight, r0, gh, gw, gb)
    return _finish(gh, gw, gb, weight, bias)


def apa_fwd(
    h: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    target: Tensor,
    n: int,
    tau: float,
    need: tuple[bool, bool, bool],
) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor | None, Tensor | None, Tensor | None] | None]:
    """APA loss over rows that are all valid, with its gradients written in the same pass.

    resid = logp - target (target = ref + adv/lam);  L = sum(resid^2) / max(n, 1);
    c = dL/dlogp = 2 resid / max(n, 1);  dz = c (onehot - p) / tau.
    Returns (loss, lse, coef, grads) with grads for an upstream gradient of 1 when any is needed.
    """
    N, V = h.shape[0], weight.shape[0]
    acc = _acc_dtype(h)
    inv_n = 1.0 / max(int(n), 1)
    lse = torch.empty(N, dtype=acc, device=h.device)
    resid = torch.empty(N, dtype=acc, device=h.device)
    want = any(need)
    gh, gw, gb = _grad_buffers(h, weight, bias, need) if want else (None, None, None)
    rows = rows_per_chunk(N, V)
    sc = _Scratch(h, weight, rows, second=False)
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        y, uy, _, e, s = _chunk_exp(h, weight, bias, labels, sc, tau, r0, r1, lse)
        res = uy - lse[r0:r1] - target[r0:r1]
        resid[r0:r1] = res
        if want:
            c = (2.0 * inv_n / tau) * res
            # dz = c (onehot - e / s) / tau, formed in fp32
            dz = e.mul_((-c / s).unsqueeze(1))
            dz.scatter_add_(1, y, c.unsqueeze(1))
            _accumulate(dz, h[r0:r1], weight, r0, gh, gw, gb)
    loss = resid.dot(resid) * inv_n
    grads = _finish(gh, gw, gb, weight, bias) if want else None
    return loss, lse, 2.0 * inv_n * resid, grads
