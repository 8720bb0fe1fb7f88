"""Critic-free pieces: group advantages and the GRPO loss (from log-probs, logits and hidden states)
against float64 formulas."""

from __future__ import annotations

import math

import pytest
import torch

from parity import BACKENDS, DEVICE, max_err

import apa_fast
from apa_fast import losses, reference


def test_group_advantages_by_hand():
    s = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    sd = math.sqrt((1.5**2 + 0.5**2) * 2 / 3)  # unbiased
    torch.testing.assert_close(apa_fast.group_advantages(s, 4), (s - 2.5) / (sd + 1e-6), atol=1e-15, rtol=0)
    torch.testing.assert_close(apa_fast.group_advantages(s, 4, std=False), s - 2.5, atol=1e-15, rtol=0)
    loo = s - (10 - s) / 3  # each sample against the mean of the other three
    torch.testing.assert_close(apa_fast.group_advantages(s, 4, std=False, baseline="loo"), loo, atol=1e-15, rtol=0)


@pytest.mark.parametrize("std", [True, False])
@pytest.mark.parametrize("baseline", ["mean", "loo"])
def test_group_advantages_against_reference(std, baseline):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(8 * 5, generator=g, dtype=torch.float64)
    s[5:10] = 0.25  # a group whose scores are all equal: 0
    s[10:15] = torch.tensor([1.0, float("nan"), 2.0, float("nan"), 0.5], dtype=torch.float64)  # NaN left out
    s[15:20] = torch.tensor([float("nan")] * 4 + [3.0], dtype=torch.float64)  # one finite score: 0
    s[20:25] = torch.tensor([2.0, float("nan"), 2.0, 2.0, float("inf")], dtype=torch.float64)  # equal finite ones
    ours = apa_fast.group_advantages(s, 5, std=std, baseline=baseline)
    exact = reference.group_advantages(s, 5, std=std, baseline=baseline)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, exact, atol=1e-12, rtol=0)
    assert (ours[5:10] == 0).all() and ours[11] == 0 and ours[13] == 0 and (ours[15:25] == 0).all()
    f32 = apa_fast.group_advantages(s.float(), 5, std=std, baseline=baseline)
    assert f32.dtype == torch.float32 and max_err(f32, exact) < 1e-5


@pytest.mark.parametrize("kw,match", [
    (dict(group_size=1), "group_size must be an int >= 2"),
    (dict(group_size=3), "not a multiple of group_size=3"),
    (dict(group_size=2, baseline="median"), "baseline must be 'mean' or 'loo'"),
])
def test_group_advantages_bad_input(kw, match):
    with pytest.raises(ValueError, match=match):
        apa_fast.group_advantages(torch.zeros(4), **kw)
    with pytest.raises(ValueError, match=r"scores must have shape \(B,\)"):
        apa_fast.group_advantages(torch.zeros(2, 2), 2)


def _tok(shape=(3, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(shape, generator=g, dtype=torch.float64) * 3
    old = logp + torch.randn(shape, generator=g, dtype=torch.float64) * 0.3
    ref = logp + torch.randn(shape, generator=g, dtype=torch.float64) * 0.5
    adv = torch.randn(shape, generator=g, dtype=torch.float64)
    m = torch.rand(shape, generator=g) > 0.3
    return logp, old, ref, adv, m


@pytest.mark.parametrize("beta", [0.04, 0.0, 1.0])
def test_grpo_loss_formula_and_gradient(beta):
    logp, old, ref, adv, m = _tok()
    ref[~m] = float("nan")  # masked positions are never read
    lp = logp.clone().requires_grad_()
    loss = apa_fast.grpo_loss(lp, old, ref, adv, m, clip=0.2, beta=beta)
    loss.backward()
    lr = logp.clone().requires_grad_()
    exact = reference.grpo_loss(lr, old, ref, adv, m, 0.2, beta)
    exact.backward()
    assert abs(loss.item() - exact.item()) < 1e-12
    torch.testing.assert_close(lp.grad, lr.grad, atol=1e-12, rtol=0)
    assert (lp.grad[~m] == 0).all()
    if beta == 0:  # no initial policy needed at all
        torch.testing.assert_close(apa_fast.grpo_loss(logp, old, None, adv, m, beta=0.0), loss.detach())
    with pytest.raises(ValueError, match="beta > 0 needs ref_logprobs"):
        apa_fast.grpo_loss(logp, old, None, adv, m, beta=0.1)
    with pytest.raises(ValueError, match="beta must be a finite number >= 0"):
        apa_fast.grpo_loss(logp, old, ref, adv, m, beta=-1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grpo_from_logits_and_hidden_states_against_float64(backend):
    """The fused engine with the GRPO loss: value and gradients against the float64 composition."""
    B, T, V, H = 2, 5, 97, 16
    g = torch.Generator().manual_seed(3)
    y = torch.randint(0, V, (B, T), generator=g)
    _, old, ref, adv, m = _tok((B, T), seed=4)
    old = old - 3.0  # near the log-probs of a 97-way softmax: ratios both inside and outside the clip

    def loss_of(dtype):
        return losses.grpo_token_loss(old.to(DEVICE), ref.to(DEVICE), adv.to(DEVICE), m.to(DEVICE), clip=0.2, beta=0.3)

    z = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    zr = z.clone().requires_grad_()
    exact = reference.grpo_loss(reference.token_logprobs(zr, y, 0.9), old, ref, adv, m, 0.2, 0.3)
    exact.backward()
    dt = torch.float64 if backend == "torch" else torch.float32
    zt = z.to(DEVICE, dt).requires_grad_()
    ours = apa_fast.token_loss(zt, y.to(DEVICE), loss_of(dt), temperature=0.9, backend=backend)
    ours.backward()
    # relative to the largest value: the k3 term's exp(logp_init - logp) makes gradients of O(100) here, and
    # fp32 keeps ~1e-7 of them (measured: 3e-7 of the largest gradient)
    tol = 1e-12 if dt == torch.float64 else 1e-6
    assert abs(ours.item() - exact.item()) <= tol * max(1.0, abs(exact.item()))
    assert max_err(zt.grad.cpu(), zr.grad) <= tol * max(1.0, zr.grad.abs().max().item())

    h = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) / 2
    hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
    exact = reference.grpo_loss(reference.linear_token_logprobs(hr, wr, y, None, 0.9), old, ref, adv, m, 0.2, 0.3)
    exact.backward()
    ht, wt = h.to(DEVICE, dt).requires_grad_(), w.to(DEVICE, dt).requires_grad_()
    ours = apa_fast.linear_token_loss(ht, wt, y.to(DEVICE), loss_of(dt), temperature=0.9, backend=backend)
    ours.backward()
    assert abs(ours.item() - exact.item()) <= tol * max(1.0, abs(exact.item()))
    for ours_g, exact_g in ((ht.grad, hr.grad), (wt.grad, wr.grad)):
        assert max_err(ours_g.cpu(), exact_g) <= tol * max(1.0, exact_g.abs().max().item())
