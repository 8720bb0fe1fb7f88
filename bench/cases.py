"""What is benchmarked: the shapes of each profile and the implementations of each op.

A *case* is (op, impl, shape, dtype, device). ``build(spec)`` returns a ``Case`` whose ``step()`` runs
one iteration (forward, or forward + backward) and returns what a caller would keep (the gradient,
or the outputs); ``reset()`` drops that result so the next step starts from the inputs alone.

Implementations, per op:

- ``apa_fast[torch]``, ``apa_fast[triton]``: this project (triton on CUDA only: the CPU interpreter is
  a correctness tool, not a speed one).
- ``eager``: ``log_softmax`` + ``gather`` + the loss on ``logits.float()``, as RLHF trainers write it.
- ``compile``: the same function under ``torch.compile``.
- ``cross_entropy``: ``-F.cross_entropy(logits, labels, reduction="none")`` as the fused built-in.
- ``liger``: Liger-Kernel's cross-entropy (``reduction="none"``) when installed (CUDA only).
- GAE: ``apa_fast[torch]-nocheck`` is the same call with ``APA_FAST_SKIP_VALUE_CHECKS=1`` (the public
  API's documented switch that skips the NaN/inf and mask-value scans of the inputs), ``loop[verl]`` (reverse Python loop over time, vectorised over the batch, skipping masked
  steps as verl's masked GAE does) and ``loop[trlx]`` (the same loop without the mask, as trlx).
- linear ops: ``linear_cross_entropy`` (PyTorch's, chunked through ``LinearCrossEntropyOptions``) and
  ``eager`` (``hidden @ weight.T`` + ``log_softmax`` + ``gather``).
- ``linear_grpo_loss`` (GRPO from hidden states, B sequences of T = 256 tokens, on-policy, beta = 0.04):
  ``apa_fast[torch]`` (``linear_token_loss`` + ``grpo_token_loss``), ``apa_fast[torch]:apa`` (the same call with
  ``apa_token_loss``: Liger has no APA, the matmul work is the same), ``liger[c=K]`` / ``liger-compiled[c=K]``
  (Liger-Kernel's ``LigerFusedLinearGRPOLoss``, ``loss_type="dapo"``: the token mean over the batch's unmasked
  tokens, which is ``grpo_token_loss``'s ``sum(m * l) / sum(m)``; K sequences per chunk; compiled = its
  ``torch.compile`` of the loss math) and ``eager`` (logits, ``log_softmax``, ``gather``, the same TokenLoss).

Written for this project; the baselines are re-implemented from the public descriptions of the
trainers they stand for.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from typing import Any, Callable

import torch
import torch.nn.functional as F

LAM_APA = 0.1

IMPLS = {
    "logprobs": ("apa_fast[torch]", "apa_fast[triton]", "eager", "compile", "cross_entropy", "liger"),
    "apa_loss": ("apa_fast[torch]", "apa_fast[triton]", "eager", "compile", "cross_entropy", "liger"),
    "gae": ("apa_fast[torch]", "apa_fast[torch]-nocheck", "apa_fast[triton]", "loop[verl]", "loop[trlx]"),
    "linear_apa_loss": ("apa_fast[torch]", "apa_fast[triton]", "linear_cross_entropy", "eager"),
    "linear_grpo_loss": ("apa_fast[torch]", "apa_fast[torch]:apa", "liger[c=1]", "liger[c=2]", "liger[c=4]",
                         "liger[c=8]", "liger-compiled[c=4]", "eager"),
}

# linear_grpo_loss: tokens per sequence, the masked tail of each (the 56 of 256) and the GRPO settings
GRPO_T, GRPO_MASKED_TAIL, GRPO_BETA, GRPO_CLIP = 256, 56, 0.04, 0.2

# Implementations skipped (with the reason) rather than failed when their warm-up step raises here:
# the optional or version-dependent baselines, and this project's backends (some still being written).
SKIP_ON_FAILURE = frozenset(
    {"compile", "liger", "linear_cross_entropy"} | {i for i in IMPLS["linear_grpo_loss"] if i.startswith("liger")}
    | {i for impls in IMPLS.values() for i in impls if i.startswith("apa_fast")}
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------------------------- shapes
def shapes(op: str, profile: str, device: str) -> list[dict]:
    """Shape dicts for one op. Logit ops: N, V, dtype, mode. GAE: B, T. Linear: N, H, V, dtype."""
    gpu = device == "cuda"
    quick = profile == "quick"
    out: list[dict] = []
    if op in ("logprobs", "apa_loss"):
        modes = ["fwd"] if op == "logprobs" else ["fwd+bwd"]
        if op == "logprobs" and not quick:
            modes = ["fwd", "fwd+bwd"]
        if gpu:
            grid = (
                [(16384, 128256, "bf16"), (4096, 50400, "fp32"), (4096, 151936, "bf16")]
                if quick
                else [(n, v, d) for d in ("bf16", "fp32") for n in (1024, 4096, 16384)
                      for v in (32000, 50400, 128256, 151936)]
            )
        else:
            grid = (
                [(4096, 50400, "fp32"), (1024, 32000, "bf16")]
                if quick
                else [(n, v, "fp32") for n in (1024, 4096) for v in (32000, 50400, 128256, 151936)]
                + [(1024, 50400, "bf16"), (4096, 50400, "bf16")]
            )
        if op == "logprobs" and quick:
            grid = grid[:1]
        for mode in modes:
            out += [dict(N=n, V=v, dtype=d, mode=mode) for n, v, d in grid]
    elif op == "gae":
        grid = [(256, 1024), (64, 512)] if (quick and not gpu) else [(64, 512), (256, 1024), (16, 8192)]
        out = [dict(B=b, T=t, dtype="fp32", mode="fwd") for b, t in grid]
    elif op == "linear_apa_loss":
        grid = [(2048, 1024, 50400, "fp32")]
        if gpu:
            grid += [(8192, 4096, 128256, "bf16")]
        out = [dict(N=n, H=h, V=v, dtype=d, mode="fwd+bwd") for n, h, v, d in grid]
        # PPO's and AWR's losses through the same fused path (the trainer's update for --algo ppo/awr)
        out += [dict(out[0], loss=loss) for loss in ("ppo", "awr")]
    elif op == "linear_grpo_loss":  # the full grid is python -m bench.liger's (hours on 2 cores)
        grid = [(2048, 768, 50400)] if quick else [(2048, 768, v) for v in (50400, 151936, 262144)]
        out = [dict(N=n, H=h, V=v, dtype="fp32", mode="fwd+bwd", masked=m) for n, h, v in grid for m in (True, False)]
    return out


def shape_id(shape: dict) -> str:
    if "B" in shape:
        return f"B{shape['B']}xT{shape['T']}"
    s = f"N{shape['N']}"
    if "H" in shape:
        s += f"-H{shape['H']}"
    s += f"-V{shape['V']}-{shape['dtype']}-{shape['mode']}" + (f"-{shape['loss']}" if "loss" in shape else "")
    return s + ({True: "-masked", False: "-nomask"}[shape["masked"]] if "masked" in shape else "")


def shape_label(shape: dict) -> str:
    """The shape as the report shows it: "N=4096, V=50,400, fp32, fwd+bwd", "B=256 x T=1024"."""
    if "B" in shape:
        return f"B={shape['B']} x T={shape['T']}"
    s = f"N={shape['N']}"
    if "H" in shape:
        s += f", H={shape['H']}"
    s += f", V={shape['V']:,}, {shape['dtype']}, {shape['mode']}"
    s += f", {shape['loss']} loss" if "loss" in shape else ""
    if "masked" in shape:
        s += f", {GRPO_MASKED_TAIL}/{GRPO_T} masked" if shape["masked"] else ", no mask"
    return s


# -------------------------------------------------------------------------------------- availability
def unavailable(op: str, impl: str, device: str) -> str | None:
    """A reason to skip, or None."""
    if impl == "apa_fast[triton]":
        if device != "cuda":
            return "Triton backend needs CUDA (the CPU interpreter is for tests, not speed)"
        if importlib.util.find_spec("triton") is None:
            return "triton not installed"
    if impl == "liger":
        if device != "cuda":
            return "Liger-Kernel runs on CUDA only"
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger_kernel not installed"
    if op == "linear_grpo_loss" and impl.startswith("liger") and importlib.util.find_spec("liger_kernel") is None:
        return "liger_kernel not installed (pip install -e '.[bench]' -c constraints.txt)"
    if op == "linear_apa_loss" and impl == "linear_cross_entropy" and not hasattr(F, "linear_cross_entropy"):
        return "torch.nn.functional.linear_cross_entropy needs a newer PyTorch"
    return None


# ----------------------------------------------------------------------------------------- the case
@dataclasses.dataclass
class Case:
    step: Callable[[], Any]
    reset: Callable[[], None]
    input_bytes: int
    result_bytes: int  # what step() returns and a caller keeps: the gradient(s), or the outputs
    bytes_moved: int  # the minimum HBM/DRAM traffic of a fused kernel (for bandwidth figures)
    tokens: int


def _nbytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def _backend(impl: str) -> str:
    """The apa_fast backend an impl names: "apa_fast[torch]-nocheck" -> "torch"."""
    return impl[len("apa_fast[") : impl.index("]")]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _per_token_inputs(N: int, V: int, device: str, g: torch.Generator):
    labels = torch.randint(0, V, (N,), generator=g).to(device)
    ref = (-torch.rand(N, generator=g) * 8).to(device)
    adv = torch.randn(N, generator=g).to(device)
    mask = torch.arange(N) % 16 != 15  # ~6% masked (padding)
    return labels, ref, adv, mask.to(device)


def _eager_logp(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(z.float(), dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)


def _ce_logp(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(z, y, reduction="none").float()


def _liger_logp(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    from liger_kernel.transformers.functional import liger_cross_entropy

    out = liger_cross_entropy(z, y, reduction="none")
    if isinstance(out, tuple):  # some versions return (loss, z_loss, ...)
        out = out[0]
    # Liger writes its gradient into the logits buffer during forward (in place): fine for timing, and
    # its "extra memory" then excludes a gradient tensor of its own
    return -out.float()


def _apa_from_logp(logp, ref, adv, mask):
    m = mask.float()
    return (((logp - ref - adv / LAM_APA) ** 2) * m).sum() / m.sum().clamp(min=1)


def _eager_apa(z, y, ref, adv, mask):
    return _apa_from_logp(_eager_logp(z, y), ref, adv, mask)


@functools.lru_cache(maxsize=None)
def _compiled(name: str):
    fn = {"logp": _eager_logp, "apa": _eager_apa}[name]
    return torch.compile(fn, dynamic=False)


def _logit_op(op: str, impl: str, shape: dict, device: str) -> Case:
    N, V, dt, mode = shape["N"], shape["V"], DTYPES[shape["dtype"]], shape["mode"]
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(N, V, generator=g) * 2).to(device=device, dtype=dt)
    labels, ref, adv, mask = _per_token_inputs(N, V, device, g)
    bwd = mode == "fwd+bwd"
    z.requires_grad_(bwd)
    up = None  # upstream gradient of token log-probs (logprobs fwd+bwd; the loss is a scalar)

    if op == "logprobs":
        if bwd:
            up = torch.randn(N, generator=g).to(device)
        if impl.startswith("apa_fast"):
            be = _backend(impl)
            import apa_fast

            f = lambda: apa_fast.token_logprobs(z, labels, backend=be)  # noqa: E731
        else:
            inner = {"eager": _eager_logp, "cross_entropy": _ce_logp, "liger": _liger_logp}.get(impl)
            inner = _compiled("logp") if impl == "compile" else inner
            f = lambda: inner(z, labels)  # noqa: E731
        out_bytes = N * 4
    else:
        if impl.startswith("apa_fast"):
            be = _backend(impl)
            import apa_fast

            f = lambda: apa_fast.apa_loss(z, labels, ref, adv, mask, lam=LAM_APA, backend=be)  # noqa: E731
        elif impl == "compile":
            c = _compiled("apa")
            f = lambda: c(z, labels, ref, adv, mask)  # noqa: E731
        else:
            inner = {"eager": _eager_logp, "cross_entropy": _ce_logp, "liger": _liger_logp}[impl]
            f = lambda: _apa_from_logp(inner(z, labels), ref, adv, mask)  # noqa: E731
        out_bytes = 4

    holder: dict = {}

    def step():
        if bwd:
            out = f()
            if out.dim() == 0:
                out.backward()
            else:
                out.backward(up)
            res = z.grad
        else:
            with torch.no_grad():
                res = f()
        _sync(device)
        holder["r"] = res
        return res

    def reset():
        holder.clear()
        z.grad = None

    elt = z.element_size()
    passes = 3 if bwd else 1  # read logits (fwd); read again + write the gradient (bwd)
    return Case(
        step=step,
        reset=reset,
        input_bytes=_nbytes(z, labels, ref, adv, mask),
        result_bytes=N * V * elt if bwd else out_bytes,
        bytes_moved=passes * N * V * elt,
        tokens=N,
    )


# --------------------------------------------------------------------------------------------- GAE
def gae_loop_verl(rewards, values, mask, gamma=1.0, lam=0.95):
    """Reverse loop over time, vectorised over the batch; masked steps pass both carries through."""
    B, T = rewards.shape
    m = mask.to(rewards.dtype)
    next_v = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    carry = torch.zeros_like(next_v)
    out = []
    for t in range(T - 1, -1, -1):
        mt = m[:, t]
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        a = delta + gamma * lam * carry
        next_v = values[:, t] * mt + (1 - mt) * next_v
        carry = a * mt + (1 - mt) * carry
        out.append(carry)
    adv = torch.stack(out[::-1], dim=1) * m
    return adv, (adv + values) * m


def gae_loop_trlx(rewards, values, mask, gamma=1.0, lam=0.95):
    """Reverse loop over time with no mask inside (right padding assumed), masked afterwards."""
    B, T = rewards.shape
    carry = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    out = []
    for t in range(T - 1, -1, -1):
        nv = values[:, t + 1] if t < T - 1 else 0.0
        delta = rewards[:, t] + gamma * nv - values[:, t]
        carry = delta + gamma * lam * carry
        out.append(carry)
    adv = torch.stack(out[::-1], dim=1)
    return adv * mask, (adv + values) * mask


def _gae(impl: str, shape: dict, device: str) -> Case:
    B, T = shape["B"], shape["T"]
    g = torch.Generator().manual_seed(0)
    r = torch.randn(B, T, generator=g).to(device)
    v = torch.randn(B, T, generator=g).to(device)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    m = (torch.arange(T)[None] < lengths[:, None]).to(device)
    if impl.startswith("apa_fast"):
        import os

        import apa_fast

        be = _backend(impl)
        if impl.endswith("-nocheck"):
            def f():
                old = os.environ.get("APA_FAST_SKIP_VALUE_CHECKS")
                os.environ["APA_FAST_SKIP_VALUE_CHECKS"] = "1"
                try:
                    return apa_fast.gae(r, v, m, gamma=1.0, lam=0.95, backend=be)
                finally:
                    if old is None:
                        del os.environ["APA_FAST_SKIP_VALUE_CHECKS"]
                    else:
                        os.environ["APA_FAST_SKIP_VALUE_CHECKS"] = old
        else:
            f = lambda: apa_fast.gae(r, v, m, gamma=1.0, lam=0.95, backend=be)  # noqa: E731
    else:
        loop = {"loop[verl]": gae_loop_verl, "loop[trlx]": gae_loop_trlx}[impl]
        mf = m.float()
        f = lambda: loop(r, v, mf, 1.0, 0.95)  # noqa: E731
    holder: dict = {}

    def step():
        with torch.no_grad():
            res = f()
        _sync(device)
        holder["r"] = res
        return res

    return Case(step, holder.clear, _nbytes(r, v, m), 2 * B * T * 4, 5 * B * T * 4, B * T)


# ----------------------------------------------------------------------------------- linear ops
def _lce_logp(h, w, y):
    opts = torch.nn.LinearCrossEntropyOptions()
    return -F.linear_cross_entropy(h, w, y, reduction="none", options=opts).float()


def _token_loss(name: str, ref, adv, mask, V: int, g: torch.Generator):
    """The per-token loss of one algorithm (apa_fast.losses), the same object for every implementation."""
    from apa_fast import losses

    if name == "ppo":  # old log-probs near a uniform policy's, so the ratios sit around 1
        old = (torch.randn(ref.shape, generator=g) * 0.1).to(ref.device) - float(torch.log(torch.tensor(float(V))))
        return losses.ppo_token_loss(old, adv, mask, clip=0.2)
    if name == "awr":
        return losses.awr_token_loss(adv, mask, lam=1.0)
    return losses.apa_token_loss(ref, adv, mask, lam=LAM_APA)


def _backward_step(f, h: torch.Tensor, w: torch.Tensor, device: str):
    """(step, reset) of a Case whose step is ``f().backward()`` on the leaf tensors h and w."""
    holder: dict = {}

    def step():
        f().backward()
        _sync(device)
        holder["r"] = (h.grad, w.grad)
        return holder["r"]

    def reset():
        holder.clear()
        h.grad = None
        w.grad = None

    return step, reset


def _linear(impl: str, shape: dict, device: str) -> Case:
    N, H, V, dt = shape["N"], shape["H"], shape["V"], DTYPES[shape["dtype"]]
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, H, generator=g).to(device=device, dtype=dt).requires_grad_()
    w = (torch.randn(V, H, generator=g) / H**0.5).to(device=device, dtype=dt).requires_grad_()
    labels, ref, adv, mask = _per_token_inputs(N, V, device, g)
    loss = _token_loss(shape.get("loss", "apa"), ref, adv, mask, V, g)
    if impl.startswith("apa_fast"):
        import apa_fast

        be = _backend(impl)
        f = lambda: apa_fast.linear_token_loss(h, w, labels, loss, backend=be)  # noqa: E731
    elif impl == "linear_cross_entropy":
        f = lambda: loss(_lce_logp(h, w, labels))  # noqa: E731
    else:
        f = lambda: loss(_eager_logp(h @ w.t(), labels))  # noqa: E731
    step, reset = _backward_step(f, h, w, device)
    elt = h.element_size()
    return Case(step, reset, _nbytes(h, w, labels, ref, adv, mask), (N * H + V * H) * elt,
                2 * (N * H + V * H) * elt, N)


def liger_config(impl: str) -> tuple[bool, int]:
    """``"liger-compiled[c=4]"`` -> (compiled True, chunk_size 4)."""
    if not impl.startswith("liger") or "[c=" not in impl or not impl.endswith("]"):
        raise ValueError(f"impl must read liger[c=K] or liger-compiled[c=K], got {impl!r}")
    return impl.startswith("liger-compiled"), int(impl[impl.index("[c=") + 3 : -1])


@functools.lru_cache(maxsize=1)  # one shape's inputs at a time, shared by its implementations
def _grpo_inputs(N: int, H: int, V: int, masked: bool, device: str):
    if N % GRPO_T:
        raise ValueError(f"N must be a multiple of {GRPO_T} (sequences of {GRPO_T} tokens), got {N}")
    B = N // GRPO_T
    g = torch.Generator().manual_seed(0)
    h = torch.randn(B, GRPO_T, H, generator=g).to(device).requires_grad_()
    w = (torch.randn(V, H, generator=g) / H**0.5).to(device).requires_grad_()
    labels = torch.randint(0, V, (B, GRPO_T), generator=g).to(device)
    mask = torch.ones(B, GRPO_T, dtype=torch.bool)
    if masked:
        mask[:, GRPO_T - GRPO_MASKED_TAIL:] = False
    adv = torch.randn(B, generator=g).to(device)  # one advantage per sequence (GRPO's group-normalised score)
    # the reference policy's log-probs near this one's (a uniform-ish policy's -log V): k3 and its gradient non-trivial
    ref = (torch.randn(B, GRPO_T, generator=g) * 0.1 - float(torch.log(torch.tensor(float(V))))).to(device)
    return h, w, labels, mask.to(device), adv, ref


def grpo_inputs(shape: dict, device: str):
    """(hidden (B, T, H), weight (V, H), labels, mask, advantages (B,), ref_logprobs (B, T)) of a linear_grpo_loss
    shape; the same tensors for every implementation of the shape (cached: build one shape at a time)."""
    return _grpo_inputs(shape["N"], shape["H"], shape["V"], bool(shape.get("masked", True)), device)


def grpo_step_fn(impl: str, h, w, labels, mask, adv, ref) -> Callable[[], torch.Tensor]:
    """A function returning the loss tensor (gradients already formed or formed by ``.backward()``)."""
    from apa_fast import losses

    adv_tok = adv[:, None].expand_as(ref).contiguous()
    if impl.startswith("liger"):
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        compiled, chunk = liger_config(impl)
        mod = LigerFusedLinearGRPOLoss(beta=GRPO_BETA, compiled=compiled, chunk_size=chunk, epsilon_low=GRPO_CLIP,
                                       epsilon_high=GRPO_CLIP, loss_type="dapo", use_ref_model=True)
        am = mask.to(h.dtype)
        return lambda: mod(h, w, labels, am, adv, ref_per_token_logps=ref)[0]
    if impl == "apa_fast[torch]:apa":
        tl = losses.apa_token_loss(ref, adv_tok, mask, lam=LAM_APA)
    else:
        tl = losses.grpo_token_loss(None, ref, adv_tok, mask, clip=GRPO_CLIP, beta=GRPO_BETA)
    if impl.startswith("apa_fast"):
        import apa_fast

        be = _backend(impl)
        return lambda: apa_fast.linear_token_loss(h, w, labels, tl, backend=be)
    if impl == "eager":
        return lambda: tl(_eager_logp(h @ w.t(), labels))
    raise ValueError(f"unknown linear_grpo_loss impl {impl!r}")


def _linear_grpo(impl: str, shape: dict, device: str) -> Case:
    h, w, labels, mask, adv, ref = grpo_inputs(shape, device)
    f = grpo_step_fn(impl, h, w, labels, mask, adv, ref)
    step, reset = _backward_step(f, h, w, device)
    N, H, V = shape["N"], shape["H"], shape["V"]
    return Case(step, reset, _nbytes(h, w, labels, mask, adv, ref), (N * H + V * H) * 4, 2 * (N * H + V * H) * 4,
                int(mask.sum()))


def build(op: str, impl: str, shape: dict, device: str) -> Case:
    if op in ("logprobs", "apa_loss"):
        return _logit_op(op, impl, shape, device)
    if op == "gae":
        return _gae(impl, shape, device)
    if op == "linear_apa_loss":
        return _linear(impl, shape, device)
    if op == "linear_grpo_loss":
        return _linear_grpo(impl, shape, device)
    raise ValueError(op)
