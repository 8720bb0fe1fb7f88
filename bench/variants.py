"""Every Triton kernel variant that the launchers in ``kernels/`` can choose, and its ahead-of-time compile for
a GPU target given explicitly (no GPU, no driver: Triton's own ``ASTSource`` + ``triton.compile``).

The variants are not listed here: the launchers (``logprobs_fwd``, ``logprobs_bwd``, ``token_fwd``, ``token_bwd``,
``gae_fwd``) are called on meta tensors over a grid of their public arguments, and each ``kernel[grid](...)``
launch they make is caught before it runs and specialised as Triton's launcher would specialise it (its own binder:
argument types, ``tt.divisibility`` attributes, ints equal to 1, constexprs, ``num_warps``). So the block sizes,
warp counts and flags are the launchers' own; ``grid_problems`` fails on a launcher argument the grid does not vary
and on a boolean constexpr that never takes both values, so that a new flag cannot be missed.

This module needs ``TRITON_INTERPRET`` unset before triton is imported (with it, ``@triton.jit`` gives interpreter
functions): ``bench.compile`` runs it in a subprocess without that variable.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import itertools
import os
import re
import subprocess
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

KERNEL_MODULES = ("kernels.logprobs", "kernels.linear", "kernels.gae")

# The grid of shapes (the issue's vocabularies and hidden sizes); token rows 1 / 24 / 8,192 give the tile kernels'
# BLOCK_N 16 / 32 / 64 and Triton's integer specialisations (== 1, not a multiple of 16, a multiple of 16).
V_GRID = (32000, 50400, 128256, 151936, 262144)
H_GRID = (768, 2048, 4096)
N_GRID = (1, 24, 8192)
# Logits kernels see (B, T) rows; T = 8,192 with V = 262,144 makes the batch stride 2^31: an int64 argument.
BT_GRID = ((1, 1), (2, 12), (1, 8192))
GAE_B_GRID = (1, 24, 4096)
GAE_T_GRID = (1, 512)
TAUS = (1.0, 0.7)
SOFTCAPS = (None, 30.0)
IGNORE_INDEX = -100

# Bool constexprs that only the interpreter sets (its bf16 rounding by hand): never True on a GPU.
INTERPRETER_ONLY = {"ROUND_BF16": "set only under TRITON_INTERPRET (hand rounding of the interpreter's bf16 cast)"}

# name -> (capability, ptxas tool): sm_90 is compiled as sm_90a by Triton.
TARGETS = {"sm_80": 80, "sm_90": 90, "sm_100": 100}
# Per target: largest dynamic shared memory a block may opt in to, shared memory and registers per SM, warps and
# blocks per SM (CUDA C++ Programming Guide, "Technical Specifications per Compute Capability").
LIMITS = {
    80: dict(shared_block=163 * 1024, shared_sm=164 * 1024, regs_sm=65536, warps_sm=64, blocks_sm=32),
    90: dict(shared_block=227 * 1024, shared_sm=228 * 1024, regs_sm=65536, warps_sm=64, blocks_sm=32),
    100: dict(shared_block=227 * 1024, shared_sm=228 * 1024, regs_sm=65536, warps_sm=64, blocks_sm=32),
}


# ---------------------------------------------------------------------------------------------- kernels


def jit_functions() -> dict[str, Any]:
    """Every ``@triton.jit`` function in ``kernels/``, by qualified name (``kernels.linear._fwd_kernel``)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("bench.variants needs TRITON_INTERPRET unset before triton is imported")
    from triton.runtime.jit import JITFunction

    out = {}
    for mod_name in KERNEL_MODULES:
        mod = importlib.import_module(mod_name)
        for name, obj in vars(mod).items():
            if isinstance(obj, JITFunction) and obj.__module__ == mod_name:
                out[f"{mod_name}.{name}"] = obj
    return out


def launched_kernels() -> dict[str, Any]:
    """The jit functions that are kernels (launched), not helpers: those no other jit function calls."""
    fns = jit_functions()
    called = set()
    for qual, fn in fns.items():
        for other in fns:
            short = other.rsplit(".", 1)[1]
            if other != qual and re.search(rf"\b{re.escape(short)}\(", fn.src):
                called.add(other)
    return {q: f for q, f in fns.items() if q not in called}


