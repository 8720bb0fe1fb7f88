"""What a user sees: metrics.jsonl, TensorBoard (when installed), samples.jsonl and plots."""

from __future__ import annotations

import ctypes
import json
import math
from pathlib import Path


class MetricsLog:
    """Appends one JSON object per step to ``metrics.jsonl``; mirrors scalars to TensorBoard if available."""

    def __init__(self, out: Path, resume_step: int | None = None, tensorboard: bool = True):
        self.path = Path(out) / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            # a resumed run rewrites what came after its checkpoint
            # (a kill may have left a half-written last line: it is dropped with the rest)
            keep = []
            for ln in self.path.read_text().splitlines():
                try:
                    if json.loads(ln)["step"] <= resume_step:
                        keep.append(ln)
                except (ValueError, KeyError, TypeError):
                    continue
            self.path.write_text("".join(ln + "\n" for ln in keep))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(out) / "tb"))
            except Exception:  # noqa: BLE001 - TensorBoard is optional
                self.tb = None

    def log(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, row["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(k, ctypes.c_size_t) for k in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                                 "uordblks", "fordblks", "keepcost")]


def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 (glibc only)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        return None
    if hasattr(libc, "mallinfo2"):  # glibc >= 2.33
        libc.mallinfo2.restype = _Mallinfo2
    return libc


_LIBC = _libc()
TRIM_ABOVE = 64 << 20  # free heap bytes worth a trim: below that the page faults of reusing them cost more


def release_freed_memory() -> None:
    """Give the heap pages that freed tensors leave behind back to the OS (glibc's ``malloc_trim``, when more than
    ``TRIM_ABOVE`` bytes of the heap are free; a no-op elsewhere). glibc keeps them resident, so a phase's freed
    activations or gradients would otherwise stay in the RSS under the next phase's allocations; a trim costs the
    page faults of touching them again."""
    if _LIBC is None:
        return
    if hasattr(_LIBC, "mallinfo2") and _LIBC.mallinfo2().fordblks < TRIM_ABOVE:
        return
    _LIBC.malloc_trim(0)


def peak_rss_gb() -> float:
    """Peak resident memory of this process, GiB: ``VmHWM`` of its own address space on Linux.

    (``getrusage``'s ``ru_maxrss`` also counts the parent's memory when the process was started by
    fork/vfork + exec, so a trainer launched by a large parent would report the parent's peak.)"""
    try:
        with open("/proc/self/status") as f:
            for ln in f:
                if ln.startswith("VmHWM:"):
                    return int(ln.split()[1]) / 2**20  # kB
    except OSError:
        pass
    import resource
    import sys

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**30 if sys.platform == "darwin" else r / 2**20  # bytes on macOS, KiB elsewhere


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


def smooth(y: list[float], k: int = 5) -> list[float]:
    """The running mean of the last ``k`` values (fewer at the start)."""
    out = []
    for i in range(len(y)):
        w = y[max(0, i - k + 1) : i + 1]
        out.append(sum(w) / len(w))
    return out


def plot_runs(runs: dict[str, list[dict]], png: Path, title: str = "") -> None:
    """Reward and KL (``kl_sqrt_k3``: sqrt of the mean k3 over response tokens) against steps: the form of the
    paper's Fig. 1, though not its KL quantity (see ``run.iteration_metrics``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, rows in runs.items():
        steps = [r["step"] for r in rows]
        rew = [r["reward_mean"] for r in rows]
        (line,) = a.plot(steps, smooth(rew), label=name)
        a.plot(steps, rew, color=line.get_color(), alpha=0.25, lw=0.8)
        kl = [r["kl_sqrt_k3"] for r in rows]
        b.plot(steps, smooth(kl), label=name, color=line.get_color())
        b.plot(steps, kl, color=line.get_color(), alpha=0.25, lw=0.8)
    a.set_xlabel("step")
    a.set_ylabel("reward (batch mean; line: 5-step average)")
    a.set_title("reward")
    b.set_xlabel("step")
    b.set_ylabel("sqrt(mean k3) to the initial policy")
    b.set_title("KL divergence")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
