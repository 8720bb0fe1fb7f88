"""Backend choice, ``"auto" | "triton" | "torch" | "reference"``, and the functions each backend runs.

Explicit imports per backend (Triton is imported only when asked for: the interpreter flag must be set
before its first import, and CPU runs never need it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

BACKENDS = ("auto", "triton", "torch", "reference")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def resolve(backend: str, device: torch.device) -> str:
    """Name of the backend that will run; errors name the argument and what was expected."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' needs the triton package: pip install triton")
        if device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
            return "triton"
        raise ValueError(
            f"backend='triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before "
            f"triton is imported); got tensors on {device}"
        )
    return backend


@dataclass(frozen=True)
class Ops:
    """One backend's log-prob primitives. ``loss_fwd`` (None: not offered) forms a ``TokenLoss``'s input
    gradient in the forward pass; without it the loss is composed on ``fwd`` and ``bwd`` recomputes."""

    fwd: Callable
    bwd: Callable
    loss_fwd: Callable | None = None
    fwd_dh: Callable | None = None  # linear only: dlogp/dh in the forward (a frozen LM head)


def _capped(fns: tuple[Callable, ...], softcap: float | None) -> tuple[Callable, ...]:
    """The backend functions with ``softcap`` bound (each takes it as its last keyword; None: as they are)."""
    return fns if softcap is None else tuple(None if f is None else partial(f, softcap=softcap) for f in fns)


def logits_ops(name: str, softcap: float | None = None) -> Ops:
    """``softcap`` c: every op soft-caps the logits, z -> c tanh(z / c), before the temperature."""
    if name == "torch":
        from . import _torch_logprobs as t

        return Ops(*_capped((t.logprobs_fwd, t.logprobs_bwd, t.loss_fwd), softcap))
    if name == "triton":
        from kernels import logprobs as k

        return Ops(*_capped((k.logprobs_fwd, k.logprobs_bwd), softcap))
    raise ValueError(f"no logits ops for backend {name!r}")


def linear_ops(name: str, softcap: float | None = None) -> Ops:
    """``softcap`` c: every op soft-caps its logits chunk, z -> c tanh(z / c), before the temperature."""
    if name == "torch":
        from . import _torch_linear as t

        return Ops(*_capped((t.token_fwd, t.token_bwd, t.loss_fwd, t.token_fwd_dh), softcap))
    if name == "triton":
        from kernels import linear as k

        return Ops(*_capped((k.token_fwd, k.token_bwd), softcap))
    raise ValueError(f"no linear ops for backend {name!r}")


def gae_fn(name: str) -> Callable:
    if name == "torch":
        from ._torch_gae import gae_fwd
    elif name == "triton":
        from kernels.gae import gae_fwd
    else:
        raise ValueError(f"no GAE for backend {name!r}")
    return gae_fwd
