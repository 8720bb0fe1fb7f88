"""GAE: backends against a plain Python loop, skip-mask semantics, last_values."""

from __future__ import annotations

import pytest
import torch
from parity import BACKENDS, DEVICE

import apa_fast
from apa_fast import reference


def python_loop(r, v, m, gamma, lam, last=None):
    """Independent of reference.gae: walk the valid steps of each row backwards as a list."""
    B, T = len(r), len(r[0])
    A = [[0.0] * T for _ in range(B)]
    R = [[0.0] * T for _ in range(B)]
    for b in range(B):
        steps = [t for t in range(T) if m[b][t]]
        next_v = 0.0 if last is None else last[b]
        next_a = 0.0
        for t in reversed(steps):
            delta = r[b][t] + gamma * next_v - v[b][t]
            next_a = delta + gamma * lam * next_a
            A[b][t], R[b][t] = next_a, next_a + v[b][t]
            next_v = v[b][t]
    return torch.tensor(A, dtype=torch.float64), torch.tensor(R, dtype=torch.float64)


def _case(B, T, seed=0, holes="random"):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(B, T, generator=g, dtype=torch.float64)
    v = torch.randn(B, T, generator=g, dtype=torch.float64)
    if holes == "random":
        m = torch.rand(B, T, generator=g) > 0.25
    else:  # right padding of random lengths, as rollouts produce
        lengths = torch.randint(0, T + 1, (B,), generator=g)
        m = torch.arange(T)[None] < lengths[:, None]
    last = torch.randn(B, generator=g, dtype=torch.float64)
    return r, v, m, last


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("B,T", [(1, 1), (3, 17), (4, 70)])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.0), (0.99, 1.0)])
@pytest.mark.parametrize("holes", ["random", "right"])
def test_against_python_loop(backend, B, T, gamma, lam, holes):
    r, v, m, last = _case(B, T, holes=holes)
    for lv in (None, last):
        A, R = apa_fast.gae(r.float().to(DEVICE), v.float().to(DEVICE), m.to(DEVICE), gamma=gamma, lam=lam,
                            last_values=None if lv is None else lv.float().to(DEVICE), backend=backend)
        Ae, Re = python_loop(r.tolist(), v.tolist(), m.tolist(), gamma, lam, None if lv is None else lv.tolist())
        assert A.dtype == torch.float32 and A.shape == (B, T)
        # fp32 inputs; A sums up to T discounted deltas of O(1): error grows ~ T * ulp
        torch.testing.assert_close(A.cpu().double(), Ae, atol=1e-5 * max(T, 1), rtol=0)
        torch.testing.assert_close(R.cpu().double(), Re, atol=1e-5 * max(T, 1), rtol=0)


def test_torch_float64_long_sequence_exact():
    r, v, m, last = _case(3, 1000, seed=3)
    A, R = apa_fast.gae(r, v, m, gamma=0.999, lam=0.95, last_values=last, backend="torch")
    Ae, Re = reference.gae(r, v, m, 0.999, 0.95, last)
    torch.testing.assert_close(A, Ae, atol=1e-10, rtol=0)
    torch.testing.assert_close(R, Re, atol=1e-10, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_masked_values_change_nothing(backend):
    r, v, m, last = _case(3, 40, seed=5)
    r, v, m, last = r.float().to(DEVICE), v.float().to(DEVICE), m.to(DEVICE), last.float().to(DEVICE)
    A1, R1 = apa_fast.gae(r, v, m, last_values=last, backend=backend)
    r2, v2 = r.clone(), v.clone()
    r2[~m], v2[~m] = 1e6, float("nan")
    A2, R2 = apa_fast.gae(r2, v2, m, last_values=last, backend=backend)
    assert torch.equal(A1, A2) and torch.equal(R1, R2)
    assert torch.all(A1[~m] == 0) and torch.all(R1[~m] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_interior_hole_passes_carry_through(backend):
    """A single valid step on each side of a hole: the hole must be invisible to the recurrence."""
    r = torch.tensor([[1.0, 5.0, 2.0]], device=DEVICE)
    v = torch.tensor([[0.5, 9.0, 0.25]], device=DEVICE)
    m = torch.tensor([[True, False, True]], device=DEVICE)
    A, R = apa_fast.gae(r, v, m, gamma=0.9, lam=0.5, last_values=torch.tensor([2.0], device=DEVICE), backend=backend)
    a2 = 2.0 + 0.9 * 2.0 - 0.25
    a0 = 1.0 + 0.9 * 0.25 - 0.5 + 0.9 * 0.5 * a2
    torch.testing.assert_close(A.cpu(), torch.tensor([[a0, 0.0, a2]]))
    torch.testing.assert_close(R.cpu(), torch.tensor([[a0 + 0.5, 0.0, a2 + 0.25]]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_masked_and_empty(backend):
    z = torch.zeros(2, 5, device=DEVICE)
    A, R = apa_fast.gae(z + 1, z + 2, z.bool(), backend=backend)
    assert torch.equal(A, z) and torch.equal(R, z)
    A, R = apa_fast.gae(torch.zeros(0, 3, device=DEVICE), torch.zeros(0, 3, device=DEVICE),
                        torch.zeros(0, 3, dtype=torch.bool, device=DEVICE), backend=backend)
    assert A.shape == (0, 3)
