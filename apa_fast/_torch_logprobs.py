"""The ``torch`` backend: chunked PyTorch that never holds more than a chunk of full-vocab rows.

Same interface as ``kernels.logprobs`` (the Triton backend; families pair up as
``apa_fast._torch_<family>`` and ``kernels.<family>``), so ``apa_fast.logprobs`` dispatches to
either without knowing which:

- ``logprobs_fwd(x3, labels, tau, ignore_index, return_entropy) -> (logp, lse, entropy | None)``
- ``logprobs_bwd(x3, labels, lse, entropy, g_logp, g_ent, tau, ignore_index) -> grad``
- ``apa_loss_fwd(x3, labels, ref, adv, n, lam, tau, ignore_index, need_grad) -> (loss, lse, coef, grad | None)``

``x3`` is a (B, T, V) view of the logits with unit stride on V and arbitrary B/T strides (a shifted
slice ``logits[:, :-1]`` needs no copy); per-token tensors are flat (N = B*T,) and contiguous; rows
whose label is ``ignore_index`` give 0 and get no gradient.

On CPU the cost is exp throughput, memory passes and, on a busy machine, the number of parallel
regions (each ATen op over a chunk is one OpenMP fork/join; a worker descheduled by another process
stalls the join, so thousands of small regions cost far more than their arithmetic). So each chunk
goes through as few whole-chunk ops as possible, built on ATen's fused row-wise kernels:

- forward log-probs: one ``log_softmax`` into a scratch (max, sum of exp and the write happen per row
  while the row is in cache), then a gather;
- APA loss with gradient: one ``softmax`` written straight into the gradient buffer (one read of the
  logits, one exp per element), then one in-place scale by each row's ``-dL/dlogp`` and a scatter of
  the one-hot part: the gradient for an upstream gradient of 1 is finished in the forward pass;
- backward of the log-probs: the same ``softmax`` + scale (recomputing instead of saving anything
  full-size), with a sub/exp path only when an entropy gradient is asked for.

``log p_y`` is taken from the softmax only where ``p_y`` is far from fp32 underflow; the rare rows
below 1e-30 get ``u_y - logsumexp(u)`` instead. Chunks hold up to 4 Mi elements (16 MiB of fp32
scratch), or 16 Mi where they live in the gradient buffer itself and need no scratch: big enough that
a chunk costs few fork/joins (measured on a busy 2-core machine: 1 MiB chunks ran up to 20x slower
than 64 MiB ones under load, and no faster when idle), small against the (N, V) gradient the caller
keeps.

That gradient is the one full-size tensor written, and on CPU writing a *fresh* buffer costs more
than the arithmetic: every 4 KiB page faults on first touch (measured here: ~1-2 GB/s against
~5-8 GB/s for a buffer already touched). So large CPU gradient buffers are advised as transparent
huge pages (``madvise(MADV_HUGEPAGE)`` before first touch, what PyTorch itself does when
``THP_MEM_ALLOC_ENABLE=1`` is set) -- a hint that is skipped wherever it is unavailable.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import out_dtype as _acc_dtype  # fp64 stays fp64, the rest accumulate in fp32

# Elements per chunk of whole rows: 16 MiB of fp32 where a chunk needs a scratch, 64 MiB where it is
# computed in the gradient buffer itself (fp32/fp64 logits, tau = 1: no scratch at all).
_CHUNK_ELEMS = 1 << 22
_DIRECT_CHUNK_ELEMS = 1 << 24
_TINY = 1e-30  # below this p_y, log(p_y) is recomputed as u_y - logsumexp(u)


_HUGE_MIN_BYTES = 8 << 20
_MADV_HUGEPAGE = 14  # Linux
_madvise = None


def _advise_hugepages(t: Tensor) -> None:
    """Ask Linux to back a large, not yet touched CPU buffer with 2 MiB pages (a hint; never fails)."""
    global _madvise
    try:
        if _madvise is None:
            import ctypes
            import sys

            if not sys.platform.startswith("linux"):
                _madvise = False
                return
            libc = ctypes.CDLL(None, use_errno=True)
            fn = libc.madvise
            fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            fn.restype = ctypes.c_int
            _madvise = fn
        if _madvise is False:
            return
        huge = 1 << 21
        start = (t.data_ptr() + huge - 1) & ~(huge - 1)
        end = (t.data_ptr() + t.numel() * t.element_size()) & ~(huge - 1)
        if end > start:
            _madvise(start, end - start, _MADV_HUGEPAGE)
    except Exception:
        _madvise = False


def _empty_grad(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """torch.empty for the full-size gradient, huge-page backed on CPU when large."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if t.device.type == "cpu" and t.numel() * t.element_size() >= _HUGE_MIN_BYTES:
        _advise_hugepages(t)
    return t


