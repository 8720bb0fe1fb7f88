"""The prepared device check, for the day a GPU is lent: one command, at most 8 minutes on one H100/H200.

``python -m bench.gpu [--parts parity,head,trainer] [--out DIR] [--steps 3]``

1. **parity**: every op (``token_logprobs``, ``apa_loss``, ``linear_token_logprobs``, ``linear_token_loss`` with
   GRPO's loss, ``gae``) on CUDA with the Triton backend (and the torch backend), fp32 and bf16, from logits and
   from hidden states, with soft-cap, temperature and ignore_index, against the float64 reference
   ``apa_fast.reference`` by the CPU tests' rules (``tests/parity.py``): fp32 within its bounds, bf16 no worse than
   eager PyTorch in bf16 plus one rounding.
2. **head**: the LM head's GRPO loss, forward + backward, at N = 8,192 tokens, H = 4,096, bf16,
   V in {50,400, 151,936, 262,144}: apa-fast's fused ``linear_token_loss`` (Triton), eager (``h @ W.T``,
   ``log_softmax`` in fp32, gather), ``torch.nn.functional.linear_cross_entropy`` (its log-probs through the same
   loss) and Liger-Kernel's ``LigerFusedLinearGRPOLoss`` where installed: time (median of CUDA-event timings),
   peak extra memory (``max_memory_allocated`` over what was allocated before, minus the gradients kept), and
   achieved FLOP/s (6 N H V: the forward matmul and the two backward ones) against the device's dense bf16 peak
   and a cuBLAS matmul measured in the same run.
3. **trainer**: ``python -m train.run`` for 3 iterations as a subprocess (so it depends only on the command line):
   on CUDA a ~162M Llama-shaped model (``bench.trainer.llama_160m_model``, built locally) in bf16 under FSDP2 on
   one GPU; tokens/s, peak memory and the phase times from its ``metrics.jsonl``.

On CPU every part runs what it can (parity with the torch backend at small sizes; the head benchmark's code at a
tiny size, marked a dry run; the trainer on the offline tiny model) and the GPU parts are recorded as skipped with
what they would measure. Writes ``bench/results/gpu-<device>-<stamp>.json`` and ``.md``; exits 1 on a parity
failure or an error.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
HEAD_SHAPE = dict(N=8192, H=4096)
HEAD_VOCABS = (50400, 151936, 262144)
# dense bf16 tensor-core peak (no sparsity), FLOP/s, by the name torch reports (specification sheets)
BF16_PEAK = {"H200": 989e12, "H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12,
             "GH200": 989e12, "B200": 2250e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12}


def _tol():
    """The CPU tests' tolerance rules (tests/parity.py), imported rather than copied."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        import parity
    finally:
        sys.path.pop(0)
    return parity


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------- 1. parity


def _row(op: str, backend: str, dtype: str, what: str, err: float, allowed: float) -> dict:
    return dict(op=op, backend=backend, dtype=dtype, what=what, err=err, allowed=allowed,
                ok=bool(math.isfinite(err) and err <= allowed))


