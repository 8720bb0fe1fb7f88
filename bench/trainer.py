"""Trainer-level figure: tokens/s and peak memory of APA training iterations, fused vs eager.

Runs ``python -m train.run`` (the offline default preset unless ``--model`` is given) once per
kernel path, each in its own process: ``--kernel-backend auto`` (apa_fast: triton on CUDA, the
chunked torch backend on CPU), ``--kernel-backend torch``, and ``--kernel-backend eager`` (lm_head
logits + ``log_softmax``, as trainers write it). Reports the median ``tokens_per_s`` the trainer logs
per iteration (the first iteration, which warms up, is left out when there are more), and the peak
memory the trainer logs: ``max_mem_gb`` on CUDA, ``max_rss_gb`` (its own ``VmHWM``) on CPU.

The offline default's vocabulary has 15 tokens, so its LM head is a rounding error and the fused
path can buy nothing there. ``--vocab V`` (``bench.run`` adds V = 50,400, GPT-J's padded vocabulary)
runs the same task with the warmed-up policy's vocabulary padded to V (extra tokens appended to the
tokenizer, embedding and head rows added by ``resize_token_embeddings``, saved with
``save_pretrained`` and passed as ``--model DIR``): the LM head then has a real width while the
rest of the run is unchanged.

``python -m bench.trainer [--steps 3] [--vocab 50400]`` prints the table (``--critic-memory``, ``--lora-memory``:
peak-memory comparisons on a ~160M-parameter model); ``bench.run``
appends it to the benchmark's Markdown (``--no-trainer`` leaves it out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from train import config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATHS = ("auto", "torch", "eager")


def run_one(backend: str, steps: int, extra: list[str], timeout: float = 900, env: dict | None = None) -> dict:
    """``python -m train.run`` in its own process; its result with the metrics rows (``rows``), or ``error``."""
    out = tempfile.mkdtemp(prefix=f"apa-bench-train-{backend}-")
    cmd = [sys.executable, "-m", "train.run", "--kernel-backend", backend, "--steps", str(steps), "--out", out,
           "--no-progress", "--no-plot", "--no-export", "--no-tensorboard", "--eval-every", "0", *extra]
    log_path = os.path.join(out, "stdout.log")
    with open(log_path, "w") as logf:
        try:
            code = subprocess.run(cmd, cwd=ROOT, stdout=logf, stderr=subprocess.STDOUT, timeout=timeout,
                                  env=env).returncode
        except subprocess.TimeoutExpired:
            code = f"timed out after {timeout:.0f} s"
    res: dict = dict(backend=backend, command=" ".join(cmd[1:]), returncode=code, out=out)
    mpath = os.path.join(out, "metrics.jsonl")
    if code != 0 or not os.path.exists(mpath):
        with open(log_path) as f:
            res["error"] = f.read()[-1500:]
        return res
    with open(mpath) as f:
        rows = [json.loads(ln) for ln in f if ln.strip()]
    res["rows"] = rows
    steady = rows[1:] if len(rows) > 1 else rows
    res["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in steady)
    res["iter_s"] = statistics.median(r["iter_s"] for r in steady)
    res["iterations"] = len(rows)
    res["response_tokens"] = rows[-1].get("response_tokens")
    if "max_mem_gb" in rows[-1]:
        res["peak_mem_mib"] = max(r["max_mem_gb"] for r in rows) * 1024
        res["mem_method"] = "torch.cuda.max_memory_allocated"
    elif "max_rss_gb" in rows[-1]:  # VmHWM of the trainer's own address space (wait4's ru_maxrss
        res["peak_mem_mib"] = max(r["max_rss_gb"] for r in rows) * 1024  # would count this parent's)
        res["mem_method"] = "peak RSS (VmHWM) of the trainer process"
    return res


def padded_vocab_model(vocab: int) -> str:
    """The warmed-up offline policy with its vocabulary padded to ``vocab`` (cached); returns its dir."""
    from train.tasks import offline

    src = offline.warmed_up_model()
    dst = config.default_cache_dir() / f"{src.name}-vocab{vocab}"
    if (dst / "DONE").exists():
        return str(dst)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    if vocab < len(tok):
        raise ValueError(f"--vocab must be at least the offline tokenizer's {len(tok)} tokens, got {vocab}")
    tok.add_tokens([f"<x{i}>" for i in range(vocab - len(tok))])
    model = AutoModelForCausalLM.from_pretrained(src)
    model.resize_token_embeddings(vocab)
    tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "DONE").write_text("ok\n")
    os.replace(tmp, dst)
    return str(dst)


def _random_160m_model(name: str, vocab: int, make) -> str:
    """A randomly initialised ~160M-parameter causal LM with the padded offline tokenizer (V = ``vocab``), built
    locally by ``make(tokenizer) -> model`` under the cache's ``name`` and cached; returns its dir."""
    from train.tasks import offline

    dst = config.default_cache_dir() / name
    if (dst / "DONE").exists():
        return str(dst)
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(padded_vocab_model(vocab))
    torch.manual_seed(0)
    tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
    make(tok).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "DONE").write_text("ok\n")
    os.replace(tmp, dst)
    return str(dst)


