"""A run that stops, fails or collides loses nothing: real trainer processes, real signals, real files.

Each case asserts the one line the trainer prints, its exit code, and what is on disk afterwards (checkpoints,
metrics rows, no temporary folders); where a run is resumed, its metrics equal those of a run never stopped.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from train_fixtures import REPO, env, main_error, make_tiny_model, metric_rows, run_trainer, tiny_args

from train import run as R

STEPS = ["--steps", "6", "--no-export", "--no-plot"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", n_layer=1)


def _args(tiny: Path, out: Path, reward: str, *extra: str) -> list[str]:
    args = tiny_args(tiny, out, *STEPS, *extra)
    args[args.index("--reward-model") + 1] = f"train_fixtures:{reward}"
    return args


@pytest.fixture(scope="module")
def full(tiny, tmp_path_factory) -> list[dict]:
    """The metrics of an uninterrupted 6-iteration run (the scores of digit_reward, which every test reward gives)."""
    out = tmp_path_factory.mktemp("full") / "run"
    p = run_trainer(_args(tiny, out, "digit_reward", "--save-every", "2"))
    assert p.returncode == 0, p.stderr[-3000:]
    return metric_rows(out)


def _start(args: list[str], **extra_env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "train.run", *args], cwd=REPO, env={**env(), **extra_env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_rows(out: Path, n: int, proc: subprocess.Popen, timeout: float = 90) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        f = out / "metrics.jsonl"
        if f.exists() and len(f.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError(f"no {n} metrics rows in {timeout} s")


def _lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def _no_tmp(out: Path) -> None:
    assert not list(out.rglob("*.tmp-*")), list(out.rglob("*.tmp-*"))


def _steps(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").glob("step_*"))


def _latest(out: Path) -> str:
    return (out / "checkpoints" / "latest").read_text().strip()


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_signal_finishes_the_iteration_saves_and_resumes_exactly(tiny, tmp_path, full, sig, code):
    out, gate = tmp_path / "run", tmp_path / "gate"
    # iteration 2 waits in its reward until the gate opens: the signal lands in it however late this test gets the CPU
    proc = _start(_args(tiny, out, "gated_reward", "--save-every", "4"), APA_TEST_GATE=str(gate))
    _wait_rows(out, 1, proc)
    proc.send_signal(sig)
    time.sleep(0.2)
    gate.touch()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    name = sig.name
    lines = _lines(err)
    assert len(lines) == 2, err
    k = int(re.fullmatch(rf"{name}: finishing iteration (\d+), then saving a checkpoint and stopping \(send it again to "
                         r"stop at once, losing that iteration\)", lines[0]).group(1))
    assert k == 2
    assert lines[1] == (f"stopped by {name} after iteration {k} of 6: saved {out}/checkpoints/step_{k:06d}; continue "
                        f"with --resume {out}")
    # nothing lost: the finished iteration's row and its checkpoint, nothing half-written
    assert len(metric_rows(out)) == k and _latest(out) == f"step_{k:06d}"
    assert (out / "checkpoints" / f"step_{k:06d}" / "COMPLETE").exists()
    _no_tmp(out)
    p = run_trainer(["--resume", str(out)])
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"resumed from {out}/checkpoints/step_{k:06d} (step {k})" in p.stdout
    assert metric_rows(out) == full


def test_a_second_signal_abandons_at_once(tiny, tmp_path):
    out = tmp_path / "run"
    proc = _start(_args(tiny, out, "slow_reward", "--save-every", "1"))
    _wait_rows(out, 2, proc)
    t0 = time.time()  # iteration 2's checkpoint written: the first signal then lands in iteration 3, not in its end
    while not ((out / "checkpoints" / "latest").exists() and _latest(out) == "step_000002"):
        assert proc.poll() is None and time.time() - t0 < 60, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)  # inside the same iteration: its reward alone takes 0.25 s
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    lines = _lines(err)
    assert len(lines) == 2 and lines[0].startswith("SIGTERM: finishing iteration"), err
    k = int(lines[0].split()[3].rstrip(","))
    assert lines[1] == (f"abandoned at once by a second SIGTERM during iteration {k}; --resume {out} continues from "
                        "the last checkpoint")
    # the last checkpoint is the iteration before (saved every iteration), and it resumes
    assert _latest(out) == f"step_{k - 1:06d}"
    p = run_trainer(["--resume", str(out), "--steps", str(k + 1)])
    assert p.returncode == 0, p.stderr[-3000:]
    assert [r["step"] for r in metric_rows(out)] == list(range(1, k + 2))
    _no_tmp(out)


def test_a_reward_that_raises_saves_the_last_iteration_and_resume_repeats_the_batch(tiny, tmp_path, full):
    """third_call_raises fails at iteration 3: the checkpoint of iteration 2 is written then (no --save-every point
    before), with the data position and RNG states of before iteration 3, so the resumed run repeats its batch; the
    resumed process fails at its own third call (iteration 5) and saves iteration 4."""
    out = tmp_path / "run"
    p = run_trainer(_args(tiny, out, "third_call_raises", "--save-every", "100"))
    assert p.returncode == 1, p.stderr[-3000:]
    assert _lines(p.stderr) == [f"error: the reward train_fixtures:third_call_raises raised ValueError: reward server "
                                f"unreachable (iteration 3); saved {out}/checkpoints/step_000002; continue with "
                                f"--resume {out}"]
    assert "Traceback" not in p.stderr
    assert _steps(out) == ["step_000002"] and len(metric_rows(out)) == 2
    p = run_trainer(["--resume", str(out)])
    assert p.returncode == 1 and "(iteration 5); saved" in p.stderr, p.stderr[-3000:]
    assert metric_rows(out) == full[:4]
    # --debug (or APA_FAST_DEBUG=1): the traceback first, then the same line
    p = run_trainer(["--resume", str(out), "--debug", "--steps", "8"])  # fails at its third call: iteration 7
    assert p.returncode == 1 and "Traceback" in p.stderr and 'raise ValueError("reward server unreachable")' in p.stderr
    assert _lines(p.stderr)[-1].startswith("error: the reward train_fixtures:third_call_raises raised ValueError")


def test_a_reward_that_hangs_is_timed_out(tiny, tmp_path):
    out = tmp_path / "run"
    t0 = time.time()
    p = run_trainer(_args(tiny, out, "third_call_hangs", "--save-every", "100", "--reward-timeout", "2"))
    assert time.time() - t0 < 60  # the hung thread does not keep the process alive
    assert p.returncode == 1, p.stderr[-3000:]
    assert _lines(p.stderr) == [f"error: the reward train_fixtures:third_call_hangs did not answer within "
                                f"--reward-timeout 2 s (iteration 3); saved {out}/checkpoints/step_000002; continue "
                                f"with --resume {out}"]
    assert _steps(out) == ["step_000002"] and len(metric_rows(out)) == 2


def test_an_evaluation_that_fails_keeps_its_trained_step(tiny, tmp_path, full):
    """The reward raises inside the evaluation after iteration 2: that iteration's row and its checkpoint are kept."""
    out = tmp_path / "run"
    args = _args(tiny, out, "third_call_raises", "--save-every", "100")
    args[args.index("--eval-every") + 1] = "2"
    p = run_trainer(args)
    assert p.returncode == 1, p.stderr[-3000:]
    assert _lines(p.stderr) == [f"error: the evaluation raised ValueError: reward server unreachable (iteration 2); "
                                f"saved {out}/checkpoints/step_000002; continue with --resume {out}"]
    assert _steps(out) == ["step_000002"] and metric_rows(out) == full[:2]


