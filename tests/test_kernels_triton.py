"""What only the Triton kernels need: bounds safety, strides, block edges, rounding, the launchers.

The cross-backend parity tests (test_logprobs.py, test_apa_loss.py, test_gae.py) cover the public
API; here the launch helpers of ``kernels.logprobs`` and ``kernels.gae`` are called directly, with
inputs the public checks would reject, so the kernels' own guarantees are tested. Under
``TRITON_INTERPRET=1`` (set by conftest.py when there is no GPU) shapes stay small except two
deliberate large-vocab cases.
"""

from __future__ import annotations

import pytest
import torch
from parity import DEVICE, labels, logits, max_err

pytest.importorskip("triton")

import apa_fast  # noqa: E402
from apa_fast import reference  # noqa: E402
from kernels import gae as KG  # noqa: E402
from kernels import interpreter  # noqa: E402
from kernels import logprobs as K  # noqa: E402

IGN = -100


def _ref_fwd(x3, y, tau=1.0, ignore_index=IGN):
    """float64 oracle on the same (rounded) input values; flat outputs like the launchers."""
    lp, h = reference.token_logprobs(x3.double(), y.view(x3.shape[:2]), tau, ignore_index, True)
    return lp.reshape(-1), h.reshape(-1)


def _ref_grad(x3, y, g, ge, tau=1.0, ignore_index=IGN):
    x = x3.detach().double().requires_grad_()
    lp, h = reference.token_logprobs(x, y.view(x3.shape[:2]), tau, ignore_index, True)
    loss = (lp.reshape(-1) * g.double()).sum()
    if ge is not None:
        loss = loss + (h.reshape(-1) * ge.double()).sum()
    loss.backward()
    return x.grad


@pytest.fixture
def small_blocks(monkeypatch):
    """Force many vocab blocks with a ragged tail, whatever the device."""
    monkeypatch.setattr(K, "MAX_BLOCK_V", 64)
    monkeypatch.setattr(interpreter, "LOGITS_MAX_BLOCK_V", 64)


# ----------------------------------------------------------------------------------------------
# bounds safety


def test_bad_labels_never_read_out_of_bounds(small_blocks):
    """Labels outside [0, V) act like ignore_index and the kernels never load z[y] for them.

    The logits are a slice of a buffer whose every other element is NaN, and labels such as V and
    -1 would point exactly at the neighbouring NaN rows: one stray read gives NaN somewhere.
    Columns past V in the ragged last block (V=203, blocks of 64) would also read NaN neighbours.
    """
    B, T, V = 2, 4, 203
    buf = torch.full((B, T + 2, V), float("nan"), device=DEVICE)
    x3 = buf[:, 1 : T + 1]
    x3.copy_(logits((B, T, V)))
    before = buf.clone()
    y = labels((B * T,), V)
    bad = {0: V, 3: -1, 4: V + 7, 6: 2**40, 7: -(2**40)}  # row 0 / 3: first / last row of batch 0
    for i, v in bad.items():
        y[i] = v
    y_ign = y.clone()
    y_ign[list(bad)] = IGN

    lp, lse, ent = K.logprobs_fwd(x3, y, 0.9, IGN, True)
    lp_i, lse_i, ent_i = K.logprobs_fwd(x3, y_ign, 0.9, IGN, True)
    assert torch.isfinite(lse).all() and torch.isfinite(lp).all() and torch.isfinite(ent).all()
    assert torch.equal(lp, lp_i) and torch.equal(ent, ent_i) and torch.equal(lse, lse_i)
    assert (lp[list(bad)] == 0).all() and (ent[list(bad)] == 0).all()

    g, ge = logits((B * T,), scale=1.0, seed=5), logits((B * T,), scale=1.0, seed=6)
    grad = K.logprobs_bwd(x3, y, lse, ent, g, ge, 0.9, IGN)
    grad_i = K.logprobs_bwd(x3, y_ign, lse_i, ent_i, g, ge, 0.9, IGN)
    assert torch.isfinite(grad).all() and torch.equal(grad, grad_i)
    assert grad.view(B * T, V)[list(bad)].abs().max() == 0

    # the APA loss composed on these kernels, with the public label checks skipped: a bad label at a
    # valid position reads nothing and scores like an ignored one
    ref, adv = logits((B, T), scale=1.0, seed=7) - 5, logits((B, T), scale=1.0, seed=8)
    m = torch.ones(B, T, dtype=torch.bool, device=DEVICE)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("APA_FAST_SKIP_VALUE_CHECKS", "1")
        loss = apa_fast.apa_loss(x3, y.view(B, T), ref, adv, m, lam=0.1, temperature=0.9, backend="triton")
        loss_i = apa_fast.apa_loss(x3, y_ign.view(B, T), ref, adv, m, lam=0.1, temperature=0.9, backend="triton")
    assert torch.isfinite(loss) and torch.equal(loss, loss_i)
    # nothing was written into the logits buffer either (NaN-aware comparison)
    assert torch.equal(buf.isnan(), before.isnan()) and torch.equal(buf.nan_to_num(), before.nan_to_num())


