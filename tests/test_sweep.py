"""The reward-KL sweep: aggregation against hand computations, a killed sweep resumed, the proxy reward
model's cache and loading, and gold_reward_mean in the trainer's metrics."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from train.experiments import sweep
from train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def write_run(d: Path, gold: list[float], proxy: list[float], kl: list[float]) -> Path:
    d.mkdir(parents=True)
    with open(d / "metrics.jsonl", "w") as f:
        for i, (g, p, k) in enumerate(zip(gold, proxy, kl)):
            f.write(json.dumps({"step": i + 1, "gold_reward_mean": g, "reward_mean": p, "kl": k, "kl_sqrt_k3": 0.1})
                    + "\n")
    return d


def test_run_summary_means_the_last_tenth(tmp_path):
    # 20 iterations: the last 10% is the last 2
    d = write_run(tmp_path / "r", [0.0] * 18 + [0.5, 0.7], [1.0] * 18 + [2.0, 4.0], [9.0] * 18 + [1.0, 2.0])
    s = sweep.run_summary(d)
    assert s["tail_iterations"] == 2 and s["steps"] == 20
    assert s["gold_reward"] == pytest.approx(0.6) and s["proxy_reward"] == pytest.approx(3.0)
    assert s["kl"] == pytest.approx(1.5)


def test_aggregate_mean_and_student_t_interval_by_hand(tmp_path):
    golds = {0: 0.60, 1: 0.70, 2: 0.80}
    runs = []
    for seed, g in golds.items():
        d = write_run(tmp_path / f"apa-lam0.1-s{seed}", [g] * 10, [g * 2] * 10, [1.0 + seed] * 10)
        runs.append({"algo": "apa", "knob": "lam", "value": 0.1, "seed": seed, **sweep.run_summary(d)})
    runs.append({"algo": "apa", "knob": "lam", "value": 1.0, "seed": 0, "gold_reward": 0.4, "proxy_reward": 0.0,
                 "kl": 0.5})
    agg = sweep.aggregate(runs)
    assert [(a["value"], a["seeds"]) for a in agg] == [(0.1, [0, 1, 2]), (1.0, [0])]
    g = agg[0]["gold_reward"]
    # by hand: mean 0.7, sample sd 0.1, t(0.975, 2) = 4.303, half-width 4.303 * 0.1 / sqrt(3) = 0.24844
    assert g["mean"] == pytest.approx(0.7) and g["ci95"] == pytest.approx(0.24844, abs=1e-5) and g["n"] == 3
    assert agg[0]["kl"]["mean"] == pytest.approx(2.0) and agg[0]["kl"]["ci95"] == pytest.approx(4.303 / math.sqrt(3))
    assert agg[1]["gold_reward"] == {"mean": 0.4, "ci95": 0.0, "n": 1}
    # matched KL: between (0.5, 0.4) and (2.0, 0.7), KL 1.25 is half-way: 0.55; interval half-way 0.12422
    m = sweep.at_kl(agg, "apa", 1.25)
    assert m["mean"] == pytest.approx(0.55) and m["ci95"] == pytest.approx(0.24844 / 2, abs=1e-5)
    assert sweep.at_kl(agg, "apa", 3.0) is None and sweep.at_kl(agg, "ppo", 1.0) is None
    md = sweep.results_md(agg, [1.25])
    assert "| apa | lam | 0.1 | 3 | 0.700 ± 0.248 |" in md and "| 1.25 | 0.550 ± 0.124 |" in md


def test_bad_arguments_are_one_line(tmp_path):
    for args, what in ((["--arms", "apa,nope"], "--arms"), (["--seeds", "a"], "--seeds"), (["--steps", "3"], "--steps")):
        p = subprocess.run([sys.executable, "-m", "train.experiments.sweep", "--out", str(tmp_path), *args], cwd=ROOT,
                           capture_output=True, text=True)
        assert p.returncode == 2 and what in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_killed_sweep_resumes_without_redoing_complete_runs(tmp_path):
    """A real sweep (3 runs, one at a time) is SIGKILLed once its first run is complete; the same command then
    completes the rest, leaves the complete run untouched, and reports over all three."""
    out = tmp_path / "sw"
    cmd = [sys.executable, "-m", "train.experiments.sweep", "--arms", "apa-group", "--seeds", "0,1,2", "--values", "1",
           "--steps", "10", "--jobs", "1", "--out", str(out), "--save-every", "5"]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = out / "runs" / "apa-group-lam0.1-s0"
    deadline = time.time() + 600
    while not (first / "DONE").exists():
        assert p.poll() is None and time.time() < deadline, p.stdout.read()
        time.sleep(0.2)
    p.send_signal(signal.SIGKILL)
    p.wait()
    done_before = (first / "DONE").read_text()
    metrics_before = (first / "metrics.jsonl").read_text()
    time.sleep(1.0)  # the run it was running dies with it (PR_SET_PDEATHSIG); nothing may write after this
    second = out / "runs" / "apa-group-lam0.1-s1"
    snap = sorted(str(f) + str(f.stat().st_size) for f in second.rglob("*") if f.is_file()) if second.exists() else []
    time.sleep(1.0)
    assert snap == (sorted(str(f) + str(f.stat().st_size) for f in second.rglob("*") if f.is_file())
                    if second.exists() else [])

    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 runs (1 complete)" in r.stdout and "done apa-group-lam0.1-s0" not in r.stdout
    assert (first / "DONE").read_text() == done_before and (first / "metrics.jsonl").read_text() == metrics_before
    res = json.loads((out / "results.json").read_text())
    assert sorted(x["seed"] for x in res["runs"]) == [0, 1, 2]
    for x in res["runs"]:
        assert {"algo", "knob", "value", "seed", "gold_reward", "proxy_reward", "kl"} <= set(x)
        rows = read_metrics(out / x["dir"] / "metrics.jsonl")
        assert [row["step"] for row in rows] == list(range(1, 11))  # a resumed run has each step once
        assert all(0.0 <= row["gold_reward_mean"] <= 1.0 for row in rows)
    assert res["aggregates"][0]["gold_reward"]["n"] == 3
    for f in ("frontier.png", "curves.png", "results.md"):
        assert (out / f).stat().st_size > 0


def test_proxy_reward_model_is_cached_and_loads_as_sequence_classification():
    from transformers import AutoModelForSequenceClassification

    from train.tasks.offline import arith_reward, proxy_reward_model
    from train.rewards import HFRewardModel

    import torch

    path = proxy_reward_model()  # the default cache, shared with the sweep test (trained there or here)
    mtime = (path / "DONE").stat().st_mtime
    logs = []
    assert proxy_reward_model(log=logs.append) == path and not logs  # a hit: nothing trained, nothing said
    assert (path / "DONE").stat().st_mtime == mtime
    assert not list(path.parent.glob(path.name + ".tmp*"))
    stats = json.loads((path / "proxy_stats.json").read_text())
    # better than chance on fresh samples of the initial policy, short of the rule
    assert 0.6 < stats["heldout"]["auc"] < 0.99
    assert isinstance(AutoModelForSequenceClassification.from_pretrained(path), torch.nn.Module)
    rm = HFRewardModel(str(path), torch.device("cpu"), torch.float32, False)
    prompts = ["3+4=", "3+4=", "12+30=", "12+30="]
    comps = ["7", "9", "42", "41"]
    s = rm(prompts, comps)
    assert len(s) == 4 and all(math.isfinite(x) for x in s)
    assert arith_reward(prompts, comps) == [1.0, 0.0, 1.0, 0.0]


def test_ppo_fixed_beta_with_kl_target_zero():
    from train.algos import KLController

    fixed, adaptive = KLController(0.1, 0.0, 10000.0), KLController(0.1, 6.0, 10000.0)
    for kl in (20.0, 0.0, 50.0):
        fixed.update(kl, 64)
        adaptive.update(kl, 64)
    assert fixed.beta == 0.1 and adaptive.beta != 0.1


def test_negative_kl_target_is_one_line():
    p = subprocess.run([sys.executable, "-m", "train.run", "--algo", "ppo", "--kl-target", "-1", "--steps", "1"],
                       cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2 and "--kl-target must be >= 0" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_matched_kl_levels_need_two_algorithms():
    def row(algo, kl):
        return {"algo": algo, "kl": {"mean": kl, "ci95": 0.0, "n": 1}}

    agg = [row("apa", 0.15), row("apa", 1.2), row("ppo", 0.4), row("ppo", 2.5), row("awr", 4.0)]
    # 0.5, 0.75 and 1.0 lie in both APA's [0.15, 1.2] and PPO's [0.4, 2.5]; 0.2 only in APA's, 3.0 only in none twice
    assert sweep.matched_kl_levels(agg) == [0.5, 0.75, 1.0]


def test_real_model_learning_rates_per_method(tmp_path, capsys):
    """``--lr`` of the real-model comparison: one value for all, or a default and per-method values (the searched
    ones); a bad one is one line naming the flag, before any run starts."""
    from train.experiments import real_model

    assert real_model.method_lrs("1e-4", ["apa-group", "ppo"]) == {"apa-group": [1e-4], "ppo": [1e-4]}
    assert real_model.method_lrs("1e-4,apa-gae=2e-4", ["apa-gae", "grpo"]) == {"apa-gae": [2e-4], "grpo": [1e-4]}
    for bad, says in [("apa=1e-4", "unknown method 'apa'"), ("grpo=1e-4", "no learning rate for ['apa-group'"),
                      ("fast", "could not convert")]:
        assert real_model.main(["--lr", bad, "--methods", "apa-group,grpo", "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --lr: ") and says in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())
