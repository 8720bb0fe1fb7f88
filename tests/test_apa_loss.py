"""apa_loss: the fused loss and its logits gradient against the float64 reference."""

from __future__ import annotations

import pytest
import torch
from parity import BACKENDS, LOWP, apa_targets, assert_no_worse_than_eager, labels, logits, rounding_margin

import apa_fast
from apa_fast import reference


def _inputs(lead, V, dtype=torch.float32, hole_frac=0.3, seed=0):
    x = logits((*lead, V), dtype, seed=seed)
    y = labels(lead, V, seed=seed + 1)
    return (x, y, *apa_targets(lead, seed, hole_frac))


def _loss_and_grad(fn, x, scale=1.0):
    x = x.detach().clone().requires_grad_()
    loss = fn(x)
    (loss * scale).backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead,V", [((6,), 1), ((4, 7), 33), ((2, 3, 5), 513)])
@pytest.mark.parametrize("tau,lam", [(1.0, 0.1), (0.8, 1.0)])
@pytest.mark.parametrize("scale", [1.0, 0.25])  # upstream gradient 1 (loss.backward()) and not 1
def test_fp32_matches_reference(backend, lead, V, tau, lam, scale):
    x, y, ref, adv, m = _inputs(lead, V)
    loss, gx = _loss_and_grad(
        lambda z: apa_fast.apa_loss(z, y, ref.float(), adv.float(), m, lam=lam, temperature=tau, backend=backend), x, scale
    )
    lr, gr = _loss_and_grad(lambda z: reference.apa_loss(z, y, ref, adv, m, lam, tau), x.double(), scale)
    assert loss.dtype == torch.float32 and loss.dim() == 0 and gx.dtype == torch.float32
    # the loss is a mean of squares of O(1/lam) residuals: relative fp32 accuracy
    torch.testing.assert_close(loss.double(), lr, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(gx.double(), gr, atol=2e-5 * max(1.0, 1 / lam), rtol=1e-5)
    assert torch.all(gx[~m] == 0)


def test_float64_torch_backend_exact_and_gradcheck():
    x, y, ref, adv, m = _inputs((3, 4), 50, torch.float64)
    l1, g1 = _loss_and_grad(lambda z: apa_fast.apa_loss(z, y, ref, adv, m, backend="torch"), x, 0.3)
    l2, g2 = _loss_and_grad(lambda z: reference.apa_loss(z, y, ref, adv, m), x, 0.3)
    torch.testing.assert_close(l1, l2, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(g1, g2, atol=1e-12, rtol=1e-12)
    xs = x[:2, :2, :9].clone().requires_grad_()
    ys = y[:2, :2] % 9
    for fn in (
        lambda z: reference.apa_loss(z, ys, ref[:2, :2], adv[:2, :2], m[:2, :2], 0.5, 0.9),
        lambda z: apa_fast.apa_loss(z, ys, ref[:2, :2], adv[:2, :2], m[:2, :2], lam=0.5, temperature=0.9, backend="torch"),
    ):
        assert torch.autograd.gradcheck(fn, (xs,), eps=1e-6, atol=1e-6)


def test_matches_the_formula_by_hand():
    """L = sum(m (logp - logp_init - A/lam)^2) / sum(m), written out with log_softmax."""
    x, y, ref, adv, m = _inputs((5, 6), 20, torch.float64)
    logp = torch.log_softmax(x, -1).gather(-1, y[..., None]).squeeze(-1)
    by_hand = ((logp - ref - adv / 0.1) ** 2 * m).sum() / m.sum()
    torch.testing.assert_close(apa_fast.apa_loss(x, y, ref, adv, m, lam=0.1, backend="torch"), by_hand)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOWP)
def test_low_precision_no_worse_than_eager(backend, dtype):
    x, y, ref, adv, m = _inputs((3, 6), 700, dtype)
    loss, gx = _loss_and_grad(lambda z: apa_fast.apa_loss(z, y, ref.float(), adv.float(), m, backend=backend), x)
    exact, gexact = _loss_and_grad(lambda z: reference.apa_loss(z, y, ref, adv, m), x.double())

    def eager(z):  # as RLHF trainers write it: log_softmax in the logits' dtype
        logp = torch.log_softmax(z, -1).gather(-1, y[..., None]).squeeze(-1)
        return (((logp - ref.to(dtype) - adv.to(dtype) / 0.1) ** 2) * m).sum() / m.sum()

    le, ge = _loss_and_grad(eager, x)
    assert gx.dtype == dtype
    # relative scale: the loss is ~ (A/lam)^2 ~ 100; one fp32 ulp there is ~1e-5
    assert_no_worse_than_eager(f"loss {dtype}", loss, le, exact, margin=1e-4)
    assert_no_worse_than_eager(f"grad {dtype}", gx, ge, gexact, margin=rounding_margin(gexact, dtype))


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_all_masked_is_zero_not_nan(backend):
    x, y, ref, adv, m = _inputs((3, 4), 17)
    m = torch.zeros_like(m)
    adv[0, 0] = float("nan")  # masked positions are never read into the loss
    loss, gx = _loss_and_grad(lambda z: apa_fast.apa_loss(z, y, ref.float(), adv.float(), m, backend=backend), x)
    assert loss.item() == 0.0 and torch.equal(gx, torch.zeros_like(gx))


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_positions_ignore_labels_and_nan(backend):
    """Padding is often labelled -100 with garbage advantages: none of it may leak into the loss."""
    x, y, ref, adv, m = _inputs((4, 5), 31)
    y2, ref2, adv2 = y.clone(), ref.clone(), adv.clone()
    y2[~m], ref2[~m], adv2[~m] = -100, float("nan"), float("inf")
    l1, g1 = _loss_and_grad(lambda z: apa_fast.apa_loss(z, y2, ref2.float(), adv2.float(), m, backend=backend), x)
    l2, g2 = _loss_and_grad(lambda z: apa_fast.apa_loss(z, y, ref.float(), adv.float(), m, backend=backend), x)
    assert torch.equal(l1, l2) and torch.equal(g1, g2) and torch.isfinite(l1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_slice_and_float_mask(backend):
    full = logits((2, 7, 130))
    x = full[:, :-1]
    _, y, ref, adv, m = _inputs((2, 6), 130)
    mf = m.float()  # 0/1 floats are accepted like bool
    l1 = apa_fast.apa_loss(x, y, ref.float(), adv.float(), mf, backend=backend)
    l2 = reference.apa_loss(x.double(), y, ref, adv, m)
    torch.testing.assert_close(l1.double(), l2, rtol=2e-5, atol=1e-6)
