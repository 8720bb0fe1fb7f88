"""How a run ends early without losing work: signals, failures, and one run per directory.

- ``Signals``: SIGTERM / SIGINT while the models load end the process at once (nothing to save yet); in the loop the
  first one lets the current iteration finish, then the run checkpoints and stops (exit 128 + signal: 143 / 130); a
  second one abandons it at once (``os._exit``; the last checkpoint stays the resume point).
- ``Stopped``: how the loop ends the run with one line (``main`` prints it, exit ``code``).
- ``agree``: an exception on one rank ends the run on every rank at the same point (under torchrun).
- ``lock_run_dir``: an exclusive ``flock`` on ``OUT/.lock`` (the OS drops it when the process dies, however it dies).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
from pathlib import Path

import torch
import torch.distributed as dist

from .dist import Dist
from .errors import LoadError

NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}


class Stopped(BaseException):
    """The run ends here: ``line`` is printed on stderr (rank 0), the process exits with ``code``. A BaseException, so
    that no ``except Exception`` on the way (a loader's, a reward's) swallows it."""

    def __init__(self, line: str, code: int, cause: BaseException | None = None):
        super().__init__(line)
        self.line, self.code, self.cause = line, code, cause


class Signals:
    """SIGTERM and SIGINT handlers for the life of a run (the previous handlers come back with ``restore``)."""

    def __init__(self, main: bool = True):
        self.requested = 0  # the first signal received in the loop (0: none)
        self.in_loop = False
        self.main = main
        self.where = ""  # what a second signal leaves behind, for its line
        self.iteration = 0
        # a signal the parent ignores (SIGINT of a background job, nohup) stays ignored, as Python itself does
        self._old = {s: signal.signal(s, self._handle) for s in NAMES if signal.getsignal(s) is not signal.SIG_IGN}

    def _handle(self, signum: int, frame) -> None:
        name = NAMES.get(signum, str(signum))
        if not self.in_loop:  # still loading: nothing to save
            raise Stopped(f"stopped by {name} before the first iteration; nothing was trained or saved", 128 + signum)
        if self.requested:  # the second one: abandon the iteration at once
            self._say(f"abandoned at once by a second {name} during iteration {self.iteration}; {self.where}")
            os._exit(128 + signum)
        self.requested = signum
        self._say(f"{name}: finishing iteration {self.iteration}, then saving a checkpoint and stopping "
                  f"(send it again to stop at once, losing that iteration)")

    def _say(self, msg: str) -> None:
        if self.main:  # os.write: safe inside a handler that may interrupt a print
            os.write(2, (msg + "\n").encode())

    def agreed(self, d: Dist) -> int:
        """The signal any rank received (0: none); a collective at the iteration boundary under torchrun."""
        if d.group is None:
            return self.requested
        t = torch.tensor([self.requested], dtype=torch.int64, device=d.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=d.group)
        return int(t.item())

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def agree(d: Dist, err: BaseException | None) -> BaseException | None:
    """``err`` (this rank's exception or None) made common: every rank gets an exception when any rank had one (the
    lowest failing rank's, as text, on the others), so all stop at the same collective. One all-reduce under torchrun;
    the messages are gathered only after a failure."""
    if d.group is None:
        return err
    if d.sum(float(err is not None))[0] == 0:
        return None
    msgs = [None] * d.world
    dist.all_gather_object(msgs, None if err is None else f"{type(err).__name__}: {err}")
    if err is not None:
        return err
    r = next(r for r, m in enumerate(msgs) if m)
    return RemoteError(f"on rank {r}: {msgs[r]}")


def lock_run_dir(out: Path, d: Dist, resume: bool):
    """Create ``out`` (checked writable) and hold an exclusive lock on ``out/.lock`` (rank 0; the answer is shared with
    every rank). Refused in one line naming the holder's pid when another live process holds it. Returns the open
    lock file (kept open for the run: closing it, or the process ending, releases the lock)."""
    err, handle = None, None
    if d.main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            handle = open(out / ".lock", "a+")
        except OSError as e:
            err = f"--out {out}: cannot create or write the run directory ({e.strerror or type(e).__name__})"
        else:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                pid = handle.read().strip() or "unknown"
                handle.close()
                handle = None
                what = f"--resume {out}: that run is still going" if resume else f"--out {out} is in use by another trainer"
                err = f"{what} (pid {pid}); wait for it to end or stop it (kill -TERM {pid}), or pick another --out"
            else:
                handle.seek(0)
                handle.truncate()
                handle.write(f"{os.getpid()}\n")
                handle.flush()
    if d.world > 1:
        box = [err]
        dist.broadcast_object_list(box, src=0, group=d.group)
        err = box[0]
    if err:
        raise LoadError(err)
    return handle


def remove_stale_tmp(out: Path) -> list[str]:
    """Remove the temporary folders of writes that never finished (a checkpoint, ``final``, the ``latest`` pointer);
    called with the lock held, so none belongs to a live process. Their names."""
    gone = []
    for p in [*sorted((out / "checkpoints").glob("*.tmp-*")), *sorted(out.glob("final.tmp-*"))]:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        gone.append(str(p.relative_to(out)))
    return gone


class RemoteError(RuntimeError):
    """Another rank's exception, as text (``agree``)."""