def test_int64_row_offsets():
    """Row offsets past 2**31 elements: b * stride_b must not wrap in int32.

    A (3, 1, V) view with stride_b = 2**30 + V over a lazily allocated fp16 buffer (the OS commits
    only the pages that are touched): row 2 starts beyond element 2**31.
    """
    V = 1000
    S = (1 << 30) + V
    try:
        buf = torch.empty(2 * S + V, dtype=torch.float16, device=DEVICE)
    except (RuntimeError, MemoryError):
        pytest.skip("cannot reserve a 4 GiB buffer here")
    x3 = buf.as_strided((3, 1, V), (S, V, 1))
    vals = logits((3, 1, V), torch.float16)
    x3.copy_(vals)
    y = torch.tensor([1, 500, V - 1], device=DEVICE)
    lp, lse, ent = K.logprobs_fwd(x3, y, 1.0, IGN, True)
    lr, hr = _ref_fwd(vals, y)
    assert max_err(lp, lr) < 2e-5 and max_err(ent, hr) < 2e-5
    grad = K.logprobs_bwd(x3, y, lse, None, torch.ones(3, device=DEVICE), None, 1.0, IGN)
    gr = _ref_grad(vals, y, torch.ones(3), None)
    assert max_err(grad, gr) <= 2**-11  # fp16 output: half an ulp of values <= 1
    del buf


# ----------------------------------------------------------------------------------------------
# strides, block edges, vocab sizes


@pytest.mark.parametrize("layout", ["shifted", "time_major"])
def test_arbitrary_row_strides(layout, small_blocks):
    """A shifted slice logits[:, :-1] and a (T, B, V)-stored tensor seen as (B, T, V): no copy."""
    B, T, V = 3, 5, 131
    if layout == "shifted":
        x3 = logits((B, T + 1, V))[:, :-1]
    else:
        x3 = logits((T, B, V)).transpose(0, 1)
    assert not x3.is_contiguous() and x3.stride(-1) == 1
    y = labels((B * T,), V)
    y[4] = IGN
    g, ge = logits((B * T,), scale=1.0, seed=3), logits((B * T,), scale=1.0, seed=4)
    lp, lse, ent = K.logprobs_fwd(x3, y, 1.3, IGN, True)
    lr, hr = _ref_fwd(x3, y, 1.3)
    # fp32 vs float64 on the same values: a few fp32 ulps of |logp|, |H| <~ 15
    assert max_err(lp, lr) < 1e-5 and max_err(ent, hr) < 1e-5
    grad = K.logprobs_bwd(x3, y, lse, ent, g, ge, 1.3, IGN)
    assert grad.is_contiguous() and grad.shape == x3.shape
    # probabilities times O(1) upstream gradients, computed in fp32
    assert max_err(grad, _ref_grad(x3, y, g, ge, 1.3)) < 1e-5


@pytest.mark.parametrize("V", [1, 2, 17, 63, 64, 65, 1001])
def test_vocab_sizes_and_ragged_blocks(V, small_blocks):
    """V below, at and around the block size (64 here) and many blocks with a ragged tail."""
    x3 = logits((2, 3, V), seed=V)
    y = labels((6,), V, seed=V + 1)
    g, ge = logits((6,), scale=1.0, seed=2), logits((6,), scale=1.0, seed=3)
    lp, lse, ent = K.logprobs_fwd(x3, y, 0.7, IGN, True)
    lr, hr = _ref_fwd(x3, y, 0.7)
    assert max_err(lp, lr) < 1e-5 and max_err(ent, hr) < 1e-5  # fp32 accumulation, see above
    grad = K.logprobs_bwd(x3, y, lse, ent, g, ge, 0.7, IGN)
    assert max_err(grad, _ref_grad(x3, y, g, ge, 0.7)) < 1e-5
    if V == 1:  # one class: logp = 0, H = 0, onehot - p = 0, exactly
        assert lp.abs().max() == 0 and ent.abs().max() == 0 and grad.abs().max() == 0


