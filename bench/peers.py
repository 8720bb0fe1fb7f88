"""apa-fast's trainer against TRL's on the same jobs, side by side in one run on this machine.

``python -m bench.peers [--jobs a,b,c] [--impls ...] [--steps K] [--repeats R] [--threads T] [--quick | --tiny]``

Each (job, implementation) runs in its own process, interleaved (a-apa, a-trl, a-trl+liger, b-apa, ..., then the
next repeat with the order inside each job reversed), so that the ratios are measured under the same load.
Implementations: ``apa-fast`` (``python -m train.run``) and, per GRPO job, every TRL row of ``TRL_ROWS``: ``trl``
(``GRPOTrainer`` as below) and ``trl+liger`` (the same with ``use_liger_kernel=True``, as TRL's users switch on
Liger-Kernel). In TRL 1.16 that flag applies Liger's layer kernels to the model (RMSNorm, RoPE, SwiGLU, ... for
the model types Liger patches; ``fused_linear_cross_entropy`` forced off) and leaves the loss to TRL's own chunked
LM head (``add_fused_lm_head``), which every TRL row uses: ``LigerFusedLinearGRPOLoss`` is no longer TRL's loss
(``python -m bench.liger`` measures it at the kernel level). Liger's layer kernels are Triton GPU kernels: on a CPU
the row is recorded as not run for a model type Liger patches (Triton has no CPU driver), and for one it does not
patch (job a's GPT-J) TRL runs with nothing applied, which the row records (``liger_applied``). Jobs:

- ``a``: the offline arithmetic task (the warmed-up tiny GPT-J and its character tokenizer,
  ``train/data/arith_prompts.jsonl``, ``train.tasks.offline:arith_reward``), GRPO, 16 prompts x 4 samples per
  iteration, at most 4 new tokens, 2 epochs of one gradient step each.
- ``b``: a ~162M-parameter Llama-shaped model (12 layers, 768 wide, V = 50,400, random weights, built locally
  with the offline tokenizer padded to 50,400: ``bench.trainer.llama_160m_model``), the same prompts and reward,
  GRPO, 8 prompts x 4 samples, exactly 64 new tokens (EOS suppressed until then on both sides: transformers'
  ``min_new_tokens``), 1 epoch of one gradient step.
- ``c``: PPO/APA with a critic. TRL 1.x ships no PPO trainer (``trl.experimental.ppo`` and ``trl.PPOTrainer``
  are gone), so the TRL row records that and apa-fast's APA (separate critic, GAE) and PPO run alone on the
  offline task as shipped (64 prompts x 1, 2 epochs x 2 minibatches of 32).
- ``d``: a real model, SmolLM2-135M-Instruct (``--model smollm2-135m-instruct``, dequantized from its GGUF) with
  LoRA rank 8 (alpha 16, no dropout) on every Linear of its blocks (``LORA_TARGETS``) on both sides, the chat-sums
  task (``train/data/chat_sums_train.jsonl``: chat messages through the model's chat template; TRL gets them as its
  conversational ``prompt`` column; ``train.tasks.chat_sums:reward``), GRPO, 4 prompts x 4 samples, temperature
  0.7, at most 8 new tokens, one gradient step per iteration: the setting of ``train.experiments.real_model``.

How the settings map (TRL's ``GRPOConfig`` / ``train.run`` flags), read off TRL's ``GRPOTrainer`` source:

- one iteration = one generation batch and every update on it. apa-fast: ``--batch-size P`` prompts x
  ``--samples-per-prompt G`` sequences, ``--epochs E`` passes of ``P / --minibatch-size M`` gradient steps.
  TRL: ``num_generations = G``, ``per_device_train_batch_size = M * G`` (one gradient step's sequences),
  ``gradient_accumulation_steps = 1``, ``steps_per_generation = P / M`` (so ``generation_batch_size = P * G``),
  ``num_iterations = E``; one iteration is ``E * P / M`` of the Trainer's optimizer steps. With one gradient
  step per epoch (``P = M``) apa-fast takes the behaviour policy's log-probs from the first training forward for
  any ``E`` (the head's no-grad log-probs and entropy on that forward's hidden states, ``train.experience.on_policy``);
  TRL does so only when ``E = 1`` (``old_per_token_logps`` = the detached training log-probs) and otherwise runs
  a separate no-grad forward, as apa-fast does with more than one step per epoch.
- loss: the clipped surrogate (``epsilon`` 0.2 = ``--ppo-clip``) + ``beta`` x k3 to the initial policy
  (``beta`` = ``--kl-loss-coef`` 0.04: both load a frozen reference model), token mean over the step's tokens
  (TRL ``loss_type="dapo"`` with one micro-batch per step = apa-fast's global token mean, which its micro-batches
  keep: each is scaled by its share of the step's tokens). TRL's
  ``use_bias_correction_kl`` (on by default since 1.x: the KL term times the importance ratio) is turned off so
  that both compute DeepSeekMath's k3 term. Advantages: ``(s - mean) / std`` within each group (TRL
  ``scale_rewards="group"``, std + 1e-4; apa-fast std + 1e-6).
- optimizer: AdamW, lr as the job's, weight decay 0, betas (0.9, 0.999), eps 1e-8, gradient clipping at norm
  1.0 on both; a constant learning rate on both (``lr_scheduler_type="constant"``, ``--lr-schedule constant``).
  TRL's optimizer is transformers' default on torch >= 2.8 (``adamw_torch_fused``).
- memory: each trainer's own default, neither changed: TRL's ``gradient_checkpointing=True`` (``GRPOConfig``'s
  default: the forward recomputed in backward) and apa-fast's ``--micro-batch-tokens`` (by default an estimated
  0.5 GiB of activations per forward on CPU: job b's 32 sequences in 3 micro-batches, the same step; jobs a and c
  in one).
- sampling: ``temperature`` 1, no top-k/top-p, a KV cache on both: TRL through HF ``generate``, apa-fast through
  its own loop (``train/sampling.py``, the same distribution; ``--hf-generate`` would use ``generate``). No vLLM
  here; on a CUDA machine ``--trl-vllm`` would add TRL rows with ``use_vllm=True``, colocated (it needs vLLM).
- the same model files, fp32 (TRL ``bf16=False``, ``model_init_kwargs`` dtype float32), SDPA attention on both,
  ``torch.set_num_threads(T)`` in both processes (and ``OMP_NUM_THREADS=T``), ``use_cpu=True`` on CPU, seed 0.

What is measured, identically for both:

- **tokens/s**: completion tokens generated (each sequence's tokens up to and including its first EOS, no
  padding; apa-fast's ``response_tokens``, TRL's ``completion_ids`` as its reward function receives them)
  summed over iterations 2..K, over the wall time of those iterations. An iteration's time runs from the start
  of generation to the end of its last optimizer step: apa-fast's ``iter_s`` (rollout + score + experience +
  update), TRL's ``on_step_begin`` of its first optimizer step (generation happens inside that step's
  ``_prepare_inputs``) to ``on_step_end`` of its last. Logging, evaluation and checkpoints fall outside on both.
- **peak RSS**: ``VmHWM`` of the training process (each job runs alone in its own process; nothing spawns
  children), read by the process itself at the end (apa-fast: its metrics' ``max_rss_gb``).

Writes ``bench/results/peers-<stamp>.json`` and ``latest-cpu-peers.json`` (``--quick``: ``peers-quick-...``;
``rows``: one per job and implementation with the median over repeats and every repeat's figure; ``machine``; ``versions``;
``settings``) and prints a Markdown table. Ratios are to each TRL row and to the best of them (highest median
tokens/s), the targets to the best. ``--quick``: every job's smallest meaningful run (``Job.quick_steps``
iterations: one warm-up, then one measured for job b, three for the sub-second iterations of a and c), one
repeat, for a look in a few minutes. ``--tiny`` (for the tests):
job a at 4 prompts x 2 samples, 2 iterations, one repeat. A new job is one more ``JOBS`` entry: every
implementation above runs on it.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace

from . import trainer as bt

RESULTS = os.path.join(bt.ROOT, "bench", "results")
REWARD = "train.tasks.offline:arith_reward"
LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # every Linear of a Llama block


@dataclass(frozen=True)
class Job:
    """One job's matched settings (see the module docstring for how each maps to TRL)."""

    name: str
    title: str
    model: str  # "offline" (the warmed-up tiny GPT-J), "llama160m" or "smollm2" (SmolLM2-135M-Instruct, GGUF preset)
    algo: str  # grpo (both), or apa / ppo (apa-fast only: TRL has no PPO trainer)
    prompts: int  # per iteration
    samples: int  # per prompt
    minibatch: int  # prompts per gradient step
    epochs: int
    max_new_tokens: int
    min_new_tokens: int = 0
    lr: float = 3e-4
    beta: float = 0.04  # GRPO's KL coefficient (k3 in the loss)
    steps: int = 8  # iterations per run unless --steps (the first is left out)
    quick_steps: int = 2  # --quick: one warm-up iteration and the rest measured (3 for the sub-second iterations)
    task: str = "arith"  # "arith": plain-string sums (REWARD); "chat": train.tasks.chat_sums (messages, its checker)
    temperature: float = 1.0
    lora_rank: int = 0  # > 0: LoRA of this rank (alpha 2R, no dropout) on LORA_TARGETS, on both sides


