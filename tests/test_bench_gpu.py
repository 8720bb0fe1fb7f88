"""bench.gpu's CPU-runnable parts run end to end here (parity with the torch backend, the head benchmark's code at a
tiny size), so that the first GPU run does not fail on a typo. The trainer part is left out: it runs train.run, which
has its own tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU run is bench.gpu itself")
def test_cpu_parts_run_and_name_what_they_skip(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "-m", "bench.gpu", "--parts", "parity,head", "--out", str(tmp_path)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    (js,) = tmp_path.glob("gpu-cpu-*.json")
    rep = json.loads(js.read_text())
    assert (tmp_path / js.name.replace(".json", ".md")).exists()
    par = rep["parts"]["parity"]
    assert par["failures"] == [] and len(par["rows"]) >= 20
    assert {r["op"] for r in par["rows"]} == {"token_logprobs", "apa_loss", "linear_token_logprobs",
                                              "linear_token_loss[grpo]", "gae"}
    head = rep["parts"]["head"]
    assert head["dry_run"] and any("time_s" in r for r in head["rows"] if r["impl"] == "apa_fast[torch]")
    assert any(r.get("skipped") == "needs CUDA" for r in head["rows"] if r["impl"] == "apa_fast[triton]")
    assert len(rep["skipped"]) == 3 and all("GPU" in s or "CUDA" in s or "bf16" in s for s in rep["skipped"])


def test_refuses_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    p = subprocess.run([sys.executable, "-m", "bench.gpu", "--parts", "parity"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "TRITON_INTERPRET" in p.stderr