def test_an_export_that_fails_keeps_the_last_step_and_resume_exports(tiny, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "final").write_text("a file where the export's folder goes")
    args = tiny_args(tiny, out, "--steps", "2", "--no-plot")
    p = run_trainer(args)
    assert p.returncode == 1, p.stderr[-3000:]
    line, = _lines(p.stderr)
    assert line.startswith("error: the export raised NotADirectoryError: ") and line.endswith(
        f"(iteration 2); its checkpoint is {out}/checkpoints/step_000002; continue with --resume {out}"), line
    _no_tmp(out)
    (out / "final").unlink()
    p = run_trainer(["--resume", str(out)])
    assert p.returncode == 0, p.stderr[-3000:]
    assert (out / "final" / "model.safetensors").exists() and len(metric_rows(out)) == 2


def test_one_run_per_directory(tiny, tmp_path):
    out = tmp_path / "run"
    args = _args(tiny, out, "slow_reward", "--steps", "1000", "--save-every", "2")  # stopped below
    proc = _start(args)
    _wait_rows(out, 1, proc)
    p = run_trainer(args)
    assert p.returncode == 2
    assert _lines(p.stderr) == [f"error: --out {out} is in use by another trainer (pid {proc.pid}); wait for it to end "
                                f"or stop it (kill -TERM {proc.pid}), or pick another --out"]
    p = run_trainer(["--resume", str(out)])
    assert p.returncode == 2
    assert _lines(p.stderr) == [f"error: --resume {out}: that run is still going (pid {proc.pid}); wait for it to end "
                                f"or stop it (kill -TERM {proc.pid}), or pick another --out"]
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 143
    steps = [r["step"] for r in metric_rows(out)]
    assert steps == list(range(1, len(steps) + 1))  # one writer: no row twice
    p = run_trainer(["--resume", str(out), "--steps", str(len(steps) + 1)])  # the lock went with the process
    assert p.returncode == 0, p.stderr[-3000:]