def _grads(fn: Callable, leaves: list, up: torch.Tensor | None = None):
    """fn(*leaves) -> (out, aux...), and d(sum(up * out))/d leaves (None where a leaf is None)."""
    xs = [None if x is None else x.detach().clone().requires_grad_() for x in leaves]
    outs = fn(*xs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    s = outs[0].sum() if up is None else (outs[0] * up.to(outs[0].dtype)).sum()
    if len(outs) > 1 and up is not None:
        s = s + (outs[1] * (0.5 * up).to(outs[1].dtype)).sum()  # an entropy term too
    s.backward()
    return [o.detach() for o in outs], [None if x is None else x.grad for x in xs]


def parity(device: str, sizes: str) -> dict:
    """Every op on ``device`` against the float64 reference, by the CPU tests' rules."""
    import apa_fast
    from apa_fast import losses, reference

    P = _tol()
    rows: list[dict] = []
    backends = ["triton", "torch"] if device == "cuda" else ["torch"]
    skipped = [] if device == "cuda" else ["triton: needs CUDA (on CPU the tests run it under TRITON_INTERPRET)"]
    big = sizes == "gpu"
    B, T, V = (4, 128, 151936) if big else (2, 6, 777)
    N, H, VL = (512, 1024, 50400) if big else (12, 48, 389)
    tau, cap = 0.7, 30.0
    g = torch.Generator().manual_seed(0)
    z64 = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * 3).to(device)
    y = torch.randint(0, V, (B, T), generator=g).to(device)
    y[:, 0] = -100  # ignored positions
    up = torch.randn(B, T, generator=g, dtype=torch.float64).to(device)
    ref_lp, adv, m = P.apa_targets((B, T), seed=7, device=torch.device(device))
    ylin = torch.randint(0, VL, (N,), generator=g).to(device)
    ylin[::5] = -100
    h64 = torch.randn(N, H, generator=g, dtype=torch.float64).to(device)
    w64 = (torch.randn(VL, H, generator=g, dtype=torch.float64) * (3.0 / H**0.5)).to(device)
    b64 = torch.randn(VL, generator=g, dtype=torch.float64).to(device)
    uplin = torch.randn(N, generator=g, dtype=torch.float64).to(device)

    def capped(z):
        return cap * torch.tanh(z / cap) / tau

    # log-probs and entropy from logits
    exact, gexact = _grads(lambda z: reference.token_logprobs(z, y, tau, -100, True, cap), [z64], up)
    for be in backends:
        fn = lambda z: apa_fast.token_logprobs(z, y, temperature=tau, return_entropy=True, backend=be, softcap=cap)  # noqa: E731
        (lp, ent), (gz,) = _grads(fn, [z64.float()], up.float())
        rows += [_row("token_logprobs", be, "fp32", "logp", P.max_err(lp, exact[0]), P.FP32_ATOL),
                 _row("token_logprobs", be, "fp32", "entropy", P.max_err(ent, exact[1]), P.FP32_ATOL),
                 _row("token_logprobs", be, "fp32", "grad", P.max_err(gz, gexact[0]), P.FP32_GRAD_ATOL)]
        zb = z64.to(torch.bfloat16)

        def eager(z):
            lsm = torch.log_softmax(capped(z), -1)
            keep = y != -100
            return torch.where(keep, lsm.gather(-1, torch.where(keep, y, 0)[..., None]).squeeze(-1), 0.0)

        (le,), (ge,) = _grads(eager, [zb], up.float())
        (lx,), (gx,) = _grads(lambda z: reference.token_logprobs(z, y, tau, -100, False, cap), [zb.double()], up)
        # the bf16 test's rules are for the log-prob term alone (no entropy)
        (lp1,), (gz1,) = _grads(lambda z: apa_fast.token_logprobs(z, y, temperature=tau, backend=be, softcap=cap),
                                [zb], up.float())
        rows += [_row("token_logprobs", be, "bf16", "logp - eager's error", P.max_err(lp1, lx) - P.max_err(le, lx),
                      P.LOWP_LOGP_MARGIN),
                 _row("token_logprobs", be, "bf16", "grad - eager's error", P.max_err(gz1, gx) - P.max_err(ge, gx),
                      P.rounding_margin(gx, torch.bfloat16))]

    # APA's loss from logits
    lam = 0.1
    (lref,), (gref,) = _grads(lambda z: reference.apa_loss(z, y.clamp(min=0), ref_lp, adv, m, lam, tau), [z64])
    for be in backends:
        (l,), (gz,) = _grads(lambda z: apa_fast.apa_loss(z, y.clamp(min=0), ref_lp.float(), adv.float(), m, lam=lam,
                                                         temperature=tau, backend=be), [z64.float()])
        rows += [_row("apa_loss", be, "fp32", "loss", P.max_err(l, lref), P.LOSS_ATOL + P.FP32_RTOL * abs(lref.item())),
                 _row("apa_loss", be, "fp32", "grad", P.max_err(gz, gref), P.FP32_RTOL * max(1.0, 1 / lam))]

    # from hidden states: log-probs, entropy and gradients of h, W, b
    exact, gexact = _grads(lambda a, c, d: reference.linear_token_logprobs(a, c, ylin, d, tau, -100, True, cap),
                           [h64, w64, b64], uplin)
    for be in backends:
        fn = lambda a, c, d: apa_fast.linear_token_logprobs(a, c, ylin, bias=d, temperature=tau, return_entropy=True,  # noqa: E731
                                                            backend=be, softcap=cap)
        (lp, ent), grads = _grads(fn, [h64.float(), w64.float(), b64.float()], uplin.float())
        rows += [_row("linear_token_logprobs", be, "fp32", "logp", P.max_err(lp, exact[0]), P.FP32_ATOL),
                 _row("linear_token_logprobs", be, "fp32", "entropy", P.max_err(ent, exact[1]), P.FP32_ATOL)]
        for name, a, r in zip(("grad_h", "grad_W", "grad_b"), grads, gexact):
            rows.append(_row("linear_token_logprobs", be, "fp32", name, P.max_err(a, r),
                             P.FP32_RTOL * max(1.0, r.abs().max().item())))
        lowp = [x.to(torch.bfloat16) for x in (h64, w64, b64)]

        def eager(a, c, d):
            lsm = torch.log_softmax(capped(F.linear(a, c, d)), -1)
            keep = ylin != -100
            return torch.where(keep, lsm.gather(-1, torch.where(keep, ylin, 0)[..., None]).squeeze(-1), 0.0)

        fn1 = lambda a, c, d: apa_fast.linear_token_logprobs(a, c, ylin, bias=d, temperature=tau, backend=be,  # noqa: E731
                                                             softcap=cap)
        (lp,), grads = _grads(fn1, lowp, uplin.float())
        (le,), ge = _grads(eager, lowp, uplin.float())
        (lx,), gx = _grads(lambda a, c, d: reference.linear_token_logprobs(a, c, ylin, d, tau, -100, False, cap),
                           [x.double() for x in lowp], uplin)
        rows.append(_row("linear_token_logprobs", be, "bf16", "logp - eager's error",
                         P.max_err(lp, lx) - P.max_err(le, lx), P.LOWP_LOGP_MARGIN))
        for name, a, e, x in zip(("grad_h", "grad_W", "grad_b"), grads, ge, gx):
            rows.append(_row("linear_token_logprobs", be, "bf16", f"{name} - eager's error",
                             P.max_err(a, x) - P.max_err(e, x), P.rounding_margin(x, torch.bfloat16)))

    # GRPO's loss from hidden states (the fused engine), fp32
    gl = torch.Generator().manual_seed(3)
    mk = (torch.rand(N, generator=gl) > 0.2).to(device)
    yl = torch.where(mk, ylin.clamp(min=0), 0)
    with torch.no_grad():  # behaviour and reference policies near the current one, as in training
        lp_now = reference.linear_token_logprobs(h64, w64, yl, b64, tau, -100, False, cap)
    old = lp_now + 0.1 * torch.randn(N, generator=gl, dtype=torch.float64).to(device)
    refl = lp_now + 0.1 * torch.randn(N, generator=gl, dtype=torch.float64).to(device)
    advl = torch.randn(N, generator=gl, dtype=torch.float64).to(device)

    def ref_grpo(a, c, d):
        lp = reference.linear_token_logprobs(a, c, yl, d, tau, -100, False, cap)
        return reference.grpo_loss(lp, old, refl, advl, mk, clip=0.2, beta=0.04)

    (lref,), gref = _grads(ref_grpo, [h64, w64, b64])
    loss32 = losses.grpo_token_loss(old.float(), refl.float(), advl.float(), mk, clip=0.2, beta=0.04)
    for be in backends:
        (l,), grads = _grads(lambda a, c, d: apa_fast.linear_token_loss(a, c, yl, loss32, bias=d, temperature=tau,
                                                                        backend=be, softcap=cap),
                             [h64.float(), w64.float(), b64.float()])
        rows.append(_row("linear_token_loss[grpo]", be, "fp32", "loss", P.max_err(l, lref),
                         P.LOSS_ATOL + P.FP32_RTOL * abs(lref.item())))
        for name, a, r in zip(("grad_h", "grad_W", "grad_b"), grads, gref):
            rows.append(_row("linear_token_loss[grpo]", be, "fp32", name, P.max_err(a, r),
                             P.FP32_RTOL * max(1.0, r.abs().max().item())))

    # GAE
    Bg, Tg = (256, 1024) if big else (4, 70)
    gg = torch.Generator().manual_seed(4)
    r = torch.randn(Bg, Tg, generator=gg, dtype=torch.float64).to(device)
    v = torch.randn(Bg, Tg, generator=gg, dtype=torch.float64).to(device)
    mg = (torch.rand(Bg, Tg, generator=gg) > 0.25).to(device)
    A64, R64 = reference.gae(r, v, mg, 0.99, 0.95)
    for be in backends:
        A, R = apa_fast.gae(r.float(), v.float(), mg, gamma=0.99, lam=0.95, backend=be)
        rows += [_row("gae", be, "fp32", "advantages", P.max_err(A, A64), P.GAE_ATOL_PER_STEP * Tg),
                 _row("gae", be, "fp32", "returns", P.max_err(R, R64), P.GAE_ATOL_PER_STEP * Tg)]
    return dict(rows=rows, skipped=skipped, sizes=dict(logits=(B, T, V), linear=(N, H, VL), gae=(Bg, Tg)),
                failures=[r for r in rows if not r["ok"]])