def gptj_160m_model(vocab: int = 50400) -> str:
    """A GPT-J-shaped model of ~160M parameters (12 layers, 768 wide, V = 50,400, random weights) with the
    padded offline tokenizer, built locally and cached; returns its dir."""
    from transformers import GPTJConfig, GPTJForCausalLM

    def make(tok):
        return GPTJForCausalLM(GPTJConfig(
            vocab_size=vocab, n_positions=2048, n_embd=768, n_layer=12, n_head=12, rotary_dim=64,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            tie_word_embeddings=False))

    return _random_160m_model(f"gptj-12x768-vocab{vocab}", vocab, make)


def llama_160m_model(vocab: int = 50400) -> str:
    """A Llama-shaped model of ~162M parameters (12 layers, 768 wide, MLP 2048, 12 heads, V = 50,400, untied
    head, random weights) with the padded offline tokenizer, built locally and cached; returns its dir."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def make(tok):
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
            num_key_value_heads=12, max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False))

    return _random_160m_model(f"llama-12x768-vocab{vocab}", vocab, make)


def critic_memory(steps: int = 2) -> list[str]:
    """Peak memory of APA with the authors' separate critic (GAE) against critic-free APA (group advantages),
    the same sequences per iteration (32), on the ~160M-parameter GPT-J shape."""
    model = gptj_160m_model()
    base = offline_task_flags(model)
    runs = {
        "--critic separate (GAE), 32 prompts x 1": ["--batch-size", "32", "--minibatch-size", "32", "--critic", "separate"],
        "--critic none (group), 8 prompts x 4": ["--batch-size", "8", "--minibatch-size", "8", "--advantage", "group",
                                                 "--critic", "none", "--samples-per-prompt", "4"],
    }
    return _memory_table({k: base + v for k, v in runs.items()}, steps, "vs separate critic",
                         "Critic memory on the GPT-J-shaped model (12 x 768, V = 50,400, ~160M parameters, fp32, "
                         f"AdamW): `python -m bench.trainer --critic-memory`, {steps} iterations each.")


def _memory_table(runs: dict[str, list[str]], steps: int, versus: str, title: str) -> list[str]:
    """Peak memory of each run (each its own process), as a Markdown table against the first run."""
    res = {k: run_one("auto", steps, v) for k, v in runs.items()}
    lines = [title, "", f"| run | peak memory MiB | {versus} |", "|---|---:|---:|"]
    first = next(iter(res.values())).get("peak_mem_mib")
    for k, r in res.items():
        mem = r.get("peak_mem_mib")
        lines.append(f"| {k} | {mem:,.0f} | {mem / first:.2f}x |" if mem and first else
                     f"| {k} | failed: {r.get('error', '')[-300:]} | |")
    return lines + [""]


def lora_memory(steps: int = 2, rank: int = 8) -> list[str]:
    """Peak memory of full fine-tuning against LoRA (``--lora-rank``), otherwise the same run (APA, GAE, a separate
    critic, 32 sequences per iteration), on the ~160M-parameter GPT-J shape."""
    model = gptj_160m_model()
    base = offline_task_flags(model) + ["--batch-size", "32", "--minibatch-size", "32", "--critic", "separate"]
    runs = {"full fine-tuning": base, f"--lora-rank {rank}": base + ["--lora-rank", str(rank)]}
    return _memory_table(runs, steps, "vs full", "LoRA memory on the GPT-J-shaped model (12 x 768, V = 50,400, "
                         f"~160M parameters, fp32, AdamW, separate critic): `python -m bench.trainer --lora-memory`, "
                         f"{steps} iterations each.")


def offline_task_flags(model_dir: str) -> list[str]:
    """The offline preset's settings, for a policy given by path (which would get the HF preset)."""
    from train.tasks import offline

    p = config.PRESETS["offline"]
    # not passed: the run length and checkpoint/eval cadence (the benchmark sets its own), the dataset
    # (replaced by its jsonl file) and the reward model (passed first, as its own flag)
    skip = {"steps", "save_every", "eval_every", "dataset", "reward_model"}
    return ["--model", model_dir, "--reward-model", p["reward_model"],
            "--dataset", str(offline.DATA_DIR / "arith_prompts.jsonl"),
            *[f"--{k.replace('_', '-')}={v}" for k, v in p.items() if k not in skip]]


