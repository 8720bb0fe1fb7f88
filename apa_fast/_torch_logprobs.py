"""The ``torch`` backend from logits, and the row math it shares with the one from hidden states.

A chunk is ``u``: (rows, V) tempered logits in the accumulation dtype (fp32, or fp64 for fp64 input).
Everything the fused ops compute on a chunk is in the ``*_rows`` functions below, written once
and used by both this backend and ``_torch_linear``:

    logp = u_y - lse(u)          H = -sum p log p             (logp_rows, logp_from_p)
    d/du [g logp] = g (onehot - p)                             (softmax_grad_rows, in place over p)
    d/du [g logp + ge H] = g (onehot - p) - ge p (t + H),  t = u - lse   (entropy_grad_rows)
    softcap c: z -> c tanh(z / c) before the temperature (softcap_rows), dz = du/tau * (1 - tanh^2)
                                                               (softcap_grad_rows)

Each chunk goes through whole-chunk ATen ops (row-wise softmax / log_softmax are single fused passes):
no (N, V) softmax, log-softmax or fp32 copy of the logits is ever built. The one full-size tensor is the
gradient the caller keeps. Why the chunk sizes and the huge-page hint: see docs/benchmarks.md, "Why the CPU backend looks the way it does".
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ._checks import out_dtype as acc_dtype

if TYPE_CHECKING:
    from .losses import TokenLoss

# Elements per chunk of whole rows: 16 MiB of fp32 where a chunk needs a scratch, 64 MiB where it is
# computed in the gradient buffer itself (fp32/fp64 logits, tau = 1: no scratch at all).
CHUNK_ELEMS = 1 << 22
DIRECT_CHUNK_ELEMS = 1 << 24
_TINY = 1e-30  # below this p_y, log(p_y) is recomputed as u_y - logsumexp(u)


# ---- row math shared with _torch_linear --------------------------------------------------------------


def logp_rows(u: Tensor, idx: Tensor, out: Tensor, spare: Tensor | None,
              u_again) -> tuple[Tensor, Tensor, Tensor | None]:
    """(logp, lse, entropy | None) of the rows ``u`` at labels ``idx`` (rows, 1). ``out`` receives (log_)softmax(u)
    (it may be u itself on CPU); ``spare`` (rows, V), given when entropy is wanted, gets p; ``u_again``: see
    ``logp_from_p``. With q = softmax(u) as computed and s = sum(q): logp = log q_y - log s, H = log s - q.log q / s."""
    uy = u.gather(-1, idx).squeeze(-1)
    if spare is None:
        logp = logp_from_p(torch.softmax(u, -1, out=out), idx, uy, u_again)
        return logp, uy - logp, None
    ls = torch.log_softmax(u, -1, out=out)
    p = torch.exp(ls, out=spare)
    s = p.sum(-1)
    log_s = s.log()
    logp = ls.gather(-1, idx).squeeze(-1) - log_s
    return logp, uy - logp, log_s - torch.linalg.vecdot(p, ls) / s


def softmax_grad_rows(p: Tensor, idx: Tensor, c: Tensor) -> Tensor:
    """``p <- c * (onehot(idx) - p)`` in place (c: (rows, 1)): the gradient of ``sum c * logp`` w.r.t. u."""
    return p.mul_(-c).scatter_add_(-1, idx, c)


def entropy_grad_rows(t: Tensor, p: Tensor, idx: Tensor, c: Tensor, ce: Tensor, ent: Tensor) -> Tensor:
    """``t <- c (onehot - p) - ce p (t + H)`` in place, with t = u - lse = log p (c, ce, ent: (rows, 1))."""
    return t.add_(ent).mul_(ce).add_(c).mul_(p).neg_().scatter_add_(-1, idx, c)


def softcap_rows(z: Tensor, c: float, keep: Tensor | None) -> Tensor:
    """``z <- c tanh(z / c)`` in place (Gemma 2's final soft-capping); ``keep`` (z's shape), when given,
    receives tanh(z / c) for ``softcap_grad_rows``."""
    z.mul_(1.0 / c).tanh_()
    if keep is not None:
        keep.copy_(z)
    return z.mul_(c)


def softcap_grad_rows(d: Tensor, th: Tensor) -> Tensor:
    """``d <- d (1 - th^2)`` in place, th = tanh(z / c) (overwritten): the chain rule through the soft-capping."""
    return d.mul_(th.mul_(th).neg_().add_(1.0))


def logp_from_p(p: Tensor, idx: Tensor, uy: Tensor, u_again) -> Tensor:
    """log p_y - log sum(p) from softmax rows p, exact (u_y - logsumexp(u)) on the rare rows where p_y underflows;
    ``u_again(rows)`` recomputes their u (p may have overwritten it). ATen's CPU softmax sums exp(u - max) in fp32
    lanes, ~1e-4 off at V = 262,144 when one logit dominates; sum(p) (a cascaded sum) is 1 up to that error."""
    py = p.gather(-1, idx).squeeze(-1)
    logp = py.log() - p.sum(-1).log()
    bad = py < _TINY
    if bool(bad.any()):
        rows = bad.nonzero().squeeze(-1)
        logp[rows] = uy[rows] - torch.logsumexp(u_again(rows), -1)
    return logp


def empty_grad(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """torch.empty for the full-size gradient; large CPU buffers are advised as transparent huge pages
    (fresh 4 KiB pages fault on first touch and cost more than the arithmetic)."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if t.device.type == "cpu" and t.numel() * t.element_size() >= 8 << 20:
        _advise_hugepages(t)
    return t