JOBS = {
    "a": Job("a", "offline arithmetic, tiny GPT-J, GRPO 16x4", "offline", "grpo", 16, 4, 16, 2, 4, quick_steps=4),
    "b": Job("b", "Llama 12x768 V=50,400 (~162M), GRPO 8x4, 64 tokens", "llama160m", "grpo", 8, 4, 8, 1, 64, 64,
             lr=1e-6, steps=3),
    "d": Job("d", "SmolLM2-135M-Instruct, LoRA r8, chat sums, GRPO 4x4", "smollm2", "grpo", 4, 4, 4, 1, 8, lr=1e-4,
             steps=6, quick_steps=2, task="chat", temperature=0.7, lora_rank=8),
    "c": Job("c", "offline arithmetic, tiny GPT-J, PPO/APA with a critic, 64x1", "offline", "ppo", 64, 1, 32, 2, 4,
             quick_steps=4),
}


def model_dir(job: Job) -> str:
    if job.model == "llama160m":
        return bt.llama_160m_model()
    if job.model == "smollm2":
        from train.gguf import resolve_model

        return resolve_model("smollm2-135m-instruct")
    from train.tasks import offline

    return str(offline.warmed_up_model())


def dataset_file(job: Job) -> str:
    from train.tasks import chat_sums, offline

    return str(chat_sums.TRAIN_FILE if job.task == "chat" else offline.DATA_DIR / "arith_prompts.jsonl")


