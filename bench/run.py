"""One command for the whole benchmark: ``python -m bench.run [--quick] [--device cpu|cuda]``.

Runs the pytest-benchmark suites (``bench/bench_*.py``) in a child pytest, then writes under
``bench/results/``:

- ``<device>-<profile>-<stamp>.json``: pytest-benchmark's raw JSON, plus the machine and its bounds;
- ``<device>-<profile>-<stamp>.md`` (and ``latest-<device>-<profile>.md``): the table, the targets;
- ``<device>-<profile>-<stamp>.png`` (and ``latest-...png``): time and extra memory per implementation.

Times are medians over the rounds (min beside them: on a shared machine the min is the least
disturbed sample); ratios compare implementations measured back to back in this one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from typing import NamedTuple

from .cases import shape_label

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
BASELINE = {"logprobs": "eager", "apa_loss": "eager", "gae": "loop[verl]", "linear_apa_loss": "eager",
            "linear_grpo_loss": "eager"}


def _mib(b) -> str:
    if b is None:
        return "n/a"
    return f"{b / 2**20:,.1f}"


def _fmt_t(s: float) -> str:
    return f"{s * 1e3:,.2f}" if s < 10 else f"{s:,.1f} s"


def _times(sep: str, *secs: float) -> str:
    """Times for a target's text: "1.59 vs 34.16 ms" when all are under 10 s, else each with its unit."""
    if all(s < 10 for s in secs):
        return sep.join(_fmt_t(s) for s in secs) + " ms"
    return sep.join(_fmt_t(s) if s >= 10 else f"{_fmt_t(s)} ms" for s in secs)


def rows_from(raw: dict) -> list[dict]:
    """One row per case measured, with its bandwidth (GB/s, and the fraction of the device's peak on
    CUDA or of the measured copy bandwidth on CPU) where the op moves a known number of bytes."""
    dev, bd = raw["machine"]["device"], raw["bounds"]
    ref = bd.get("peak_GBps") if dev == "cuda" else bd.get("copy_GBps")
    rows = []
    for b in raw["benchmarks"]:
        e = b["extra_info"]
        if "op" not in e:
            continue
        st = b["stats"]
        shape = {k[len("shape_"):]: v for k, v in e.items() if k.startswith("shape_")}
        gbs = bw_frac = None
        if e.get("bytes_moved") and e["op"] != "gae":
            gbs = e["bytes_moved"] / st["median"] / 1e9
            bw_frac = gbs / ref if ref else None
        rows.append(dict(
            op=e["op"], impl=e["impl"], shape=shape_label(shape), median=st["median"], min=st["min"],
            rounds=st["rounds"], extra=e.get("mem_extra_bytes"), mem_error=e.get("mem_error"),
            result_bytes=e.get("result_bytes"), input_bytes=e.get("input_bytes"),
            bytes_moved=e.get("bytes_moved"), tokens=e.get("tokens"), gbs=gbs, bw_frac=bw_frac,
        ))
    return rows


def _groups(rows):
    out: dict = {}
    for r in rows:
        out.setdefault((r["op"], r["shape"]), []).append(r)
    return out


class _Ratio(NamedTuple):
    value: float  # a's field over b's (the medians, unless told)
    a: dict
    b: dict

    @property
    def by_min(self) -> float:
        return self.a["min"] / self.b["min"]


def _ratio(groups, key, a: str, b: str, field: str = "median") -> _Ratio | None:
    """Impl ``a``'s ``field`` over impl ``b``'s in the group ``key`` = (op, shape label); None when
    either is missing (or b's value is 0 or None, a's None)."""
    d = {r["impl"]: r for r in groups.get(key, ())}
    if a not in d or b not in d or d[a][field] is None or not d[b][field]:
        return None
    return _Ratio(d[a][field] / d[b][field], d[a], d[b])


