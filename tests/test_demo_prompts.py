"""bench.demo_prompts on two tiny policies: the per-prompt right-answer rates and the printed summary."""

from __future__ import annotations

import pytest

from train_fixtures import make_tiny_model

from bench import demo_prompts


def test_rates_and_summary(tmp_path, capsys):
    a, b = make_tiny_model(tmp_path / "a", seed=0), make_tiny_model(tmp_path / "b", seed=1)
    rates = demo_prompts.right_rates(str(a), ["1+2=", "3+4="], 4)
    assert len(rates) == 2 and all(r in (0.0, 0.25, 0.5, 0.75, 1.0) for r in rates)
    assert demo_prompts.main([str(b), "--init", str(a), "--samples", "2"]) == 0
    out = capsys.readouterr().out
    assert "mean p(right) over 169 prompts" in out
    counts = [int(ln.split(":")[1].split()[0]) for ln in out.splitlines() if ln.startswith("trained p in")]
    assert sum(counts) == 169


def test_bad_samples_is_refused(capsys):
    with pytest.raises(SystemExit):
        demo_prompts.main(["somewhere", "--samples", "0"])
    assert "--samples must be >= 1" in capsys.readouterr().err
