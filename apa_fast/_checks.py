"""Input checks shared by every public op.

Every check raises ``ValueError`` (``TypeError`` for a wrong dtype) naming the argument, so that bad
input never reaches a kernel. Value checks (labels in range, 0/1 masks, finite advantages) need one
device->host sync; set ``APA_FAST_SKIP_VALUE_CHECKS=1`` to skip them in a hot loop you trust. Shape,
dtype and device checks are free and always run; the Triton kernels additionally never read out of
bounds, whatever the labels.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def value_checks_enabled() -> bool:
    return os.environ.get("APA_FAST_SKIP_VALUE_CHECKS", "0") not in ("1", "true", "True")


def check_tensor(name: str, x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_floating(name: str, x: Tensor) -> None:
    check_tensor(name, x)
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got {x.dtype}")


def check_integer(name: str, x: Tensor) -> None:
    check_tensor(name, x)
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (int64 or int32), got {x.dtype}")


def check_mask(name: str, x: Tensor) -> None:
    check_tensor(name, x)
    if x.dtype.is_complex:
        raise TypeError(f"{name} must be bool or 0/1 numeric, got {x.dtype}")


def check_shape(name: str, x: Tensor, shape: torch.Size | tuple[int, ...], what: str) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} ({what}), got {tuple(x.shape)}")


def check_same_device(named: dict[str, Tensor | None]) -> torch.device:
    devices = {k: v.device for k, v in named.items() if v is not None}
    first_name, first = next(iter(devices.items()))
    for k, d in devices.items():
        if d != first:
            raise ValueError(f"{k} is on {d} but {first_name} is on {first}; all tensors must be on one device")
    return first


def check_positive(name: str, value: float) -> float:
    if isinstance(value, Tensor):
        raise TypeError(f"{name} must be a Python number, got a Tensor")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}") from None
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return v


def check_unit_interval(name: str, value: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}") from None
    if not (0.0 <= v <= 1.0):
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return v


def check_logits_labels(logits: Tensor, labels: Tensor, lead_name: str = "logits") -> int:
    """Checks shared by the log-prob ops; returns V."""
    check_floating(lead_name, logits)
    check_integer("labels", labels)
    if logits.dim() < 1:
        raise ValueError(f"{lead_name} must have at least one dimension (..., V), got a scalar")
    V = logits.shape[-1]
    if V < 1:
        raise ValueError(f"{lead_name} must have a vocabulary dimension V >= 1, got V = {V}")
    check_shape("labels", labels, logits.shape[:-1], f"the leading dims of {lead_name}")
    check_same_device({lead_name: logits, "labels": labels})
    return V


def check_label_range(labels: Tensor, V: int, ignore_index: int | None, valid: Tensor | None = None) -> None:
    """labels must lie in [0, V) wherever they are not ignore_index (and, if given, where valid)."""
    if not value_checks_enabled() or labels.numel() == 0:
        return
    bad = (labels < 0) | (labels >= V)
    if ignore_index is not None:
        bad &= labels != ignore_index
    if valid is not None:
        bad &= valid
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        allowed = f"[0, {V})" + ("" if ignore_index is None else f" or equal ignore_index={ignore_index}")
        where = "" if valid is None else " at valid (mask=1) positions"
        raise ValueError(f"labels must lie in {allowed}{where}; labels{list(idx)} = {int(labels[idx])}")


def check_mask_values(name: str, mask: Tensor) -> None:
    if mask.dtype == torch.bool or not value_checks_enabled() or mask.numel() == 0:
        return
    if bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError(f"{name} must be bool or contain only 0 and 1")


def all_finite(x: Tensor) -> bool:
    """True when x has no NaN/inf, in one read: a finite sum proves it (isfinite alone is three passes).
    False may also mean a sum that overflowed: callers then look element by element."""
    return bool(torch.isfinite(x.sum(dtype=out_dtype(x))))


def check_finite_where(name: str, x: Tensor, valid: Tensor) -> None:
    """NaN/inf at valid positions would silently poison a loss: refuse them by name."""
    if not value_checks_enabled() or x.numel() == 0:
        return
    if all_finite(x):
        return
    bad = ~torch.isfinite(x) & valid
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name} must be finite at valid (mask=1) positions; {name}{list(idx)} = {x[idx].item()}")


def out_dtype(x: Tensor) -> torch.dtype:
    """Log-prob ops return float32, or float64 for float64 input (the oracle's precision)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32