def test_minus_inf_logits_in_first_block(small_blocks):
    """Top-k-style masked logits (-inf) filling whole early blocks must not poison the running max."""
    B, T, V = 1, 3, 300
    x3 = logits((B, T, V))
    x3[0, 0, :200] = float("-inf")  # blocks 0..2 all -inf, block 3 partly
    x3[0, 1, ::2] = float("-inf")
    y = torch.tensor([250, 1, 7], device=DEVICE)
    g, ge = logits((3,), scale=1.0, seed=2), logits((3,), scale=1.0, seed=3)
    lp, lse, ent = K.logprobs_fwd(x3, y, 1.0, IGN, True)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    lr, _ = _ref_fwd(x3, y)
    assert max_err(lp, lr) < 1e-5
    # entropy oracle over the finite columns only (the reference's p*log p is 0*-inf = NaN there)
    for r in range(3):
        zr = x3[0, r][torch.isfinite(x3[0, r])].double()
        ls = torch.log_softmax(zr, -1)
        assert abs(ent[r].item() + (ls.exp() * ls).sum().item()) < 1e-5
    grad = K.logprobs_bwd(x3, y, lse, ent, g, ge, 1.0, IGN)
    assert torch.isfinite(grad).all()
    assert grad[0, 0, :200].abs().max() == 0 and grad[0, 1, ::2].abs().max() == 0
    x = x3.double().requires_grad_()
    (reference.token_logprobs(x, y.view(1, 3)).reshape(-1) * g.double()).sum().backward()
    ge0 = K.logprobs_bwd(x3, y, lse, None, g, None, 1.0, IGN)
    assert max_err(ge0, x.grad) < 1e-5


def test_ignore_index_is_any_integer():
    """ignore_index may be a valid vocab id or -1: those rows give 0 and no gradient."""
    V = 50
    x3 = logits((1, 8, V))
    for ign in (5, -1):
        y = labels((8,), V)
        y[2] = ign
        y[5] = ign
        lp, lse, ent = K.logprobs_fwd(x3, y, 1.0, ign, True)
        lr, hr = _ref_fwd(x3, y, 1.0, ign)
        assert max_err(lp, lr) < 1e-5 and max_err(ent, hr) < 1e-5
        assert lp[2] == 0 and lp[5] == 0 and ent[2] == 0
        grad = K.logprobs_bwd(x3, y, lse, ent, torch.ones(8, device=DEVICE), torch.ones(8, device=DEVICE), 1.0, ign)
        assert grad[0, 2].abs().max() == 0 and grad[0, 5].abs().max() == 0
        assert grad[0, 0].abs().max() > 0


def test_float64_is_refused_with_a_pointer():
    x3 = torch.zeros(1, 2, 3, dtype=torch.float64, device=DEVICE)
    y = torch.zeros(2, dtype=torch.long, device=DEVICE)
    with pytest.raises(TypeError, match="backend='torch'"):
        K.logprobs_fwd(x3, y, 1.0, IGN, False)
    with pytest.raises(TypeError, match="float64"):
        t = torch.zeros(1, 2, dtype=torch.float64, device=DEVICE)
        apa_fast.apa_loss(x3, y.view(1, 2), t, t, t > -1, backend="triton")


# ----------------------------------------------------------------------------------------------
# low precision: the no-worse-than-eager rule and rounding once


def _eager(x3, y, tau, g, ge):
    """Eager PyTorch as RLHF code writes it, entirely in the input dtype."""
    x = x3.detach().clone().requires_grad_()
    ls = torch.log_softmax(x / tau, -1)
    lp = ls.gather(-1, y.clamp(min=0).view(*x.shape[:2], 1)).squeeze(-1).reshape(-1)
    h = -(ls.exp() * ls).sum(-1).reshape(-1)
    ((lp * g.to(x.dtype)).sum() + (h * ge.to(x.dtype)).sum()).backward()
    return lp, h, x.grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [3.0, 20.0])
