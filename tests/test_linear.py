"""linear_token_logprobs / linear_apa_loss: every backend against the float64 reference.

The reference builds the logits ``hidden @ weight.T + bias`` in float64 and runs the logits oracle;
``-F.linear_cross_entropy(..., reduction="none")`` is the independent oracle. Triton runs under the
interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1), so interpreted shapes stay small.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from parity import BACKENDS, DEVICE, FP32_ATOL, LOWP, apa_targets, assert_no_worse_than_eager, max_err, rounding_margin

import apa_fast
import apa_fast._torch_linear as torch_linear
from apa_fast import reference


def _make(lead, H, V, bias=True, seed=0, ignore_frac=0.2):
    """float64 hidden/weight/bias with logits of std ~3 (peaked enough for p_y near 1 to occur)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn((*lead, H), generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * (3.0 / H**0.5)
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    y = torch.randint(0, V, lead, generator=g)
    if ignore_frac and y.numel() > 1:
        drop = torch.rand(lead, generator=g) < ignore_frac
        drop.view(-1)[0] = True  # at least one ignored row
        y = torch.where(drop, torch.full_like(y, -100), y)
    to = lambda x: None if x is None else x.to(DEVICE)  # noqa: E731
    return to(h), to(w), to(b), to(y)


def _leaf(x, dtype):
    return None if x is None else x.detach().to(dtype).clone().requires_grad_()


def _run_token(fn, h, w, b, dtype, g, ge):
    """Outputs and (grad_h, grad_W, grad_b) of sum(g * logp + ge * H)."""
    hh, ww, bb = _leaf(h, dtype), _leaf(w, dtype), _leaf(b, dtype)
    lp, ent = fn(hh, ww, bb)
    ((lp * g.to(lp.dtype)).sum() + (ent * ge.to(ent.dtype)).sum()).backward()
    return lp.detach(), ent.detach(), (hh.grad, ww.grad, None if bb is None else bb.grad)


def _close(name, got, want, atol):
    assert got is not None and want is not None, name
    err = max_err(got, want) if got.numel() else 0.0
    assert err <= atol, f"{name}: max error {err:.3e} > {atol:.1e}"


def _close_grads(grads, refs, rtol: float, dtype=None, prefix: str = "") -> None:
    """grad_h, grad_W, grad_b each within ``rtol`` x max(1, max |ref|): sums of O(1) terms over up to N rows
    (grad_W, grad_b) or V columns (grad_h); a None reference (no bias) wants a None gradient."""
    for name, a, r in zip(("grad_h", "grad_W", "grad_b"), grads, refs):
        if r is None:
            assert a is None, name
            continue
        assert dtype is None or a.dtype == dtype, name
        _close(prefix + name, a, r, rtol * max(1.0, r.abs().max().item()))


# (lead, H, V): odd H and V, V = 1, a 3-D lead.
SHAPES = [((4, 7), 32, 257), ((2, 3, 5), 19, 33), ((6,), 17, 1)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead,H,V", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_token_logprobs_fp32_matches_reference(backend, lead, H, V, bias, tau):
    h, w, b, y = _make(lead, H, V, bias)
    gen = torch.Generator().manual_seed(5)
    g = torch.randn(lead, generator=gen, dtype=torch.float64).to(DEVICE)
    ge = torch.randn(lead, generator=gen, dtype=torch.float64).to(DEVICE)
    ours = _run_token(
        lambda a, c, d: apa_fast.linear_token_logprobs(a, c, y, bias=d, temperature=tau, return_entropy=True, backend=backend),
        h, w, b, torch.float32, g, ge,
    )
    ref = _run_token(lambda a, c, d: reference.linear_token_logprobs(a, c, y, d, tau, -100, True), h, w, b, torch.float64, g, ge)
    lp, ent, grads = ours
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32 and lp.shape == lead
    # fp32 logits from an H-term dot product, then an fp32 log-sum-exp: see parity.FP32_ATOL
    _close("logp", lp, ref[0], FP32_ATOL)
    _close("entropy", ent, ref[1], FP32_ATOL)
    _close_grads(grads, ref[2], 2e-5, torch.float32)
    ignored = (y == -100).reshape(-1)
    assert torch.all(lp.reshape(-1)[ignored] == 0) and torch.all(ent.reshape(-1)[ignored] == 0)
    assert torch.all(grads[0].reshape(-1, H)[ignored] == 0)


def _run_apa(fn, h, w, b, dtype, scale):
    hh, ww, bb = _leaf(h, dtype), _leaf(w, dtype), _leaf(b, dtype)
    loss = fn(hh, ww, bb)
    (loss * scale).backward()
    return loss.detach(), (hh.grad, ww.grad, None if bb is None else bb.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead,H,V", SHAPES[:2])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("tau,lam", [(1.0, 0.1), (0.8, 1.0)])
@pytest.mark.parametrize("scale", [1.0, 0.25])  # loss.backward() and a non-unit upstream gradient
def test_apa_loss_fp32_matches_reference(backend, lead, H, V, bias, tau, lam, scale):
    h, w, b, y = _make(lead, H, V, bias, ignore_frac=0)
    ref, adv, m = apa_targets(lead, seed=7)
    y = torch.where(m, y, -7)  # labels at masked positions are unused, even out of range
    loss, grads = _run_apa(
        lambda a, c, d: apa_fast.linear_apa_loss(a, c, y, ref.float(), adv.float(), m, bias=d, lam=lam, temperature=tau, backend=backend),
        h, w, b, torch.float32, scale,
    )
    lr, gr = _run_apa(lambda a, c, d: reference.linear_apa_loss(a, c, y, ref, adv, m, d, lam, tau), h, w, b, torch.float64, scale)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    # a mean of squared O(1/lam) residuals: relative fp32 accuracy
    torch.testing.assert_close(loss.double(), lr, rtol=2e-5, atol=1e-6)
    for name, a, r in zip(("grad_h", "grad_W", "grad_b"), grads, gr):
        if r is None:
            assert a is None
            continue
        assert a.dtype == torch.float32
        _close(name, a, r, 2e-5 * max(1.0, r.abs().max().item()))
    assert torch.all(grads[0][~m] == 0)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("tau,cap", [(1.0, None), (0.7, 2.0)])
def test_loss_with_scores_is_one_pass_of_loss_and_logprobs(backend, tau, cap, request):
    """``return_scores``: the same loss and gradients as without, plus the log-probs and entropies of
    ``linear_token_logprobs`` (0 where masked). On-policy GRPO (``old_logprobs`` None: the pass's own log-probs)
    equals GRPO with those log-probs passed in, in value and gradient: the ratio is 1, its gradient dlogp."""
    if backend == "torch":  # several chunks of rows, each with its own scores
        request.getfixturevalue("small_chunks")
    lead, H, V = (4, 7), 32, 257
    h, w, b, y = _make(lead, H, V, True, ignore_frac=0)
    ref_lp, adv, m = apa_targets(lead, seed=7)
    y = torch.where(m, y, -7)
    h, w, b = (x.float() for x in (h, w, b))
    kw = dict(bias=b, temperature=tau, backend=backend, softcap=cap)
    lp_want, ent_want = apa_fast.linear_token_logprobs(h, w, torch.where(m, y, -100), return_entropy=True, **kw)

    def run(loss, scores):
        hh, ww = _leaf(h, torch.float32), _leaf(w, torch.float32)
        out = apa_fast.linear_token_loss(hh, ww, y, loss, return_scores=scores, **{**kw, "bias": b})
        (out[0] if scores else out).backward()
        return out, (hh.grad, ww.grad)

    base = apa_fast.losses.apa_token_loss(ref_lp.float(), adv.float(), m, lam=0.5)
    (value, lp, ent), grads = run(base, True)
    value0, grads0 = run(base, False)
    assert not lp.requires_grad and not ent.requires_grad and lp.shape == lead
    torch.testing.assert_close(value, value0, atol=0, rtol=1e-6)
    for a, r in zip(grads, grads0):
        torch.testing.assert_close(a, r, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lp, lp_want, atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(ent, ent_want, atol=FP32_ATOL, rtol=0)
    assert torch.all(lp[~m] == 0) and torch.all(ent[~m] == 0)
    on = apa_fast.losses.grpo_token_loss(None, ref_lp.float(), adv.float(), m, clip=0.2, beta=0.1)
    off = apa_fast.losses.grpo_token_loss(lp, ref_lp.float(), adv.float(), m, clip=0.2, beta=0.1)
    (v_on, lp_on, _), g_on = run(on, True)
    v_off, g_off = run(off, False)
    torch.testing.assert_close(lp_on, lp, atol=0, rtol=0)
    torch.testing.assert_close(v_on, v_off, atol=1e-6, rtol=1e-5)
    for a, r in zip(g_on, g_off):
        torch.testing.assert_close(a, r, atol=1e-6, rtol=1e-5)


@pytest.fixture
def small_chunks(monkeypatch):
    """Force many token chunks in the torch backend (a few rows each)."""
    monkeypatch.setattr(torch_linear, "ROW_MIN", 3)
    monkeypatch.setattr(torch_linear, "MAX_CHUNK_BYTES", 1)


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("tau", [1.0, 1.7])
def test_torch_backend_float64_is_exact(chunked, tau, request):
    """In float64 the chunked backend and the oracle agree to rounding: any formula slip shows."""
    if chunked:
        request.getfixturevalue("small_chunks")
    h, w, b, y = _make((5, 9), 23, 301)
    g = torch.randn(5, 9, dtype=torch.float64).to(DEVICE)
    ge = torch.randn(5, 9, dtype=torch.float64).to(DEVICE)
    ours = _run_token(
        lambda a, c, d: apa_fast.linear_token_logprobs(a, c, y, bias=d, temperature=tau, return_entropy=True, backend="torch"),
        h, w, b, torch.float64, g, ge,
    )
    ref = _run_token(lambda a, c, d: reference.linear_token_logprobs(a, c, y, d, tau, -100, True), h, w, b, torch.float64, g, ge)
    for a, r in zip((ours[0], ours[1], *ours[2]), (ref[0], ref[1], *ref[2])):
        torch.testing.assert_close(a, r, atol=1e-11, rtol=1e-11)
    rl, adv, m = apa_targets((5, 9), seed=7)
    yv = torch.where(m, y.clamp(min=0), 0)
    for scale in (1.0, -0.3):
        la, ga = _run_apa(lambda a, c, d: apa_fast.linear_apa_loss(a, c, yv, rl, adv, m, bias=d, lam=0.5, temperature=tau, backend="torch"), h, w, b, torch.float64, scale)
        lb, gb = _run_apa(lambda a, c, d: reference.linear_apa_loss(a, c, yv, rl, adv, m, d, 0.5, tau), h, w, b, torch.float64, scale)
        torch.testing.assert_close(la, lb, atol=1e-11, rtol=1e-11)
        for a, r in zip(ga, gb):
            torch.testing.assert_close(a, r, atol=1e-11, rtol=1e-11)


def test_gradcheck_torch_backend(small_chunks):
    h, w, b, y = _make((2, 3), 5, 7)
    rl, adv, m = apa_targets((2, 3), seed=7)
    yv = torch.where(m, y.clamp(min=0), 0)
    args = tuple(x.detach().clone().requires_grad_() for x in (h, w, b))
    assert torch.autograd.gradcheck(
        lambda a, c, d: apa_fast.linear_token_logprobs(a, c, y, bias=d, temperature=0.8, return_entropy=True, backend="torch"),
        args, eps=1e-6, atol=1e-7,
    )
    assert torch.autograd.gradcheck(
        lambda a, c, d: apa_fast.linear_apa_loss(a, c, yv, rl, adv, m, bias=d, lam=0.5, temperature=0.9, backend="torch"),
        args, eps=1e-6, atol=1e-7,
    )


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("bias", [False, True])
def test_independent_oracle_linear_cross_entropy(backend, bias):
    h, w, b, y = _make((12,), 24, 301, bias)
    h, w, b = h.float(), w.float(), None if b is None else b.float()
    lp = apa_fast.linear_token_logprobs(h, w, y, bias=b, backend=backend)
    ce = -F.linear_cross_entropy(h.double(), w.double(), y, linear_bias=None if b is None else b.double(), reduction="none")
    torch.testing.assert_close(lp.double(), ce, atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOWP)
def test_low_precision_no_worse_than_eager(backend, dtype):
    """|ours - exact| <= |eager - exact| + margin, eager being F.linear + log_softmax in ``dtype``."""
    lead, H, V = (3, 6), 48, 389
    h, w, b, y = _make(lead, H, V, True)
    gen = torch.Generator().manual_seed(2)
    g = torch.randn(lead, generator=gen, dtype=torch.float64).to(DEVICE)
    ge = torch.zeros(lead, dtype=torch.float64, device=DEVICE)

    def eager(a, c, d):
        logsm = torch.log_softmax(F.linear(a, c, d), -1)
        valid = y != -100
        lp = torch.where(valid, logsm.gather(-1, torch.where(valid, y, 0)[..., None]).squeeze(-1), 0.0)
        return lp, lp * 0

    lp, _, gs = _run_token(lambda a, c, d: apa_fast.linear_token_logprobs(a, c, y, bias=d, return_entropy=True, backend=backend), h, w, b, dtype, g, ge)
    le, _, ges = _run_token(eager, h, w, b, dtype, g, ge)
    lx, _, gxs = _run_token(lambda a, c, d: reference.linear_token_logprobs(a, c, y, d, 1.0, -100, True), h, w, b, torch.float64, g, ge)
    assert lp.dtype == torch.float32 and all(x.dtype == dtype for x in gs)
    # log-probs come out in fp32: beyond eager's error only fp32 rounding at |logp| <~ 20 remains
    assert_no_worse_than_eager(f"logp {dtype}", lp, le, lx, margin=1e-5)
    # gradients are stored in dtype: allow one rounding of the largest entry beyond eager's max error
    # (eager's max error may sit on a small entry while ours sits on the largest)
    for name, a, e, x in zip(("grad_h", "grad_W", "grad_b"), gs, ges, gxs):
        assert_no_worse_than_eager(f"{name} {dtype}", a, e, x, margin=rounding_margin(x, dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_empty_mask_and_empty_input(backend):
    h, w, b, _ = _make((4,), 16, 37)
    hh, ww, bb = _leaf(h, torch.float32), _leaf(w, torch.float32), _leaf(b, torch.float32)
    y = torch.full((4,), -100, device=DEVICE)
    lp, ent = apa_fast.linear_token_logprobs(hh, ww, y, bias=bb, return_entropy=True, backend=backend)
    assert torch.equal(lp, torch.zeros(4, device=DEVICE)) and torch.equal(ent, torch.zeros(4, device=DEVICE))
    (lp.sum() + ent.sum()).backward()
    assert hh.grad.abs().max() == 0 and ww.grad.abs().max() == 0 and bb.grad.abs().max() == 0
    for x in (hh, ww, bb):
        x.grad = None
    zero = torch.zeros(4, device=DEVICE)
    loss = apa_fast.linear_apa_loss(hh, ww, y, zero, zero, torch.zeros(4, dtype=torch.bool, device=DEVICE), bias=bb, backend=backend)
    assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()
    assert hh.grad.abs().max() == 0 and ww.grad.abs().max() == 0 and bb.grad.abs().max() == 0
    e = torch.zeros(0, 16, device=DEVICE, requires_grad=True)
    out = apa_fast.linear_token_logprobs(e, ww, torch.zeros(0, dtype=torch.long, device=DEVICE), backend=backend)
    assert out.shape == (0,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_head_no_grad_and_strided_hidden(backend):
    """A frozen LM head (only grad_h), a no_grad forward (reference log-probs) and a transposed hidden."""
    h, w, b, y = _make((3, 5), 16, 70, ignore_frac=0)
    base = h.float().transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous (3, 5, 16) view
    assert not base.is_contiguous()
    hh = base.detach().requires_grad_()
    lp = apa_fast.linear_token_logprobs(hh, w.float(), y, bias=b.float(), backend=backend)
    lp.sum().backward()
    hr = h.detach().clone().requires_grad_()
    reference.linear_token_logprobs(hr, w, y, b).sum().backward()
    _close("logp", lp, reference.linear_token_logprobs(h, w, y, b), FP32_ATOL)
    _close("grad_h", hh.grad, hr.grad, 2e-5 * max(1.0, hr.grad.abs().max().item()))
    with torch.no_grad():
        lp2 = apa_fast.linear_token_logprobs(h.float(), w.float(), y, bias=b.float(), backend=backend)
    torch.testing.assert_close(lp2, lp.detach(), atol=1e-6, rtol=0)


def test_grad_weight_accumulates_in_fp32(monkeypatch):
    """Many token chunks in bf16: grad_W is summed in fp32 and rounded once, so its error stays at
    about one bf16 rounding of its entries instead of growing with the number of chunks."""
    monkeypatch.setattr(torch_linear, "ROW_MIN", 4)
    monkeypatch.setattr(torch_linear, "MAX_CHUNK_BYTES", 1)
    h, w, b, y = _make((256,), 16, 40, ignore_frac=0, seed=3)
    g = torch.ones(256, dtype=torch.float64)
    ours = _run_token(lambda a, c, d: apa_fast.linear_token_logprobs(a, c, y, bias=d, return_entropy=True, backend="torch"),
                      h, w, b, torch.bfloat16, g, g * 0)
    # the exact gradient of the same bf16-rounded inputs
    hb, wb, bb = (x.to(torch.bfloat16).double() for x in (h, w, b))
    ref = _run_token(lambda a, c, d: reference.linear_token_logprobs(a, c, y, d, 1.0, -100, True), hb, wb, bb, torch.float64, g, g * 0)
    gw, gw_ref = ours[2][1].double(), ref[2][1]
    # per entry: one bf16 rounding of the result plus the bf16 rounding of the logits feeding p
    # (eager does the same), but no 64-fold accumulation of bf16 partial sums
    rel = ((gw - gw_ref).abs() / gw_ref.abs().clamp(min=1e-3 * gw_ref.abs().max())).median().item()
    assert rel < 2e-2, rel


V_ERR = 11  # the hidden-dim and bias-shape cases are in test_errors.py, with their full messages


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: apa_fast.linear_token_logprobs(torch.zeros(3, 4), torch.zeros(V_ERR, 4, 1), torch.zeros(3, dtype=torch.long)), ValueError, "weight must have shape"),
        (lambda: apa_fast.linear_token_logprobs(torch.zeros(3, 4), torch.zeros(V_ERR, 4, dtype=torch.float64), torch.zeros(3, dtype=torch.long)), TypeError, "weight dtype"),
        (lambda: apa_fast.linear_token_logprobs(torch.zeros(3, 4), torch.zeros(V_ERR, 4), torch.zeros(3, dtype=torch.long), bias=torch.zeros(V_ERR, dtype=torch.float64)), TypeError, "bias dtype"),
        (lambda: apa_fast.linear_token_logprobs(torch.zeros(3, 4), torch.zeros(V_ERR, 4), torch.zeros(3)), TypeError, "labels must be an integer"),
        (lambda: apa_fast.linear_token_logprobs(torch.zeros(3, 4), torch.zeros(V_ERR, 4), torch.zeros(4, dtype=torch.long)), ValueError, "labels must have shape"),
        (lambda: apa_fast.linear_token_logprobs(torch.zeros(3, 4), torch.zeros(V_ERR, 4), torch.tensor([0, V_ERR, 1])), ValueError, "labels must lie in"),
        (lambda: apa_fast.linear_token_logprobs(torch.zeros(3, 4), torch.zeros(V_ERR, 4), torch.tensor([0, -1, 1])), ValueError, "labels must lie in"),
        (lambda: apa_fast.linear_token_logprobs(torch.zeros(3, 4), torch.zeros(V_ERR, 4), torch.zeros(3, dtype=torch.long), temperature=0.0), ValueError, "temperature"),
        (lambda: apa_fast.linear_token_logprobs(torch.zeros(3, 4), torch.zeros(V_ERR, 4), torch.zeros(3, dtype=torch.long), backend="cuda"), ValueError, "backend must be one of"),
        (lambda: apa_fast.linear_apa_loss(torch.zeros(3, 4), torch.zeros(V_ERR, 4), torch.tensor([0, V_ERR, 1]), torch.zeros(3), torch.zeros(3), torch.ones(3, dtype=torch.bool)), ValueError, "labels must lie in"),
        (lambda: apa_fast.linear_apa_loss(torch.zeros(3, 4), torch.zeros(V_ERR, 4), torch.zeros(3, dtype=torch.long), torch.zeros(2), torch.zeros(3), torch.ones(3)), ValueError, "ref_logprobs must have shape"),
        (lambda: apa_fast.linear_apa_loss(torch.zeros(3, 4), torch.zeros(V_ERR, 4), torch.zeros(3, dtype=torch.long), torch.zeros(3), torch.zeros(3), torch.full((3,), 2.0)), ValueError, "mask must be bool or contain only 0 and 1"),
        (lambda: apa_fast.linear_apa_loss(torch.zeros(3, 4), torch.zeros(V_ERR, 4), torch.zeros(3, dtype=torch.long), torch.zeros(3), torch.zeros(3), torch.ones(3), lam=-1.0), ValueError, "lam"),
    ],
)
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_large_vocab_triton_vs_torch(dtype):
    """A GPT-J-like head slice on the GPU: the Triton kernels against the chunked torch backend."""
    h, w, b, y = _make((256,), 256, 50_400, True, ignore_frac=0.1)
    g = torch.randn(256, dtype=torch.float64, device=DEVICE)
    outs = {}
    for bk in ("triton", "torch"):
        outs[bk] = _run_token(lambda a, c, d: apa_fast.linear_token_logprobs(a, c, y, bias=d, return_entropy=True, backend=bk),
                              h, w, b, dtype, g, g * 0.5)
    ref = _run_token(lambda a, c, d: reference.linear_token_logprobs(a, c, y, d, 1.0, -100, True), h, w, b, torch.float64, g, g * 0.5)
    for bk, (lp, ent, grads) in outs.items():
        tol = FP32_ATOL if dtype == torch.float32 else 0.1
        _close(f"{bk} logp", lp, ref[0], tol * 5)
        _close_grads(grads, ref[2], 2e-5 if dtype == torch.float32 else 2e-2, prefix=f"{bk} ")


@pytest.mark.parametrize("chunked", [False, True])
def test_frozen_head_float64_exact(chunked, request):
    """Only hidden wants a gradient: the torch backend's forward-computed dlogp/dh path, exactly."""
    if chunked:
        request.getfixturevalue("small_chunks")
    h, w, b, y = _make((4, 6), 13, 97)
    g = torch.randn(4, 6, dtype=torch.float64).to(DEVICE)
    hh, hr = h.clone().requires_grad_(), h.clone().requires_grad_()
    lp = apa_fast.linear_token_logprobs(hh, w, y, bias=b, temperature=0.9, backend="torch")
    (lp * g).sum().backward()
    lr = reference.linear_token_logprobs(hr, w, y, b, 0.9)
    (lr * g).sum().backward()
    torch.testing.assert_close(lp, lr, atol=1e-11, rtol=1e-11)
    torch.testing.assert_close(hh.grad, hr.grad, atol=1e-11, rtol=1e-11)


@pytest.mark.parametrize("splits", [1, 3])
def test_triton_vocab_blocks_and_splits(splits, monkeypatch):
    """Several vocab blocks per program and the vocabulary split across programs (merged online-lse
    partials in forward, per-split partial grad_h in backward), with a masked tail block."""
    pytest.importorskip("triton")
    import kernels.interpreter
    import kernels.linear as kl

    monkeypatch.setattr(kernels.interpreter, "LINEAR_MAX_BLOCK_V", 64)
    monkeypatch.setattr(kl, "FORCE_SPLITS", splits)
    h, w, b, y = _make((3, 7), 20, 257)
    g = torch.randn(3, 7, dtype=torch.float64).to(DEVICE)
    ge = torch.randn(3, 7, dtype=torch.float64).to(DEVICE)
    ours = _run_token(lambda a, c, d: apa_fast.linear_token_logprobs(a, c, y, bias=d, temperature=0.9, return_entropy=True, backend="triton"),
                      h, w, b, torch.float32, g, ge)
    ref = _run_token(lambda a, c, d: reference.linear_token_logprobs(a, c, y, d, 0.9, -100, True), h, w, b, torch.float64, g, ge)
    _close("logp", ours[0], ref[0], FP32_ATOL)
    _close("entropy", ours[1], ref[1], FP32_ATOL)
    _close_grads(ours[2], ref[2], 2e-5)


# ---- final logit soft-capping (Gemma 2): u = c tanh(z / c) / tau, inside the fused op ----------------


def _capped_oracle(h, w, b, y, c, tau):
    """-cross_entropy of the soft-capped logits, built in float64 (an oracle independent of apa_fast)."""
    z = F.linear(h, w, b)
    return -F.cross_entropy((c * torch.tanh(z / c) / tau).flatten(0, -2), y.flatten(), reduction="none",
                            ignore_index=-100).view(y.shape)


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("tau,cap", [(1.0, 2.0), (0.7, 0.5)])
def test_softcap_torch_backend_float64_is_exact(chunked, tau, cap, request):
    """Soft-capped log-probs, entropy, their gradients, a fused loss and the frozen-head path, all at 1e-11
    against the float64 reference (logits of std ~3 against caps of 2 and 0.5: deep in tanh's curve)."""
    from apa_fast.losses import apa_token_loss

    if chunked:
        request.getfixturevalue("small_chunks")
    h, w, b, y = _make((5, 9), 23, 301)
    g = torch.randn(5, 9, dtype=torch.float64).to(DEVICE)
    ge = torch.randn(5, 9, dtype=torch.float64).to(DEVICE)
    ours = _run_token(lambda a, c, d: apa_fast.linear_token_logprobs(a, c, y, bias=d, temperature=tau, return_entropy=True,
                                                                     backend="torch", softcap=cap), h, w, b, torch.float64, g, ge)
    ref = _run_token(lambda a, c, d: reference.linear_token_logprobs(a, c, y, d, tau, -100, True, softcap=cap),
                     h, w, b, torch.float64, g, ge)
    for a, r in zip((ours[0], ours[1], *ours[2]), (ref[0], ref[1], *ref[2])):
        torch.testing.assert_close(a, r, atol=1e-11, rtol=1e-11)
    torch.testing.assert_close(ours[0], torch.where(y != -100, _capped_oracle(h, w, b, y, cap, tau), 0.0),
                               atol=1e-11, rtol=0)
    assert (ours[0] - reference.linear_token_logprobs(h, w, y, b, tau)).abs().max() > 0.1  # the cap matters here
    rl, adv, m = apa_targets((5, 9), seed=7)
    yv = torch.where(m, y.clamp(min=0), 0)
    for scale in (1.0, -0.3):
        def loss_of(fn):
            return _run_apa(lambda a, c, d: fn(a, c, d)(apa_token_loss(rl, adv, m, lam=0.5)), h, w, b, torch.float64, scale)

        la, ga = loss_of(lambda a, c, d: lambda L: apa_fast.linear_token_loss(a, c, yv, L, bias=d, temperature=tau,
                                                                              backend="torch", softcap=cap))
        lb, gb = loss_of(lambda a, c, d: lambda L: L(reference.linear_token_logprobs(a, c, torch.where(m, yv, -100), d, tau,
                                                                                    softcap=cap)))
        torch.testing.assert_close(la, lb, atol=1e-11, rtol=1e-11)
        for a, r in zip(ga, gb):
            torch.testing.assert_close(a, r, atol=1e-11, rtol=1e-11)
    hh, hr = h.clone().requires_grad_(), h.clone().requires_grad_()  # frozen head: dlogp/dh formed in forward
    (apa_fast.linear_token_logprobs(hh, w, y, bias=b, temperature=tau, backend="torch", softcap=cap) * g).sum().backward()
    (reference.linear_token_logprobs(hr, w, y, b, tau, softcap=cap) * g).sum().backward()
    torch.testing.assert_close(hh.grad, hr.grad, atol=1e-11, rtol=1e-11)


def test_softcap_gradcheck_and_fp32(small_chunks):
    h, w, b, y = _make((2, 3), 5, 7)
    args = tuple(x.detach().clone().requires_grad_() for x in (h, w, b))
    assert torch.autograd.gradcheck(
        lambda a, c, d: apa_fast.linear_token_logprobs(a, c, y, bias=d, temperature=0.8, return_entropy=True,
                                                       backend="torch", softcap=1.5), args, eps=1e-6, atol=1e-7)
    # fp32 against the float64 reference: log-probs 2e-5 and gradients 1e-5 (relative to their size), as without a cap
    h, w, b, y = _make((4, 7), 32, 257)
    g, ge = torch.randn(4, 7, dtype=torch.float64), torch.randn(4, 7, dtype=torch.float64)
    ours = _run_token(lambda a, c, d: apa_fast.linear_token_logprobs(a, c, y, bias=d, temperature=0.7, return_entropy=True,
                                                                     backend="torch", softcap=2.0), h, w, b, torch.float32, g, ge)
    ref = _run_token(lambda a, c, d: reference.linear_token_logprobs(a, c, y, d, 0.7, -100, True, softcap=2.0),
                     h.float(), w.float(), None if b is None else b.float(), torch.float64, g, ge)
    _close("logp", ours[0], ref[0], FP32_ATOL)
    _close("entropy", ours[1], ref[1], FP32_ATOL)
    _close_grads(ours[2], ref[2], 1e-5)


def test_softcap_must_be_positive():
    h, w, b, y = _make((2, 3), 5, 7)
    for bad in (0.0, -1.0, float("inf")):
        for backend in ("torch", "reference"):
            with pytest.raises(ValueError, match="softcap must be a finite number > 0"):
                apa_fast.linear_token_logprobs(h, w, y, softcap=bad, backend=backend)
    rl, adv, m = apa_targets((2, 3), seed=7)
    with pytest.raises(ValueError, match="softcap must be a finite number > 0"):
        apa_fast.linear_apa_loss(h, w, y.clamp(min=0), rl, adv, m, softcap=-2.0)


@pytest.fixture
def triton_small_vocab_blocks(monkeypatch):
    """Vocab blocks of 64 columns under the interpreter: V = 257 spans five of them, the last ragged."""
    pytest.importorskip("triton")
    import kernels.interpreter

    monkeypatch.setattr(kernels.interpreter, "LINEAR_MAX_BLOCK_V", 64)


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("tau,cap,bias", [(1.0, 2.0, True), (0.7, 0.5, False)])
def test_softcap_triton_fp32_matches_reference(splits, tau, cap, bias, triton_small_vocab_blocks, monkeypatch):
    """Triton (interpreted) soft-capped log-probs, entropy, a fused loss and every gradient against the float64
    reference, over several vocab blocks (and vocab splits), with ignored rows. Tolerances as without a cap
    (test_token_logprobs_fp32_matches_reference): |tanh| <= 1 shrinks the logits, so fp32 rounding does not grow."""
    import kernels.linear as kl

    monkeypatch.setattr(kl, "FORCE_SPLITS", splits)
    h, w, b, y = _make((3, 7), 20, 257, bias)
    gen = torch.Generator().manual_seed(5)
    g = torch.randn(3, 7, generator=gen, dtype=torch.float64).to(DEVICE)
    ge = torch.randn(3, 7, generator=gen, dtype=torch.float64).to(DEVICE)
    lp, ent, grads = _run_token(lambda a, c, d: apa_fast.linear_token_logprobs(
        a, c, y, bias=d, temperature=tau, return_entropy=True, backend="triton", softcap=cap), h, w, b, torch.float32, g, ge)
    ref = _run_token(lambda a, c, d: reference.linear_token_logprobs(a, c, y, d, tau, -100, True, softcap=cap),
                     h, w, b, torch.float64, g, ge)
    assert (ref[0] - reference.linear_token_logprobs(h, w, y, b, tau)).abs().max() > 0.1  # the cap matters here
    _close("logp", lp, ref[0], FP32_ATOL)
    _close("entropy", ent, ref[1], FP32_ATOL)
    _close_grads(grads, ref[2], 2e-5)
    ignored = (y == -100).reshape(-1)
    assert ignored.any() and torch.all(lp.reshape(-1)[ignored] == 0) and torch.all(grads[0].reshape(-1, 20)[ignored] == 0)
    # the APA loss on the soft-capped log-probs (composed on the kernels), value and gradients
    rl, adv, m = apa_targets((3, 7), seed=7)
    yv = torch.where(m, y.clamp(min=0), -7)  # labels at masked positions are unused
    la, ga = _run_apa(lambda a, c, d: apa_fast.linear_apa_loss(a, c, yv, rl.float(), adv.float(), m, bias=d, lam=0.5,
                                                               temperature=tau, backend="triton", softcap=cap),
                      h, w, b, torch.float32, 0.25)
    lb, gb = _run_apa(lambda a, c, d: reference.linear_apa_loss(a, c, yv, rl, adv, m, d, 0.5, tau, softcap=cap),
                      h, w, b, torch.float64, 0.25)
    torch.testing.assert_close(la.double(), lb, rtol=2e-5, atol=1e-6)
    for name, a, r in zip(("grad_h", "grad_W", "grad_b"), ga, gb):
        if r is not None:
            _close(name, a, r, 2e-5 * max(1.0, r.abs().max().item()))
    assert torch.all(ga[0][~m] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_softcap_low_precision_no_worse_than_eager(backend, dtype, triton_small_vocab_blocks):
    """bf16 with a cap: |ours - exact| <= |eager - exact| + margin, eager being F.linear, c tanh(z / c) and
    log_softmax in bf16; margins as without a cap (test_low_precision_no_worse_than_eager): log-probs are fp32
    results (1e-5 at |logp| <~ 20), gradients are stored in bf16 (one rounding of the largest entry)."""
    lead, H, V, cap = (3, 6), 48, 389, 3.0
    h, w, b, y = _make(lead, H, V, True)
    gen = torch.Generator().manual_seed(2)
    g = torch.randn(lead, generator=gen, dtype=torch.float64).to(DEVICE)
    ge = torch.randn(lead, generator=gen, dtype=torch.float64).to(DEVICE)

    def eager(a, c, d):
        z = F.linear(a, c, d)
        logsm = torch.log_softmax(cap * torch.tanh(z / cap), -1)
        valid = y != -100
        lp = torch.where(valid, logsm.gather(-1, torch.where(valid, y, 0)[..., None]).squeeze(-1), 0.0)
        return lp, torch.where(valid, -(logsm.exp() * logsm).sum(-1), 0.0)

    lp, ent, gs = _run_token(lambda a, c, d: apa_fast.linear_token_logprobs(
        a, c, y, bias=d, return_entropy=True, backend=backend, softcap=cap), h, w, b, dtype, g, ge)
    le, ee, ges = _run_token(eager, h, w, b, dtype, g, ge)
    lx, ex, gxs = _run_token(lambda a, c, d: reference.linear_token_logprobs(a, c, y, d, 1.0, -100, True, softcap=cap),
                             h, w, b, torch.float64, g, ge)
    assert lp.dtype == torch.float32 and all(x.dtype == dtype for x in gs)
    assert_no_worse_than_eager(f"logp {dtype}", lp, le, lx, margin=1e-5)
    assert_no_worse_than_eager(f"entropy {dtype}", ent, ee, ex, margin=1e-5)
    for name, a, e, x in zip(("grad_h", "grad_W", "grad_b"), gs, ges, gxs):
        assert_no_worse_than_eager(f"{name} {dtype}", a, e, x, margin=rounding_margin(x, dtype))
