"""bench.peers end to end on a tiny job: apa-fast's trainer and TRL's GRPOTrainer, each in its own process."""

from __future__ import annotations

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


def test_tiny_job_writes_rows(tmp_path):
    pytest.importorskip("trl", reason="TRL is not installed (the optional [peers] extra)")
    assert peers.main(["--tiny", "--results-dir", str(tmp_path)]) == 0
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
    assert list(tmp_path.glob("peers-*.json"))