def task_flags(job: Job) -> list[str]:
    """``train.run``'s model, data and reward flags for the job (LoRA included)."""
    if job.task != "chat":
        flags = bt.offline_task_flags(model_dir(job))
    else:
        from train.tasks import chat_sums

        flags = ["--model", model_dir(job), *chat_sums.flags()]
    if job.lora_rank:
        flags += ["--lora-rank", str(job.lora_rank), "--lora-targets", LORA_TARGETS]
    return flags


# TRL's rows: name -> GRPOConfig fields set on top of the matched settings (trl_worker)
TRL_ROWS = {"trl": {}, "trl+liger": {"use_liger_kernel": True}}
TRL_VLLM = ("trl vllm", {"use_vllm": True})  # --trl-vllm: colocated vLLM generation (CUDA + vLLM only)


def trl_unavailable(job: Job, row: str = "trl") -> str | None:
    """Why TRL's row ``row`` cannot run ``job`` here (None: it can, as far as can be told before starting it)."""
    if importlib.util.find_spec("trl") is None:
        return "TRL is not installed (pip install -e '.[peers]' -c constraints.txt)"
    if row == "trl+liger" and importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install -e '.[peers]' -c constraints.txt)"
    if job.algo != "grpo":
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # looking for trl.experimental.ppo warns otherwise
        has_ppo = importlib.util.find_spec("trl.experimental") is not None and \
            importlib.util.find_spec("trl.experimental.ppo") is not None
        if not has_ppo:
            return (f"trl {md.version('trl')} ships no PPO trainer (no trl.experimental.ppo, no trl.PPOTrainer: "
                    "removed from TRL), so there is no TRL PPO to run")
        return f"trl {md.version('trl')} has trl.experimental.ppo, but bench.peers does not drive it"
    return None


