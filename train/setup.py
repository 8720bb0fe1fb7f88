"""Everything before the loop: flags checked in one place, the run directory, resume, models, optimiser, state.

Every check here runs before any model is built, and each refusal is one line naming the flag (``LoadError``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import checkpoint as ckpt
from .algos import KLController
from .config import BUILT, Config, given_flags
from .dist import Dist
from .errors import LoadError
from .gguf import is_gguf_spec
from .loading import Prompt, check_chat_prompts, check_model_source, load_prompts, load_tokenizer, resolve_source
from .metrics import MetricsLog, peak_rss_gb
from .models import Models, build_models
from .rewards import RewardScaler
from .stopping import lock_run_dir, remove_stale_tmp


class PromptSampler:
    """Global batches from a seeded permutation per epoch; rank r takes its contiguous share."""

    def __init__(self, prompts: list[Prompt], batch: int, seed: int, d: Dist):
        self.prompts, self.batch, self.seed, self.d = prompts, batch, seed, d
        self.epoch, self.pos = 0, 0

    def next(self) -> list[Prompt]:
        out: list[int] = []
        while len(out) < self.batch:
            perm = torch.randperm(len(self.prompts), generator=torch.Generator().manual_seed(self.seed * 100003 + self.epoch))
            take = perm[self.pos : self.pos + self.batch - len(out)].tolist()
            out += take
            self.pos += len(take)
            if self.pos >= len(self.prompts):
                self.epoch, self.pos = self.epoch + 1, 0
        per = self.batch // self.d.world
        return [self.prompts[i] for i in out[self.d.rank * per : (self.d.rank + 1) * per]]


class Progress:
    """The trainer's scalars a checkpoint carries (a DCP Stateful through ``ckpt.TrainState``): the step,
    the data position, the KL controller and the reward scaler."""

    def __init__(self, sampler: PromptSampler, kl: KLController, scaler: RewardScaler):
        self.step, self.sampler, self.kl, self.scaler = 0, sampler, kl, scaler

    def state_dict(self) -> dict:
        return {"step": self.step, "epoch": self.sampler.epoch, "pos": self.sampler.pos, "beta": self.kl.beta,
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        self.step, self.sampler.epoch, self.sampler.pos = int(sd["step"]), int(sd["epoch"]), int(sd["pos"])
        self.kl.beta = float(sd["beta"])
        self.scaler.load_state_dict(sd["scaler"])


# flags that may be given anew with --resume (they change how long the run goes and what it writes, not what it
# learns); any other flag given with a value unlike the saved one is refused
RESUMABLE = ("steps", "stop_after", "save_every", "eval_every", "eval_samples", "keep_checkpoints", "threads",
             "reward_timeout", "progress", "plot", "export", "tensorboard", "debug")


def resume_config(cfg: Config, argv: list[str] | None) -> Config:
    """A resumed run's config: its saved config.json, with the ``RESUMABLE`` flags given now applied; a flag that would
    change the run (``--algo``, ``--lr``, ``--batch-size``, ``--out``, ...) and differs from the saved value is refused
    in one line listing them."""
    run_dir = Path(cfg.resume)
    try:
        saved = json.loads((run_dir / "config.json").read_text())
    except FileNotFoundError:
        raise LoadError(f"--resume {cfg.resume!r}: no run directory there (config.json missing)") from None
    except (OSError, ValueError) as e:
        raise LoadError(f"--resume {cfg.resume!r}: its config.json cannot be read ({type(e).__name__}: {e})") from None
    names = {f.name for f in dataclasses.fields(Config)}
    saved = {k: v for k, v in saved.items() if k in names}  # fields added since then keep their defaults
    given = given_flags(argv if argv is not None else sys.argv[1:])
    changed = []
    if "out" in given and Path(given["out"]).resolve() != run_dir.resolve():
        changed.append(f"--out {given['out']} (a resumed run writes into --resume {cfg.resume})")
    for k in sorted(given.keys() - {"out", "resume", *RESUMABLE}):
        if k in saved and getattr(cfg, k) != saved[k]:
            changed.append(f"--{k.replace('_', '-')} {getattr(cfg, k)} (saved: {saved[k]})")
    if changed:
        raise LoadError(f"--resume {cfg.resume}: {'; '.join(changed)}: a resumed run keeps the settings it started "
                        f"with; only {', '.join('--' + k.replace('_', '-') for k in RESUMABLE)} may change (or start a "
                        f"new run with another --out)")
    for k in given.keys() & set(RESUMABLE):
        saved[k] = getattr(cfg, k)
    saved["resume"] = saved["out"] = cfg.resume
    return Config(**saved)


@dataclass
class Run:
    """Everything the loop uses: the run's final config, models, optimiser, checkpointed state, outputs."""

    cfg: Config
    models: Models
    opt: torch.optim.Optimizer
    params: list
    progress: Progress
    state: ckpt.TrainState
    out: Path
    eval_prompts: list[Prompt]  # the first --eval-samples, shown at each evaluation
    heldout: list[Prompt]  # all of --eval-dataset (or --dataset): the held-out accuracy's prompts
    metrics: MetricsLog | None
    bar: object
    lock: object = None  # the open OUT/.lock (rank 0): the run directory is this process's until it is closed
    carry: dict = dataclasses.field(default_factory=dict)  # fields for the next metrics row (the initial accuracy)

    def show(self, msg: str) -> None:
        """Print ``msg`` on the main process without breaking the progress bar."""
        (self.bar.write if self.bar is not None else print)(msg)

    def log_row(self, row: dict, dt: float) -> None:
        row["tokens_per_s"] = row["response_tokens"] / dt
        row["iter_s"] = dt
        if torch.cuda.is_available():
            row["max_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        else:
            row["max_rss_gb"] = peak_rss_gb()
        if self.metrics is not None:
            self.metrics.log(row)
        if self.bar is not None:
            post = {"reward": f"{row['reward_mean']:.3f}", **({"kl": f"{row['kl']:.3f}"} if "kl" in row else {}),
                    "s": "/".join(f"{row[f'time_{k}']:.2f}" for k in ("rollout", "experience", "update"))}
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.lock is not None:
            self.lock.close()
            self.lock = None


def setup_run(cfg: Config, d: Dist, log) -> Run:
    """Checks, prompts, models, optimiser and state (resumed when asked); the run directory."""
    check_flags(cfg, d)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out or f"runs/{cfg.algo}-{time.strftime('%Y%m%d-%H%M%S')}")
    lock = lock_run_dir(out, d, resume=bool(cfg.resume))  # --out writable, and no other live trainer in it
    try:
        return _setup_run(cfg, d, log, out, lock)
    except BaseException:
        if lock is not None:
            lock.close()
        raise


