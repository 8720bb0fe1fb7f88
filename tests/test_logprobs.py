"""token_logprobs: every backend against the float64 reference, plus cross_entropy as an independent oracle."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from parity import (BACKENDS, DEVICE, FP32_ATOL, HAS_TRITON, LOWP, apa_targets, assert_no_worse_than_eager, labels, logits,
                    max_err, rounding_margin)

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


@pytest.mark.parametrize("backend", ["torch", "reference"])  # triton at this V: tests/test_gemma_vocab.py
def test_fp32_large_vocab_one_dominant_logit(backend):
    """V = 262,144 (Gemma 3), one logit 20 above the rest in each row, as in a confident model's rows. ATen's CPU
    (log_)softmax sums exp in fp32 lanes and was up to ~7e-5 off here: every path, from logits and from hidden
    states, log-probs alone, with entropy and inside a loss, must stay within FP32_ATOL of float64."""
    V, top = 262_144, 7
    x = logits((4, V))
    x[:, top] += 20.0
    y = torch.tensor([top, top, 3, V - 1], device=DEVICE)
    lr, hr = reference.token_logprobs(x.double(), y, return_entropy=True)
    lp, h = apa_fast.token_logprobs(x, y, return_entropy=True, backend=backend)
    hid = torch.eye(4, 16, dtype=torch.float64, device=DEVICE)  # z = x exactly: W's first 4 columns are x's rows
    w = torch.zeros(V, 16, dtype=torch.float64, device=DEVICE)
    w[:, :4] = x.double().T
    hid, w = hid.float(), w.float()
    loss = apa_fast.losses.apa_token_loss(lr - 1.0, torch.zeros_like(lr), torch.ones_like(y, dtype=torch.bool), lam=1.0)
    got = {"logp": apa_fast.token_logprobs(x, y, backend=backend), "logp with entropy": lp,
           "linear logp": apa_fast.linear_token_logprobs(hid, w, y, backend=backend),
           "linear logp with entropy": apa_fast.linear_token_logprobs(hid, w, y, return_entropy=True, backend=backend)[0]}
    if backend == "torch":  # the fused loss paths (reference composes the above)
        got["linear loss scores"] = apa_fast.linear_token_loss(hid, w, y, loss, backend=backend, return_scores=True)[1]
    for name, v in got.items():
        assert v.max().item() <= 0.0 and max_err(v, lr) <= FP32_ATOL, f"{name}: error {max_err(v, lr):.2e}"
    assert max_err(h, hr) <= FP32_ATOL
    # L = mean((logp - (lr - 1))^2) = mean((1 + err)^2): its error is about twice the log-probs'
    assert abs(apa_fast.token_loss(x, y, loss, backend=backend).item() - 1.0) <= 2 * FP32_ATOL + 1e-6


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


# ---- final logit soft-capping (Gemma 2): u = c tanh(z / c) / tau, straight from logits ---------------


@pytest.fixture
def small_vocab_blocks(monkeypatch):
    """Many vocab blocks with a ragged tail in the Triton row kernels, and many row chunks in the torch backend."""
    import apa_fast._torch_logprobs as T

    monkeypatch.setattr(T, "CHUNK_ELEMS", 600)
    monkeypatch.setattr(T, "DIRECT_CHUNK_ELEMS", 600)
    if HAS_TRITON:
        import kernels.interpreter
        import kernels.logprobs

        monkeypatch.setattr(kernels.logprobs, "MAX_BLOCK_V", 64)
        monkeypatch.setattr(kernels.interpreter, "LOGITS_MAX_BLOCK_V", 64)


def _capped_ce(x, y, cap, tau):
    """-cross_entropy of the soft-capped logits in float64: an oracle independent of apa_fast."""
    z = cap * torch.tanh(x.double() / cap) / tau
    return -F.cross_entropy(z.flatten(0, -2), y.flatten(), reduction="none", ignore_index=-100).view(y.shape)


@pytest.mark.parametrize("tau,cap,scale", [(1.0, 2.0, 3.0), (0.7, 0.5, 3.0), (0.25, 30.0, 40.0)])
def test_softcap_torch_float64_is_exact(tau, cap, scale, small_vocab_blocks):
    """float64 through the chunked torch backend against the reference at 1e-12: log-probs, entropy, their
    gradient, the fused APA loss and its gradient (two upstream gradients). (0.25, 30, 40): |u| up to 120, so
    some p_y underflow and log p_y is recomputed from the capped logits."""
    x = logits((3, 4, 300), torch.float64, scale=scale)
    y = labels((3, 4), 300)
    y[1, 2] = -100
    g, ge = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    fn = lambda z: apa_fast.token_logprobs(z, y, temperature=tau, return_entropy=True, backend="torch", softcap=cap)  # noqa: E731
    (lp, h), gx = _grads(fn, x, g, ge)
    (lr, hr), gr = _grads(lambda z: reference.token_logprobs(z, y, tau, -100, True, softcap=cap), x, g, ge)
    for a, b in ((lp, lr), (h, hr), (gx, gr)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lp, torch.where(y != -100, _capped_ce(x, y, cap, tau), 0.0), atol=1e-12, rtol=0)
    assert (lr - reference.token_logprobs(x, y, tau)).abs().max() > 0.1  # the cap matters here
    if scale > 10:
        assert lr.min() < -70  # p_y < 1e-30 somewhere: the recompute path ran

    ref, adv, m = apa_targets((3, 4), seed=7)
    yv = torch.where(m, y.clamp(min=0), -7)  # labels at masked positions are unused
    for up in (1.0, -0.3):
        def run(f):
            z = x.clone().requires_grad_()
            loss = f(z)
            (loss * up).backward()
            return loss.detach(), z.grad

        la, ga = run(lambda z: apa_fast.apa_loss(z, yv, ref, adv, m, lam=0.5, temperature=tau, backend="torch", softcap=cap))
        lb, gb = run(lambda z: reference.apa_loss(z, yv, ref, adv, m, 0.5, tau, softcap=cap))
        torch.testing.assert_close(la, lb, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(ga, gb, atol=1e-12, rtol=1e-12)


def test_softcap_gradcheck_torch_backend():
    x = logits((2, 3, 11), torch.float64).requires_grad_()
    y = labels((2, 3), 11)
    y[0, 1] = -100

    ref, adv, m = apa_targets((2, 3), seed=4)
    for fn in (
        lambda z: apa_fast.token_logprobs(z, y, temperature=0.8, return_entropy=True, backend="torch", softcap=1.5),
        lambda z: apa_fast.apa_loss(z, y.clamp(min=0), ref, adv, m, lam=0.5, temperature=0.9, backend="torch", softcap=2.0),
    ):
        assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tau,cap", [(1.0, 2.0), (0.7, 0.5)])
def test_softcap_fp32_matches_reference(backend, tau, cap, small_vocab_blocks):
    """fp32 logits (V = 300: five vocab blocks of 64 under the interpreter) against the float64 reference, with
    ignored rows. Tolerances as without a cap (test_fp32_matches_reference, test_apa_loss): the cap only
    shrinks the logits, so fp32 rounding does not grow."""

    x = logits((3, 5, 300))
    y = labels((3, 5), 300)
    y[0, 1] = y[2, 4] = -100
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(3, 5, dtype=torch.float64, generator=gen).to(DEVICE)
    ge = torch.randn(3, 5, dtype=torch.float64, generator=gen).to(DEVICE)
    (lp, h), gx = _grads(lambda z: apa_fast.token_logprobs(z, y, temperature=tau, return_entropy=True, backend=backend,
                                                          softcap=cap), x, g.float(), ge.float())
    (lr, hr), gr = _grads(lambda z: reference.token_logprobs(z, y, tau, -100, True, softcap=cap), x.double(), g, ge)
    assert lp.dtype == torch.float32 and gx.dtype == torch.float32
    assert (lr - reference.token_logprobs(x.double(), y, tau)).abs().max() > 0.1  # the cap matters here
    torch.testing.assert_close(lp.double(), lr, atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(h.double(), hr, atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(gx.double(), gr, atol=1e-5, rtol=0)  # O(|g|) differences of fp32 probabilities
    assert lp[0, 1] == 0 and h[0, 1] == 0 and gx[0, 1].abs().max() == 0
    ref, adv, m = apa_targets((3, 5), seed=7)
    for up in (1.0, 0.25):
        z = x.clone().requires_grad_()
        loss = apa_fast.apa_loss(z, y.clamp(min=0), ref.float(), adv.float(), m, lam=0.5, temperature=tau,
                                 backend=backend, softcap=cap)
        (loss * up).backward()
        zr = x.double().requires_grad_()
        lref = reference.apa_loss(zr, y.clamp(min=0), ref, adv, m, 0.5, tau, softcap=cap)
        (lref * up).backward()
        # a mean of squared O(1/lam) residuals: relative fp32 accuracy (as test_apa_loss.test_fp32_matches_reference)
        torch.testing.assert_close(loss.double(), lref.detach(), rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(z.grad.double(), zr.grad, atol=2e-5 * 2, rtol=1e-5)
        assert torch.all(z.grad[~m] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_bf16_no_worse_than_eager(backend, small_vocab_blocks):
    """bf16 logits with a cap: eager is c tanh(z / c) and log_softmax in bf16. Margins as without a cap
    (test_low_precision_no_worse_than_eager): 1e-5 for the fp32 log-probs, one bf16 rounding of the largest
    gradient entry (the gradient is formed in fp32 and rounded once)."""
    dtype, cap = torch.bfloat16, 4.0
    x = logits((3, 5, 777), dtype, scale=6.0)
    y = labels((3, 5), 777)
    g = torch.randn(3, 5, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    lp, gx = _grads(lambda z: apa_fast.token_logprobs(z, y, backend=backend, softcap=cap), x, g)
    exact, gexact = _grads(lambda z: reference.token_logprobs(z, y, softcap=cap), x.double(), g.double())
    eager, geager = _grads(lambda z: torch.log_softmax(cap * torch.tanh(z / cap), -1).gather(-1, y[..., None]).squeeze(-1),
                           x, g.to(dtype))
    assert lp.dtype == torch.float32 and gx.dtype == dtype
    assert_no_worse_than_eager(f"logp {dtype}", lp, eager, exact, margin=1e-5)
    assert_no_worse_than_eager(f"grad {dtype}", gx, geager, gexact, margin=rounding_margin(gexact, dtype))


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_softcap_must_be_positive(bad):

    x, y = logits((2, 3, 7)), labels((2, 3), 7)
    ref, adv, m = apa_targets((2, 3), seed=1)
    for call in (
        lambda: apa_fast.token_logprobs(x, y, softcap=bad),
        lambda: apa_fast.token_logprobs(x, y, softcap=bad, backend="reference"),
        lambda: apa_fast.apa_loss(x, y, ref, adv, m, softcap=bad),
        lambda: apa_fast.apa_loss(x, y, ref, adv, m, softcap=bad, backend="reference"),
    ):
        with pytest.raises(ValueError, match="softcap must be a finite number > 0"):
            call()