def table(device: str, steps: int, extra: list[str], label: str) -> list[str]:
    results = [run_one(b, steps, extra) for b in PATHS]
    lines = [f"Trainer-level figure on {label}: `python -m train.run --steps {steps}` per backend, {device}, "
             f"median over iterations 2..{steps}.", "",
             "| --kernel-backend | tokens/s | s / iteration | peak memory MiB | vs eager tokens/s | vs eager memory |",
             "|---|---:|---:|---:|---:|---:|"]
    eager = next((r for r in results if r["backend"] == "eager" and "tokens_per_s" in r), None)
    for r in results:
        if "tokens_per_s" not in r:
            lines.append(f"| {r['backend']} | failed: {r.get('error', '')[-200:].strip().splitlines()[-1:] } | | | | |")
            continue
        rel = f"{r['tokens_per_s'] / eager['tokens_per_s']:.2f}x" if eager else ""
        mem = r.get("peak_mem_mib", float("nan"))
        mrel = f"{mem / eager['peak_mem_mib']:.2f}x" if eager and eager.get("peak_mem_mib") else ""
        lines.append(f"| {r['backend']} | {r['tokens_per_s']:,.1f} | {r['iter_s']:.2f} | {mem:,.0f} | {rel} | {mrel} |")
    method = next((r.get("mem_method") for r in results if r.get("mem_method")), "")
    return lines + ["", f"Peak memory: {method} (whole process: models, optimizer, rollout and update).", ""]


def figure(device: str, quick: bool = True, steps: int | None = None, extra: list[str] | None = None,
           vocabs: tuple[int, ...] = (0, 50400)) -> str:
    """Markdown for the benchmark report (a note saying what is missing when the trainer cannot run).

    ``vocabs``: 0 is the offline default as shipped; V > 0 the same task with the vocabulary padded to V."""
    try:
        import train.run  # noqa: F401
    except Exception as e:  # the trainer is optional for the kernel benchmarks
        return f"Trainer-level figure: not available (`train.run` does not import: {type(e).__name__}: {e})."
    steps = steps or (3 if quick else 6)
    extra = list(extra or [])
    lines: list[str] = []
    for v in vocabs:
        if v == 0:
            model = "the offline default" if "--model" not in extra else extra[extra.index("--model") + 1]
            lines += table(device, steps, extra, model)
        else:
            lines += table(device, steps, offline_task_flags(padded_vocab_model(v)) + extra,
                           f"the offline task with its vocabulary padded to {v:,} (`--vocab {v}`)")
    return "\n".join(lines).rstrip()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)  # the rest goes to train.run
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default=None)
    ap.add_argument("--vocab", type=int, default=0,
                    help="pad the offline policy's vocabulary to this size (0: the offline default as shipped)")
    ap.add_argument("--critic-memory", action="store_true",
                    help="peak memory with a separate critic vs critic-free, on a ~160M-parameter GPT-J shape")
    ap.add_argument("--lora-memory", action="store_true",
                    help="peak memory of full fine-tuning vs LoRA, on a ~160M-parameter GPT-J shape")
    a, extra = ap.parse_known_args(argv)
    if a.lora_memory:
        print("\n".join(lora_memory(a.steps)))
        return 0
    if a.critic_memory:
        print("\n".join(critic_memory(a.steps)))
        return 0
    import torch

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(figure(device, steps=a.steps, extra=extra, vocabs=(a.vocab,)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