# --------------------------------------------------------------------------------------------- 2. the LM head


def _device_peak(device: str) -> float | None:
    if device != "cuda":
        return None
    name = torch.cuda.get_device_properties(0).name
    return next((v for k, v in BF16_PEAK.items() if k in name), None)


def _median_time(step: Callable, device: str, reps: int) -> float:
    ts = []
    for _ in range(reps):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step()
            b.record()
            torch.cuda.synchronize()
            ts.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            step()
            ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def _matmul_ceiling(N: int, H: int, V: int, dtype: torch.dtype, device: str) -> float | None:
    """FLOP/s of one cuBLAS matmul of the head's forward shape (N x H @ H x V), for scale."""
    if device != "cuda":
        return None
    a = torch.randn(N, H, device=device, dtype=dtype)
    b = torch.randn(H, min(V, 65536), device=device, dtype=dtype)
    a @ b
    t = _median_time(lambda: a @ b, device, 5)
    return 2 * N * H * b.shape[1] / t


def _head_impls(device: str) -> dict[str, str | None]:
    """implementation -> None (runs) or why it is skipped."""
    import importlib.util

    return {
        "apa_fast[triton]": None if device == "cuda" else "needs CUDA",
        "apa_fast[torch]": None,
        "eager": None,
        "linear_cross_entropy": None if hasattr(F, "linear_cross_entropy") else "this torch has no "
                                "torch.nn.functional.linear_cross_entropy",
        "liger": None if importlib.util.find_spec("liger_kernel") else "liger_kernel not installed",
    }


