"""GAE with skip-mask semantics, and whitening over valid tokens (optionally across ranks)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from . import _checks as C
from . import _dispatch, reference


def gae(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    last_values: Tensor | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over (B, T), reverse in time, skipping masked steps.

    ``delta_t = r_t + gamma*V_next - V_t``, ``A_t = delta_t + gamma*lam*A_next``, ``R_t = A_t + V_t``,
    where "next" is the next unmasked step (``last_values``, default 0, past the end). Masked steps
    give A = R = 0 and their rewards and values change nothing. Returns float32 (float64 for float64
    input) ``(advantages, returns)``.
    """
    C.check_floating("rewards", rewards)
    C.check_floating("values", values)
    C.check_mask("mask", mask)
    if rewards.dim() != 2:
        raise ValueError(f"rewards must have shape (B, T), got {tuple(rewards.shape)}")
    C.check_shape("values", values, rewards.shape, "the shape of rewards")
    C.check_shape("mask", mask, rewards.shape, "the shape of rewards")
    if last_values is not None:
        C.check_floating("last_values", last_values)
        C.check_shape("last_values", last_values, rewards.shape[:1], "(B,), one per sequence")
    C.check_same_device({"rewards": rewards, "values": values, "mask": mask, "last_values": last_values})
    gamma = C.check_unit_interval("gamma", gamma)
    lam = C.check_unit_interval("lam", lam)
    C.check_mask_values("mask", mask)
    valid = mask.bool()
    C.check_finite_where("rewards", rewards, valid)
    C.check_finite_where("values", values, valid)
    if last_values is not None:
        C.check_finite_where("last_values", last_values, torch.ones_like(last_values, dtype=torch.bool))
    name = _dispatch.resolve(backend, rewards.device)
    rewards, values = rewards.detach(), values.detach()
    last_values = None if last_values is None else last_values.detach()
    if name == "reference":
        return reference.gae(rewards, values, mask, gamma, lam, last_values)
    if rewards.numel() == 0:
        z = torch.zeros(rewards.shape, dtype=C.out_dtype(rewards), device=rewards.device)
        return z, z.clone()
    return _dispatch.gae_fn(name)(rewards, values, mask, gamma, lam, last_values)


def masked_whiten(
    x: Tensor, mask: Tensor, *, shift_mean: bool = True, process_group: dist.ProcessGroup | None = None
) -> Tensor:
    """``(x - mean) / sqrt(var + 1e-8)`` with mean and (unbiased, as TRL and trlx) var over valid tokens.

    With ``process_group`` the statistics are all-reduced (count, sum, then sum of squared
    deviations) so the result does not depend on the world size. ``shift_mean=False`` adds the mean
    back. Masked positions come out 0; an empty mask gives all zeros.
    """
    C.check_floating("x", x)
    C.check_mask("mask", mask)
    C.check_shape("mask", mask, x.shape, "the shape of x")
    C.check_same_device({"x": x, "mask": mask})
    C.check_mask_values("mask", mask)
    m = mask.bool()
    C.check_finite_where("x", x, m)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xv = torch.where(m, x.to(acc), 0.0)
    stats = torch.stack([m.sum().to(acc), xv.sum()])
    if process_group is not None:
        dist.all_reduce(stats, group=process_group)
    n, total = stats[0], stats[1]
    mean = total / n.clamp(min=1)
    sq = torch.where(m, (xv - mean) ** 2, 0.0).sum()
    if process_group is not None:
        dist.all_reduce(sq, group=process_group)
    var = sq / (n - 1).clamp(min=1)
    out = (xv - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return torch.where(m, out, 0.0).to(x.dtype if x.dtype in (torch.float32, torch.float64) else acc)