def test_low_precision_no_worse_than_eager(dtype, scale, small_blocks):
    """Backend error vs float64 <= eager's error in the same dtype + margin (Cut Cross-Entropy rule).

    scale 20 makes p_y close to 1 on many rows: the cancellation that broke bf16 gradients in Liger.
    """
    B, T, V = 2, 6, 777
    x3 = logits((B, T, V), dtype, scale=scale, seed=11)
    y = x3.float().argmax(-1).reshape(-1)  # the likely token, as sampled text mostly is
    y[1::3] = labels((B * T,), V)[1::3]
    tau = 0.8
    g, ge = logits((B * T,), scale=1.0, seed=12), logits((B * T,), scale=1.0, seed=13)
    lp, lse, ent = K.logprobs_fwd(x3, y, tau, IGN, True)
    grad = K.logprobs_bwd(x3, y, lse, ent, g, ge, tau, IGN)
    lr, hr = _ref_fwd(x3, y, tau)
    gr = _ref_grad(x3, y, g, ge, tau)
    elp, eh, eg = _eager(x3, y, tau, g, ge)
    # logp/H: ours are fp32 sums of exactly-upcast inputs, eager's are rounded to the dtype; the
    # margin is fp32 rounding at |value| <~ 60 (scale 20 / tau): 60 * 2**-23 ~ 7e-6, doubled
    for name, ours, eager, exact in (("logp", lp, elp, lr), ("entropy", ent, eh, hr)):
        assert max_err(ours, exact) <= max_err(eager, exact) + 1.5e-5, name
    # gradient: rounded once from fp32, so <= half an ulp of |grad| <~ 5; eager rounds several
    # intermediates. Margin: 1/8 ulp at that magnitude in bf16 (2**-6), 1/8 ulp in fp16 (2**-9)
    margin = 2**-6 if dtype == torch.bfloat16 else 2**-9
    assert max_err(grad, gr) <= max_err(eg, gr) + margin
    assert grad.dtype == dtype
    # eager's own error is large in these dtypes, so also hold the kernel to absolute bounds:
    # logp/H are fp32 results (fp32 rounding at |value| <~ 60, see above) and the gradient is
    # correctly rounded up to fp32 slack: half an ulp of the largest |grad| in the dtype
    assert max_err(lp, lr) < 1.5e-5 and max_err(ent, hr) < 1.5e-5
    mant = 8 if dtype == torch.bfloat16 else 11  # significand bits incl. the implicit one
    gmax = gr.abs().max().item()
    half_ulp = 2.0 ** (torch.tensor(gmax).log2().floor().item() - mant)
    assert max_err(grad, gr) <= half_ulp * 1.01


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gradient_is_rounded_once(dtype, small_blocks):
    """The low-precision gradient equals the fp32 kernel's gradient on the same values, rounded once
    to the dtype by torch (round to nearest even): no intermediate is rounded to the dtype."""
    x3 = logits((2, 3, 200), dtype, scale=6.0, seed=21)
    y = labels((6,), 200)
    g, ge = logits((6,), scale=2.0, seed=22), logits((6,), scale=2.0, seed=23)
    lp, lse, ent = K.logprobs_fwd(x3, y, 0.9, IGN, True)
    lp32, lse32, ent32 = K.logprobs_fwd(x3.float(), y, 0.9, IGN, True)
    assert torch.equal(lp, lp32) and torch.equal(lse, lse32) and torch.equal(ent, ent32)
    grad = K.logprobs_bwd(x3, y, lse, ent, g, ge, 0.9, IGN)
    grad32 = K.logprobs_bwd(x3.float(), y, lse, ent, g, ge, 0.9, IGN)
    assert torch.equal(grad, grad32.to(dtype))


