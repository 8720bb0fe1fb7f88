"""Runs of ``python -m train.run`` as child processes, a few at a time, each in its own directory.

A run that exits cleanly is marked ``DONE`` (so a rerun of the experiment skips it); one killed before its first
checkpoint starts afresh, one with checkpoints is resumed. A killed experiment takes its children with it.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path


def _die_with_parent() -> None:
    """In the child: get SIGKILL when the parent dies, so a killed experiment leaves no run writing behind it."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def in_use(d: Path) -> bool:
    """Whether a live trainer holds the run directory's lock (``OUT/.lock``, train.stopping)."""
    try:
        with open(d / ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(f, fcntl.LOCK_UN)
    except FileNotFoundError:
        return False
    except BlockingIOError:
        return True
    return False


def run_jobs(todo: list[tuple[Path, list[str]]], jobs: int) -> list[str]:
    """Run each ``(run directory, command)`` with ``--out DIR`` (and ``--resume DIR`` where it has checkpoints) added,
    ``jobs`` at once, its output in ``DIR/log.txt``; the names of the runs that failed."""
    pending, live, failed = [(d, cmd) for d, cmd in todo if not (d / "DONE").exists()], {}, []
    t0 = time.time()
    try:
        while pending or live:
            while pending and len(live) < jobs:
                d, cmd = pending.pop(0)
                if in_use(d):
                    failed.append(d.name)
                    print(f"  SKIPPED {d.name}: another trainer is running in it", flush=True)
                    continue
                if d.exists() and not (d / "checkpoints").exists():
                    shutil.rmtree(d)  # killed before its first checkpoint: start it afresh
                d.mkdir(parents=True, exist_ok=True)
                cmd = [*cmd, "--out", str(d), *(["--resume", str(d)] if (d / "checkpoints").exists() else [])]
                log = open(d / "log.txt", "a")
                p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
                live[p] = (d, log, time.time())
            time.sleep(0.5)
            for p in [p for p in live if p.poll() is not None]:
                d, log, ts = live.pop(p)
                log.close()
                if p.returncode == 0:
                    (d / "DONE").write_text(json.dumps({"seconds": time.time() - ts}) + "\n")
                    print(f"  done {d.name} in {time.time() - ts:.0f}s ({len(pending) + len(live)} left, "
                          f"{time.time() - t0:.0f}s elapsed)", flush=True)
                else:
                    failed.append(d.name)
                    print(f"  FAILED {d.name} (exit {p.returncode}; {d / 'log.txt'})", flush=True)
    finally:
        for p in live:
            p.kill()
    return failed