# ---------------------------------------------------------------------------------------------- launcher grid


def _launcher_calls() -> dict[str, tuple[Callable, Iterator[dict]]]:
    """launcher qualified name -> (the launcher, the keyword arguments of each call in the grid)."""
    import torch

    from kernels import gae, linear, logprobs

    dev = "meta"
    DT = (torch.float32, torch.bfloat16, torch.float16)

    def t(*shape, dtype=torch.float32):
        return torch.empty(shape, dtype=dtype, device=dev)

    def lp_fwd():
        for dt, V, (B, T), tau, ent, cap in itertools.product(DT, V_GRID, BT_GRID, TAUS, (False, True), SOFTCAPS):
            yield dict(x3=t(B, T, V, dtype=dt), labels=t(B, T, dtype=torch.int64), tau=tau,
                       ignore_index=IGNORE_INDEX, return_entropy=ent, softcap=cap)

    def lp_bwd():
        for dt, V, (B, T), tau, g, ge, cap in itertools.product(DT, V_GRID, BT_GRID, TAUS, (False, True),
                                                                (False, True), SOFTCAPS):
            row = t(B, T)
            yield dict(x3=t(B, T, V, dtype=dt), labels=t(B, T, dtype=torch.int64), lse=row,
                       entropy=row if ge else None, g_logp=row if g else None, g_ent=row if ge else None,
                       tau=tau, ignore_index=IGNORE_INDEX, softcap=cap)

    def lin_fwd():
        for dt, V, H, N, tau, bias, ent, cap in itertools.product(DT, V_GRID, H_GRID, N_GRID, TAUS, (False, True),
                                                                  (False, True), SOFTCAPS):
            yield dict(h=t(N, H, dtype=dt), weight=t(V, H, dtype=dt), bias=t(V, dtype=dt) if bias else None,
                       labels=t(N, dtype=torch.int64), tau=tau, return_entropy=ent, softcap=cap)

    def lin_bwd():
        needs = [n for n in itertools.product((False, True), repeat=3) if any(n)]
        for dt, V, H, N, tau, bias, g, ge, need, cap in itertools.product(
                DT, V_GRID, H_GRID, N_GRID, TAUS, (False, True), (False, True), (False, True), needs, SOFTCAPS):
            row = t(N)
            yield dict(h=t(N, H, dtype=dt), weight=t(V, H, dtype=dt), bias=t(V, dtype=dt) if bias else None,
                       labels=t(N, dtype=torch.int64), lse=row, ent=row if ge else None, g_logp=row if g else None,
                       g_ent=row if ge else None, tau=tau, need=need, softcap=cap)

    def gae_grid():
        for dt, B, T, last, mdt in itertools.product((torch.float32, torch.bfloat16, torch.float64), GAE_B_GRID,
                                                     GAE_T_GRID, (False, True), (torch.bool, torch.float32)):
            yield dict(rewards=t(B, T, dtype=dt), values=t(B, T, dtype=dt), mask=t(B, T, dtype=mdt), gamma=1.0,
                       lam=0.95, last_values=t(B, dtype=dt) if last else None)

    return {
        "kernels.logprobs.logprobs_fwd": (logprobs.logprobs_fwd, lp_fwd()),
        "kernels.logprobs.logprobs_bwd": (logprobs.logprobs_bwd, lp_bwd()),
        "kernels.linear.token_fwd": (linear.token_fwd, lin_fwd()),
        "kernels.linear.token_bwd": (linear.token_bwd, lin_bwd()),
        "kernels.gae.gae_fwd": (gae.gae_fwd, gae_grid()),
    }


def _describe(x: Any) -> str:
    """A launcher argument as the grid's coverage sees it: a tensor by its dtype, anything else by value."""
    if hasattr(x, "dtype") and hasattr(x, "shape"):
        return f"tensor:{str(x.dtype).replace('torch.', '')}"
    return repr(x)


@dataclass
class Launch:
    kernel: str  # qualified name
    launcher: str
    args: tuple
    kwargs: dict


