"""Backend resolution: ``"auto" | "triton" | "torch" | "reference"``."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

BACKENDS = ("auto", "triton", "torch", "reference")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve(backend: str, device: torch.device) -> str:
    """Name of the backend that will run; errors name the argument and what was expected."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' needs the triton package: pip install triton")
        if device.type == "cuda":
            return "triton"
        if device.type == "cpu" and interpreter_on():
            return "triton"
        raise ValueError(
            f"backend='triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before "
            f"triton is imported); got tensors on {device}"
        )
    return backend


def module(name: str, family: str) -> ModuleType:
    """The module implementing ``family`` (e.g. "logprobs", "gae") for a resolved backend."""
    if name == "triton":
        return importlib.import_module(f"kernels.{family}")
    if name == "torch":
        return importlib.import_module(f"apa_fast._torch_{family}")
    raise ValueError(f"no module for backend {name!r}")
