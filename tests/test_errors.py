"""Each bad input gets a clear error naming the argument (never an OOB read or a silent NaN)."""

from __future__ import annotations

import pytest
import torch

import apa_fast

V = 11


def good():
    return dict(
        logits=torch.randn(2, 3, V),
        labels=torch.randint(0, V, (2, 3)),
        ref_logprobs=-torch.rand(2, 3),
        advantages=torch.randn(2, 3),
        mask=torch.ones(2, 3, dtype=torch.bool),
    )


def apa(**over):
    kw = good()
    opts = {k: over.pop(k) for k in ("lam", "temperature", "backend") if k in over}
    kw.update(over)
    return apa_fast.apa_loss(kw["logits"], kw["labels"], kw["ref_logprobs"], kw["advantages"], kw["mask"], **opts)


def logp(**over):
    kw = good()
    opts = {k: over.pop(k) for k in ("temperature", "backend", "ignore_index") if k in over}
    kw.update(over)
    return apa_fast.token_logprobs(kw["logits"], kw["labels"], **opts)


LABELS_HIGH = torch.tensor([[0, 1, V], [0, 0, 0]])
LABELS_NEG = torch.tensor([[0, -1, 2], [0, 0, 0]])

CASES = [
    # (call, exception, words the message must contain)
    (lambda: logp(labels=LABELS_HIGH), ValueError, "labels must lie in [0, 11)"),
    (lambda: logp(labels=LABELS_NEG), ValueError, "labels[0, 1] = -1"),
    (lambda: logp(labels=LABELS_NEG, ignore_index=-1), None, None),  # -1 is then the ignore index
    (lambda: logp(labels=torch.zeros(2, 4, dtype=torch.long)), ValueError, "labels must have shape (2, 3)"),
    (lambda: logp(labels=torch.zeros(2, 3)), TypeError, "labels must be an integer tensor"),
    (lambda: logp(logits=torch.zeros(2, 3, V, dtype=torch.long)), TypeError, "logits must be a floating tensor"),
    (lambda: logp(logits=torch.zeros(2, 3, 0)), ValueError, "V >= 1"),
    (lambda: logp(temperature=0.0), ValueError, "temperature must be a finite number > 0"),
    (lambda: logp(temperature=float("nan")), ValueError, "temperature"),
    (lambda: logp(backend="cuda"), ValueError, "backend must be one of"),
    (lambda: logp(logits=[1.0]), TypeError, "logits must be a torch.Tensor"),
    (lambda: apa(labels=LABELS_HIGH), ValueError, "at valid (mask=1) positions"),
    (lambda: apa(labels=torch.full((2, 3), -100)), ValueError, "labels"),
    (lambda: apa(labels=torch.full((2, 3), -100), mask=torch.zeros(2, 3, dtype=torch.bool)), None, None),
    (lambda: apa(ref_logprobs=torch.zeros(3, 2)), ValueError, "ref_logprobs must have shape (2, 3)"),
    (lambda: apa(advantages=torch.zeros(2, 3, 1)), ValueError, "advantages must have shape (2, 3)"),
    (lambda: apa(mask=torch.ones(6)), ValueError, "mask must have shape (2, 3)"),
    (lambda: apa(mask=torch.full((2, 3), 2.0)), ValueError, "mask must be bool or contain only 0 and 1"),
    (lambda: apa(advantages=torch.tensor([[0.0, float("nan"), 0], [0, 0, 0]])), ValueError, "advantages must be finite"),
    (lambda: apa(ref_logprobs=torch.tensor([[0.0, 0, 0], [float("-inf"), 0, 0]])), ValueError, "ref_logprobs must be finite"),
    (lambda: apa(advantages=torch.zeros(2, 3, dtype=torch.long)), TypeError, "advantages must be a floating tensor"),
    (lambda: apa(lam=0.0), ValueError, "lam must be a finite number > 0"),
    (lambda: apa(lam=-1.0), ValueError, "lam"),
    (lambda: apa_fast.gae(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3)), ValueError, "values must have shape (2, 3)"),
    (lambda: apa_fast.gae(torch.zeros(6), torch.zeros(6), torch.ones(6)), ValueError, "rewards must have shape (B, T)"),
    (lambda: apa_fast.gae(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), last_values=torch.zeros(3)), ValueError, "last_values must have shape (2,)"),
    (lambda: apa_fast.gae(torch.tensor([[float("nan")]]), torch.zeros(1, 1), torch.ones(1, 1)), ValueError, "rewards must be finite"),
    (lambda: apa_fast.gae(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), lam=1.5), ValueError, "lam must lie in [0, 1]"),
    (lambda: apa_fast.masked_whiten(torch.zeros(2, 3), torch.ones(3, 2)), ValueError, "mask must have shape (2, 3)"),
    (lambda: apa_fast.ppo_loss(torch.zeros(2), torch.zeros(2), torch.zeros(3), torch.ones(2)), ValueError, "advantages must have shape (2,)"),
    (lambda: apa_fast.awr_loss(torch.zeros(2), torch.zeros(2), torch.ones(2), lam=0), ValueError, "lam must be"),
    (lambda: apa_fast.linear_token_logprobs(torch.zeros(3, 4), torch.zeros(V, 5), torch.zeros(3, dtype=torch.long)), ValueError, "hidden's last dim (4) must equal"),
    (lambda: apa_fast.linear_token_logprobs(torch.zeros(3, 4), torch.zeros(V, 4), torch.zeros(3, dtype=torch.long), bias=torch.zeros(V + 1)), ValueError, "bias must have shape (11,)"),
]


@pytest.mark.parametrize("i", range(len(CASES)))
def test_bad_input(i):
    call, exc, words = CASES[i]
    if exc is None:
        call()
        return
    with pytest.raises(exc) as info:
        call()
    assert words in str(info.value), str(info.value)


@pytest.mark.skipif(torch.cuda.device_count() < 1, reason="needs a second device (CUDA) to mix devices")
def test_mixed_devices():
    kw = good()
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        apa_fast.apa_loss(kw["logits"].cuda(), kw["labels"].cuda(), kw["ref_logprobs"], kw["advantages"].cuda(), kw["mask"].cuda())


def test_mixed_devices_meta():
    """The device check runs before any compute, so the meta device shows it on a CPU-only machine."""
    kw = good()
    with pytest.raises(ValueError, match="ref_logprobs is on meta but logits is on cpu"):
        apa_fast.apa_loss(kw["logits"], kw["labels"], kw["ref_logprobs"].to("meta"), kw["advantages"], kw["mask"])


def test_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        logp(backend="triton")


def test_finite_check_fast_path_edges():
    """The NaN/inf scan first sums the input: a sum that overflows (finite inputs) or is NaN from a
    masked position must fall through to the exact masked check, not raise."""
    big = torch.full((2, 4), 3e38)  # finite, but the float32 sum overflows to inf
    A, _ = apa_fast.gae(big * 1e-30, big, torch.ones(2, 4), backend="torch")
    assert torch.isfinite(A).all()
    r = torch.zeros(2, 4)
    r[1, 3] = float("nan")
    m = torch.ones(2, 4)
    m[1, 3] = 0
    A, _ = apa_fast.gae(r, torch.zeros(2, 4), m, backend="torch")  # NaN only where masked: fine
    assert torch.equal(A, torch.zeros(2, 4))
    r[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"rewards must be finite at valid \(mask=1\) positions; rewards\[0, 0\] = inf"):
        apa_fast.gae(r, torch.zeros(2, 4), m, backend="torch")