def _setup_run(cfg: Config, d: Dist, log, out: Path, lock) -> Run:
    if not cfg.resume and ckpt.complete(out / "checkpoints"):
        raise LoadError(f"{out} already holds a run with checkpoints; continue it with --resume {out} or pick another --out")
    if d.main:
        gone = remove_stale_tmp(out)
        if gone:
            log(f"note: removed {len(gone)} unfinished write(s) of an earlier process: {', '.join(gone)}")
    torch.manual_seed(cfg.seed)
    if cfg.model not in BUILT and not is_gguf_spec(cfg.model, cfg.gguf_file):
        gptj = cfg.model == "Dahoas/gptj-sft-static"
        check_model_source(cfg.model, "policy", " (about 24 GB; the GPT-J setup also needs `huggingface-cli download "
                           "Dahoas/gptj-rm-static hf_ckpt.pt` and `huggingface-cli download --repo-type dataset "
                           "Dahoas/rm-static`)" if gptj else "")
    prompts = load_prompts(cfg.dataset, cfg.dataset_split, cfg.prompt_column)
    eval_prompts = load_prompts(cfg.eval_dataset, "train", cfg.prompt_column) if cfg.eval_dataset else prompts
    if any(not isinstance(q, str) for q in prompts):  # chats need the policy tokenizer's template: checked first
        tok = load_tokenizer(resolve_source(cfg.model, cfg, d, log, cfg.gguf_file), trust_remote_code=cfg.trust_remote_code)
        check_chat_prompts(prompts, tok, cfg.model, cfg.prompt_column)
    m = build_models(cfg, d, log)
    cfg = dataclasses.replace(cfg, out=str(out), max_prompt_len=fit_positions(cfg, m, log))
    torch.manual_seed(cfg.seed + 100_003 * d.rank)  # sampling: each rank its own stream
    params = [p for mod in (m.policy, m.critic) if mod is not None for p in mod.parameters() if p.requires_grad]
    # one process: the fused kernel (one pass over each tensor, the default of TRL and transformers on torch >= 2.8;
    # 2-5x faster steps than the per-tensor loop on a 162M model here); FSDP2's sharded DTensors keep the loop
    fused = d.mesh is None and all(p.dtype in (torch.float32, torch.bfloat16) for p in params)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                            **({"fused": True} if fused else {"foreach": False}))
    progress = Progress(PromptSampler(prompts, cfg.batch_size, cfg.seed, d),
                        KLController(cfg.kl_init, cfg.kl_target, cfg.kl_horizon), RewardScaler(cfg.reward_scale, cfg.reward_clip))
    models = nn.ModuleDict({"policy": m.policy, **({"critic": m.critic} if m.critic is not None else {})})
    state = ckpt.TrainState(models, opt, progress)
    resumed_from = None
    if cfg.resume:
        paths = ckpt.complete(out / "checkpoints")
        if not paths:
            raise LoadError(f"--resume {cfg.resume!r}: no complete checkpoint under {out / 'checkpoints'}")
        for i, path in enumerate(paths):  # an unreadable checkpoint: the one before it
            try:
                ckpt.load(path, state)
                break
            except ckpt.LoadFailed as e:
                if i + 1 == len(paths):
                    raise LoadError(f"--resume {cfg.resume}: checkpoint {path.name} cannot be loaded: {e}; no earlier "
                                    f"complete checkpoint to fall back to") from None
                log(f"warning: checkpoint {path.name} cannot be loaded: {e}; falling back to {paths[i + 1].name}")
        resumed_from = progress.step
        log(f"resumed from {path} (step {progress.step})")
        if progress.step > cfg.steps:
            raise LoadError(f"--steps {cfg.steps} is below the step of the checkpoint to resume from ({progress.step})")
    bar = None
    if d.main:
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
        log(f"run directory: {out}  ({cfg.algo}, {d.world} process(es) on {d.device.type}, kernels: "
            f"{cfg.kernel_backend}, {sum(p.numel() for p in params) / 1e6:.2f}M trainable parameters)")
        if cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=progress.step, desc=cfg.algo, dynamic_ncols=True)
    metrics = MetricsLog(out, resumed_from, cfg.tensorboard) if d.main else None
    return Run(cfg, m, opt, params, progress, state, out, eval_prompts[: cfg.eval_samples], eval_prompts, metrics, bar,
               lock)