@pytest.mark.parametrize("damage", ["truncated", "empty", "no-metadata"])
def test_an_unreadable_checkpoint_falls_back_to_the_one_before(tiny, tmp_path, full, damage):
    out = tmp_path / "run"
    p = run_trainer(_args(tiny, out, "digit_reward", "--save-every", "2", "--stop-after", "4"))
    assert p.returncode == 0, p.stderr[-3000:]
    ck = out / "checkpoints"
    data = ck / "step_000004" / "__0_0.distcp"
    if damage == "truncated":
        os.truncate(data, data.stat().st_size // 2)
    elif damage == "empty":
        os.truncate(data, 0)
    else:
        (ck / "step_000004" / ".metadata").unlink()
    (ck / "step_000006.tmp-12345").mkdir()  # a write that a killed process never finished
    (ck / "step_000006.tmp-12345" / "__0_0.distcp").write_bytes(b"partial")
    p = run_trainer(["--resume", str(out)])
    assert p.returncode == 0, p.stderr[-3000:]
    why = {"truncated": "its data cannot be read (RuntimeError: PytorchStreamReader failed reading zip archive",
           "empty": "its data cannot be read (EOFError: the file ends early (truncated or empty))",
           "no-metadata": "its .metadata cannot be read (FileNotFoundError: [Errno 2] No such file or directory"}[damage]
    warn = [ln for ln in p.stdout.splitlines() if ln.startswith("warning:")]
    assert len(warn) == 1 and warn[0].startswith(f"warning: checkpoint step_000004 cannot be loaded: {why}"), p.stdout
    assert warn[0].endswith("; falling back to step_000002")
    assert f"resumed from {ck}/step_000002 (step 2)" in p.stdout
    assert "note: removed 1 unfinished write(s) of an earlier process: checkpoints/step_000006.tmp-12345" in p.stdout
    assert metric_rows(out) == full
    _no_tmp(out)


def test_no_readable_checkpoint_is_one_line(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert R.main(_args(tiny, out, "digit_reward", "--steps", "2", "--stop-after", "1", "--save-every", "1")) == 0
    (out / "checkpoints" / "step_000001" / ".metadata").write_bytes(b"")
    line = main_error(["--resume", str(out)], capsys)
    assert line.startswith(f"error: --resume {out}: checkpoint step_000001 cannot be loaded: its .metadata cannot be "
                           "read (EOFError") and line.endswith("no earlier complete checkpoint to fall back to"), line


def _fsize_limit(n: int):
    def limit() -> None:  # in the child: a write past n bytes fails with EFBIG (the signal would kill it instead)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (n, n))

    return limit


def test_a_full_disk_keeps_the_earlier_checkpoint(tiny, tmp_path, full):
    out = tmp_path / "run"
    p = run_trainer(_args(tiny, out, "digit_reward", "--save-every", "2", "--stop-after", "2"))
    assert p.returncode == 0, p.stderr[-3000:]
    size = (out / "checkpoints" / "step_000002" / "__0_0.distcp").stat().st_size
    # files up to half a checkpoint's size may be written: the metrics are, the next checkpoint is not
    p = subprocess.run([sys.executable, "-m", "train.run", "--resume", str(out)], cwd=REPO, env=env(),
                       capture_output=True, text=True, timeout=120, preexec_fn=_fsize_limit(size // 2))
    assert p.returncode == 1, p.stderr[-3000:]
    line, = _lines(p.stderr)
    assert line.startswith(f"error: cannot write checkpoint step_000004 in {out}/checkpoints: the disk is full (or a "
                           f"file-size limit was reached) (OSError: [Errno 27] File too large; "), line
    assert line.endswith(f"its partial write was removed; the last complete checkpoint is "
                         f"{out}/checkpoints/step_000002; continue with --resume {out}"), line
    assert _steps(out) == ["step_000002"] and _latest(out) == "step_000002"
    _no_tmp(out)
    p = run_trainer(["--resume", str(out), "--stop-after", "0"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert metric_rows(out) == full


@pytest.mark.parametrize("reward,expect", [
    ("none_reward", "returned None (NoneType); expected a list of 8 numbers, one per completion"),
    ("scalar_reward", "returned 0.5 (float); expected a list of 8 numbers, one per completion"),
    ("dict_reward", "returned {'scores': ["),
    ("pair_reward", "returned a Tensor of shape (8, 2); expected a list of 8 numbers, one per completion (shape (8,) "
                    "or (8, 1))"),
    ("short_reward", "returned 7 scores for 8 completions; expected a list of 8 numbers, one per completion"),
])
def test_a_reward_answer_of_the_wrong_kind_is_refused(tiny, tmp_path, capsys, reward, expect):
    line = main_error(_args(tiny, tmp_path / "run", reward), capsys)
    assert line.startswith(f"error: the reward train_fixtures:{reward} {expect}"), line
    assert line.endswith("(iteration 1); no iteration had completed, nothing to save"), line


@pytest.mark.parametrize("reward", ["column_reward", "nested_reward"])
def test_a_column_of_scores_is_read_as_one_score_per_sample(tiny, tmp_path, reward):
    rows = {}
    for r in (reward, "digit_reward"):
        assert R.main(_args(tiny, tmp_path / r, r, "--steps", "2")) == 0
        rows[r] = metric_rows(tmp_path / r)
    assert rows[reward] == rows["digit_reward"] and all(r["reward_nan"] == 0 for r in rows[reward])


def test_over_long_prompts_reach_the_reward_as_the_policy_saw_them(tiny, tmp_path, capsys):
    import train_fixtures

    data = tmp_path / "long.jsonl"
    prompts = [f"{a}+{b}+{a}+{b}+{a}=" for a, b in ((12, 34), (5, 6), (70, 8), (9, 10))]  # 10 to 15 characters
    data.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in prompts))
    args = _args(tiny, tmp_path / "run", "recording_reward", "--steps", "2", "--max-prompt-len", "8",
                 "--batch-size", "4", "--minibatch-size", "4")
    args[args.index("--dataset") + 1] = str(data)
    train_fixtures.SEEN.clear()
    assert R.main(args) == 0
    seen = train_fixtures.SEEN
    assert len(seen) == 8 and set(seen) == {q[-8:] for q in prompts}  # one character per token, cut from the left
    assert [r["prompts_truncated"] for r in metric_rows(tmp_path / "run")] == [4, 4]
    warn = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("warning:")]
    assert warn == ["warning: 4 of 4 prompts of iteration 1 are longer than --max-prompt-len 8 tokens and were cut from "
                    "the left; the reward sees them as the policy did (counted as prompts_truncated in metrics.jsonl; "
                    "warned once)"]


def test_samples_are_strict_json_with_null_for_a_reward_that_is_not_a_number(tiny, tmp_path):
    out = tmp_path / "run"
    args = _args(tiny, out, "nan_reward", "--steps", "1")
    args[args.index("--eval-every") + 1] = "1"
    assert R.main(args) == 0

    def no_nan(c):
        raise AssertionError(f"{c} in samples.jsonl")

    rows = [json.loads(ln, parse_constant=no_nan) for ln in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["reward"] for r in rows] == [1.0, None, 1.0, None]


def _worker_pid(launcher: int, rank: int, timeout: float = 60) -> int:
    """The pid of torchrun's worker of ``rank`` (a child of the launcher with RANK=rank in its environment)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        kids = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
        for k in kids:
            try:
                if f"RANK={rank}".encode() in Path(f"/proc/{k}/environ").read_bytes().split(b"\0"):
                    return int(k)
            except OSError:
                continue
        time.sleep(0.05)
    raise AssertionError(f"no worker of rank {rank}")


def test_two_ranks_stop_together_when_one_is_signalled(tiny, tmp_path):
    """torchrun, 2 processes: SIGTERM to rank 1 alone. At the iteration boundary the flag is all-reduced, both ranks
    write the same last checkpoint and stop; rank 0 prints the line. The run then resumes on 2 processes."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train.run",
           *_args(tiny, out, "slow_reward", "--steps", "40", "--save-every", "100")]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_rows(out, 1, proc, timeout=120)
    os.kill(_worker_pid(proc.pid, 1), signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    m = re.search(rf"^stopped by SIGTERM after iteration (\d+) of 40: saved {out}/checkpoints/step_(\d+); continue "
                  rf"with --resume {out}$", err, re.M)
    assert m and m.group(1) == str(int(m.group(2))), err[-3000:]
    k = int(m.group(1))
    assert "SIGTERM: finishing" not in err  # rank 1 received it, and only rank 0 speaks
    assert _steps(out) == [f"step_{k:06d}"] and len(metric_rows(out)) == k
    _no_tmp(out)
    p = run_trainer(["--resume", str(out), "--steps", str(k + 1)], nproc=2)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"resumed from {out}/checkpoints/step_{k:06d}" in p.stdout and len(metric_rows(out)) == k + 1


def test_a_signal_while_loading_ends_at_once_in_one_line():
    """Before the first iteration there is nothing to save: the handler ends the run at once (here: this process
    signals itself while a Signals is installed, as during setup_run)."""
    from train.stopping import Signals, Stopped

    sig = Signals()
    try:
        with pytest.raises(Stopped) as e:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    finally:
        sig.restore()
    assert (e.value.line, e.value.code) == ("stopped by SIGTERM before the first iteration; nothing was trained or saved",
                                            143)