_madvise = None


def _advise_hugepages(t: Tensor) -> None:
    """madvise(MADV_HUGEPAGE) over the buffer's 2 MiB-aligned span (what THP_MEM_ALLOC_ENABLE=1 does); a hint."""
    global _madvise
    try:
        if _madvise is None:
            import ctypes
            import sys

            _madvise = False
            if sys.platform.startswith("linux"):
                fn = ctypes.CDLL(None, use_errno=True).madvise
                fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
                _madvise = fn
        if _madvise:
            huge = 1 << 21
            start = (t.data_ptr() + huge - 1) & ~(huge - 1)
            end = (t.data_ptr() + t.numel() * t.element_size()) & ~(huge - 1)
            if end > start:
                _madvise(start, end - start, 14)  # MADV_HUGEPAGE
    except Exception:  # noqa: BLE001 - a hint, never an error
        _madvise = False


# ---- the logits backend -----------------------------------------------------------------------------


class Scratch:
    """Chunk-sized (rows, V) buffers in one dtype, allocated on first use and reused for every chunk."""

    def __init__(self, rows: int, V: int, dtype: torch.dtype, device: torch.device):
        self.shape, self.dtype, self.device, self._bufs = (rows, V), dtype, device, {}

    def __call__(self, i: int, r: int) -> Tensor:
        if i not in self._bufs:
            self._bufs[i] = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        return self._bufs[i][:r]


def loss_grad_rows(p: Tensor, idx: Tensor, uy: Tensor, u_again, loss: "TokenLoss", sl: slice, tau: float,
                   logp: Tensor | None = None) -> Tensor:
    """Softmax rows ``p`` -> this chunk's part of the loss, and ``p <- dL/du`` in place: the fused step both
    backends share (``u_again``: see ``logp_from_p``; ``logp``: the rows' log-probs when already known)."""
    if logp is None:
        logp = logp_from_p(p, idx, uy, u_again)
    part, dlogp = loss.value_and_grad(logp, sl)
    softmax_grad_rows(p, idx, (dlogp / tau).unsqueeze(-1))
    return part