# --------------------------------------------------------------------------------------------------
# the two implementations, each in its own process


def _env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "TRL_EXPERIMENTAL_SILENCE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": bt.ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def run_apa(job: Job, steps: int, threads: int, algo: str | None = None) -> dict:
    """``python -m train.run`` on the job (apa-fast's GRPO, or ``algo``)."""
    algo = algo or job.algo
    flags = task_flags(job) + [
        "--algo", algo, "--samples-per-prompt", str(job.samples), "--batch-size", str(job.prompts),
        "--minibatch-size", str(job.minibatch), "--epochs", str(job.epochs), "--lr", str(job.lr),
        "--lr-schedule", "constant", "--max-new-tokens", str(job.max_new_tokens), "--min-new-tokens", str(job.min_new_tokens),
        "--threads", str(threads), "--precision", "fp32", "--attn", "sdpa", "--temperature", str(job.temperature),
        "--save-every", "0", "--weight-decay", "0", "--max-grad-norm", "1.0", "--seed", "0"]
    if algo == "grpo":
        flags += ["--kl-loss-coef", str(job.beta)]
    res = bt.run_one("auto", steps, flags, env=_env(threads))
    with open(os.path.join(res["out"], "stdout.log")) as f:
        m = re.search(r"([\d.]+)M trainable parameters", f.read())
    shutil.rmtree(res["out"], ignore_errors=True)  # checkpoints of a 162M model: not worth keeping
    if "rows" not in res:
        return {"error": res.get("error", "")[-600:], "command": res["command"]}
    rows = res["rows"]
    per_iter = [(r["response_tokens"], r["iter_s"]) for r in rows]
    phases = {k: statistics.median(r[f"time_{k}"] for r in rows[1:] or rows)
              for k in ("rollout", "score", "experience", "update")}
    return {"iterations": per_iter, "peak_rss_gb": max(r["max_rss_gb"] for r in rows), "phases_s": phases,
            "trainable_m": float(m.group(1)) if m else None, "command": "python " + res["command"]}


def run_trl(job: Job, steps: int, threads: int, config: dict | None = None) -> dict:
    """TRL's GRPOTrainer on the job, in a child process (``--trl-worker``); ``config``: GRPOConfig fields on top."""
    spec = dict(job=asdict(job), steps=steps, threads=threads, model=model_dir(job), dataset=dataset_file(job),
                config=config or {})
    with tempfile.TemporaryDirectory(prefix="apa-bench-trl-") as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [sys.executable, "-m", "bench.peers", "--trl-worker", json.dumps(spec), "--worker-out", out]
        p = subprocess.run(cmd, cwd=bt.ROOT, env=_env(threads), capture_output=True, text=True, timeout=1800)
        if p.returncode != 0 or not os.path.exists(out):
            return {"error": (p.stdout + p.stderr)[-600:], "command": "python -m bench.peers --trl-worker ..."}
        with open(out) as f:
            return json.load(f)


def liger_on_cpu(model: str) -> tuple[bool, str | None]:
    """(whether Liger patches this model's type, why the row cannot run here or None). Imports transformers."""
    import torch
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    from transformers import AutoConfig

    mt = AutoConfig.from_pretrained(model).model_type
    patched = mt in MODEL_TYPE_TO_APPLY_LIGER_FN
    if patched and not torch.cuda.is_available():
        return True, (f"use_liger_kernel=True patches {mt} with Liger's Triton kernels (RMSNorm, RoPE, SwiGLU), which "
                      "need a GPU: on this CPU Triton has no driver ('0 active drivers')")
    return patched, None