def check_flags(cfg: Config, d: Dist) -> None:
    """Flags that cannot run, each refused with one line naming the flag: every number in its range (NaN never is),
    then the combinations."""
    for flag, value, ok, want in _ranges(cfg):
        if not ok:
            raise LoadError(f"--{flag.replace('_', '-')} must be {want}, got {value}")
    if cfg.batch_size % d.world or cfg.minibatch_size % d.world:
        raise LoadError(f"--batch-size {cfg.batch_size} and --minibatch-size {cfg.minibatch_size} must be multiples "
                        f"of the number of processes ({d.world})")
    if cfg.advantage == "group" and cfg.samples_per_prompt < 2:
        raise LoadError(f"--advantage group needs --samples-per-prompt >= 2 (a group to compare within), got "
                        f"{cfg.samples_per_prompt}")
    if cfg.critic == "none" and cfg.advantage == "gae":
        raise LoadError("--critic none needs --advantage group: GAE needs a critic's values")
    if cfg.critic != "none" and cfg.advantage == "group":
        raise LoadError(f"--critic {cfg.critic} has nothing to learn with --advantage group (no GAE returns); use "
                        "--critic none")
    if cfg.kl_coef and cfg.advantage == "group":
        raise LoadError("--kl-coef puts a KL penalty into GAE's token rewards, which --advantage group does not use; "
                        "GRPO's KL term is --kl-loss-coef")
    if not 0 <= cfg.warmup_steps < max(cfg.steps, 1):
        raise LoadError(f"--warmup-steps must be in [0, --steps) = [0, {cfg.steps}), got {cfg.warmup_steps}")
    if cfg.lora_rank > 0 and importlib.util.find_spec("peft") is None:
        raise LoadError("--lora-rank needs peft, which is not installed: pip install -e '.[lora]' -c constraints.txt")
    if cfg.lora_rank > 0 and not (cfg.lora_alpha >= 0 and 0 <= cfg.lora_dropout < 1):
        raise LoadError(f"--lora-alpha must be >= 0 (0: 2 * rank) and --lora-dropout in [0, 1), got "
                        f"{cfg.lora_alpha} and {cfg.lora_dropout}")