def test_large_vocab_bf16():
    """V = 151,936 (Qwen2) in bf16, forward and backward, a few rows: the deliberate large case."""
    V = 151_936
    x3 = logits((1, 3, V), torch.bfloat16, scale=4.0, seed=31)
    y = torch.tensor([0, V - 1, 77_777], device=DEVICE)
    g, ge = logits((3,), scale=1.0, seed=32), logits((3,), scale=1.0, seed=33)
    lp, lse, ent = K.logprobs_fwd(x3, y, 1.0, IGN, True)
    grad = K.logprobs_bwd(x3, y, lse, ent, g, ge, 1.0, IGN)
    lr, hr = _ref_fwd(x3, y)
    gr = _ref_grad(x3, y, g, ge)
    elp, eh, eg = _eager(x3, y, 1.0, g, ge)
    # same rule and margins as above (|logp|, H <~ 20 here)
    assert max_err(lp, lr) <= max_err(elp, lr) + 1.5e-5
    assert max_err(ent, hr) <= max_err(eh, hr) + 1.5e-5
    assert max_err(grad, gr) <= max_err(eg, gr) + 2**-6
    # and against fp32 accumulation alone: a sum of 1.5e5 terms in fp32, ~log2(V) ulps of |H| ~ 12
    assert max_err(lp, lr) < 3e-5 and max_err(ent, hr) < 3e-5


# ----------------------------------------------------------------------------------------------
# the APA launcher and the public path


def test_apa_loss_formula_and_recompute(small_blocks):
    """fp32 APA loss composed on the kernels (backward recomputes p): value and gradient against the
    float64 formula; an all-masked batch gives 0 and a zero gradient, never NaN."""
    B, T, V = 2, 5, 150
    z = logits((B, T + 1, V))
    y = labels((B, T), V)
    m = (torch.rand(B, T, generator=torch.Generator().manual_seed(3)) > 0.3).to(DEVICE)
    ref = torch.where(m, logits((B, T), scale=1.0, seed=4) - 5, 0.0)
    adv = torch.where(m, logits((B, T), scale=1.0, seed=5), 0.0)
    lam, tau = 0.3, 0.8
    zt = z.clone().requires_grad_()
    loss = apa_fast.apa_loss(zt[:, :-1], y, ref, adv, m, lam=lam, temperature=tau, backend="triton")
    assert loss.dim() == 0 and loss.dtype == torch.float32
    loss.backward()
    zr = z.double().requires_grad_()
    exact = reference.apa_loss(zr[:, :-1], y, ref.double(), adv.double(), m, lam, tau)
    exact.backward()
    assert abs(loss.item() - exact.item()) <= 1e-5 * exact.item()  # fp32 sum of N squares
    assert max_err(zt.grad, zr.grad) < 1e-6
    zt.grad = None
    loss0 = apa_fast.apa_loss(zt[:, :-1], y, ref, adv, torch.zeros_like(m), lam=lam, temperature=tau, backend="triton")
    loss0.backward()
    assert loss0.item() == 0 and zt.grad.abs().max().item() == 0


def test_public_apa_loss_triton_matches_reference_bf16():
    """End to end through apa_fast.apa_loss (autograd Function + recompute in backward), bf16."""
    B, T, V = 2, 6, 333
    z = logits((B, T + 1, V), torch.bfloat16, scale=3.0, seed=41)
    y = labels((B, T), V)
    ref = logits((B, T), scale=1.0, seed=42) - 6
    adv = logits((B, T), scale=1.0, seed=43)
    m = torch.rand(B, T, generator=torch.Generator().manual_seed(44)).to(DEVICE) > 0.25
    zt = z.clone().requires_grad_()
    L = apa_fast.apa_loss(zt[:, :-1], y, ref, adv, m, lam=0.1, temperature=0.9, backend="triton")
    (2.5 * L).backward()
    zr = z.double().requires_grad_()
    Lr = reference.apa_loss(zr[:, :-1], y, ref, adv, m, 0.1, 0.9)
    (2.5 * Lr).backward()
    assert abs(L.item() - Lr.item()) <= 1e-5 * Lr.item()  # fp32 sums of exactly-upcast bf16
    # gradient rounded once to bf16: half an ulp of its largest magnitude, plus fp32 slack
    gmax = zr.grad.abs().max().item()
    assert max_err(zt.grad, zr.grad) <= gmax * 2**-8 * 1.01
    assert zt.grad[:, -1].abs().max() == 0  # the shifted-out position gets no gradient


# ----------------------------------------------------------------------------------------------
# GAE