APA_GPU = ("apa_loss", shape_label(dict(N=16384, V=128256, dtype="bf16", mode="fwd+bwd")))
APA_CPU = ("apa_loss", shape_label(dict(N=4096, V=50400, dtype="fp32", mode="fwd+bwd")))
GAE_CPU = ("gae", shape_label(dict(B=256, T=1024)))
LINEAR_CPU = {loss: ("linear_apa_loss", shape_label(dict(N=2048, H=1024, V=50400, dtype="fp32", mode="fwd+bwd",
                                                      **({} if loss == "apa" else {"loss": loss}))))
              for loss in ("apa", "ppo", "awr")}


def targets(rows, device: str) -> list[tuple[str, str, bool | None]]:
    """The issue's targets, as (what, measured, met)."""
    g = _groups(rows)
    res = []
    if device != "cpu":
        if r := _ratio(g, APA_GPU, "eager", "apa_fast[triton]"):
            res.append(("Triton APA fwd+bwd >= 3x eager", f"{r.value:.2f}x", r.value >= 3))
        if r := _ratio(g, APA_GPU, "liger", "apa_fast[triton]"):
            res.append(("Triton faster than Liger CE", f"{r.value:.2f}x", r.b["median"] < r.a["median"]))
        t = {r["impl"]: r for r in g.get(APA_GPU, ())}.get("apa_fast[triton]")
        if t and t.get("bw_frac") is not None:
            res.append(("Triton >= 80% of peak bandwidth", f"{100 * t['bw_frac']:.0f}%", t["bw_frac"] >= 0.8))
        return res
    if r := _ratio(g, APA_CPU, "apa_fast[torch]", "eager"):
        res.append(("APA fwd+bwd time, torch / eager <= 0.5",
                    f"{r.value:.3f} (median {_times(' / ', r.a['median'], r.b['median'])}; by min {r.by_min:.3f})",
                    r.value <= 0.5))
    if r := _ratio(g, APA_CPU, "apa_fast[torch]", "eager", field="extra"):
        res.append(("extra memory beyond the logits gradient, torch / eager <= 5%",
                    f"{100 * r.value:.3f}% ({_mib(r.a['extra'])} / {_mib(r.b['extra'])} MiB)", r.value <= 0.05))
    for loss, key in LINEAR_CPU.items():
        if r := _ratio(g, key, "apa_fast[torch]", "eager"):
            res.append((f"{loss.upper()} loss from hidden states N=2048 H=1024 V=50,400, torch / eager linear + "
                        "log_softmax <= 1.0", f"{r.value:.3f} (median {_times(' / ', r.a['median'], r.b['median'])})",
                        r.value <= 1.0))
        if r := _ratio(g, key, "apa_fast[torch]", "eager", field="extra"):
            res.append((f"{loss.upper()} from hidden states, extra memory torch / eager <= 10%",
                        f"{100 * r.value:.1f}% ({_mib(r.a['extra'])} / {_mib(r.b['extra'])} MiB)", r.value <= 0.10))
    if r := _ratio(g, GAE_CPU, "loop[verl]", "apa_fast[torch]"):
        trlx = _ratio(g, GAE_CPU, "loop[trlx]", "apa_fast[torch]") or r
        res.append(("GAE 256x1024, Python loop / torch >= 20x (public API, input value checks on)",
                    f"{r.value:.1f}x (median {_times(' vs ', r.b['median'], r.a['median'])}; by min "
                    f"{r.by_min:.1f}x; vs the trlx loop {trlx.value:.1f}x)", r.value >= 20))
        if r := _ratio(g, GAE_CPU, "loop[verl]", "apa_fast[torch]-nocheck"):
            res.append(("GAE 256x1024, Python loop / torch >= 20x (APA_FAST_SKIP_VALUE_CHECKS=1)",
                        f"{r.value:.1f}x (median {_times(' vs ', r.b['median'], r.a['median'])}; by min "
                        f"{r.by_min:.1f}x)", r.value >= 20))
    return res