def _rows(T: int, V: int, no_scratch: bool = False) -> int:
    return max(1, min(T, (_DIRECT_CHUNK_ELEMS if no_scratch else _CHUNK_ELEMS) // max(V, 1)))


def _chunks(x3: Tensor, rows: int):
    """Yield (flat_start, rows_view) over x3 in chunks of at most ``rows`` whole rows."""
    B, T, V = x3.shape
    for b in range(B):
        for t0 in range(0, T, rows):
            t1 = min(T, t0 + rows)
            yield b * T + t0, x3[b, t0:t1]


class _Scratch:
    """Chunk-sized buffers in the accumulation dtype, allocated on first use and reused across chunks."""

    def __init__(self, rows: int, V: int, dtype: torch.dtype, device: torch.device):
        self.shape, self.dtype, self.device, self.bufs = (rows, V), dtype, device, {}

    def __call__(self, i: int, r: int) -> Tensor:
        if i not in self.bufs:
            self.bufs[i] = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        return self.bufs[i][:r]


def _prep(z: Tensor, tau: float, acc: torch.dtype, scr: _Scratch) -> Tensor:
    """u = z / tau in the accumulation dtype: z itself when nothing is to be done, else a copy in scratch 0
    (upcast first: z * (1/tau) on bf16 would round in bf16)."""
    if z.dtype == acc and tau == 1.0:
        return z
    u = scr(0, z.shape[0]).copy_(z)
    return u.mul_(1.0 / tau) if tau != 1.0 else u


def _target(u: Tensor, z: Tensor, scr: _Scratch) -> Tensor:
    """Where a row-wise softmax/log_softmax of u may write when not into the gradient: over u itself when
    u is our own copy on CPU (ATen's CPU kernels finish a row's reductions before writing it; softmax
    with dtype= instead would build a converted copy of the chunk), else a scratch."""
    if u is not z and u.device.type == "cpu":
        return u
    return scr(0 if u is z else 1, u.shape[0])


def _logp_from_p(p: Tensor, idx: Tensor, acc: torch.dtype, uy: Tensor, z: Tensor, tau: float) -> Tensor:
    """log p_y from softmax probabilities, exact (uy - logsumexp(z/tau)) where p_y would lose digits to
    underflow (rare rows; recomputed from z, since u may have been overwritten by p)."""
    py = p.gather(-1, idx).squeeze(-1)
    logp = py.log()
    bad = py < _TINY
    if bool(bad.any()):
        rows = bad.nonzero().squeeze(-1)
        ub = z[rows].to(acc) / tau
        logp[rows] = uy[rows] - torch.logsumexp(ub, -1)
    return logp


def logprobs_fwd(
    x3: Tensor, labels: Tensor, tau: float, ignore_index: int, return_entropy: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    B, T, V = x3.shape
    N = B * T
    acc = _acc_dtype(x3)
    logp = torch.empty(N, dtype=acc, device=x3.device)
    lse = torch.empty(N, dtype=acc, device=x3.device)
    ent = torch.empty(N, dtype=acc, device=x3.device) if return_entropy else None
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0)
    rows = _rows(T, V)
    scr = _Scratch(rows, V, acc, x3.device)
    for s0, z in _chunks(x3, rows):
        r = z.shape[0]
        sl = slice(s0, s0 + r)
        idx = safe[sl].unsqueeze(-1)
        u = _prep(z, tau, acc, scr)
        uy = u.gather(-1, idx).squeeze(-1).to(acc)
        ls = torch.log_softmax(u, -1, out=_target(u, z, scr))  # u - lse, one fused row-wise pass
        lp = ls.gather(-1, idx).squeeze(-1)
        logp[sl] = lp
        lse[sl] = uy - lp
        if return_entropy:
            # H = -sum p * log p
            ent[sl] = -torch.linalg.vecdot(torch.exp(ls, out=scr(2, r)), ls)
    logp.masked_fill_(~valid, 0.0)
    if ent is not None:
        ent.masked_fill_(~valid, 0.0)
    return logp, lse, ent


def _onehot_minus_p(p: Tensor, idx: Tensor, c: Tensor, out: Tensor, direct: bool) -> None:
    """The logits gradient c * (onehot(idx) - p), formed in place over the softmax rows ``p`` (c: (rows, 1)),
    then copied into the gradient rows ``out`` (rounded once) unless ``p`` already lives there."""
    p.mul_(-c)
    p.scatter_add_(-1, idx, c)
    if not direct:
        out.copy_(p)


def logprobs_bwd(
    x3: Tensor,
    labels: Tensor,
    lse: Tensor,
    entropy: Tensor | None,
    g_logp: Tensor | None,
    g_ent: Tensor | None,
    tau: float,
    ignore_index: int,
) -> Tensor:
    """dlogp/du = onehot - p;  dH/du = -p * (u - E_p[u]) = -p * (t + H) with t = u - lse;  dz = du / tau."""
    B, T, V = x3.shape
    acc = _acc_dtype(x3)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0)
    g = torch.zeros(B * T, dtype=acc, device=x3.device) if g_logp is None else g_logp.to(acc)
    g = torch.where(valid, g, 0.0)
    ge = None if g_ent is None else torch.where(valid, g_ent.to(acc), 0.0)
    grad = _empty_grad((B, T, V), x3.dtype, x3.device)
    direct = x3.dtype == acc  # the gradient buffer itself can hold the fp32/fp64 probabilities
    rows = _rows(T, V, direct and ge is None and tau == 1.0)
    scr = _Scratch(rows, V, acc, x3.device)
    gflat = grad.view(B * T, V)
    for s0, z in _chunks(x3, rows):
        r = z.shape[0]
        sl = slice(s0, s0 + r)
        gr = g[sl].unsqueeze(-1)
        idx = safe[sl].unsqueeze(-1)
        if ge is None:
            # dz = g * (onehot - softmax(u)) / tau: softmax recomputed (one fused pass), then scaled
            u = _prep(z, tau, acc, scr)
            p = torch.softmax(u, -1, out=gflat[sl] if direct else _target(u, z, scr))
            _onehot_minus_p(p, idx, gr / tau, gflat[sl], direct)
            continue
        scratch, pscratch = scr(0, r), scr(1, r)
        t = torch.sub(z, (lse[sl] * tau).unsqueeze(-1), out=scratch)
        if tau != 1.0:
            t.mul_(1.0 / tau)
        p = torch.exp(t, out=pscratch)
        # -(g + ge * (t + H)) * p
        t.add_(entropy[sl].unsqueeze(-1)).mul_(ge[sl].unsqueeze(-1)).add_(gr).mul_(p).mul_(-1.0 / tau)
        t.scatter_add_(-1, idx, gr / tau)
        gflat[sl].copy_(t)
    return grad


def apa_loss_fwd(
    x3: Tensor,
    labels: Tensor,
    ref: Tensor,
    adv: Tensor,
    n: Tensor,
    lam: float,
    tau: float,
    ignore_index: int,
    need_grad: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Fused APA forward. Rows with label == ignore_index are the masked ones.

    resid = logp - ref - adv/lam;  L = sum(resid^2)/n;  coef = dL/dlogp = 2*resid/n.
    With ``need_grad`` the logits gradient for an upstream gradient of 1 is written in the same pass.
    """
    B, T, V = x3.shape
    N = B * T
    acc = _acc_dtype(x3)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0)
    target = ref.to(acc) + adv.to(acc) / lam
    n_acc = n.to(acc).clamp(min=1)
    lse = torch.empty(N, dtype=acc, device=x3.device)
    resid = torch.empty(N, dtype=acc, device=x3.device)
    grad = _empty_grad((B, T, V), x3.dtype, x3.device) if need_grad else None
    gflat = grad.view(N, V) if need_grad else None
    direct = need_grad and x3.dtype == acc  # softmax straight into the gradient buffer
    rows = _rows(T, V, direct and tau == 1.0)
    scr = _Scratch(rows, V, acc, x3.device)
    for s0, z in _chunks(x3, rows):
        r = z.shape[0]
        sl = slice(s0, s0 + r)
        idx = safe[sl].unsqueeze(-1)
        u = _prep(z, tau, acc, scr)
        uy = u.gather(-1, idx).squeeze(-1).to(acc)
        if need_grad:
            p = torch.softmax(u, -1, out=gflat[sl] if direct else _target(u, z, scr))
            logp = _logp_from_p(p, idx, acc, uy, z, tau)
        else:
            logp = torch.log_softmax(u, -1, out=_target(u, z, scr)).gather(-1, idx).squeeze(-1)
        lse[sl] = uy - logp
        res = torch.where(valid[sl], logp - target[sl], 0.0)
        resid[sl] = res
        if need_grad:
            # dL/dz = c * (onehot - p) / tau with c = dL/dlogp, rounded once into the gradient's dtype
            c = (2.0 / tau) * res / n_acc
            _onehot_minus_p(p, idx, c.unsqueeze(-1), gflat[sl], direct)
    loss = (resid * resid).sum() / n_acc
    return loss, lse, 2.0 * resid / n_acc, grad
