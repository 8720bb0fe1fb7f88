"""awr_loss, ppo_loss, value_loss and masked_whiten against the formulas, incl. a 2-process whitening."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import apa_fast


def _tok(seed=0, shape=(4, 6)):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(shape, generator=g, dtype=torch.float64) * 3
    old = logp + torch.randn(shape, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(shape, generator=g, dtype=torch.float64)
    m = torch.rand(shape, generator=g) > 0.3
    return logp, old, adv, m


def test_awr_formula_clamp_and_overflow():
    logp, _, adv, m = _tok()
    lp = logp.clone().requires_grad_()
    loss = apa_fast.awr_loss(lp, adv, m, lam=0.5)
    w = torch.exp(adv / 0.5)
    torch.testing.assert_close(loss, -(logp * w * m).sum() / m.sum(), atol=1e-6, rtol=1e-6)
    loss.backward()
    assert torch.all(lp.grad[~m] == 0)
    clamped = apa_fast.awr_loss(logp, adv * 20, m, lam=1.0, max_weight=20.0)
    torch.testing.assert_close(clamped, -(logp * torch.exp(adv * 20).clamp(max=20) * m).sum() / m.sum(), atol=1e-5, rtol=1e-6)
    with pytest.raises(ValueError, match="max_weight"):
        apa_fast.awr_loss(logp, adv * 1e4, m)


def test_awr_works_in_the_inputs_precision():
    """float64 in, float64 weights: exact to 1e-12, and exp(90) (finite in float64) is not an overflow."""
    logp = torch.tensor([[-1.0]], dtype=torch.float64)
    adv = torch.tensor([[0.123456789012345]], dtype=torch.float64)
    m = torch.ones(1, 1, dtype=torch.bool)
    loss = apa_fast.awr_loss(logp, adv, m, lam=0.1)
    assert loss.dtype == torch.float64
    want = -(logp * torch.exp(adv / 0.1)).sum()  # float64 formula: 3.4368930843...
    assert abs(float(loss) - float(want)) < 1e-12, (float(loss), float(want))
    big = apa_fast.awr_loss(logp, torch.full((1, 1), 9.0, dtype=torch.float64), m, lam=0.1)
    torch.testing.assert_close(big, torch.exp(torch.tensor(90.0, dtype=torch.float64)), rtol=1e-12, atol=0)


def test_ppo_formula_and_gradient():
    logp, old, adv, m = _tok(1)
    lp = logp.clone().requires_grad_()
    loss = apa_fast.ppo_loss(lp, old, adv, m, clip=0.2)
    r = torch.exp(logp - old)
    by_hand = (torch.maximum(-adv * r, -adv * r.clamp(0.8, 1.2)) * m).sum() / m.sum()
    torch.testing.assert_close(loss, by_hand)
    loss.backward()
    clipped = ((adv > 0) & (r > 1.2)) | ((adv < 0) & (r < 0.8))
    assert torch.all(lp.grad[clipped | ~m] == 0) and torch.any(lp.grad != 0)


def test_value_loss_plain_and_clipped():
    v, old, ret, m = _tok(2)
    torch.testing.assert_close(apa_fast.value_loss(v, ret, m), 0.5 * ((v - ret) ** 2 * m).sum() / m.sum())
    vc = torch.maximum(torch.minimum(v, old + 0.2), old - 0.2)
    by_hand = 0.5 * (torch.maximum((v - ret) ** 2, (vc - ret) ** 2) * m).sum() / m.sum()
    torch.testing.assert_close(apa_fast.value_loss(v, ret, m, old_values=old, clip=0.2), by_hand)
    with pytest.raises(ValueError, match="old_values"):
        apa_fast.value_loss(v, ret, m, clip=0.2)


@pytest.mark.parametrize("clipped", [False, True])
def test_value_loss_masked_positions_get_exactly_zero_gradient(clipped):
    """NaN / inf at masked positions (returns, old values, values) reach neither the loss nor the gradient."""
    v = torch.tensor([[0.5, 0.2, float("inf")]], dtype=torch.float64, requires_grad=True)
    ret = torch.tensor([[1.0, float("nan"), 2.0]], dtype=torch.float64)
    old = torch.tensor([[0.4, float("nan"), float("-inf")]], dtype=torch.float64)
    m = torch.tensor([[1, 0, 0]])
    kw = dict(old_values=old, clip=0.2) if clipped else {}
    loss = apa_fast.value_loss(v, ret, m, **kw)
    loss.backward()
    # one valid position: 0.5 * (V - R)^2 (clipped: V=0.5 is within 0.4 +- 0.2, so the same)
    assert loss.item() == pytest.approx(0.125, abs=1e-12)
    assert torch.isfinite(v.grad).all(), v.grad
    assert v.grad[0, 0].item() == pytest.approx(-0.5, abs=1e-12)
    assert torch.equal(v.grad[0, 1:], torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize("fn", ["awr", "ppo", "value"])
def test_empty_mask_gives_zero_and_zero_grad(fn):
    logp, old, adv, m = _tok(3)
    m = torch.zeros_like(m)
    lp = logp.clone().requires_grad_()
    loss = {"awr": lambda: apa_fast.awr_loss(lp, adv, m), "ppo": lambda: apa_fast.ppo_loss(lp, old, adv, m),
            "value": lambda: apa_fast.value_loss(lp, adv, m)}[fn]()
    loss.backward()
    assert loss.item() == 0 and torch.equal(lp.grad, torch.zeros_like(lp))


def test_nan_at_valid_position_is_refused():
    logp, old, adv, m = _tok(4)
    adv[m.nonzero()[0].tolist()] = float("nan")
    with pytest.raises(ValueError, match="advantages must be finite"):
        apa_fast.ppo_loss(logp, old, adv, m)


def test_masked_whiten_statistics_over_valid_only():
    x, _, _, m = _tok(5)
    x2 = x.clone()
    x2[~m] = 1e9  # padding must not move the statistics
    w = apa_fast.masked_whiten(x2, m)
    v = x[m]
    torch.testing.assert_close(w[m], (v - v.mean()) / torch.sqrt(v.var() + 1e-8))
    assert torch.all(w[~m] == 0)
    ws = apa_fast.masked_whiten(x2, m, shift_mean=False)
    torch.testing.assert_close(ws[m], (v - v.mean()) / torch.sqrt(v.var() + 1e-8) + v.mean())
    assert torch.equal(apa_fast.masked_whiten(x, torch.zeros_like(m)), torch.zeros_like(x))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _whiten_worker(rank: int, world: int, port: int, x: torch.Tensor, m: torch.Tensor, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        w = apa_fast.masked_whiten(x[rank::world], m[rank::world], process_group=dist.group.WORLD)
        torch.save(w, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_masked_whiten_across_two_processes_equals_one(tmp_path):
    """Statistics are all-reduced, so 2 ranks holding halves whiten exactly like 1 rank holding all."""
    x, _, _, m = _tok(6, shape=(6, 9))
    m[0] = False  # ranks get unequal valid counts
    mp.spawn(_whiten_worker, args=(2, _free_port(), x, m, str(tmp_path / "w")), nprocs=2, join=True)
    whole = apa_fast.masked_whiten(x, m)
    for rank in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"w.{rank}", weights_only=True), whole[rank::2])