def trl_worker(spec: dict) -> dict:
    """Runs inside its own process: TRL's GRPOTrainer with the job's matched settings; returns per-iteration
    (completion tokens, seconds) and the process's peak RSS."""
    import torch

    torch.set_num_threads(spec["threads"])
    from datasets import load_dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from train.metrics import peak_rss_gb

    job = Job(**spec["job"])
    chat = job.task == "chat"
    from train.tasks import chat_sums

    mod, fn = (chat_sums.REWARD if chat else REWARD).split(":")
    reward = getattr(importlib.import_module(mod), fn)
    gen_tokens: list[int] = []  # completion tokens per generation batch (one reward call each)

    def task_reward(prompts, completions, completion_ids, **_):
        gen_tokens.append(sum(len(c) for c in completion_ids))  # up to and including the first EOS
        if chat:  # conversational: prompts are message lists, completions [{"role": "assistant", "content": ...}]
            return reward([""] * len(prompts), [c[-1]["content"] for c in completions], messages=prompts)
        return reward(prompts, completions)

    steps_per_gen = job.prompts // job.minibatch
    per_iter = steps_per_gen * job.epochs  # optimizer steps per generation batch

    class IterationTimer(TrainerCallback):
        """Wall time from the first optimizer step of an iteration (which generates) to the end of its last."""

        def __init__(self):
            self.t0, self.times = 0.0, []

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step % per_iter == 0:
                self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step % per_iter == 0:
                self.times.append(time.perf_counter() - self.t0)

    extra = dict(spec.get("config") or {})
    liger_applied = None
    if extra.get("use_liger_kernel"):
        liger_applied, why = liger_on_cpu(spec["model"])
        if why:
            return {"error": why, "liger_applied": liger_applied}

    with tempfile.TemporaryDirectory(prefix="trl-out-") as tmp:
        args = GRPOConfig(
            output_dir=tmp, use_cpu=not torch.cuda.is_available(), bf16=False, fp16=False, seed=0,
            report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=1, dataloader_num_workers=0,
            max_steps=spec["steps"] * per_iter, learning_rate=job.lr, lr_scheduler_type="constant",
            weight_decay=0.0, max_grad_norm=1.0, per_device_train_batch_size=job.minibatch * job.samples,
            gradient_accumulation_steps=1, steps_per_generation=steps_per_gen, num_generations=job.samples,
            num_iterations=job.epochs, max_completion_length=job.max_new_tokens, temperature=job.temperature, top_p=1.0,
            top_k=0, generation_kwargs={"min_new_tokens": job.min_new_tokens} if job.min_new_tokens else None,
            beta=job.beta, epsilon=0.2, loss_type="dapo", scale_rewards="group", use_bias_correction_kl=False,
            model_init_kwargs={"dtype": torch.float32, "attn_implementation": "sdpa"}, **extra,
        )
        tok = AutoTokenizer.from_pretrained(spec["model"])
        ds = load_dataset("json", data_files=spec["dataset"], split="train")
        peft_config = None
        if chat:
            ds = ds.rename_column(chat_sums.PROMPT_COLUMN, "prompt")  # TRL's conversational prompt column
        if job.lora_rank:
            from peft import LoraConfig

            peft_config = LoraConfig(r=job.lora_rank, lora_alpha=2 * job.lora_rank, lora_dropout=0.0,
                                     target_modules=LORA_TARGETS.split(","), task_type="CAUSAL_LM")
        timer = IterationTimer()
        trainer = GRPOTrainer(model=spec["model"], reward_funcs=task_reward, args=args, train_dataset=ds,
                              processing_class=tok, callbacks=[timer], peft_config=peft_config)
        trainer.train()
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad) / 1e6
    out = {"iterations": list(zip(gen_tokens, timer.times)), "peak_rss_gb": peak_rss_gb(), "config": extra,
           "trainable_m": round(trainable, 2),
           "optimizer": type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer")
                             else trainer.optimizer).__name__ + f" ({args.optim})"}
    if liger_applied is not None:
        out["liger_applied"] = liger_applied  # False: Liger has no kernels for this model type (TRL ran unchanged)
    return out


# --------------------------------------------------------------------------------------------------
# the run