def _ranges(cfg: Config) -> list[tuple[str, object, bool, str]]:
    """(flag, value, in range, the range in words) for every numeric flag."""
    pos, nonneg = "a positive number", ">= 0"

    def finite(x: float) -> bool:
        return isinstance(x, (int, float)) and math.isfinite(x)

    c = cfg
    return [
        ("steps", c.steps, c.steps >= 1, ">= 1"),
        ("batch_size", c.batch_size, c.batch_size >= 1, ">= 1"),
        ("minibatch_size", c.minibatch_size, c.minibatch_size >= 1, ">= 1"),
        ("epochs", c.epochs, c.epochs >= 1, ">= 1"),
        ("micro_batch_tokens", c.micro_batch_tokens, c.micro_batch_tokens >= -1, ">= 0 (0: one pass; -1: auto)"),
        ("samples_per_prompt", c.samples_per_prompt, c.samples_per_prompt >= 1, ">= 1"),
        ("lr", c.lr, finite(c.lr) and c.lr > 0, pos),
        ("weight_decay", c.weight_decay, finite(c.weight_decay) and c.weight_decay >= 0, nonneg),
        ("max_grad_norm", c.max_grad_norm, finite(c.max_grad_norm) and c.max_grad_norm >= 0, ">= 0 (0: off)"),
        ("lam", c.lam, finite(c.lam) and c.lam > 0, pos),
        ("awr_max_weight", c.awr_max_weight, finite(c.awr_max_weight) and c.awr_max_weight >= 0, ">= 0 (0: no clamp)"),
        ("gamma", c.gamma, finite(c.gamma) and 0 <= c.gamma <= 1, "in [0, 1]"),
        ("gae_lam", c.gae_lam, finite(c.gae_lam) and 0 <= c.gae_lam <= 1, "in [0, 1]"),
        ("vf_coef", c.vf_coef, finite(c.vf_coef) and c.vf_coef >= 0, nonneg),
        ("ppo_clip", c.ppo_clip, finite(c.ppo_clip) and c.ppo_clip > 0, pos),
        ("value_clip", c.value_clip, finite(c.value_clip) and c.value_clip > 0, pos),
        ("kl_init", c.kl_init, finite(c.kl_init) and c.kl_init >= 0, nonneg),
        ("kl_target", c.kl_target, finite(c.kl_target) and c.kl_target >= 0, ">= 0 (0: a fixed beta of --kl-init)"),
        ("kl_horizon", c.kl_horizon, finite(c.kl_horizon) and c.kl_horizon > 0, pos),
        ("kl_coef", c.kl_coef, finite(c.kl_coef) and c.kl_coef >= 0, nonneg),
        ("kl_loss_coef", c.kl_loss_coef, finite(c.kl_loss_coef) and c.kl_loss_coef >= 0, nonneg),
        ("reward_clip", c.reward_clip, finite(c.reward_clip) and c.reward_clip >= 0, ">= 0 (0: off)"),
        ("reward_timeout", c.reward_timeout, finite(c.reward_timeout) and c.reward_timeout >= 0, ">= 0 seconds (0: no limit)"),
        ("max_new_tokens", c.max_new_tokens, c.max_new_tokens >= 1, ">= 1"),
        ("min_new_tokens", c.min_new_tokens, c.min_new_tokens >= 0, ">= 0 (0: off)"),
        ("max_prompt_len", c.max_prompt_len, c.max_prompt_len >= 1, ">= 1"),
        ("temperature", c.temperature, finite(c.temperature) and c.temperature > 0, pos),
        ("top_k", c.top_k, c.top_k >= 0, ">= 0 (0: off)"),
        ("top_p", c.top_p, finite(c.top_p) and 0 < c.top_p <= 1, "in (0, 1] (1: off)"),
        ("unfrozen_layers", c.unfrozen_layers, c.unfrozen_layers >= -1, ">= 0, or -1 (all)"),
        ("lora_rank", c.lora_rank, c.lora_rank >= 0, ">= 1 for LoRA (or 0: off, full fine-tuning)"),
        ("save_every", c.save_every, c.save_every >= 0, ">= 0 (0: only at the end)"),
        ("keep_checkpoints", c.keep_checkpoints, c.keep_checkpoints >= 1, ">= 1 (the one just written is kept)"),
        ("eval_every", c.eval_every, c.eval_every >= 0, ">= 0 (0: never)"),
        ("eval_samples", c.eval_samples, c.eval_samples >= 0, nonneg),
        ("threads", c.threads, c.threads >= 0, ">= 0 (0: torch's default)"),
        ("stop_after", c.stop_after, c.stop_after >= 0, ">= 0 (0: off)"),
        ("seed", c.seed, c.seed >= 0, nonneg),
    ]


def fit_positions(cfg: Config, m: Models, log) -> int:
    """The prompt length: ``--max-prompt-len``, shortened when prompt + response would not fit the model's positions."""
    c = m.policy.config
    n_pos = getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None)
    if n_pos and cfg.max_prompt_len + cfg.max_new_tokens > n_pos:
        if cfg.max_new_tokens >= n_pos:
            raise LoadError(f"--max-new-tokens {cfg.max_new_tokens} does not fit the model's {n_pos} positions")
        log(f"note: prompts truncated to {n_pos - cfg.max_new_tokens} tokens so that prompt + {cfg.max_new_tokens} new "
            f"tokens fit the model's {n_pos} positions")
        return n_pos - cfg.max_new_tokens
    return cfg.max_prompt_len

