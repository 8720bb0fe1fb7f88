"""GRPO from hidden states: apa_fast.linear_token_loss + grpo_token_loss against Liger-Kernel's
LigerFusedLinearGRPOLoss (loss_type="dapo", the same token mean) and both against the float64 reference.

The benchmark (bench.liger) times the two as the same loss; this checks they are: the value and the gradients of
hidden and weight, masked and not, on-policy (ratio 1) and off-policy (old log-probs far enough for the clip to
bite), over several Liger chunk sizes. Liger's loss is plain torch on CPU (compiled=False: its torch.compile of the
loss math only changes speed).
"""

from __future__ import annotations

import pytest
import torch
from parity import max_err

import apa_fast
from apa_fast import losses, reference

liger = pytest.importorskip("liger_kernel.chunked_loss", reason="liger_kernel not installed (the [test] extra)")

B, T, H, V = 3, 16, 32, 300
BETA, CLIP = 0.04, 0.2


def _inputs(masked: bool, off_policy: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * (3.0 / H**0.5)
    y = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    if masked:  # ragged right padding, one sequence unpadded
        mask[0, 10:] = False
        mask[2, 5:] = False
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    logp = reference.linear_token_logprobs(h, w, y, None, 1.0, False, None)
    ref = logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    old = logp + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64) if off_policy else None
    return h, w, y, mask, adv, ref, old


def _grads(fn, h, w, dtype):
    hh, ww = h.detach().to(dtype).requires_grad_(), w.detach().to(dtype).requires_grad_()
    loss = fn(hh, ww)
    loss.backward()
    return loss.detach().double(), hh.grad.double(), ww.grad.double()


def _ours(y, mask, adv, ref, old):
    def fn(hh, ww):
        dt = hh.dtype
        cast = lambda x: None if x is None else x.to(dt)  # noqa: E731
        tl = losses.grpo_token_loss(cast(old), cast(ref), cast(adv)[:, None].expand(B, T), mask, clip=CLIP, beta=BETA)
        return apa_fast.linear_token_loss(hh, ww, y, tl, backend="torch")

    return fn


def _reference(y, mask, adv, ref, old):
    def fn(hh, ww):
        logp = reference.linear_token_logprobs(hh, ww, y, None, 1.0, False, None)
        tl = losses.grpo_token_loss(old, ref, adv[:, None].expand(B, T), mask, clip=CLIP, beta=BETA)
        return tl(logp)

    return fn


def _liger(y, mask, adv, ref, old, chunk):
    mod = liger.LigerFusedLinearGRPOLoss(beta=BETA, compiled=False, chunk_size=chunk, epsilon_low=CLIP,
                                         epsilon_high=CLIP, loss_type="dapo", use_ref_model=True)

    def fn(hh, ww):
        cast = lambda x: None if x is None else x.to(hh.dtype)  # noqa: E731
        return mod(hh, ww, y, mask.to(hh.dtype), cast(adv), ref_per_token_logps=cast(ref),
                   old_per_token_logps=cast(old))[0]

    return fn


@pytest.mark.parametrize("chunk", [1, 2, 4])
@pytest.mark.parametrize("off_policy", [False, True], ids=["on-policy", "off-policy"])
@pytest.mark.parametrize("masked", [True, False], ids=["masked", "no-mask"])
def test_grpo_matches_liger_and_reference(masked, off_policy, chunk):
    h, w, y, mask, adv, ref, old = _inputs(masked, off_policy)
    if off_policy:  # the clip must be active somewhere, else the test would not tell clipped from unclipped
        lp = reference.linear_token_logprobs(h, w, y, None, 1.0, False, None)
        r = torch.exp(lp - old)[mask]
        assert ((r < 1 - CLIP) | (r > 1 + CLIP)).any()
    want = _grads(_reference(y, mask, adv, ref, old), h, w, torch.float64)
    ours = _grads(_ours(y, mask, adv, ref, old), h, w, torch.float32)
    lig = _grads(_liger(y, mask, adv, ref, old, chunk), h, w, torch.float32)
    scale = [max(1.0, x.abs().max().item()) for x in want]
    for name, got in (("apa_fast", ours), ("liger", lig)):
        for what, a, b, s in zip(("loss", "grad_h", "grad_W"), got, want, scale):
            assert max_err(a, b) <= 2e-5 * s, f"{name} {what} vs float64 reference: {max_err(a, b):.3g}"
    for what, a, b, s in zip(("loss", "grad_h", "grad_W"), ours, lig, scale):
        assert max_err(a, b) <= 2e-5 * s, f"apa_fast vs liger {what}: {max_err(a, b):.3g}"


def test_liger_dapo_is_our_token_mean_not_its_grpo_type():
    # loss_type="grpo" in Liger averages per sequence first: with ragged masks it differs from our token mean,
    # which is why the benchmark and the test use "dapo"
    h, w, y, mask, adv, ref, _ = _inputs(True, False)
    ours = _grads(_ours(y, mask, adv, ref, None), h, w, torch.float64)[0]
    per_seq = liger.LigerFusedLinearGRPOLoss(beta=BETA, compiled=False, chunk_size=1, loss_type="grpo")
    other = per_seq(h.clone(), w.clone(), y, mask.double(), adv, ref_per_token_logps=ref)[0].detach()
    assert abs(other.item() - ours.item()) > 1e-6
