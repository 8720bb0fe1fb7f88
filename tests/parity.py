"""Shared helpers for the parity tests: devices, backends and the per-dtype error rule."""

from __future__ import annotations

import importlib.util

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HAS_TRITON = importlib.util.find_spec("triton") is not None

# Backends under test against the reference. Triton runs interpreted on CPU (exact, slow).
BACKENDS = [
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")),
]

# Low-precision dtypes: a backend must be no worse than eager PyTorch in the same dtype, plus a
# margin. The margin is one unit of the output's own fp32 rounding for the log-prob scale used
# here (|logp| <~ 20): kernels accumulate in fp32, so beyond eager's error only fp32 rounding remains.
LOWP = [torch.bfloat16, torch.float16]

# fp32 input vs the float64 reference of the same values: a cascaded fp32 log-sum-exp over V terms loses
# about log2(V) ulps at worst; 2e-5 absolute covers V = 262,144 at |logp| <~ 100 (fp32 rounds 100 by 3.8e-6).
FP32_ATOL = 2e-5


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over elements, computed in float64."""
    return (a.double() - b.double()).abs().max().item()


def assert_no_worse_than_eager(name: str, ours: torch.Tensor, eager: torch.Tensor, exact: torch.Tensor, margin: float) -> None:
    """The Cut Cross-Entropy rule: |ours - exact| <= |eager - exact| + margin (max over elements)."""
    e_ours = max_err(ours, exact)
    e_eager = max_err(eager, exact)
    assert e_ours <= e_eager + margin, f"{name}: error {e_ours:.3e} vs eager {e_eager:.3e} (+{margin:.1e})"


def rounding_margin(exact: torch.Tensor, dtype: torch.dtype) -> float:
    """One rounding of the largest value into ``dtype`` (unit roundoff x max|exact|): an output
    stored in ``dtype`` cannot do better than this, however it was computed."""
    return torch.finfo(dtype).eps / 2 * exact.abs().max().item()


def logits(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, scale: float = 3.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(DEVICE)


def labels(shape: tuple[int, ...], V: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, shape, generator=g).to(DEVICE)


def apa_targets(lead: tuple[int, ...], seed: int, hole_frac: float = 0.3, device: torch.device = DEVICE):
    """float64 APA targets for ``lead``: ref log-probs in (-5, 0], advantages ~ N(0, 1), and a mask
    with about ``hole_frac`` of the positions masked out, all from one generator seeded ``seed``."""
    g = torch.Generator().manual_seed(seed)
    ref = (-torch.rand(lead, generator=g, dtype=torch.float64) * 5).to(device)
    adv = torch.randn(lead, generator=g, dtype=torch.float64).to(device)
    m = (torch.rand(lead, generator=g) > hole_frac).to(device)
    return ref, adv, m


# The other bounds of the fp32 parity tests, named so that bench.gpu checks CUDA runs by the same rules:
FP32_GRAD_ATOL = 1e-5  # logits gradient: O(|g|) differences of probabilities rounded in fp32 (test_logprobs)
FP32_RTOL = 2e-5  # losses (with LOSS_ATOL) and hidden/weight/bias gradients, relative to max(1, max |ref|)
LOSS_ATOL = 1e-6
LOWP_LOGP_MARGIN = 1e-5  # low-precision inputs: fp32 log-probs beyond eager's error (|logp| <~ 20)
GAE_ATOL_PER_STEP = 1e-5  # fp32 GAE: up to T discounted deltas of O(1) summed, ~T ulps
