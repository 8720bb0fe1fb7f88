"""The APA trainer: ``python -m train.run [flags]`` (``--help`` lists them); ``torchrun`` for FSDP2.

One iteration, top to bottom (each step is a function below):

    prompts -> rollout (generate, left-padded, sampled)
            -> score (reward on the decoded text; NaN rows reported and dropped)
            -> make_experience (logp_old, logp_init, values from hidden states via apa_fast; token rewards)
            -> compute_advantages (gae + whitening over all ranks)
            -> update (epochs x minibatches of the APA / PPO / AWR loss + value loss)
            -> metrics, samples, checkpoint
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

import apa_fast
from apa_fast import reference

from . import checkpoint as ckpt
from .config import Config, parse_args, preset_name
from .loading import check_model_source, load_base_model, load_causal_lm, load_prompts, load_tokenizer
from .metrics import MetricsLog, peak_rss_gb, plot_runs, read_metrics
from .models import (
    HeadRequest, LoadError, freeze_bottom, install_fused_head, make_critic, position_ids_from_mask, shard,
)
from .offline import DATA_DIR, warmed_up_model
from .rewards import RewardScaler, load_reward

# --------------------------------------------------------------------------------------------------
# distributed context


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    mesh: object = None  # a DeviceMesh when running under FSDP2
    group: object = None  # process group for the all-reduces (None: single process)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, *xs: float | Tensor) -> list[float]:
        """Sum scalars over ranks (float64 on the wire)."""
        # one device-to-host copy for all tensors (float() on each would sync once per argument)
        t = torch.stack([torch.as_tensor(x, dtype=torch.float64, device=self.device).reshape(()) for x in xs])
        if self.group is not None:
            dist.all_reduce(t, group=self.group)
        return t.tolist()


def setup_dist() -> Dist:
    if "LOCAL_RANK" not in os.environ and not torch.cuda.is_available():
        return Dist()
    from torch.distributed.device_mesh import init_device_mesh

    if "LOCAL_RANK" not in os.environ:  # one GPU without torchrun: a 1-process group, so FSDP2 + bf16 apply
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    local = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    return Dist(dist.get_rank(), dist.get_world_size(), device, mesh, dist.group.WORLD)


# --------------------------------------------------------------------------------------------------
# models


@dataclass
class Models:
    policy: nn.Module  # a transformers causal LM whose lm_head is a FusedLMHead
    ref: nn.Module  # the frozen initial policy (same architecture, also a FusedLMHead)
    critic: nn.Module | None  # Critic, or None when the value head is on the policy (--critic shared)
    tokenizer: object
    reward: object


def attn_implementation(cfg: Config) -> tuple[str, ...]:
    """The attention implementations to try, best first; the loaders take the first one the model accepts.

    ``--attn X``: X only. ``auto``: ``flash_attention_2`` on CUDA when ``flash_attn`` imports, then ``sdpa``
    (PyTorch's fused attention), then ``eager``. Whether a model supports one is asked of transformers itself:
    ``from_pretrained`` refuses an implementation the model lacks with a ValueError (``load_causal_lm``)."""
    if cfg.attn != "auto":
        return (cfg.attn,)
    order = ("sdpa", "eager")
    if torch.cuda.is_available():
        try:
            import flash_attn  # noqa: F401

            order = ("flash_attention_2", *order)
        except Exception:  # noqa: BLE001 - absent or broken build: sdpa then
            pass
    return order


def build_models(cfg: Config, d: Dist, log) -> Models:
    """Policy, initial policy, critic and reward, loaded and placed one at a time (peak host memory: one model).

    Single process: each model moves to the device. FSDP2: each is sharded (``shard``: every transformer block,
    the fused LM head, then the root); ``fully_shard`` moves each unit to the mesh's device as it shards it,
    so no model ever sits whole on one GPU.
    """
    gpu = d.device.type == "cuda"
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and gpu)
    attn = attn_implementation(cfg)
    frozen_dtype = torch.bfloat16 if bf16 else torch.float32
    mp = None
    if d.mesh is not None and bf16:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)

    def place(model: nn.Module, trainable: bool = False) -> nn.Module:
        if d.mesh is None:  # single process (CPU): --precision bf16 trains in plain bf16
            return model.to(d.device, torch.bfloat16 if bf16 and trainable else None)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        return shard(model, d.mesh, mp if trainable else None, extra=(head,) if head is not None else ())

    if cfg.model == "offline":
        path = str(_main_first(d, lambda: warmed_up_model(cfg.cache_dir or None, log=log)))
    else:
        path = cfg.model
    tokenizer = load_tokenizer(path, trust_remote_code=cfg.trust_remote_code)
    # the trainable policy keeps fp32 master weights; FSDP2's MixedPrecisionPolicy computes in bf16 on GPU
    policy = load_causal_lm(path, dtype=torch.float32, attn=attn, trust_remote_code=cfg.trust_remote_code)
    config = policy.config
    install_fused_head(policy, value_head=cfg.critic == "shared")
    freeze_bottom(policy, cfg.unfrozen_layers)
    policy = place(policy, trainable=True)
    policy.generation_config.pad_token_id = tokenizer.pad_token_id

    ref = load_causal_lm(path, dtype=frozen_dtype, attn=attn, trust_remote_code=cfg.trust_remote_code, what="initial policy")
    install_fused_head(ref)
    ref = place(ref.requires_grad_(False).eval())

    critic = None
    if cfg.critic == "separate":  # the authors' separate critic: the SFT model's transformer + a scalar head
        body = load_base_model(path, dtype=torch.float32, attn=attn, trust_remote_code=cfg.trust_remote_code)
        critic = make_critic(body, config)
        freeze_bottom(critic, cfg.unfrozen_layers)
        critic = place(critic, trainable=True)

    reward = load_reward(cfg.reward_model, policy_config=config, tokenizer=tokenizer,
                         device=d.device if d.mesh is None else torch.device("cpu"), dtype=frozen_dtype,
                         trust_remote_code=cfg.trust_remote_code, gptj_reward_at=cfg.gptj_reward_at)
    rm = getattr(reward, "model", None)  # a reward model (not a function): sharded like the frozen policy
    if isinstance(rm, nn.Module) and d.mesh is not None:
        shard(rm, d.mesh, None)
        reward.device = d.device
    return Models(policy, ref, critic, tokenizer, reward)


def _main_first(d: Dist, fn):
    """Run ``fn`` on rank 0 first (e.g. a cached warm-up), then on the others."""
    if d.world > 1 and not d.main:
        dist.barrier()
    out = fn()
    if d.world > 1 and d.main:
        dist.barrier()
    return out


# --------------------------------------------------------------------------------------------------
# one batch of experience


@dataclass
class Batch:
    """Left-padded prompt + response. Per-token tensors are over the R response positions."""

    input_ids: Tensor  # (B, P+R)
    attention_mask: Tensor  # (B, P+R): prompt's mask, then the response's mask
    position_ids: Tensor  # (B, P+R)
    prompt_len: int  # P
    response: Tensor  # (B, R) sampled tokens
    mask: Tensor  # (B, R) bool: tokens up to and including the first EOS (and of finite-reward rows)
    prompts: list[str]
    completions: list[str]
    scores: Tensor | None = None  # (B,) raw scores (NaN where the reward was not a number)
    logp_old: Tensor | None = None  # (B, R) behaviour policy's log-probs
    logp_init: Tensor | None = None  # (B, R) frozen initial policy's log-probs
    values: Tensor | None = None  # (B, R)
    entropy: Tensor | None = None  # (B, R)
    rewards: Tensor | None = None  # (B, R) token rewards
    advantages: Tensor | None = None
    returns: Tensor | None = None
    logp_sample: Tensor | None = None  # (B, R) only when rollout(sampling_logprobs=True)

    def rows(self, idx: Tensor) -> "Batch":
        f = {k: (v[idx] if isinstance(v, Tensor) and v.dim() > 0 else v) for k, v in vars(self).items()}
        f["prompts"] = [self.prompts[i] for i in idx.tolist()]
        f["completions"] = [self.completions[i] for i in idx.tolist()]
        return Batch(**f)


@torch.no_grad()
def rollout(m: Models, prompts: list[str], cfg: Config, d: Dist, greedy: bool = False,
            sampling_logprobs: bool = False) -> Batch:
    """Sample responses with ``generate`` from left-padded prompts.

    ``sampling_logprobs``: also keep the log-probs of the sampled tokens under the distribution that
    ``generate`` sampled from (``log_softmax(logits / temperature)``), to check against training's."""
    tok = m.tokenizer
    tok.padding_side, tok.truncation_side = "left", "left"
    enc = tok(prompts, padding=True, truncation=True, max_length=cfg.max_prompt_len, return_tensors="pt").to(d.device)
    P = enc["input_ids"].shape[1]
    sample = {} if greedy else dict(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
    m.policy.eval()
    gen = m.policy.generate(
        **enc, do_sample=not greedy, max_new_tokens=cfg.max_new_tokens, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, synced_gpus=d.world > 1, return_dict_in_generate=True,
        output_logits=sampling_logprobs, **sample,
    )
    seq = gen.sequences
    response = seq[:, P:]
    if response.shape[1] == 0:
        raise RuntimeError("generate returned no new tokens")
    is_eos = response == tok.eos_token_id
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    mask = ~after_eos
    response = torch.where(mask, response, tok.pad_token_id)
    attn = torch.cat([enc["attention_mask"].bool(), mask], 1).long()
    input_ids = torch.cat([enc["input_ids"], response], 1)
    completions = tok.batch_decode(torch.where(mask & ~is_eos, response, tok.pad_token_id), skip_special_tokens=True)
    b = Batch(input_ids, attn, position_ids_from_mask(attn), P, response, mask, list(prompts), completions)
    if sampling_logprobs:
        b.logp_sample = reference.token_logprobs(
            torch.stack(gen.logits, 1), torch.where(mask, response, -100), 1.0 if greedy else cfg.temperature
        )
    return b


def score(m: Models, b: Batch, d: Dist, log) -> int:
    """Rewards on the decoded text. A NaN or non-number score is reported and its row leaves the loss."""
    raw = m.reward(b.prompts, b.completions)
    if len(raw) != len(b.prompts):
        raise RuntimeError(f"the reward returned {len(raw)} scores for {len(b.prompts)} completions")
    b.scores = torch.tensor(raw, dtype=torch.float32, device=d.device)
    bad = ~torch.isfinite(b.scores)
    if bad.any():
        i = int(bad.nonzero()[0])
        log(f"warning: reward is not a finite number for {int(bad.sum())}/{len(raw)} samples on rank {d.rank} "
            f"(e.g. prompt {b.prompts[i]!r} -> {b.completions[i]!r}: {raw[i]!r}); they are left out of the loss")
        b.mask = b.mask & ~bad.unsqueeze(1)
    return int(bad.sum())


def head_forward(model: nn.Module, b: Batch, req: HeadRequest) -> dict:
    """The model's forward with its FusedLMHead computing ``req`` from the final hidden states."""
    head = model.get_output_embeddings()
    with head.fused(req):
        out = model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids, use_cache=False)
    return out.logits  # the head's dict (logprobs / entropy / values / loss)


def labels_of(b: Batch) -> Tensor:
    return torch.where(b.mask, b.response, -100)


def critic_values(m: Models, b: Batch) -> Tensor:
    return m.critic(b.input_ids, b.attention_mask, b.position_ids, b.prompt_len - 1, b.response.shape[1])


@torch.no_grad()
def make_experience(m: Models, b: Batch, cfg: Config, kl: "KLController", scores: Tensor) -> None:
    """logp_old (policy), logp_init (initial policy), values (critic), and the token rewards from ``scores``."""
    start, shared = b.prompt_len - 1, cfg.critic == "shared"
    req = HeadRequest(labels_of(b), start, cfg.temperature, entropy=True, values=shared, backend=cfg.kernel_backend)
    out = head_forward(m.policy, b, req)
    b.logp_old, b.entropy = out["logprobs"], out["entropy"]
    b.values = out["values"] if shared else critic_values(m, b)
    b.logp_init = head_forward(m.ref, b, dataclasses.replace(req, entropy=False, values=False))["logprobs"]
    # token rewards: the scaled score on the last valid token; PPO adds -beta * (logp_old - logp_init)
    beta = kl.beta if cfg.algo == "ppo" else cfg.kl_coef
    r = -beta * (b.logp_old - b.logp_init) * b.mask
    last = (b.mask.long().cumsum(-1) * b.mask).argmax(-1)
    sc = torch.where(torch.isfinite(scores), scores, 0.0)
    r[torch.arange(len(sc), device=r.device), last] += sc * b.mask.any(-1)
    b.rewards = r


def compute_advantages(b: Batch, cfg: Config, d: Dist) -> None:
    """GAE over the response, then advantages whitened over the valid tokens of all ranks."""
    A, R = apa_fast.gae(b.rewards, b.values, b.mask, gamma=cfg.gamma, lam=cfg.gae_lam)
    b.advantages = apa_fast.masked_whiten(A, b.mask, process_group=d.group)
    b.returns = R


# --------------------------------------------------------------------------------------------------
# the update


class KLController:
    """PPO's adaptive KL coefficient (Ziegler et al.): beta *= 1 + clip(KL/target - 1, -0.2, 0.2) * n/horizon."""

    def __init__(self, init: float, target: float, horizon: float):
        self.beta, self.target, self.horizon = init, target, horizon

    def update(self, kl: float, n_steps: int) -> None:
        err = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + err * n_steps / self.horizon


def policy_loss(m: Models, mb: Batch, cfg: Config) -> tuple[Tensor, Tensor | None]:
    """The algorithm's loss on a minibatch (a masked mean over its local tokens) and the shared-critic values."""
    req = HeadRequest(labels_of(mb), mb.prompt_len - 1, cfg.temperature, values=cfg.critic == "shared",
                      backend=cfg.kernel_backend)
    if cfg.algo == "apa":
        # APA: L = sum(m * (logp - logp_init - A/lam)^2) / n, fused from hidden states (apa_fast.linear_apa_loss)
        req.apa = dict(ref_logprobs=mb.logp_init, advantages=mb.advantages, mask=mb.mask, lam=cfg.lam)
        out = head_forward(m.policy, mb, req)
        return out["loss"], out.get("values")
    out = head_forward(m.policy, mb, req)
    logp = out["logprobs"]
    if cfg.algo == "ppo":
        loss = apa_fast.ppo_loss(logp, mb.logp_old, mb.advantages, mb.mask, clip=cfg.ppo_clip)
    else:
        loss = apa_fast.awr_loss(logp, mb.advantages, mb.mask, lam=cfg.lam, max_weight=cfg.awr_max_weight or None)
    return loss, out.get("values")


def update(m: Models, b: Batch, cfg: Config, d: Dist, opt: torch.optim.Optimizer, params: list, gen: torch.Generator):
    """Epochs x minibatches of (policy loss + vf_coef * value loss), normalised by the global token count."""
    m.policy.train()
    if m.critic is not None:
        m.critic.train()
    B = b.input_ids.shape[0]
    mb_size = cfg.minibatch_size // d.world
    sums = {"loss": 0.0, "policy_loss": 0.0, "value_loss": 0.0}
    n_total = 0.0  # valid tokens seen over all ranks and epochs
    for _ in range(cfg.epochs):
        perm = torch.randperm(B, generator=gen).to(d.device)
        starts = range(0, B, mb_size)
        counts = [float(b.mask[perm[i : i + mb_size]].sum()) for i in starts]
        global_counts = d.sum(*counts)  # one all-reduce per epoch for every minibatch's token count
        n_total += sum(global_counts)
        for i, n_local, n_global in zip(starts, counts, global_counts):
            mb = b.rows(perm[i : i + mb_size])
            # each rank's loss is a mean over its own tokens; FSDP averages gradients over ranks, so this
            # rescaling makes the update sum(token losses) / n_global, the same for any number of ranks
            scale = n_local * d.world / n_global if n_global > 0 else 0.0
            pg, values = policy_loss(m, mb, cfg)
            if values is None:
                values = critic_values(m, mb)
            clip = dict(old_values=mb.values, clip=cfg.value_clip) if cfg.algo == "ppo" else {}
            vf = apa_fast.value_loss(values, mb.returns, mb.mask, **clip)
            loss = pg + cfg.vf_coef * vf
            (loss * scale).backward()
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            for k, v in (("loss", loss), ("policy_loss", pg), ("value_loss", vf)):
                sums[k] += float(v.detach()) * n_local
    tot = d.sum(*sums.values())
    return {k: v / max(n_total, 1.0) for k, v in zip(sums, tot)}


# --------------------------------------------------------------------------------------------------
# data, trainer state


class PromptSampler:
    """Global batches from a seeded permutation per epoch; rank r takes its contiguous share."""

    def __init__(self, prompts: list[str], batch: int, seed: int, d: Dist):
        self.prompts, self.batch, self.seed, self.d = prompts, batch, seed, d
        self.epoch, self.pos = 0, 0

    def next(self) -> list[str]:
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


class Trainer:
    """The trainer's scalars that a checkpoint carries (a DCP Stateful via TrainState)."""

    def __init__(self, sampler: PromptSampler, kl: KLController, scaler: RewardScaler):
        self.step, self.sampler, self.kl, self.scaler = 0, sampler, kl, scaler

    def state_dict(self) -> dict:
        return {"step": self.step, "epoch": self.sampler.epoch, "pos": self.sampler.pos, "beta": self.kl.beta,
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        self.step, self.sampler.epoch, self.sampler.pos = int(sd["step"]), int(sd["epoch"]), int(sd["pos"])
        self.kl.beta = float(sd["beta"])
        self.scaler.load_state_dict(sd["scaler"])


# --------------------------------------------------------------------------------------------------
# metrics


def iteration_metrics(b: Batch, d: Dist, n_bad: int) -> dict:
    """Global (all-rank) reward, KL and entropy of one rollout batch, over the response tokens only.

    ``kl`` (k1): per sequence ``sum_t (logp - logp_init)``, averaged over sequences. ``kl_sqrt_k3``:
    ``sqrt(mean_t k3)``, ``k3 = exp(x) - 1 - x``, ``x = logp_init - logp``, the mean over all response tokens
    (k3 is an unbiased, non-negative per-token estimator of KL(pi || pi_init)).

    Neither is the APA authors' plotted ``policy/sqrt_kl``: that is the square root of the mean of
    ``exp(lr) - 1 - lr`` with ``lr = logp - logp_init`` (the other ratio: its expectation under pi is
    chi^2(pi || pi_init) - KL(pi || pi_init), not a KL) over every position of the (B, T-1) tensor, prompt
    tokens and padding (0 there) included, so it also moves with prompt length and padding. It is not
    computed here: it needs both models' log-probs at the prompt positions, which the fused head never forms.
    """
    finite = torch.isfinite(b.scores)
    scores = torch.where(finite, b.scores, 0.0)
    m = b.mask.float()
    x = (b.logp_init - b.logp_old) * m  # log(pi_init / pi), 0 at masked steps
    k3 = torch.exp(x) - 1 - x
    seq_kl = ((b.logp_old - b.logp_init) * m).sum(-1)
    has = b.mask.any(-1).float()
    s = d.sum(
        scores.sum(), finite.sum(), (seq_kl * has).sum(), has.sum(), k3.sum(), m.sum(),
        (b.entropy * m).sum(), n_bad, scores.pow(2).sum(),
    )
    n = max(s[1], 1.0)
    mean = s[0] / n
    return {
        "reward_mean": mean,
        "reward_std": math.sqrt(max(s[8] / n - mean * mean, 0.0)),
        "kl": s[2] / max(s[3], 1.0),
        "kl_sqrt_k3": math.sqrt(max(s[4] / max(s[5], 1.0), 0.0)),
        "entropy": s[6] / max(s[5], 1.0),
        "reward_nan": int(s[7]),
        "response_tokens": int(s[5]),
        "response_len": s[5] / max(s[3], 1.0),
    }


# --------------------------------------------------------------------------------------------------
# main


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    import transformers

    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars: noise next to ours
    try:
        return train(cfg, argv)
    except LoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _resume_config(cfg: Config, argv: list[str] | None) -> Config:
    """A resumed run uses its saved config; only run-length and output flags given now override it."""
    saved = json.loads((Path(cfg.resume) / "config.json").read_text())
    given = {a.split("=")[0][2:].replace("-", "_") for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--")}
    overridable = {"steps", "stop_after", "progress", "save_every", "eval_every", "threads", "plot", "export",
                   "tensorboard", "keep_checkpoints"}
    for k in given & overridable:
        saved[k] = getattr(cfg, k)
    saved["resume"], saved["out"] = cfg.resume, cfg.resume
    return Config(**saved)


def train(cfg: Config, argv: list[str] | None = None) -> int:
    if cfg.resume:
        if not (Path(cfg.resume) / "config.json").exists():
            raise LoadError(f"--resume {cfg.resume!r}: no run directory there (config.json missing)")
        cfg = _resume_config(cfg, argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    d = setup_dist()
    log = (lambda s: print(s, flush=True)) if d.main else (lambda s: None)
    if cfg.batch_size % d.world or cfg.minibatch_size % d.world:
        raise LoadError(f"--batch-size {cfg.batch_size} and --minibatch-size {cfg.minibatch_size} must be multiples "
                        f"of the number of processes ({d.world})")
    out = Path(cfg.out or f"runs/{cfg.algo}-{time.strftime('%Y%m%d-%H%M%S')}")
    cfg.out = str(out)
    if not cfg.resume and (out / "checkpoints").exists():
        raise LoadError(f"{out} already holds a run with checkpoints; continue it with --resume {out} or pick another --out")
    torch.manual_seed(cfg.seed)
    if cfg.model != "offline":
        gptj = cfg.model == "Dahoas/gptj-sft-static"
        check_model_source(cfg.model, "policy", " (about 24 GB; the GPT-J setup also needs `huggingface-cli download "
                           "Dahoas/gptj-rm-static hf_ckpt.pt` and `huggingface-cli download --repo-type dataset "
                           "Dahoas/rm-static`)" if gptj else "")
    prompts = load_prompts(cfg.dataset, cfg.dataset_split, cfg.prompt_column)
    if preset_name(cfg.model) == "offline" and cfg.dataset is None:  # a fixed few sums
        eval_prompts = load_prompts(str(DATA_DIR / "arith_eval.jsonl"), "train", "prompt")
    else:
        eval_prompts = prompts
    eval_prompts = eval_prompts[: cfg.eval_samples]
    m = build_models(cfg, d, log)
    n_pos = getattr(m.policy.config, "max_position_embeddings", None) or getattr(m.policy.config, "n_positions", None)
    if n_pos and cfg.max_prompt_len + cfg.max_new_tokens > n_pos:
        if cfg.max_new_tokens >= n_pos:
            raise LoadError(f"--max-new-tokens {cfg.max_new_tokens} does not fit the model's {n_pos} positions")
        log(f"note: prompts truncated to {n_pos - cfg.max_new_tokens} tokens so that prompt + {cfg.max_new_tokens} new "
            f"tokens fit the model's {n_pos} positions")
        cfg.max_prompt_len = n_pos - cfg.max_new_tokens
    torch.manual_seed(cfg.seed + 100_003 * d.rank)  # sampling: each rank its own stream
    params = [p for mod in (m.policy, m.critic) if mod is not None for p in mod.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False)
    trainer = Trainer(PromptSampler(prompts, cfg.batch_size, cfg.seed, d), KLController(cfg.kl_init, cfg.kl_target,
                      cfg.kl_horizon), RewardScaler(cfg.reward_scale, cfg.reward_clip))
    models = nn.ModuleDict({"policy": m.policy, **({"critic": m.critic} if m.critic is not None else {})})
    state = ckpt.TrainState(models, opt, trainer)
    ckpt_dir = out / "checkpoints"
    resumed_from = None
    if cfg.resume:
        path = ckpt.latest(ckpt_dir)
        if path is None:
            raise LoadError(f"--resume {cfg.resume!r}: no complete checkpoint under {ckpt_dir}")
        ckpt.load(path, state)
        resumed_from = trainer.step
        log(f"resumed from {path} (step {trainer.step})")
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
        log(f"run directory: {out}  ({cfg.algo}, {d.world} process(es) on {d.device.type}, kernels: "
            f"{cfg.kernel_backend}, {sum(p.numel() for p in params) / 1e6:.2f}M trainable parameters)")
    metrics = MetricsLog(out, resumed_from, cfg.tensorboard) if d.main else None
    bar = None
    if d.main and cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=trainer.step, desc=cfg.algo, dynamic_ncols=True)
    done_here = 0
    while trainer.step < cfg.steps:
        t0 = time.perf_counter()
        b = rollout(m, trainer.sampler.next(), cfg, d)
        n_bad = score(m, b, d, log)
        finite = _gather(b.scores[torch.isfinite(b.scores)], d)
        if finite.numel() == 0:
            raise LoadError(f"every reward of iteration {trainer.step + 1} was NaN or not a number (e.g. "
                            f"{b.completions[0]!r} for {b.prompts[0]!r}); check --reward-model {cfg.reward_model}")
        trainer.scaler.update(finite)
        make_experience(m, b, cfg, trainer.kl, trainer.scaler(b.scores))
        compute_advantages(b, cfg, d)
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + trainer.step)
        losses = update(m, b, cfg, d, opt, params, gen)
        row = {"step": trainer.step + 1, **iteration_metrics(b, d, n_bad), **losses}
        if cfg.algo == "ppo":
            trainer.kl.update(row["kl"], cfg.batch_size)
        row["beta"] = trainer.kl.beta if cfg.algo == "ppo" else cfg.kl_coef
        dt = time.perf_counter() - t0
        row["tokens_per_s"] = row["response_tokens"] / dt
        row["iter_s"] = dt
        if d.device.type == "cuda":
            row["max_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        else:
            row["max_rss_gb"] = peak_rss_gb()
        trainer.step += 1
        done_here += 1
        if metrics is not None:
            metrics.log(row)
        if bar is not None:
            bar.set_postfix(reward=f"{row['reward_mean']:.3f}", kl=f"{row['kl']:.3f}", refresh=False)
            bar.update(1)
        if cfg.eval_every and (trainer.step % cfg.eval_every == 0 or trainer.step == cfg.steps):
            evaluate(m, eval_prompts, cfg, d, out, trainer.step, bar)
        if cfg.save_every and trainer.step % cfg.save_every == 0 or trainer.step == cfg.steps:
            ckpt.save(ckpt_dir, trainer.step, state, cfg.keep_checkpoints)
        if cfg.stop_after and done_here >= cfg.stop_after and trainer.step < cfg.steps:
            log(f"stopping after {done_here} iterations (--stop-after); continue with --resume {out}")
            if metrics:
                metrics.close()
            _teardown(d)
            return 0
    if bar is not None:
        bar.close()
    if metrics is not None:
        metrics.close()
    if cfg.export:
        ckpt.export_pretrained(m.policy, m.tokenizer, out / "final")
        log(f"final policy: {out / 'final'} (AutoModelForCausalLM.from_pretrained)")
    if d.main and cfg.plot and (out / "metrics.jsonl").exists():
        rows = read_metrics(out / "metrics.jsonl")
        plot_runs({cfg.algo: rows}, out / "plot.png", title=f"{cfg.algo} on {cfg.model}")
        k = max(1, min(10, len(rows) // 4))
        first = sum(r["reward_mean"] for r in rows[:k]) / k
        last = sum(r["reward_mean"] for r in rows[-k:]) / k
        log(f"reward (mean of the first / last {k} iterations) {first:.3f} -> {last:.3f}; final KL: k1 {rows[-1]['kl']:.3f}, "
            f"sqrt(mean k3) {rows[-1]['kl_sqrt_k3']:.3f}; plot: {out / 'plot.png'}")
    _teardown(d)
    return 0


def _gather(x: Tensor, d: Dist) -> Tensor:
    if d.group is None:
        return x
    parts = [None] * d.world
    dist.all_gather_object(parts, x.cpu())
    return torch.cat(parts).to(x.device)


@torch.no_grad()
def evaluate(m: Models, prompts: list[str], cfg: Config, d: Dist, out: Path, step: int, bar) -> None:
    """Greedy completions of the evaluation prompts (printed and appended to samples.jsonl)."""
    if not prompts:
        return
    per = math.ceil(len(prompts) / d.world)
    mine = (prompts * d.world)[d.rank * per : (d.rank + 1) * per] if d.world > 1 else prompts
    b = rollout(m, mine, cfg, d, greedy=True)
    rows = list(zip(b.prompts, b.completions, m.reward(b.prompts, b.completions)))
    if d.world > 1:
        parts = [None] * d.world
        dist.all_gather_object(parts, rows)
        rows = [r for part in parts for r in part][: len(prompts)]
    if not d.main:
        return
    lines = [f"  {p!r} -> {c!r}  (reward {r:.3g})" for p, c, r in rows]
    msg = f"step {step} samples (greedy):\n" + "\n".join(lines)
    (bar.write if bar is not None else print)(msg)
    with open(out / "samples.jsonl", "a") as f:
        for p, c, r in rows:
            f.write(json.dumps({"step": step, "prompt": p, "completion": c, "reward": r}) + "\n")


def _teardown(d: Dist) -> None:
    if d.group is not None:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