@dataclass
class Grid:
    launches: list[Launch]
    # launcher -> parameter -> distinct values the grid gave it
    values: dict[str, dict[str, set[str]]] = field(default_factory=dict)
    signatures: dict[str, inspect.Signature] = field(default_factory=dict)


def intercept() -> Grid:
    """Call every launcher over the grid on meta tensors, catching each kernel launch before it runs."""
    kernels = launched_kernels()
    grid = Grid([])
    current = {"launcher": ""}

    def catcher(qual):
        def run(*args, grid, warmup, **kwargs):  # noqa: ARG001 - the launch is recorded, never run
            seen.append(Launch(qual, current["launcher"], args, kwargs))

        return run

    seen: list[Launch] = []
    for qual, k in kernels.items():
        k.run = catcher(qual)  # instance attribute: kernel[grid](...) calls self.run
    try:
        for name, (fn, calls) in _launcher_calls().items():
            current["launcher"] = name
            grid.signatures[name] = inspect.signature(fn)
            vals = grid.values.setdefault(name, {})
            for kw in calls:
                for p, v in kw.items():
                    vals.setdefault(p, set()).add(_describe(v))
                fn(**kw)
    finally:
        for k in kernels.values():
            k.__dict__.pop("run", None)
    grid.launches = seen
    return grid


# ---------------------------------------------------------------------------------------------- variants


@dataclass
class Variant:
    """One compiled form of a kernel: what Triton's cache key distinguishes, for one target."""

    kernel: str
    cap: int
    signature: dict  # param -> Triton type ("*bf16", "i32", "constexpr")
    constexprs: dict  # path tuple -> value (flags, blocks, and ints specialised to 1)
    attrs: dict  # path tuple -> [[attr, value]]
    options: dict  # backend options (num_warps, num_stages, ...)
    launcher: str
    param_names: list[str]
    declared: list[str]  # the kernel's own tl.constexpr parameters

    @property
    def key(self) -> str:
        """What tells two compiled forms apart on one target."""
        return repr((self.cap, self.row_key, self.options.get("num_stages")))

    @property
    def row_key(self) -> str:
        """The same variant on any target."""
        return repr((self.kernel, sorted(self.signature.items()), sorted(self.constexprs.items()),
                     sorted((k, repr(v)) for k, v in self.attrs.items()), self.options.get("num_warps")))

    def named_constexprs(self) -> dict[str, Any]:
        return {self.param_names[p[0]]: v for p, v in self.constexprs.items() if len(p) == 1}

    def flags(self) -> dict[str, Any]:
        """The kernel's own constexpr parameters (flags, blocks, tau), by name."""
        return {n: v for n, v in self.named_constexprs().items() if n in self.declared}

    def dtype(self) -> str:
        """Element type of the kernel's first pointer argument (the logits, hidden states or rewards)."""
        return next((v[1:] for v in self.signature.values() if isinstance(v, str) and v.startswith("*")), "-")

    def specialisation(self) -> str:
        """Runtime arguments Triton specialised: ints equal to 1, 64-bit ints, ints not a multiple of 16."""
        named = self.named_constexprs()
        div16 = {self.param_names[p[0]] for p, a in self.attrs.items() if any(x[0] == "tt.divisibility" for x in a)}
        out = []
        for n in self.param_names:
            ty = self.signature.get(n)
            if n in self.declared:
                continue
            if n in named:
                out.append(f"{n}=1")
            elif ty == "i64":
                out.append(f"{n}:i64")
            elif ty in ("i32", "i64") and n not in div16:
                out.append(f"{n}%16!=0")
        return " ".join(out) or "all %16"

    def label(self) -> str:
        short = self.kernel.rsplit(".", 1)[1]
        f = self.flags()
        on = [n for n, v in f.items() if v is True and n not in INTERPRETER_ONLY]
        blocks = "x".join(str(v) for n, v in f.items() if n.startswith("BLOCK_"))
        extra = [f"{n}={v}" for n, v in f.items() if not isinstance(v, bool) and not n.startswith("BLOCK_")
                 and n not in ("SOFTCAP", "IGNORE_INDEX")]
        return (f"{short} {self.dtype()} [{','.join(on) or '-'}] blocks {blocks} w{self.options.get('num_warps')} "
                f"{' '.join(extra)} ({self.specialisation()})")

    def features(self) -> set[tuple]:
        """What a representative set must cover: each flag value, block, warp count, dtype, specialisation."""
        k = self.kernel
        feats = {(k, "dtype", self.dtype()), (k, "num_warps", self.options.get("num_warps")),
                 (k, "spec", self.specialisation())}
        feats |= {(k, n, v) for n, v in self.flags().items()}
        return feats

    def work(self) -> dict:
        return dict(kernel=self.kernel, cap=self.cap, signature=self.signature, constexprs=self.constexprs,
                    attrs=self.attrs, options=self.options)