def throughput(iterations: list) -> tuple[float, int]:
    """Tokens/s over iterations 2..K (the first warms up; all of them if there is only one), and K - 1."""
    steady = iterations[1:] or iterations
    return sum(n for n, _ in steady) / sum(t for _, t in steady), len(steady)


def versions() -> dict:
    out = {}
    for pkg in ("torch", "transformers", "trl", "liger-kernel", "accelerate", "datasets"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    out["apa-fast"] = f"{md.version('apa-fast') if _installed('apa-fast') else '0.1.0'} (git {_git()})"
    return out


def _installed(dist: str) -> bool:
    try:
        md.version(dist)
        return True
    except md.PackageNotFoundError:
        return False


def _git() -> str:
    from .machine import _git_rev

    return _git_rev()


def implementations(job: Job, vllm: bool = False) -> list[tuple[str, str | None, dict | None]]:
    """(row name, apa-fast algo or None, TRL config or None) for every row of ``job``."""
    if job.algo == "grpo":
        out: list[tuple[str, str | None, dict | None]] = [("apa-fast", None, None)]
    else:
        out = [("apa-fast APA", "apa", None), ("apa-fast PPO", "ppo", None)]
    rows = {**TRL_ROWS, TRL_VLLM[0]: TRL_VLLM[1]} if vllm else TRL_ROWS
    return out + [(name, None, cfg) for name, cfg in rows.items()]


def measure(jobs: list[Job], steps: int, repeats: int, threads: int, vllm: bool = False, log=print,
            only: set[str] | None = None, quick: bool = False) -> list[dict]:
    """Every (job, implementation) ``repeats`` times, interleaved; one row per job and implementation.
    ``only``: row names to run; ``quick``: each job's ``quick_steps`` unless ``steps``."""
    runs: dict[tuple[str, str], list[dict]] = {}
    for rep in range(repeats):
        for job in jobs:
            impls = [i for i in implementations(job, vllm) if only is None or i[0] in only]
            n_steps = steps or (job.quick_steps if quick else job.steps)
            for impl, algo, cfg in (impls if rep % 2 == 0 else impls[::-1]):
                why = trl_unavailable(job, impl) if cfg is not None else None
                if why:
                    runs.setdefault((job.name, impl), []).append({"error": why})
                    continue
                t0 = time.time()
                if cfg is not None:
                    r = run_trl(job, n_steps, threads, config=cfg)
                else:
                    r = run_apa(job, n_steps, threads, algo=algo)
                r["wall_s"] = round(time.time() - t0, 1)
                if "iterations" in r:
                    r["tokens_per_s"], r["measured_iterations"] = throughput(r["iterations"])
                log(f"job {job.name} {impl} repeat {rep + 1}/{repeats}: "
                    + (f"{r['tokens_per_s']:.1f} tokens/s, peak RSS {r['peak_rss_gb']:.2f} GB ({r['wall_s']} s)"
                       if "tokens_per_s" in r else f"failed: {r.get('error', '')[-300:]}"))
                runs.setdefault((job.name, impl), []).append(r)
    return rows_from(runs)


def rows_from(runs: dict) -> list[dict]:
    """Median and spread over repeats; the ratio to TRL per repeat (the runs next to each other), then its median."""
    rows = []
    for (job, impl), rs in runs.items():
        ok = [r for r in rs if "tokens_per_s" in r]
        row = {"job": job, "impl": impl, "title": JOBS[job].title, "repeats": len(ok)}
        if not ok:
            row["error"] = rs[0].get("error", "failed")
            rows.append(row)
            continue
        tps, rss = [r["tokens_per_s"] for r in ok], [r["peak_rss_gb"] for r in ok]
        row.update(tokens_per_s=statistics.median(tps), tokens_per_s_runs=tps, peak_rss_gb=statistics.median(rss),
                   peak_rss_gb_runs=rss, measured_iterations=ok[0]["measured_iterations"],
                   tokens_per_iteration=statistics.median(n for r in ok for n, _ in r["iterations"]),
                   command=ok[0].get("command"), runs=ok)
        if any("liger_applied" in r for r in rs):
            row["liger_applied"] = next(r["liger_applied"] for r in rs if "liger_applied" in r)
        rows.append(row)
    for row in rows:
        if not row["impl"].startswith("apa-fast") or "tokens_per_s" not in row:
            continue
        trls = [r for r in rows if r["job"] == row["job"] and r["impl"].startswith("trl") and "tokens_per_s" in r]
        for trl in trls:
            key = "" if trl["impl"] == "trl" else "_" + trl["impl"].replace(" ", "_").replace("+", "_")
            pairs = list(zip(row["tokens_per_s_runs"], trl["tokens_per_s_runs"]))
            row[f"speed_vs_trl{key}_runs"] = [a / b for a, b in pairs]
            row[f"speed_vs_trl{key}"] = statistics.median(row[f"speed_vs_trl{key}_runs"])
            row[f"rss_vs_trl{key}_runs"] = [a / b for a, b in zip(row["peak_rss_gb_runs"], trl["peak_rss_gb_runs"])]
            row[f"rss_vs_trl{key}"] = statistics.median(row[f"rss_vs_trl{key}_runs"])
        if trls:  # the targets are against the best TRL row: the highest median tokens/s
            best = max(trls, key=lambda r: r["tokens_per_s"])
            row["best_trl"] = best["impl"]
            key = "" if best["impl"] == "trl" else "_" + best["impl"].replace(" ", "_").replace("+", "_")
            for f in ("speed", "rss"):
                row[f"{f}_vs_best_trl"] = row[f"{f}_vs_trl{key}"]
                row[f"{f}_vs_best_trl_runs"] = row[f"{f}_vs_trl{key}_runs"]
    return rows


def markdown(rows: list[dict]) -> str:
    """The table: per row tokens/s (median; min-max over repeats), peak RSS, ratios to TRL, targets."""
    lines = ["| job | impl | tokens/s (median; range) | peak RSS GB | speed vs best TRL | RSS vs best TRL | targets |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        if "tokens_per_s" not in r:
            lines.append(f"| {r['job']} | {r['impl']} | not run: {r['error'].splitlines()[-1][:200]} | | | | |")
            continue
        rng = f"{min(r['tokens_per_s_runs']):,.1f}-{max(r['tokens_per_s_runs']):,.1f}"
        sp = (f"{r['speed_vs_best_trl']:.2f}x ({min(r['speed_vs_best_trl_runs']):.2f}-"
              f"{max(r['speed_vs_best_trl_runs']):.2f}; best: {r['best_trl']})") if "speed_vs_best_trl" in r else ""
        mem = f"{r['rss_vs_best_trl']:.2f}x" if "rss_vs_best_trl" in r else ""
        if r.get("liger_applied") is False:
            sp = "Liger applied no kernel to this model type: TRL unchanged"
        tgt = ""
        if "speed_vs_best_trl" in r:
            tgt = f"speed >= 1.5x: {'met' if r['speed_vs_best_trl'] >= 1.5 else 'NOT met'}"
            if r["job"] in ("b", "d"):  # the larger jobs
                tgt += f"; RSS <= 0.8x: {'met' if r['rss_vs_best_trl'] <= 0.8 else 'NOT met'}"
        lines.append(f"| {r['job']} | {r['impl']} | {r['tokens_per_s']:,.1f} ({rng}) | {r['peak_rss_gb']:.2f} | "
                     f"{sp} | {mem} | {tgt} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", default="a,b,c", help="comma-separated subset of " + ",".join(JOBS))
    ap.add_argument("--steps", type=int, default=0,
                    help="iterations per run, the first left out as warm-up (0: each job's own: a, c 8; b 3)")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each (job, implementation), interleaved")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in every process")
    ap.add_argument("--impls", default="", help="comma-separated rows to run (default all: apa-fast[ APA/PPO], "
                                                "" + ", ".join(TRL_ROWS) + ")")
    ap.add_argument("--quick", action="store_true",
                    help="every job's smallest meaningful run: its quick_steps iterations (one measured), 1 repeat")
    ap.add_argument("--tiny", action="store_true", help="job a at 4 prompts x 2 samples, 2 iterations, 1 repeat")
    ap.add_argument("--trl-vllm", action="store_true", help="also TRL with use_vllm=True (CUDA + vLLM only)")
    ap.add_argument("--results-dir", default=RESULTS)
    ap.add_argument("--trl-worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.trl_worker:
        res = trl_worker(json.loads(a.trl_worker))
        with open(a.worker_out, "w") as f:
            json.dump(res, f)
        return 0
    names = [n.strip() for n in a.jobs.split(",") if n.strip()]
    bad = [n for n in names if n not in JOBS]
    if bad or not names:
        print(f"error: unknown job {','.join(bad) or '(none)'!r}; jobs: {', '.join(f'{k} ({j.title})' for k, j in JOBS.items())}",
              file=sys.stderr)
        return 2
    jobs = [JOBS[n] for n in names]
    known = {i[0] for j in JOBS.values() for i in implementations(j, True)}
    only = {i.strip() for i in a.impls.split(",") if i.strip()} or None
    if only and only - known:
        print(f"error: unknown --impls {','.join(sorted(only - known))!r}; rows: {', '.join(sorted(known))}",
              file=sys.stderr)
        return 2
    if a.quick and a.tiny:
        print("error: --quick and --tiny are two different short runs: pass one", file=sys.stderr)
        return 2
    if any(j.algo == "grpo" for j in jobs) and importlib.util.find_spec("trl") is None:
        print("error: TRL is not installed; bench.peers compares against it: pip install -e '.[peers]' -c constraints.txt",
              file=sys.stderr)
        return 2
    if a.trl_vllm and importlib.util.find_spec("vllm") is None:
        print("error: --trl-vllm needs vLLM installed (and a CUDA GPU)", file=sys.stderr)
        return 2
    steps, repeats = a.steps, a.repeats
    if a.quick:
        repeats = 1
    if a.tiny:
        jobs = [replace(JOBS["a"], prompts=4, samples=2, minibatch=4)]
        steps, repeats = 2, 1
    import torch

    from train.tasks import chat_sums

    from .machine import describe

    t0 = time.time()
    rows = measure(jobs, steps, repeats, a.threads, vllm=a.trl_vllm, log=lambda s: print(s, flush=True), only=only,
                   quick=a.quick)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(a.threads)
    machine = describe(device)
    cmd = "python -m bench.peers " + " ".join(argv if argv is not None else sys.argv[1:])
    out = {"command": cmd.strip(), "machine": machine, "versions": versions(), "wall_s": round(time.time() - t0, 1),
           "settings": {"steps": steps or {j.name: j.quick_steps if a.quick else j.steps for j in jobs},
                        "repeats": repeats, "threads": a.threads, "precision": "fp32", "quick": a.quick,
                        "trl_rows": {k: v for k, v in TRL_ROWS.items() if only is None or k in only},
                        "attention": "sdpa", "jobs": {j.name: asdict(j) for j in jobs},
                        "reward": {j.name: chat_sums.REWARD if j.task == "chat" else REWARD for j in jobs},
                        "tokens": "completion tokens up to and including the first EOS (no padding), iterations 2..K",
                        "peak_rss": "VmHWM of the training process"},
           "rows": rows}
    os.makedirs(a.results_dir, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    kind = "peers-quick" if a.quick else "peers"  # a quick look does not replace the latest full run
    for name in (f"{kind}-{stamp}.json", f"latest-{device}-{kind}.json"):
        with open(os.path.join(a.results_dir, name), "w") as f:
            json.dump(out, f, indent=1)
    v = out["versions"]
    print(f"\n{device.upper()}: {machine['cpu']} ({machine['cpu_count']} cores, {a.threads} torch threads per "
          "process), "
          f"apa-fast {v['apa-fast']}, trl {v['trl']}, transformers {v['transformers']}, torch {v['torch']}; "
          f"iterations per run: {out['settings']['steps']} (tokens/s over 2..K), {repeats} interleaved "
          "repeat(s).\n")
    print(markdown(rows))
    print(f"\nwrote {os.path.join(a.results_dir, f'{kind}-{stamp}.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
