"""The ``torch`` backend from hidden states and the LM head: the logits exist one chunk of rows at a time.

Per chunk of token rows: ``u = (h W^T + b) / tau`` into an fp32 (fp64) scratch (with ``softcap`` c:
``u = c tanh(z / c) / tau``, and ``dz`` gains the factor ``1 - tanh^2(z / c)``, kept in one more chunk scratch),
then the row math of ``_torch_logprobs`` (log-probs, entropy, ``dz = du / tau``), then ``grad_h[chunk] = dz @ W`` and
``grad_W += dz^T @ h``, ``grad_b += sum dz``. A chunk spans the whole vocabulary (``dz`` needs the row's
full softmax), so its row count bounds memory: never more than ``MAX_CHUNK_BYTES`` of logits.

``loss_fwd`` forms the gradients in the forward pass (three matmuls in all: logits, grad_h, grad_W);
``token_fwd``/``token_bwd`` serve any upstream gradient by recomputing each chunk from the saved lse.
Low-precision chunks are multiplied in the input dtype (as eager ``F.linear``), widened before the
softmax; ``grad_W``/``grad_b`` accumulate in fp32 and are cast to the weight's dtype once.

``h`` is (N, H) contiguous, ``labels`` (N,) int64 with every row valid (``apa_fast.linear`` drops
masked rows first), ``bias`` (V,) or None, ``need`` = which of (hidden, weight, bias) want a gradient.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ._checks import out_dtype as acc_dtype
from ._torch_logprobs import (Scratch, entropy_grad_rows, logp_from_p, logp_rows, loss_grad_rows, softcap_grad_rows,
                              softcap_rows, softmax_grad_rows)

if TYPE_CHECKING:
    from .losses import TokenLoss

# Rows per chunk: an eighth of the tokens, at least ROW_MIN (fewer rows re-stream all of grad_W too
# often) and at most MAX_CHUNK_BYTES of fp32 logits, rounded to a multiple of 16 (aligned panels).
ROW_MIN = 64
MAX_CHUNK_BYTES = 64 << 20


def rows_per_chunk(N: int, V: int, itemsize: int = 4) -> int:
    rows = min(max(ROW_MIN, N // 8), max(1, MAX_CHUNK_BYTES // max(1, V * itemsize)))
    if rows >= 32:
        rows -= rows % 16
    return max(1, min(N, rows))


class _Chunks:
    """Row chunks of ``h`` and their logits, in reused scratch buffers."""

    def __init__(self, h: Tensor, weight: Tensor, bias: Tensor | None, tau: float, softcap: float | None = None):
        N, V = h.shape[0], weight.shape[0]
        self.h, self.weight, self.bias, self.tau, self.softcap = h, weight, bias, tau, softcap
        self.acc = acc_dtype(h)
        self.rows = rows_per_chunk(N, V)
        self.scratch = Scratch(self.rows, V, self.acc, h.device)
        self.lowp = None if h.dtype == self.acc else Scratch(self.rows, V, h.dtype, h.device)

    def __iter__(self):
        N = self.h.shape[0]
        for r0 in range(0, N, self.rows):
            yield slice(r0, min(N, r0 + self.rows))

    def logits(self, rows: slice | Tensor, into: Tensor | None = None, keep_tanh: bool = False) -> Tensor:
        """u = (h[rows] W^T + b) / tau in the accumulation dtype (scratch 0 unless ``into``); with a softcap c,
        u = c tanh(z / c) / tau and, when ``keep_tanh``, tanh(z / c) kept in scratch 3 for ``cap_grad``."""
        h = self.h[rows]
        r = h.shape[0]
        u = self.scratch(0, r) if into is None else into
        dst = u if self.lowp is None else self.lowp(0, r)
        if self.bias is None:
            torch.mm(h, self.weight.t(), out=dst)
        else:
            torch.addmm(self.bias, h, self.weight.t(), out=dst)
        if self.lowp is not None:
            u.copy_(dst)
        if self.softcap is not None:
            softcap_rows(u, self.softcap, self.scratch(3, r) if keep_tanh else None)
        return u.mul_(1.0 / self.tau) if self.tau != 1.0 else u

    def cap_grad(self, dz: Tensor) -> Tensor:
        """dz <- dz * (1 - tanh^2(z / c)) in place: the chain rule through the soft-capping (a no-op without)."""
        return dz if self.softcap is None else softcap_grad_rows(dz, self.scratch(3, dz.shape[0]))

    def out(self, u: Tensor) -> Tensor:
        """Where a row-wise (log_)softmax of the scratch u may write: over u itself on CPU, else scratch 1."""
        return u if u.device.type == "cpu" else self.scratch(1, u.shape[0])

    def u_again(self, sl: slice):
        """Recompute some rows of chunk ``sl`` (for ``logp_from_p``)."""
        return lambda rows: self.logits(torch.arange(sl.start, sl.stop, device=self.h.device)[rows],
                                        into=torch.empty(len(rows), self.weight.shape[0], dtype=self.acc, device=self.h.device))


def _accumulate(dz: Tensor, h: Tensor, weight: Tensor, sl: slice, gh: Tensor | None, gw: Tensor | None,
                gb: Tensor | None) -> None:
    """grad_h[chunk] = dz @ W (in h's dtype);  grad_W += dz^T @ h and grad_b += sum dz (fp32)."""
    if gh is not None:  # one rounding of dz to the weight dtype, as eager's backward does
        torch.mm(dz if dz.dtype == weight.dtype else dz.to(weight.dtype), weight, out=gh[sl])
    if gw is not None:
        hh = h[sl] if h.dtype == dz.dtype else h[sl].to(dz.dtype)
        if sl.start == 0:  # the first chunk writes grad_W: no zero-fill pass over V x H beforehand
            torch.mm(dz.t(), hh, out=gw)
        else:
            gw.addmm_(dz.t(), hh)
    if gb is not None:
        gb.add_(dz.sum(0))


def _grad_buffers(h: Tensor, weight: Tensor, bias: Tensor | None, need: tuple[bool, bool, bool]):
    acc = acc_dtype(h)
    gh = torch.empty_like(h) if need[0] else None
    # empty, not zeros: the first chunk's matmul writes it (and N = 0 rows means no chunk at all)
    gw = (torch.empty if h.shape[0] > 0 else torch.zeros)(weight.shape, dtype=acc, device=h.device) if need[1] else None
    gb = torch.zeros(weight.shape[0], dtype=acc, device=h.device) if (need[2] and bias is not None) else None
    return gh, gw, gb


def _finish(gh, gw, gb, weight: Tensor, bias: Tensor | None):
    if gw is not None and gw.dtype != weight.dtype:
        gw = gw.to(weight.dtype)
    if gb is not None and bias is not None and gb.dtype != bias.dtype:
        gb = gb.to(bias.dtype)
    return gh, gw, gb


def token_fwd(h: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, tau: float,
              return_entropy: bool, softcap: float | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """(logp, lse, entropy | None) per row; lse is of u = z / tau (z soft-capped first when ``softcap``)."""
    N = h.shape[0]
    ch = _Chunks(h, weight, bias, tau, softcap)
    logp = torch.empty(N, dtype=ch.acc, device=h.device)
    lse = torch.empty_like(logp)
    ent = torch.empty_like(logp) if return_entropy else None
    for sl in ch:
        u = ch.logits(sl)
        spare = ch.scratch(2, u.shape[0]) if return_entropy else None
        lp, ls, e = logp_rows(u, labels[sl].unsqueeze(1), ch.out(u), spare, ch.u_again(sl))
        logp[sl], lse[sl] = lp, ls
        if return_entropy:
            ent[sl] = e
    return logp, lse, ent


def token_fwd_dh(h: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, tau: float,
                 softcap: float | None = None) -> tuple[Tensor, Tensor]:
    """(logp, D) with D_i = dlogp_i/dh_i = ((onehot - p) / tau) @ W, for fp32/fp64 input.

    For a frozen LM head (only hidden wants a gradient) the hidden gradient of sum_i g_i logp_i is
    g_i D_i: D costs the one matmul backward would need anyway, and backward becomes a row scaling."""
    N = h.shape[0]
    ch = _Chunks(h, weight, bias, tau, softcap)
    logp = torch.empty(N, dtype=ch.acc, device=h.device)
    D = torch.empty_like(h)
    one = torch.full((ch.rows, 1), 1.0 / tau, dtype=ch.acc, device=h.device)
    for sl in ch:
        u = ch.logits(sl, keep_tanh=True)
        idx = labels[sl].unsqueeze(1)
        uy = u.gather(1, idx).squeeze(1)
        p = torch.softmax(u, -1, out=ch.out(u))
        logp[sl] = logp_from_p(p, idx, uy, ch.u_again(sl))
        torch.mm(ch.cap_grad(softmax_grad_rows(p, idx, one[: u.shape[0]])), weight, out=D[sl])
    return logp, D


def token_bwd(h: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, lse: Tensor, ent: Tensor | None,
              g_logp: Tensor | None, g_ent: Tensor | None, tau: float, need: tuple[bool, bool, bool],
              softcap: float | None = None):
    """(grad_h, grad_W, grad_b) of sum g_logp*logp + g_ent*H, recomputing each logits chunk from lse."""
    N = h.shape[0]
    ch = _Chunks(h, weight, bias, tau, softcap)
    g = torch.zeros(N, dtype=ch.acc, device=h.device) if g_logp is None else g_logp.to(ch.acc)
    g = g / tau
    ge = None if g_ent is None else g_ent.to(ch.acc) / tau
    gh, gw, gb = _grad_buffers(h, weight, bias, need)
    for sl in ch:
        idx, c = labels[sl].unsqueeze(1), g[sl].unsqueeze(1)
        t = ch.logits(sl, keep_tanh=True).sub_(lse[sl].unsqueeze(1))  # t = u - lse = log p
        if ge is None:
            dz = softmax_grad_rows(t.exp_(), idx, c)
        else:
            p = torch.exp(t, out=ch.scratch(2, t.shape[0]))
            dz = entropy_grad_rows(t, p, idx, c, ge[sl].unsqueeze(1), ent[sl].unsqueeze(1))
        _accumulate(ch.cap_grad(dz), h, weight, sl, gh, gw, gb)
    return _finish(gh, gw, gb, weight, bias)


def loss_fwd(h: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, tau: float, loss: "TokenLoss",
             need: tuple[bool, bool, bool], softcap: float | None = None, scores: bool = False):
    """(L, grads | None, (logp, entropy) | None) of a ``TokenLoss`` over the rows' log-probs, the gradients (for an
    upstream gradient of 1) formed chunk by chunk in the same pass: logits -> softmax -> dz -> two matmuls. With
    ``scores`` also each row's log-prob and entropy ``lse - sum(p * u)`` (the softmax then goes to a scratch of
    its own, so that u survives it)."""
    ch = _Chunks(h, weight, bias, tau, softcap)
    total = torch.zeros((), dtype=ch.acc, device=h.device)
    want = any(need)
    gh, gw, gb = _grad_buffers(h, weight, bias, need) if want else (None, None, None)
    N = h.shape[0]
    logp_all = torch.empty(N, dtype=ch.acc, device=h.device) if scores else None
    ent_all = torch.empty_like(logp_all) if scores else None
    for sl in ch:
        u = ch.logits(sl, keep_tanh=want)
        r = u.shape[0]
        idx = labels[sl].unsqueeze(1)
        if not want:
            lp, _, e = logp_rows(u, idx, ch.out(u), ch.scratch(2, r) if scores else None, ch.u_again(sl))
            if scores:
                logp_all[sl], ent_all[sl] = lp, e
            total += loss.part(lp, sl)
            continue
        uy = u.gather(1, idx).squeeze(1)
        lp = None
        if scores:
            p = torch.softmax(u, -1, out=ch.scratch(1, r))
            lp = logp_from_p(p, idx, uy, ch.u_again(sl))
            logp_all[sl] = lp
            ent_all[sl] = (uy - lp) - torch.linalg.vecdot(p, u) / p.sum(-1)
        else:
            p = torch.softmax(u, -1, out=ch.out(u))
        total += loss_grad_rows(p, idx, uy, ch.u_again(sl), loss, sl, tau, lp)
        _accumulate(ch.cap_grad(p), h, weight, sl, gh, gw, gb)
    return total, (_finish(gh, gw, gb, weight, bias) if want else None), ((logp_all, ent_all) if scores else None)