def specialise(launches: list[Launch], cap: int) -> list[Variant]:
    """The distinct variants among ``launches`` for one target, specialised by Triton's own binder."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernels = launched_kernels()
    backend = make_backend(GPUTarget("cuda", cap, 32))
    binders = {}
    out: dict[str, Variant] = {}
    for ln in launches:
        k = kernels[ln.kernel]
        if ln.kernel not in binders:
            binders[ln.kernel] = create_function_from_signature(k.signature, k.params, backend)
        bound, spec, opts = binders[ln.kernel](*ln.args, **ln.kwargs)
        options, signature, constexprs, attrs = k._pack_args(backend, dict(ln.kwargs), bound, spec, opts)
        v = Variant(ln.kernel, cap, dict(signature), dict(constexprs), dict(attrs), dict(options.__dict__),
                    ln.launcher, [p.name for p in k.params], [p.name for p in k.params if p.is_constexpr])
        out.setdefault(v.key, v)
    return list(out.values())


def _heaviness(v: Variant) -> tuple[int, int]:
    """(flags on, block elements): the variant of a kernel most likely to run out of registers or shared memory."""
    f = v.flags()
    blocks = 1
    for n, val in f.items():
        if n.startswith("BLOCK_"):
            blocks *= int(val)
    return sum(1 for n, val in f.items() if val is True and n not in INTERPRETER_ONLY), blocks


def representative(variants: list[Variant]) -> list[Variant]:
    """A small subset: for each kernel and input dtype its heaviest variant (every flag on, the largest blocks),
    then a greedy cover of every flag value, block size, warp count, dtype and integer specialisation."""
    pool = sorted(variants, key=lambda v: v.key)
    chosen: dict[str, Variant] = {}
    for kd in sorted({(v.kernel, v.dtype()) for v in pool}):
        best = max((v for v in pool if (v.kernel, v.dtype()) == kd), key=_heaviness)
        chosen[best.key] = best
    todo = set().union(*(v.features() for v in pool)) if pool else set()
    for v in chosen.values():
        todo -= v.features()
    while todo:
        best = max(pool, key=lambda v: len(v.features() & todo))
        chosen[best.key] = best
        todo -= best.features()
    return list(chosen.values())


def grid_problems(grid: Grid, variants: list[Variant]) -> list[str]:
    """Ways in which the grid could miss a variant: a launcher argument it does not set, an optional or boolean
    argument it does not vary, a kernel never launched, a boolean constexpr that never takes both values."""
    out = []
    for name, sig in grid.signatures.items():
        vals = grid.values.get(name, {})
        for p, param in sig.parameters.items():
            if p not in vals:
                out.append(f"{name}: argument {p!r} is not set by bench.variants' grid")
                continue
            ann = str(param.annotation)
            if ("None" in ann or "bool" in ann) and len(vals[p]) < 2:
                out.append(f"{name}: optional/boolean argument {p!r} takes one value only ({sorted(vals[p])})")
    launched = {v.kernel for v in variants}
    for q in launched_kernels():
        if q not in launched:
            out.append(f"{q}: never launched by the launchers over the grid")
    by_kernel: dict[str, dict[str, set]] = {}
    for v in variants:
        for n, val in v.flags().items():
            if isinstance(val, bool):
                by_kernel.setdefault(v.kernel, {}).setdefault(n, set()).add(val)
    for k, flags in by_kernel.items():
        for n, vals in flags.items():
            if vals != {False, True} and n not in INTERPRETER_ONLY:
                out.append(f"{k}: constexpr {n} only takes {sorted(vals)} over the grid")
    return out


# ---------------------------------------------------------------------------------------------- compiling

_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def occupancy(regs: int, shared: int, warps: int, cap: int) -> tuple[int, int]:
    """(blocks per SM, warps per SM) from registers per thread (allocated per warp in units of 256), shared memory
    per block (plus 1 KiB the driver reserves per block) and the per-SM limits of the target."""
    lim = LIMITS[cap]
    regs_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = (lim["regs_sm"] // regs_warp) // warps
    by_shared = lim["shared_sm"] // (shared + 1024) if shared else lim["blocks_sm"]
    blocks = min(by_regs, by_shared, lim["warps_sm"] // warps, lim["blocks_sm"])
    return blocks, blocks * warps


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")


def spills_in_loops(cubin: bytes) -> tuple[int, int]:
    """(local loads/stores in the SASS, those inside a loop): a loop is the span of a backward branch."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    return local_in_loops(sass)