def _head_step(impl: str, h, w, y, old, ref, adv_tok, adv_seq, mask, B: int, T: int) -> Callable:
    """One forward + backward of the head's GRPO loss (clip 0.2, beta 0.04, token mean over the batch)."""
    import apa_fast
    from apa_fast import losses

    from .cases import _eager_logp, _lce_logp

    loss = losses.grpo_token_loss(old, ref, adv_tok, mask, clip=0.2, beta=0.04)
    if impl.startswith("apa_fast"):
        be = impl[len("apa_fast["):-1]
        return lambda: apa_fast.linear_token_loss(h, w, y, loss, backend=be).backward()
    if impl == "eager":
        return lambda: loss(_eager_logp(h @ w.t(), y)).backward()
    if impl == "linear_cross_entropy":
        return lambda: loss(_lce_logp(h, w, y)).backward()
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    mod = LigerFusedLinearGRPOLoss(beta=0.04, epsilon_low=0.2, epsilon_high=0.2, loss_type="dapo",
                                   use_ref_model=True, compiled=h.device.type == "cuda")
    H = h.shape[-1]
    return lambda: mod(h.view(B, T, H), w, y.view(B, T), mask.view(B, T), adv_seq, ref_per_token_logps=ref.view(B, T),
                       old_per_token_logps=old.view(B, T))[0].backward()