def _gae_inputs(B, T, seed, holes=True):
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(B, T, generator=gen)
    v = torch.randn(B, T, generator=gen)
    lengths = torch.randint(0, T + 1, (B,), generator=gen)
    m = torch.arange(T)[None, :] < lengths[:, None]  # right padding, one all-masked row likely
    if holes:
        m &= torch.rand(B, T, generator=gen) > 0.25  # interior holes
    last = torch.randn(B, generator=gen)
    return r.to(DEVICE), v.to(DEVICE), m.to(DEVICE), last.to(DEVICE)


@pytest.mark.parametrize("B,T", [(1, 1), (3, 17), (37, 9)])
@pytest.mark.parametrize("use_last", [False, True])
def test_gae_kernel_against_reference(B, T, use_last, monkeypatch):
    monkeypatch.setattr(KG, "MAX_BLOCK_B", 16)  # several programs, a ragged last block at B=37
    monkeypatch.setattr(interpreter, "GAE_MAX_BLOCK_B", 16)
    r, v, m, last = _gae_inputs(B, T, seed=B * 100 + T)
    lv = last if use_last else None
    # NaN at masked positions must not leak: the kernel loads them under the mask
    rn = torch.where(m, r, float("nan"))
    vn = torch.where(m, v, float("nan"))
    A, R = KG.gae_fwd(rn, vn, m, 0.99, 0.9, lv)
    Ar, Rr = reference.gae(r.double().cpu(), v.double().cpu(), m.cpu(), 0.99, 0.9, None if lv is None else lv.double().cpu())
    assert A.dtype == torch.float32 and torch.isfinite(A).all() and torch.isfinite(R).all()
    # fp32 recurrence of <= T steps with |terms| <~ 4: a few ulps per step
    assert max_err(A.cpu(), Ar) < 1e-5 * T and max_err(R.cpu(), Rr) < 1e-5 * T
    assert (A[~m] == 0).all() and (R[~m] == 0).all()


def test_gae_float64_exact_strided_and_numeric_mask():
    """float64 in -> float64 out, computed in float64 (matches the Python loop to rounding); inputs
    stored time-major (strided (B, T) views) and a 0/1 float mask."""
    B, T = 4, 12
    r, v, m, last = _gae_inputs(B, T, seed=7)
    rt = r.double().t().contiguous().t()
    vt = v.double().t().contiguous().t()
    assert not rt.is_contiguous()
    A, R = KG.gae_fwd(rt, vt, m.double(), 1.0, 0.95, last.double())
    Ar, Rr = reference.gae(r.double().cpu(), v.double().cpu(), m.cpu(), 1.0, 0.95, last.double().cpu())
    assert A.dtype == torch.float64
    torch.testing.assert_close(A.cpu(), Ar, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(R.cpu(), Rr, atol=1e-12, rtol=1e-12)


def test_gae_interior_hole_carries_through_exactly():
    """A hole between two valid steps: the earlier step sees the later one's value and advantage."""
    r = torch.tensor([[1.0, 123.0, 2.0, 0.0]], device=DEVICE)
    v = torch.tensor([[0.5, float("nan"), 0.25, float("inf")]], device=DEVICE)
    m = torch.tensor([[True, False, True, False]], device=DEVICE)
    A, R = KG.gae_fwd(r, v, m, 0.5, 0.5, torch.tensor([4.0], device=DEVICE))
    a2 = 2.0 + 0.5 * 4.0 - 0.25  # last_values passes through the masked step 3
    a0 = 1.0 + 0.5 * 0.25 - 0.5 + 0.25 * a2
    torch.testing.assert_close(A.cpu(), torch.tensor([[a0, 0.0, a2, 0.0]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(R.cpu(), torch.tensor([[a0 + 0.5, 0.0, a2 + 0.25, 0.0]]), atol=1e-6, rtol=0)


def test_gae_bf16_inputs_accumulate_in_fp32():
    r, v, m, last = _gae_inputs(3, 20, seed=9)
    A, R = KG.gae_fwd(r.bfloat16(), v.bfloat16(), m, 1.0, 0.95, last.bfloat16())
    Ar, Rr = reference.gae(r.bfloat16().double().cpu(), v.bfloat16().double().cpu(), m.cpu(), 1.0, 0.95,
                           last.bfloat16().double().cpu())
    assert A.dtype == torch.float32
    assert max_err(A.cpu(), Ar) < 2e-5 and max_err(R.cpu(), Rr) < 2e-5  # exact inputs, fp32 steps