def local_in_loops(sass: str) -> tuple[int, int]:
    """``spills_in_loops`` on SASS text."""
    local, loops = [], []
    for m in _SASS_LINE.finditer(sass):
        addr, op, rest = int(m.group(1), 16), m.group(2), m.group(3)
        if op.startswith(("LDL", "STL")):
            local.append(addr)
        elif op.startswith("BRA"):
            t = re.search(r"0x([0-9a-f]+)", rest)
            if t and int(t.group(1), 16) <= addr:
                loops.append((int(t.group(1), 16), addr))
    return len(local), sum(1 for a in local if any(lo <= a <= hi for lo, hi in loops))


def compile_one(work: dict) -> dict:
    """Compile one variant for its target; registers, spills and stack from ptxas's verbose log, shared memory
    from Triton's metadata. Never raises: a failure is returned as ``error``."""
    import time

    warnings.filterwarnings("ignore", message=".*FP_FUSION.*")
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    knobs.nvidia.dump_ptxas_log = True  # make_cubin prints ptxas -v's log to stdout
    kern = launched_kernels()[work["kernel"]]
    t0 = time.perf_counter()
    buf = io.StringIO()
    res: dict[str, Any] = dict(kernel=work["kernel"], cap=work["cap"])
    try:
        with contextlib.redirect_stdout(buf):
            ck = triton.compile(ASTSource(kern, work["signature"], work["constexprs"], work["attrs"]),
                                target=GPUTarget("cuda", work["cap"], 32), options=work["options"])
    except Exception as e:  # noqa: BLE001 - reported per variant
        res["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:400]
        res["compile_s"] = round(time.perf_counter() - t0, 2)
        return res
    log = buf.getvalue()
    m_regs, m_frame = _PTXAS_REGS.search(log), _PTXAS_FRAME.search(log)
    if m_regs is None or m_frame is None:
        res["error"] = "no ptxas -v log (compiled from a cache?)"
        return res
    warps = ck.metadata.num_warps
    shared = int(ck.metadata.shared)
    regs = int(m_regs.group(1))
    blocks, warps_sm = occupancy(regs, shared, warps, work["cap"])
    res.update(regs=regs, stack=int(m_frame.group(1)), spill_stores=int(m_frame.group(2)),
               spill_loads=int(m_frame.group(3)), shared=shared, num_warps=warps, blocks_sm=blocks,
               warps_sm=warps_sm, cubin_bytes=len(ck.asm["cubin"]), compile_s=round(time.perf_counter() - t0, 2))
    if res["spill_stores"] or res["spill_loads"]:
        res["local_insts"], res["local_insts_in_loops"] = spills_in_loops(ck.asm["cubin"])
    return res


def target_available(cap: int) -> str | None:
    """None when ptxas for ``cap`` runs here, else why not (sm_100 needs the wheel's ptxas-blackwell)."""
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        tool = get_ptxas(cap)
        subprocess.run([tool.path, "--version"], check=True, capture_output=True, timeout=60)
    except Exception as e:  # noqa: BLE001
        return f"ptxas for sm_{cap} does not run here: {type(e).__name__}: {e}"
    return None