def head(device: str, dry: bool, budget_s: float) -> dict:
    """The head's GRPO loss, forward + backward, each implementation at each vocabulary (see the module doc)."""
    N, H, vocabs, dtype, reps = (64, 32, (512, 1000), torch.float32, 2) if dry else (
        HEAD_SHAPE["N"], HEAD_SHAPE["H"], HEAD_VOCABS, torch.bfloat16, 5)
    T = 1024 if N >= 1024 else N // 4
    B = N // T
    impls = _head_impls(device)
    peak = _device_peak(device)
    rows, t_start = [], time.perf_counter()
    for V in vocabs:
        g = torch.Generator().manual_seed(0)
        h = torch.randn(N, H, generator=g).to(device=device, dtype=dtype).requires_grad_()
        w = (torch.randn(V, H, generator=g) / H**0.5).to(device=device, dtype=dtype).requires_grad_()
        y = torch.randint(0, V, (N,), generator=g).to(device)
        old = (-torch.rand(N, generator=g) - math.log(V)).to(device)
        ref = (old + 0.05 * torch.randn(N, generator=g).to(device)).to(device)
        adv_seq = torch.randn(B, generator=g).to(device)
        adv_tok = adv_seq.repeat_interleave(T)
        mask = (torch.arange(N) % T < T - 16).to(device)  # right padding in each sequence
        ceiling = _matmul_ceiling(N, H, V, dtype, device)
        flops = 6 * N * H * V
        for impl, why in impls.items():
            row = dict(V=V, N=N, H=H, dtype=str(dtype).replace("torch.", ""), impl=impl)
            if why:
                rows.append({**row, "skipped": why})
                continue
            if time.perf_counter() - t_start > budget_s:
                rows.append({**row, "skipped": f"time budget of {budget_s:.0f} s spent"})
                continue
            try:
                step = _head_step(impl, h, w, y, old, ref, adv_tok, adv_seq, mask, B, T)
                t0 = time.perf_counter()
                step()  # warm-up: kernel compiles, torch.compile, allocator
                _sync(device)
                warm = time.perf_counter() - t0
                h.grad = w.grad = None
                mem = None
                if device == "cuda":
                    torch.cuda.empty_cache()
                    before = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                    step()
                    torch.cuda.synchronize()
                    kept = h.grad.numel() * h.grad.element_size() + w.grad.numel() * w.grad.element_size()
                    mem = torch.cuda.max_memory_allocated() - before - kept
                    h.grad = w.grad = None

                def timed():
                    step()
                    h.grad = w.grad = None

                t = _median_time(timed, device, reps)
                rows.append({**row, "time_s": t, "warmup_s": warm, "extra_mem_gib": None if mem is None else mem / 2**30,
                             "tflops": flops / t / 1e12, "of_peak": None if peak is None else flops / t / peak,
                             "of_matmul": None if ceiling is None else flops / t / ceiling})
            except Exception as e:  # noqa: BLE001 - a baseline that fails is recorded, the rest go on
                rows.append({**row, "error": f"{type(e).__name__}: {str(e)[:300]}"})
                h.grad = w.grad = None
            finally:
                if device == "cuda":
                    torch.cuda.empty_cache()
        del h, w
    return dict(rows=rows, dry_run=dry, peak_bf16_flops=peak, reps=reps,
                note=None if not dry else "a dry run of the benchmark's code at a tiny fp32 size on CPU: not a "
                "measurement. On CUDA: N=8,192, H=4,096, bf16, V 50,400 / 151,936 / 262,144: time, peak extra "
                "memory, FLOP/s against the bf16 peak and a cuBLAS matmul")


# --------------------------------------------------------------------------------------------- 3. the trainer


def _metrics(path: Path) -> dict:
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip().startswith("{")]
    rows = [r for r in rows if "tokens_per_s" in r or "iter_s" in r]
    if not rows:
        return {}
    last = rows[-1]
    keep = {k: v for k, v in last.items() if k.startswith("time_") or k in ("tokens_per_s", "iter_s", "max_mem_gb",
                                                                              "max_rss_gb", "step", "loss")}
    later = rows[1:] or rows  # iteration 1 carries the kernels' compiles
    keep["tokens_per_s_after_first"] = sum(r.get("tokens_per_s", 0) for r in later) / len(later)
    return keep


