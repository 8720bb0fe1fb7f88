"""The machine a run happened on, and what bounds it: memory bandwidth and exp throughput.

CPU: read, write and copy bandwidth over a buffer far larger than the caches (the buffer already
touched), the cost of writing a *fresh* buffer (first touch page-faults: every new gradient pays
it), exp throughput on an L2-resident chunk, and the fp32 matmul rate (the floor of the losses from
hidden states). CUDA: the device's peak bandwidth from its memory
clock and bus width, and a measured device-to-device copy.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import time

import torch


def _median(f, k: int = 5) -> float:
    ts = []
    for _ in range(k):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout.strip()
    except OSError:
        return "?"


def describe(device: str) -> dict:
    info = dict(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        device=device,
        cpu=_cpu_model(),
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        python=platform.python_version(),
        torch=torch.__version__,
        git=_git_rev(),
        load_avg=os.getloadavg() if hasattr(os, "getloadavg") else None,
    )
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    try:
        import importlib.metadata as md

        info["liger_kernel"] = md.version("liger-kernel")
    except Exception:
        info["liger_kernel"] = None
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = p.name
        info["gpu_memory_gib"] = round(p.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


def gpu_peak_bandwidth() -> float | None:
    """Bytes/s from the memory clock (kHz, double data rate) and bus width, when torch exposes them."""
    p = torch.cuda.get_device_properties(0)
    clock = getattr(p, "memory_clock_rate", None)
    width = getattr(p, "memory_bus_width", None)
    if clock and width:
        return 2.0 * clock * 1e3 * width / 8
    table = {"H100 SXM": 3.35e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12,
             "L40S": 0.864e12, "A10": 0.6e12, "4090": 1.0e12}
    for k, v in table.items():
        if k in p.name:
            return v
    return None


def bounds(device: str) -> dict:
    out: dict = {}
    if device == "cuda":
        n = 1 << 28  # 1 GiB of fp32
        a = torch.empty(n, device="cuda")
        b = torch.empty_like(a)
        a.fill_(1.0)

        def copy():
            b.copy_(a)
            torch.cuda.synchronize()

        copy()
        out["copy_GBps"] = 2 * n * 4 / _median(copy, 10) / 1e9
        peak = gpu_peak_bandwidth()
        out["peak_GBps"] = None if peak is None else peak / 1e9
        return out
    n = 1 << 27  # 512 MiB of fp32: far past L2, and past most of a shared L3
    a = torch.randn(n)
    b = torch.empty_like(a)
    b.fill_(0.0)
    gb = n * 4 / 1e9
    out["read_GBps"] = gb / _median(lambda: a.sum())
    out["write_GBps"] = gb / _median(lambda: b.fill_(1.0))
    out["copy_GBps"] = 2 * gb / _median(lambda: b.copy_(a))
    out["fresh_write_GBps"] = gb / _median(lambda: torch.empty_like(a).fill_(1.0))
    out["matmul_GFLOPs"] = matmul_gflops(1024)
    c = torch.randn(5, 50400)
    cb = torch.empty_like(c)
    reps = 200
    out["exp_Gelem_per_s_in_L2"] = c.numel() * reps / 1e9 / _median(lambda: [torch.exp(c, out=cb) for _ in range(reps)])
    nt = torch.get_num_threads()
    torch.set_num_threads(1)  # one core's exp rate, free of fork/join stalls on a busy machine
    try:
        out["exp_Gelem_per_s_1thread"] = c.numel() * reps / 1e9 / _median(lambda: [torch.exp(c, out=cb) for _ in range(reps)])
    finally:
        torch.set_num_threads(nt)
    return out


def matmul_gflops(k: int, m: int = 2048, n: int = 8192, reps: int = 5) -> float:
    """The measured fp32 matmul rate, GFLOP/s: ``(m x k) @ (k x n)`` (``a @ b.T``, as an LM head's logits), the
    median of ``reps`` after one warm-up. A fused loss from hidden states does at least ``6 N H V`` FLOP (the logits,
    then the gradients of hidden and weight), so ``6 N H V / rate`` is its floor on this machine."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    out = torch.empty(m, n)
    torch.matmul(a, b.t(), out=out)
    return 2.0 * m * k * n / _median(lambda: torch.matmul(a, b.t(), out=out), reps) / 1e9
