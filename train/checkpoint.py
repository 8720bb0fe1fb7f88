"""Checkpoints with ``torch.distributed.checkpoint`` (DCP), written atomically, and the final export.

Layout of ``OUT/checkpoints``: ``step_000020/`` (a complete DCP checkpoint with a ``COMPLETE`` marker),
``latest`` (a text file naming the newest complete one). A checkpoint is first written to
``step_000020.tmp-<pid>/``; only after every rank has finished and rank 0 has written ``COMPLETE`` is
it renamed to its final name and ``latest`` replaced (``os.replace``). A crash mid-write leaves a
``.tmp-*`` directory that nothing ever loads (the next run in that directory removes it). A failed write (a full
disk) is removed at once and reported (``SaveError``); a checkpoint that cannot be read is reported (``LoadFailed``)
and the trainer falls back to the one before it.

What is saved (``TrainState``, a DCP ``Stateful``): the trainable models (policy, critic), the optimizer,
the trainer's progress (step, data position, KL controller, reward scaler) and every rank's RNG states.
"""

from __future__ import annotations

import errno
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rng_state() -> dict:
    s = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state()
    return s


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["cpu"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


class TrainState(Stateful):
    """Everything a resumed run needs to continue as if never stopped."""

    def __init__(self, models: torch.nn.Module, optimizer: torch.optim.Optimizer, progress: Stateful):
        self.models, self.optimizer, self.progress = models, optimizer, progress

    def state_dict(self) -> dict:
        msd, osd = get_state_dict(self.models, self.optimizer)
        rngs = [None] * _world()
        if dist.is_initialized():
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs[0] = rng_state()
        # every rank stores the same list; each takes back its own entry
        rng = {f"rank{r}_{k}": v for r, s in enumerate(rngs) for k, v in s.items()}
        return {"model": msd, "optim": osd, "trainer": self.progress.state_dict(), "rng": rng}

    def load_state_dict(self, sd: dict) -> None:
        set_state_dict(self.models, self.optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        self.progress.load_state_dict(sd["trainer"])
        r = _rank()
        mine = {k.split("_", 1)[1]: v for k, v in sd["rng"].items() if k.startswith(f"rank{r}_")}
        if mine:
            set_rng_state(mine)


class SaveError(RuntimeError):
    """A checkpoint that could not be written; its partial write is removed, the earlier checkpoints are kept."""


_NO_SPACE = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def _causes(e: BaseException) -> list[BaseException]:
    """``e``, the per-rank exceptions a DCP ``CheckpointException`` wraps, and their causes."""
    out, todo = [], [e]
    while todo:
        x = todo.pop()
        if x is None or x in out:
            continue
        out.append(x)
        for v in (getattr(x, "failures", None) or {}).values():  # CheckpointException: rank -> (exc, frames)
            todo.append(v[0] if isinstance(v, tuple) else getattr(v, "exception", v))
        todo += [x.__cause__, x.__context__]
    return [x for x in out if isinstance(x, BaseException)]


def explain(e: BaseException) -> str:
    """The innermost useful line of a (DCP-wrapped) exception: ``Type: first line`` (at most 160 characters)."""
    inner = [x for x in _causes(e) if not type(x).__name__ == "CheckpointException"] or [e]
    x = inner[-1] if len(inner) > 1 else inner[0]
    lines = str(x).strip().splitlines()
    if not lines and isinstance(x, EOFError):
        lines = ["the file ends early (truncated or empty)"]
    msg = f"{type(x).__name__}: {lines[0] if lines else ''}"
    return msg if len(msg) <= 160 else msg[:157] + "..."


def out_of_space(e: BaseException) -> bool:
    """A write that failed for lack of space: ENOSPC / EFBIG (a file-size limit) / EDQUOT, or PyTorch's writer finding
    fewer bytes written than it wrote (``unexpected pos``: how a short write surfaces through its zip writer)."""
    return any((isinstance(x, OSError) and x.errno in _NO_SPACE) or "unexpected pos" in str(x) for x in _causes(e))


def save(ckpt_dir: Path, step: int, state: TrainState, keep: int = 2) -> Path:
    """Write ``ckpt_dir/step_{step}`` atomically (also over an existing one); prune to the ``keep`` newest. A write
    that fails (a full disk) raises ``SaveError`` after removing its partial folder: the earlier checkpoints stay."""
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / f"step_{step:06d}"
    # the same temp name on every rank: rank 0 chooses it
    name = [f"{final.name}.tmp-{os.getpid()}"]
    if dist.is_initialized():
        dist.broadcast_object_list(name, src=0)
    tmp = ckpt_dir / name[0]
    if _rank() == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    try:
        with warnings.catch_warnings():  # single process: DCP says it assumes no process group, which is right
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save({"app": state}, checkpoint_id=str(tmp))
        if dist.is_initialized():
            dist.barrier()
        if _rank() == 0:
            (tmp / "COMPLETE").write_text(f"{step}\n")
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - one line; DCP's wrapper is a BaseException
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        why = "the disk is full (or a file-size limit was reached)" if out_of_space(e) else "the write failed"
        free = shutil.disk_usage(ckpt_dir).free / 2**20
        raise SaveError(f"cannot write checkpoint {final.name} in {ckpt_dir}: {why} ({explain(e)}; {free:.0f} MiB "
                        f"free there); its partial write was removed") from e
    if _rank() == 0:
        old = ckpt_dir / f"{final.name}.tmp-{os.getpid()}-old"
        if final.exists():  # the same step again: the old one moved aside, never a moment with neither
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        latest_tmp = ckpt_dir / f"latest.tmp-{os.getpid()}"
        try:
            latest_tmp.write_text(final.name + "\n")
            os.replace(latest_tmp, ckpt_dir / "latest")
        except OSError:  # no room even for the pointer: without one, the newest complete checkpoint is the latest
            latest_tmp.unlink(missing_ok=True)
            (ckpt_dir / "latest").unlink(missing_ok=True)
        done = sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir() and (p / "COMPLETE").exists()
                      and ".tmp" not in p.name)
        for old in done[: max(0, len(done) - keep)]:
            shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return final


def complete(ckpt_dir: Path) -> list[Path]:
    """The complete checkpoints, the one to resume from first: ``latest`` when it names a complete one, then every
    ``step_*`` with COMPLETE, newest first."""
    ckpt_dir = Path(ckpt_dir)
    done = sorted((p for p in ckpt_dir.glob("step_*") if ".tmp" not in p.name and (p / "COMPLETE").exists()),
                  reverse=True)
    ptr = ckpt_dir / "latest"
    try:
        named = ckpt_dir / ptr.read_text().strip() if ptr.is_file() else None
    except (OSError, UnicodeDecodeError, ValueError):  # a garbled pointer: the newest complete one
        named = None
    if named in done:
        done.remove(named)
        done.insert(0, named)
    return done


def latest(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint (``latest`` if valid, else the newest ``step_*`` with COMPLETE)."""
    done = complete(ckpt_dir)
    return done[0] if done else None


class LoadFailed(RuntimeError):
    """A checkpoint that cannot be read (a truncated, empty or missing file); the message is one line."""


def load(path: Path, state: TrainState) -> None:
    """Load ``path`` into ``state``; ``LoadFailed`` naming what is wrong when its files cannot be read."""
    from torch.distributed.checkpoint import FileSystemReader

    try:  # read first here: DCP itself would log two tracebacks on a missing or unreadable .metadata
        FileSystemReader(str(path)).read_metadata()
    except (Exception, CheckpointException) as e:  # noqa: BLE001
        raise LoadFailed(f"its .metadata cannot be read ({explain(e)})") from e
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({"app": state}, checkpoint_id=str(path))
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP's wrapper is a BaseException
        raise LoadFailed(f"its data cannot be read ({explain(e)})") from e


def merged_lora_copy(peft_lm: torch.nn.Module, sd: dict) -> torch.nn.Module:
    """A fresh copy of the base model (CPU) holding ``sd`` (the peft model's full state dict), its LoRA adapters merged
    (``W + (alpha / R) B A``, peft's ``merge_and_unload``): the trained policy, with no peft needed to load it.
    The live model is left as it is (sharded under FSDP, adapters unmerged)."""
    import copy

    from peft import get_peft_model

    base = peft_lm.get_base_model()
    copy_ = type(base)(copy.deepcopy(base.config)).to(next(iter(sd.values())).dtype)
    with warnings.catch_warnings():  # peft asks transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        copy_ = get_peft_model(copy_, copy.deepcopy(peft_lm.peft_config[peft_lm.active_adapter]))
        copy_.load_state_dict(sd)
        return copy_.merge_and_unload()


def export_pretrained(policy: torch.nn.Module, tokenizer, out: Path) -> None:
    """``save_pretrained`` (safetensors) of the policy's causal LM, loadable with ``AutoModelForCausalLM``.

    Under FSDP the full state dict is gathered (to CPU, rank 0). The optional value head on the policy
    is not part of a causal LM and is left out.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if dist.is_initialized():
        sd = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        sd = {k: v.detach().cpu() for k, v in policy.state_dict().items()}
    if _rank() != 0:
        return
    sd = {k.removeprefix("lm."): v for k, v in sd.items() if k.startswith("lm.")}
    lm = policy.lm
    if getattr(policy, "lora", False):  # the adapters merged into a copy of the base: a plain transformers model
        lm, sd = merged_lora_copy(policy.lm, sd), None
    out = Path(out)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        lm.save_pretrained(tmp, state_dict=sd, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after a failure: nothing half-written is left