def markdown(raw: dict, rows, cmd: str) -> str:
    m, bd = raw["machine"], raw["bounds"]
    dev = m["device"]
    lines = [f"### apa-fast benchmark: {dev}, profile `{raw['profile']}`", ""]
    where = m.get("gpu") or f"{m['cpu']} ({m['cpu_count']} cores, {m['torch_threads']} torch threads)"
    lines += [
        f"Machine: {where}. {m['date']}. Python {m['python']}, torch {m['torch']}, triton {m['triton']}, "
        f"liger-kernel {m['liger_kernel'] or 'not installed'}, apa-fast git {m['git']}. "
        f"Load average at start: {', '.join(f'{x:.2f}' for x in (m['load_avg'] or []))}.",
        "",
        f"Command: `{cmd}`. Wall time of the whole run: {raw['wall_s'] / 60:.1f} min.",
        "",
    ]
    if dev == "cpu":
        lines += [
            f"Bounds measured here: read {bd['read_GBps']:.1f} GB/s, write {bd['write_GBps']:.1f} GB/s, "
            f"copy {bd['copy_GBps']:.1f} GB/s (read+write), writing a *fresh* buffer (page faults) "
            f"{bd['fresh_write_GBps']:.1f} GB/s, exp {bd['exp_Gelem_per_s_in_L2']:.2f} G elem/s on an L2-resident chunk "
            f"({bd.get('exp_Gelem_per_s_1thread', float('nan')):.2f} on one thread).",
            "",
        ]
    else:
        pk = bd.get("peak_GBps")
        lines += [f"Bounds: device peak {pk and f'{pk:,.0f}'} GB/s, measured copy {bd['copy_GBps']:,.0f} GB/s.", ""]
    bw_col = "GB/s (of peak)" if dev == "cuda" else "GB/s (of copy bw)"
    lines += [f"| op | shape | implementation | median ms | min ms | vs baseline | extra memory MiB | {bw_col} |",
              "|---|---|---|---:|---:|---:|---:|---:|"]
    for (op, shape), rs in _groups(rows).items():
        base = {r["impl"]: r for r in rs}.get(BASELINE[op])
        for r in sorted(rs, key=lambda r: r["median"]):
            rel = f"{base['median'] / r['median']:.2f}x" if base else ""
            mem = _mib(r["extra"]) if r["mem_error"] is None else "error"
            bw = ""
            if r["gbs"] is not None:
                bw = f"{r['gbs']:,.1f}" + (f" ({100 * r['bw_frac']:.0f}%)" if r["bw_frac"] is not None else "")
            lines.append(f"| {op} | {shape} | {r['impl']} | {_fmt_t(r['median'])} | {_fmt_t(r['min'])} | {rel} | {mem} | {bw} |")
    if raw.get("skipped"):
        lines += ["", "Skipped here: " + "; ".join(sorted(set(raw["skipped"]))) + "."]
    tg = targets(rows, dev)
    if tg:
        lines += ["", "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {w} | {v} | {'yes' if ok else 'NO'} |" for w, v, ok in tg]
    if raw.get("trainer"):
        lines += ["", raw["trainer"]]
    lines += [
        "",
        "*vs baseline*: the baseline's median time over this one's (baseline: eager PyTorch; for GAE the "
        "verl-style reverse Python loop). *extra memory*: peak memory during one step minus the memory "
        "held before it (the inputs) minus what the step returns (the gradient for fwd+bwd cases). "
        "*GB/s*: the bytes a fused kernel must move (read the logits forward; read them again and write "
        "the gradient backward) over the median time.",
    ]
    return "\n".join(lines) + "\n"


