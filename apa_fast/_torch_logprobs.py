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

CPU is bound by exp throughput and memory passes, not FLOPs, so each chunk is read once into an
L2-sized fp32 scratch, exponentiated once, and (for the scalar APA loss, whose upstream gradient is
a scalar) its gradient is written in the same pass: one read of the logits, one exp and one write of
the gradient per element, against eager's two exps and five full-size passes.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Rows per chunk: about 1 MiB of fp32 scratch per buffer, so a chunk stays in L2 across its ops.
_CHUNK_ELEMS = 1 << 18


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _chunks(x3: Tensor):
    """Yield (flat_start, rows_view) over x3 in chunks of whole rows."""
    B, T, V = x3.shape
    rows = max(1, min(T, _CHUNK_ELEMS // max(V, 1)))
    for b in range(B):
        for t0 in range(0, T, rows):
            t1 = min(T, t0 + rows)
            yield b * T + t0, x3[b, t0:t1]


def _shifted(z: Tensor, tau: float, scratch: Tensor) -> tuple[Tensor, Tensor]:
    """t = (z - max z) / tau in fp32 scratch; returns (t, rowmax/tau)."""
    zmax = z.amax(-1, keepdim=True).to(scratch.dtype)
    t = torch.sub(z, zmax, out=scratch[: z.shape[0]])
    if tau != 1.0:
        t.mul_(1.0 / tau)
        zmax = zmax / tau
    return t, zmax


def _label_logits(z: Tensor, safe: Tensor, acc: torch.dtype, tau: float) -> Tensor:
    return z.gather(-1, safe.unsqueeze(-1)).squeeze(-1).to(acc) / tau


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
    rows = max(1, min(T, _CHUNK_ELEMS // max(V, 1)))
    scratch = torch.empty(rows, V, dtype=acc, device=x3.device)
    escratch = torch.empty(rows, V, dtype=acc, device=x3.device) if return_entropy else None
    for s0, z in _chunks(x3):
        r = z.shape[0]
        t, zmax = _shifted(z, tau, scratch)
        e = torch.exp(t, out=escratch[:r]) if return_entropy else t.exp_()
        s = e.sum(-1)
        log_s = s.log()
        lse[s0 : s0 + r] = zmax.squeeze(-1) + log_s
        logp[s0 : s0 + r] = _label_logits(z, safe[s0 : s0 + r], acc, tau) - lse[s0 : s0 + r]
        if return_entropy:
            # H = lse - E_p[u] = log s - E_p[t]
            ent[s0 : s0 + r] = log_s - torch.linalg.vecdot(e, t) / s
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
) -> Tensor:
    """dlogp/du = onehot - p;  dH/du = -p * (u - E_p[u]) = -p * (t + H) with t = u - lse;  dz = du / tau."""
    B, T, V = x3.shape
    acc = _acc_dtype(x3)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0)
    g = torch.zeros(B * T, dtype=acc, device=x3.device) if g_logp is None else g_logp.to(acc)
    g = torch.where(valid, g, 0.0)
    ge = None if g_ent is None else torch.where(valid, g_ent.to(acc), 0.0)
    grad = torch.empty((B, T, V), dtype=x3.dtype, device=x3.device)
    rows = max(1, min(T, _CHUNK_ELEMS // max(V, 1)))
    scratch = torch.empty(rows, V, dtype=acc, device=x3.device)
    pscratch = torch.empty(rows, V, dtype=acc, device=x3.device) if ge is not None else None
    for s0, z in _chunks(x3):
        r = z.shape[0]
        sl = slice(s0, s0 + r)
        gslice = grad.view(B * T, V)[sl]
        t = torch.sub(z, (lse[sl] * tau).unsqueeze(-1), out=scratch[:r])
        if tau != 1.0:
            t.mul_(1.0 / tau)
        gr = g[sl].unsqueeze(-1)
        if ge is None:
            t.exp_().mul_(-gr / tau)
            out = t
        else:
            p = torch.exp(t, out=pscratch[:r])
            # -(g + ge * (t + H)) * p
            t.add_(entropy[sl].unsqueeze(-1)).mul_(ge[sl].unsqueeze(-1)).add_(gr).mul_(p).mul_(-1.0 / tau)
            out = t
        out.scatter_add_(-1, safe[sl].unsqueeze(-1), gr / tau)
        gslice.copy_(out)
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
    grad = torch.empty((B, T, V), dtype=x3.dtype, device=x3.device) if need_grad else None
    direct = need_grad and x3.dtype == acc  # write exp straight into the gradient buffer
    rows = max(1, min(T, _CHUNK_ELEMS // max(V, 1)))
    scratch = torch.empty(rows, V, dtype=acc, device=x3.device)
    for s0, z in _chunks(x3):
        r = z.shape[0]
        sl = slice(s0, s0 + r)
        t, zmax = _shifted(z, tau, scratch)
        e = torch.exp(t, out=grad.view(N, V)[sl]) if direct else t.exp_()
        s = e.sum(-1)
        lse[sl] = zmax.squeeze(-1) + s.log()
        logp = _label_logits(z, safe[sl], acc, tau) - lse[sl]
        res = torch.where(valid[sl], logp - target[sl], 0.0)
        resid[sl] = res
        c = 2.0 * res / n_acc
        if need_grad:
            # dL/dz = c * (onehot - e/s) / tau, rounded once into the gradient's dtype
            e.mul_((-c / (s * tau)).unsqueeze(-1))
            e.scatter_add_(-1, safe[sl].unsqueeze(-1), (c / tau).unsqueeze(-1))
            if not direct:
                grad.view(N, V)[sl].copy_(e)
    loss = (resid * resid).sum() / n_acc
    return loss, lse, 2.0 * resid / n_acc, grad