class _Chunks:
    """Chunks of whole rows of a (B, T, V) view, with reused chunk-sized scratch buffers."""

    def __init__(self, x3: Tensor, tau: float, direct: bool = False, softcap: float | None = None):
        B, T, V = x3.shape
        self.x3, self.tau, self.acc, self.softcap = x3, tau, acc_dtype(x3), softcap
        direct = direct and softcap is None  # a capped chunk always lives in a scratch: keep the scratch size
        self.rows = max(1, min(T, (DIRECT_CHUNK_ELEMS if direct else CHUNK_ELEMS) // max(V, 1)))
        self.scratch = Scratch(self.rows, V, self.acc, x3.device)

    def __iter__(self):
        """(slice of flat rows, the rows' logits z)."""
        B, T, _ = self.x3.shape
        for b in range(B):
            for t0 in range(0, T, self.rows):
                t1 = min(T, t0 + self.rows)
                yield slice(b * T + t0, b * T + t1), self.x3[b, t0:t1]

    def tempered(self, z: Tensor, keep_tanh: bool = False) -> Tensor:
        """u = z / tau in the accumulation dtype: z itself when nothing is to be done, else scratch 0
        (upcast first: z * (1/tau) in bf16 would round in bf16). With a softcap c, u = c tanh(z / c) / tau
        and, when ``keep_tanh``, tanh(z / c) kept in scratch 3 for ``cap_grad``."""
        if z.dtype == self.acc and self.tau == 1.0 and self.softcap is None:
            return z
        u = self.scratch(0, z.shape[0]).copy_(z)
        if self.softcap is not None:
            softcap_rows(u, self.softcap, self.scratch(3, z.shape[0]) if keep_tanh else None)
        return u.mul_(1.0 / self.tau) if self.tau != 1.0 else u

    def cap_grad(self, d: Tensor) -> Tensor:
        """d <- d * (1 - tanh^2(z / c)) in place, after ``tempered(z, keep_tanh=True)`` (a no-op without a cap)."""
        return d if self.softcap is None else softcap_grad_rows(d, self.scratch(3, d.shape[0]))

    def u_again(self, z: Tensor):
        """Recompute u for some rows of the chunk z into a fresh tensor (for ``logp_from_p``)."""
        def f(rows: Tensor) -> Tensor:
            u = z[rows].to(self.acc)  # advanced indexing copies: capping in place leaves z alone
            return (u if self.softcap is None else softcap_rows(u, self.softcap, None)) / self.tau
        return f

    def out(self, u: Tensor, z: Tensor) -> Tensor:
        """Where a row-wise (log_)softmax of u may write: over u when u is our own copy on CPU (ATen's CPU
        kernels finish a row's reductions before writing it), else a scratch."""
        if u is not z and u.device.type == "cpu":
            return u
        return self.scratch(0 if u is z else 1, u.shape[0])


def logprobs_fwd(
    x3: Tensor, labels: Tensor, tau: float, ignore_index: int, return_entropy: bool, softcap: float | None = None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(logp, lse, entropy | None), flat (B*T,); rows labelled ignore_index give 0 (``softcap`` c: the logits
    are c tanh(z / c) first)."""
    B, T, V = x3.shape
    acc = acc_dtype(x3)
    logp = torch.empty(B * T, dtype=acc, device=x3.device)
    lse = torch.empty_like(logp)
    ent = torch.empty_like(logp) if return_entropy else None
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0)
    ch = _Chunks(x3, tau, softcap=softcap)
    for sl, z in ch:
        u = ch.tempered(z)
        spare = ch.scratch(2, z.shape[0]) if return_entropy else None
        lp, ls, h = logp_rows(u, safe[sl].unsqueeze(-1), ch.out(u, z), spare, ch.u_again(z))
        logp[sl], lse[sl] = lp, ls
        if return_entropy:
            ent[sl] = h
    logp.masked_fill_(~valid, 0.0)
    if ent is not None:
        ent.masked_fill_(~valid, 0.0)
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
    """d(sum g_logp*logp + g_ent*H)/dz, recomputing p chunk by chunk (dz = du / tau, times 1 - tanh^2(z / c)
    with a ``softcap`` c)."""
    B, T, V = x3.shape
    acc = acc_dtype(x3)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0)
    g = torch.zeros(B * T, dtype=acc, device=x3.device) if g_logp is None else g_logp.to(acc)
    g = torch.where(valid, g, 0.0) / tau
    ge = None if g_ent is None else torch.where(valid, g_ent.to(acc), 0.0) / tau
    grad = empty_grad((B, T, V), x3.dtype, x3.device)
    direct = x3.dtype == acc  # the gradient buffer itself can hold the fp32/fp64 probabilities
    gflat = grad.view(B * T, V)
    in_place = direct and ge is None
    ch = _Chunks(x3, tau, in_place and tau == 1.0, softcap)
    for sl, z in ch:
        idx, c = safe[sl].unsqueeze(-1), g[sl].unsqueeze(-1)
        u = ch.tempered(z, keep_tanh=True)
        if ge is None:
            p = torch.softmax(u, -1, out=gflat[sl] if in_place else ch.out(u, z))
            d = softmax_grad_rows(p, idx, c)
        else:
            r = z.shape[0]
            t = torch.sub(u, lse[sl].unsqueeze(-1), out=ch.scratch(1, r))
            p = torch.exp(t, out=ch.scratch(2, r))
            d = entropy_grad_rows(t, p, idx, c, ge[sl].unsqueeze(-1), entropy[sl].unsqueeze(-1))
        d = ch.cap_grad(d)
        if not in_place:
            gflat[sl].copy_(d)  # rounded once into the logits' dtype
    return grad


def loss_fwd(x3: Tensor, labels: Tensor, tau: float, loss: "TokenLoss", need_grad: bool,
             softcap: float | None = None) -> tuple[Tensor, Tensor | None]:
    """(L, dL/dz | None) of a ``TokenLoss`` over the flat rows' log-probs, the gradient formed in the same
    pass as the forward (for an upstream gradient of 1): softmax once, then ``c * (onehot - p)``.
    ``labels`` must be valid wherever ``loss.mask`` is (callers pass 0 elsewhere)."""
    B, T, V = x3.shape
    acc = acc_dtype(x3)
    total = torch.zeros((), dtype=acc, device=x3.device)
    grad = empty_grad((B, T, V), x3.dtype, x3.device) if need_grad else None
    gflat = grad.view(B * T, V) if need_grad else None
    direct = need_grad and x3.dtype == acc  # softmax straight into the gradient buffer
    ch = _Chunks(x3, tau, direct and tau == 1.0, softcap)
    for sl, z in ch:
        idx = labels[sl].unsqueeze(-1)
        u = ch.tempered(z, keep_tanh=need_grad)
        if not need_grad:
            total += loss.part(logp_rows(u, idx, ch.out(u, z), None, ch.u_again(z))[0], sl)
            continue
        uy = u.gather(-1, idx).squeeze(-1)
        p = torch.softmax(u, -1, out=gflat[sl] if direct else ch.out(u, z))
        total += loss_grad_rows(p, idx, uy, ch.u_again(z), loss, sl, tau)
        ch.cap_grad(p)
        if not direct:
            gflat[sl].copy_(p)
    return total, grad
