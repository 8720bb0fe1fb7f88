"""Advantage estimators: GAE with skip-mask semantics, whitening over valid tokens (optionally across ranks),
and group advantages from several samples per prompt (critic-free)."""

from __future__ import annotations

import math

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


def group_advantages(scores: Tensor, group_size: int, *, std: bool = True, baseline: str = "mean") -> Tensor:
    """Critic-free advantages of (B,) sequence scores, B = prompts x ``group_size`` samples, each prompt's
    samples contiguous: ``A_i = (s_i - b_i) / (std(s) + 1e-6)`` (GRPO), without the division (``std=False``:
    Dr. GRPO), with ``b_i`` the group mean or (``baseline="loo"``) the mean of the group's other samples
    (RLOO). ``std`` is the unbiased std of the group's finite scores. A NaN score takes no part in its
    group's statistics and gets 0; so does every sample of a group with fewer than two finite scores or
    with all its scores equal (nothing to prefer). Returns float32 (float64 for float64 scores).
    """
    C.check_floating("scores", scores)
    if scores.dim() != 1:
        raise ValueError(f"scores must have shape (B,), one per sequence, got {tuple(scores.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size must be an int >= 2 (samples per prompt), got {group_size!r}")
    if scores.numel() % group_size:
        raise ValueError(f"scores has {scores.numel()} entries, not a multiple of group_size={group_size}")
    if baseline not in ("mean", "loo"):
        raise ValueError(f"baseline must be 'mean' or 'loo', got {baseline!r}")
    x, valid, n, flat = group_stats(scores, group_size)
    total = x.sum(1, keepdim=True)
    mean = total / n.clamp(min=1)
    A = x - (mean if baseline == "mean" else (total - x) / (n - 1).clamp(min=1))
    if std:
        var = (torch.where(valid, x - mean, 0.0) ** 2).sum(1, keepdim=True) / (n - 1).clamp(min=1)
        A = A / (var.sqrt() + 1e-6)
    return torch.where(valid & ~flat, A, 0.0).reshape(-1)


def group_stats(scores: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(scores as (groups, G) with NaN -> 0, finite mask, finite count per group, groups with nothing to
    compare: fewer than two finite scores or all of them equal)."""
    s = scores.reshape(-1, group_size).to(C.out_dtype(scores))
    valid = torch.isfinite(s)
    x = torch.where(valid, s, 0.0)
    n = valid.sum(1, keepdim=True)
    hi = torch.where(valid, s, -math.inf).amax(1, keepdim=True)
    lo = torch.where(valid, s, math.inf).amin(1, keepdim=True)
    return x, valid, n, (n < 2) | (hi == lo)