def plot(rows, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(_groups(rows).items())
    if not groups:
        return
    fig, axes = plt.subplots(len(groups), 2, figsize=(12, 2.2 + 1.9 * len(groups)), squeeze=False)
    for i, ((op, shape), rs) in enumerate(groups):
        rs = sorted(rs, key=lambda r: r["impl"])
        names = [r["impl"] for r in rs]
        colors = ["tab:green" if n.startswith("apa_fast") else "tab:gray" for n in names]
        ax = axes[i][0]
        ax.barh(names, [r["median"] * 1e3 for r in rs], color=colors)
        ax.set_xscale("log")
        ax.set_title(f"{op}: {shape}", fontsize=9)
        ax.set_xlabel("median time, ms (log)", fontsize=8)
        ax.tick_params(labelsize=8)
        ax = axes[i][1]
        mem = [max(r["extra"], 2**10) / 2**20 if r["extra"] is not None else 0 for r in rs]
        ax.barh(names, mem, color=colors)
        ax.set_xscale("log")
        ax.set_xlabel("extra memory, MiB (log)", fontsize=8)
        ax.tick_params(labelsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes (under 10 min on a 2-core CPU)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None)
    ap.add_argument("--ops", default="logprobs,apa_loss,gae,linear_apa_loss", help="comma-separated suites")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    ap.add_argument("--seconds", type=float, default=None, help="time budget per case for the timed rounds")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--no-trainer", action="store_true",
                    help="skip the trainer-level figure (APA iterations of python -m train.run, fused vs eager)")
    ap.add_argument("--out", default=RESULTS, help="results folder")
    a = ap.parse_args(argv)

    import torch

    from . import machine

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    profile = "quick" if a.quick else "full"
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    os.makedirs(a.out, exist_ok=True)
    base = os.path.join(a.out, f"{device}-{profile}-{stamp}")
    cmd = "python -m bench.run" + (" --quick" if a.quick else "") + (f" --device {a.device}" if a.device else "")
    if a.threads:
        torch.set_num_threads(a.threads)
    t_start = time.time()
    info = machine.describe(device)
    print(f"[bench] {device}, profile {profile}; measuring bandwidth and exp throughput", flush=True)
    bd = machine.bounds(device)
    env = dict(os.environ, BENCH_PROFILE=profile, BENCH_DEVICE=device, BENCH_MEMORY="0" if a.no_memory else "1",
               BENCH_SECONDS=str(a.seconds or (3 if a.quick else 8)), PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if a.threads:
        env["BENCH_THREADS"] = str(a.threads)
    suites = [os.path.join("bench", f"bench_{op}.py") for op in a.ops.split(",")]
    raw_path = base + ".pytest.json"
    pcmd = [sys.executable, "-m", "pytest", *suites, "-o", "python_files=bench_*.py", "-o", "testpaths=bench",
            "-v", "-rs", f"--benchmark-json={raw_path}", "--benchmark-sort=name",
            "--benchmark-columns=min,median,rounds"]
    print("[bench] " + " ".join(pcmd), flush=True)
    proc = subprocess.Popen(pcmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out_lines = []
    for line in proc.stdout:  # stream: a long run shows its progress
        out_lines.append(line.rstrip("\n"))
        sys.stdout.write(line)
        sys.stdout.flush()
    code = proc.wait()
    if code not in (0, 5) or not os.path.exists(raw_path):
        print(f"[bench] pytest exited with code {code}", file=sys.stderr)
        if not os.path.exists(raw_path):
            return 1
    with open(raw_path) as f:
        raw = json.load(f)
    os.remove(raw_path)
    skipped = [ln.split("] ", 1)[-1].split(": ", 1)[-1] for ln in out_lines if ln.startswith("SKIPPED")]
    raw.update(machine=info, bounds=bd, profile=profile, skipped=skipped, command=cmd)
    if not a.no_trainer:
        from . import trainer

        print("[bench] trainer-level figure: python -m train.run per --kernel-backend", flush=True)
        raw["trainer"] = trainer.figure(device, quick=a.quick)
        print(raw["trainer"], flush=True)
    raw["wall_s"] = time.time() - t_start
    rows = rows_from(raw)
    md = markdown(raw, rows, cmd)
    raw["table_rows"] = rows
    with open(base + ".json", "w") as f:
        json.dump(raw, f, indent=1, default=str)
    with open(base + ".md", "w") as f:
        f.write(md)
    title = f"apa-fast {device} ({info.get('gpu') or info['cpu']}), {info['date']}, torch {info['torch']}"
    plot(rows, base + ".png", title)
    for ext in (".md", ".png"):
        if os.path.exists(base + ext):
            shutil.copyfile(base + ext, os.path.join(a.out, f"latest-{device}-{profile}{ext}"))
    print(md)
    print(f"[bench] wrote {base}.json/.md/.png in {raw['wall_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
