"""token_logprobs: every backend against the float64 reference, plus cross_entropy as an independent oracle."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from parity import BACKENDS, DEVICE, FP32_ATOL, LOWP, assert_no_worse_than_eager, labels, logits, rounding_margin

import apa_fast
from apa_fast import reference

SHAPES = [((), 5), ((6,), 1), ((4, 7), 7), ((2, 3), 129), ((2, 5), 1000)]


def _grads(fn, x, g_logp, g_ent=None):
    x = x.detach().clone().requires_grad_()
    out = fn(x)
    if isinstance(out, tuple):
        loss = (out[0] * g_logp).sum() + (out[1] * g_ent).sum()
    else:
        loss = (out * g_logp).sum()
    loss.backward()
    return out, x.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead,V", SHAPES)
@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_fp32_matches_reference(backend, lead, V, tau):
    x = logits((*lead, V))
    y = labels(lead, V)
    if y.numel() > 1:
        y.view(-1)[1] = -100  # one ignored position
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(lead, dtype=torch.float64, generator=gen).to(DEVICE)
    ge = torch.randn(lead, dtype=torch.float64, generator=gen).to(DEVICE)
    (lp, h), gx = _grads(
        lambda z: apa_fast.token_logprobs(z, y, temperature=tau, return_entropy=True, backend=backend), x, g.float(), ge.float()
    )
    (lr, hr), gr = _grads(lambda z: reference.token_logprobs(z, y, tau, -100, True), x.double(), g, ge)
    assert lp.dtype == torch.float32 and h.dtype == torch.float32 and lp.shape == lead
    assert gx.dtype == torch.float32 and gx.shape == x.shape
    torch.testing.assert_close(lp.double(), lr, atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(h.double(), hr, atol=FP32_ATOL, rtol=0)
    # gradients are O(|g|) differences of probabilities: fp32 rounding of p is ~1e-7 relative
    torch.testing.assert_close(gx.double(), gr, atol=1e-5, rtol=0)
    if y.numel() > 1:
        assert lp.view(-1)[1] == 0 and h.view(-1)[1] == 0 and gx.view(-1, V)[1].abs().max() == 0


@pytest.mark.parametrize("tau", [1.0, 1.7])
def test_torch_backend_float64_is_exact(tau):
    """In float64 the chunked backend and the oracle agree to rounding: any formula slip shows."""
    x = logits((3, 4, 300), torch.float64)
    y = labels((3, 4), 300)
    g, ge = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    (lp, h), gx = _grads(lambda z: apa_fast.token_logprobs(z, y, temperature=tau, return_entropy=True, backend="torch"), x, g, ge)
    (lr, hr), gr = _grads(lambda z: reference.token_logprobs(z, y, tau, -100, True), x, g, ge)
    for a, b in ((lp, lr), (h, hr), (gx, gr)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_gradcheck_reference_and_torch_backend():
    x = logits((2, 3, 11), torch.float64).requires_grad_()
    y = labels((2, 3), 11)
    y[0, 1] = -100
    for fn in (
        lambda z: reference.token_logprobs(z, y, 0.8, -100, True),
        lambda z: apa_fast.token_logprobs(z, y, temperature=0.8, return_entropy=True, backend="torch"),
    ):
        assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_independent_oracle_cross_entropy(backend):
    x = logits((8, 503))
    y = labels((8,), 503)
    y[3] = -100
    lp = apa_fast.token_logprobs(x, y, backend=backend)
    ce = -F.cross_entropy(x.double(), y, reduction="none", ignore_index=-100)
    torch.testing.assert_close(lp.double(), ce, atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOWP)
def test_low_precision_no_worse_than_eager(backend, dtype):
    x = logits((3, 5, 777), dtype)
    y = labels((3, 5), 777)
    g = torch.randn(3, 5, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    lp, gx = _grads(lambda z: apa_fast.token_logprobs(z, y, backend=backend), x, g)
    exact, gexact = _grads(lambda z: reference.token_logprobs(z, y), x.double(), g.double())
    # eager, as RLHF trainers write it, in the input dtype
    eager, geager = _grads(lambda z: torch.log_softmax(z, -1).gather(-1, y[..., None]).squeeze(-1), x, g.to(dtype))
    assert lp.dtype == torch.float32 and gx.dtype == dtype
    assert_no_worse_than_eager(f"logp {dtype}", lp, eager, exact, margin=1e-5)
    # gradient: onehot - p is formed in fp32 and rounded once into dtype, so beyond eager's error we
    # allow one rounding of the largest gradient entry (eager's max error may land on a small entry)
    assert_no_worse_than_eager(f"grad {dtype}", gx, geager, gexact, margin=rounding_margin(gexact, dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_shifted_slice_needs_no_copy(backend):
    """logits[:, :-1] of a (B, T+1, V) tensor: the usual next-token slice, non-collapsible strides."""
    full = logits((3, 6, 257))
    x = full[:, :-1]
    assert not x.is_contiguous()
    y = labels((3, 5), 257)
    lp = apa_fast.token_logprobs(x, y, backend=backend)
    torch.testing.assert_close(lp.double(), reference.token_logprobs(x.double(), y), atol=FP32_ATOL, rtol=0)
    xg = x.detach().requires_grad_()
    apa_fast.token_logprobs(xg, y, backend=backend).sum().backward()
    xr = x.double().detach().requires_grad_()
    reference.token_logprobs(xr, y).sum().backward()
    torch.testing.assert_close(xg.grad.double(), xr.grad, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_above_65536(backend):
    V = 70_001  # above 2^16 and odd: exercises vocab blocking and the masked tail block
    x = logits((2, V), scale=4.0)
    y = torch.tensor([0, V - 1], device=DEVICE)
    lp, h = apa_fast.token_logprobs(x, y, return_entropy=True, backend=backend)
    lr, hr = reference.token_logprobs(x.double(), y, return_entropy=True)
    torch.testing.assert_close(lp.double(), lr, atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(h.double(), hr, atol=1e-4, rtol=0)  # entropy ~ log V ~ 11: fp32 sum of V terms


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_and_empty(backend):
    x = logits((4, 9)).requires_grad_()
    y = torch.full((4,), -100, device=DEVICE)
    lp, h = apa_fast.token_logprobs(x, y, return_entropy=True, backend=backend)
    assert torch.equal(lp, torch.zeros_like(lp)) and torch.equal(h, torch.zeros_like(h))
    (lp.sum() + h.sum()).backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    e = torch.zeros(0, 9, device=DEVICE, requires_grad=True)
    out = apa_fast.token_logprobs(e, torch.zeros(0, dtype=torch.long, device=DEVICE), backend=backend)
    assert out.shape == (0,)


def test_entropy_only_gradient_matches_reference():
    x = logits((5, 40), torch.float64)
    y = labels((5,), 40)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    apa_fast.token_logprobs(xa, y, return_entropy=True, backend="torch")[1].sum().backward()
    reference.token_logprobs(xb, y, return_entropy=True)[1].sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-12, rtol=0)