def trainer(device: str, steps: int, timeout: float) -> dict:
    """``python -m train.run`` for ``steps`` iterations in a subprocess; its metrics."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    out = Path(tempfile.mkdtemp(prefix="bench-gpu-trainer-"))
    model_note = "the offline preset's tiny GPT-J (addition task), fp32, one process"
    flags = ["--model", "offline", "--threads", "1"]
    if device == "cuda":
        # a small real-shaped model: the 162M Llama that bench.peers uses, built locally (no hub)
        q = subprocess.run([sys.executable, "-c", "import json, bench.trainer as t; "
                            "print(json.dumps(t.offline_task_flags(t.llama_160m_model())))"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        lines = [ln for ln in q.stdout.splitlines() if ln.startswith("[")]
        if q.returncode == 0 and lines:
            flags = json.loads(lines[-1])
            model_note = "a 162M Llama-shaped model (bench.trainer.llama_160m_model), bf16, FSDP2 on one GPU"
        else:
            model_note = f"the offline tiny GPT-J, bf16 (building the 162M Llama failed: {q.stderr[-300:]})"
        flags += ["--precision", "bf16"]
    cmd = [sys.executable, "-m", "train.run", *flags, "--steps", str(steps), "--out", str(out), "--no-plot"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    res = dict(command=" ".join(cmd[1:]), model=model_note, returncode=p.returncode,
               wall_s=round(time.perf_counter() - t0, 1))
    mfile = out / "metrics.jsonl"
    if p.returncode != 0 or not mfile.exists():
        res["error"] = (p.stderr or p.stdout)[-1500:]
    else:
        res["metrics"] = _metrics(mfile)
    subprocess.run(["rm", "-rf", str(out)], check=False)
    return res


# --------------------------------------------------------------------------------------------- report


def _fmt(x, spec=".3g"):
    return "-" if x is None else format(x, spec)


def markdown(rep: dict) -> str:
    mach = rep["machine"]
    dev = mach.get("gpu") or f"CPU ({mach.get('cpu')})"
    lines = [f"# bench.gpu on {dev} ({rep['stamp']})", "",
             f"torch {mach.get('torch')}, triton {mach.get('triton')}, liger-kernel {mach.get('liger_kernel')}, "
             f"git {mach.get('git')}; {rep['elapsed_s']:.0f} s in all.", ""]
    if rep["device"] != "cuda":
        lines += ["**No GPU: the GPU parts were skipped** (listed below with what they would measure); what ran is "
                  "the CPU-runnable code of each part.", ""]
    par = rep["parts"].get("parity")
    if par:
        lines += ["## Parity against the float64 reference", ""]
        if "error" in par:
            lines += [f"error: {par['error']}", ""]
        else:
            lines += [f"sizes {par['sizes']}; skipped: {'; '.join(par['skipped']) or 'nothing'}; "
                      f"failures: {len(par['failures'])} of {len(par['rows'])}.", "",
                      "| op | backend | dtype | quantity | error | allowed | ok |", "|---|---|---|---|---|---|---|"]
            for r in par["rows"]:
                lines.append(f"| {r['op']} | {r['backend']} | {r['dtype']} | {r['what']} | {r['err']:.3g} | "
                             f"{r['allowed']:.3g} | {'yes' if r['ok'] else '**NO**'} |")
        lines.append("")
    hd = rep["parts"].get("head")
    if hd:
        lines += ["## LM head: GRPO loss forward + backward", ""]
        if "error" in hd:
            lines += [f"error: {hd['error']}", ""]
        else:
            if hd.get("note"):
                lines += [hd["note"], ""]
            lines += ["| V | impl | time (ms) | extra memory (GiB) | TFLOP/s (6NHV) | of bf16 peak | of cuBLAS matmul "
                      "| note |", "|---|---|---|---|---|---|---|---|"]
            for r in hd["rows"]:
                note = r.get("skipped") or r.get("error") or ""
                t = r.get("time_s")
                lines.append(f"| {r['V']} | {r['impl']} | {_fmt(None if t is None else t * 1e3, '.1f')} | "
                             f"{_fmt(r.get('extra_mem_gib'), '.2f')} | {_fmt(r.get('tflops'), '.1f')} | "
                             f"{_fmt(r.get('of_peak'), '.0%')} | {_fmt(r.get('of_matmul'), '.0%')} | {note} |")
        lines.append("")
    tr = rep["parts"].get("trainer")
    if tr:
        lines += ["## Trainer smoke run", ""]
        if "metrics" in tr:
            lines += [f"{tr['model']}: `{tr['command']}` ({tr['wall_s']} s wall).", "",
                      "| metric | value |", "|---|---|", *[f"| {k} | {_fmt(v, '.4g')} |" for k, v in tr["metrics"].items()]]
        else:
            lines += [f"{tr.get('model', '')}: failed: {tr.get('error', '')[-800:]}"]
        lines.append("")
    if rep["skipped"]:
        lines += ["## Skipped here", "", *[f"- {s}" for s in rep["skipped"]], ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="parity,head,trainer", help="comma-separated of parity, head, trainer")
    ap.add_argument("--out", default=str(RESULTS), help="folder for gpu-<device>-<stamp>.json/.md")
    ap.add_argument("--steps", type=int, default=3, help="trainer iterations")
    ap.add_argument("--head-budget-s", type=float, default=180.0,
                    help="stop starting new head measurements after this many seconds")
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = [p for p in parts if p not in ("parity", "head", "trainer")]
    if bad or not parts:
        ap.error(f"--parts must be a comma-separated subset of parity,head,trainer, got {args.parts!r}")
    if args.steps < 1:
        ap.error(f"--steps must be >= 1, got {args.steps}")
    if os.environ.get("TRITON_INTERPRET") == "1":
        ap.error("unset TRITON_INTERPRET: bench.gpu measures compiled kernels (the interpreter is for the tests)")

    from . import machine

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(1)
    t0 = time.perf_counter()
    rep: dict = dict(device=device, machine=machine.describe(device), stamp=time.strftime("%Y%m%d-%H%M%S"),
                     parts={}, skipped=[])
    if device != "cuda":
        rep["skipped"] = [
            "parity on CUDA with the Triton backend (fp32, bf16; logits and hidden states; soft-cap, temperature, "
            "ignore_index; 4x128x151,936 logits, 512x1,024 hidden states with V = 50,400; GAE 256x1,024): here the "
            "torch backend at small sizes",
            "the LM head's GRPO loss at N = 8,192, H = 4,096, bf16, V = 50,400 / 151,936 / 262,144: apa-fast Triton, "
            "eager, torch linear_cross_entropy, Liger fused linear GRPO: time, peak extra memory, FLOP/s against "
            "the device's bf16 peak: here a dry run of the same code at a tiny size",
            "the trainer on a 162M Llama in bf16 under FSDP2 on one GPU: here the offline tiny model on CPU"]
    for part in parts:
        t = time.perf_counter()
        print(f"[bench.gpu] {part} ...", flush=True)
        try:
            if part == "parity":
                res = parity(device, "gpu" if device == "cuda" else "cpu")
            elif part == "head":
                res = head(device, dry=device != "cuda", budget_s=args.head_budget_s)
            else:
                res = trainer(device, args.steps, timeout=240 if device == "cuda" else 600)
        except Exception:  # noqa: BLE001 - one part's failure is reported, the others still run
            res = dict(error=traceback.format_exc()[-2000:])
        res["elapsed_s"] = round(time.perf_counter() - t, 1)
        rep["parts"][part] = res
        print(f"[bench.gpu] {part}: {res['elapsed_s']} s" + (" ERROR" if "error" in res else ""), flush=True)
    rep["elapsed_s"] = round(time.perf_counter() - t0, 1)
    md = markdown(rep)
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = rep["machine"].get("gpu") or "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    stem = out / f"gpu-{slug}-{rep['stamp']}"
    stem.with_suffix(".json").write_text(json.dumps(rep, indent=1, default=str))
    stem.with_suffix(".md").write_text(md)
    print(f"wrote {stem}.md and .json")
    failed = any("error" in p for p in rep["parts"].values()) or bool(rep["parts"].get("parity", {}).get("failures"))
    failed = failed or any("error" in r for r in rep["parts"].get("head", {}).get("rows", []) if r["impl"].startswith("apa"))
    failed = failed or rep["parts"].get("trainer", {}).get("returncode", 0) != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
