"""Shared pieces of the trainer tests: a tiny random GPT-J on disk, test rewards, and a torchrun entry.

    torchrun --nproc_per_node=2 tests/train_fixtures.py one-update MODEL_DIR OUT.pt

runs one rollout + one update on a fixed global batch and saves the full parameters (rank 0).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PROMPTS = str(REPO / "train" / "data" / "arith_prompts.jsonl")


def tiny_config(tok, n_layer: int = 2, n_embd: int = 32):
    """The tests' tiny GPT-J config (2 heads, rotary_dim 8) for the offline tokenizer ``tok``."""
    from train.tasks.offline import tiny_gptj_config

    return tiny_gptj_config(tok, n_layer=n_layer, n_embd=n_embd, n_head=2, rotary_dim=8)


def make_tiny_model(path: Path, seed: int = 0, n_layer: int = 2, n_embd: int = 32, pad_is_eos: bool = False) -> Path:
    """A random tiny GPTJForCausalLM with the offline character tokenizer, saved with save_pretrained.

    ``pad_is_eos``: pad with the EOS token, as GPT-J's tokenizer setups do."""
    from transformers import GPTJForCausalLM

    from train.tasks.offline import build_tokenizer

    tok = build_tokenizer()
    if pad_is_eos:
        tok.pad_token = tok.eos_token
    torch.manual_seed(seed)
    model = GPTJForCausalLM(tiny_config(tok, n_layer=n_layer, n_embd=n_embd))
    with torch.no_grad():  # a less uniform start: non-trivial log-probs and rewards
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return Path(path)


def make_tiny_hf_model(path: Path, model_type: str, n_layer: int = 2, **extra) -> Path:
    """A random tiny causal LM of ``model_type`` (hidden 32, 2 heads) with the offline tokenizer, built from
    ``AutoConfig.for_model`` and saved with save_pretrained; ``extra`` goes to the config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from train.tasks.offline import build_tokenizer

    tok = build_tokenizer()
    cfg = AutoConfig.for_model(model_type, vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                               num_hidden_layers=n_layer, num_attention_heads=2, num_key_value_heads=2,
                               max_position_embeddings=64, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, **extra)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return Path(path)


def two_steps_with_evals(model_dir: Path, out: Path, *extra: str) -> list[dict]:
    """``train.run`` in this process for 2 iterations with an evaluation after each (so each row has its
    ``logp_mismatch``); the metrics rows."""
    import json

    from train import run as R
    from train import algos as A
    from train import dist as D
    from train import loading as L
    from train import models as M
    from train import rollout as RO
    from train import experience as X

    args = tiny_args(model_dir, out, "--steps", "2", "--no-plot", "--no-export", *extra)
    args[args.index("--eval-every") + 1] = "1"
    assert R.main(args) == 0
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def metric_rows(out: Path) -> list[dict]:
    """The computed metrics of a run (``metrics.jsonl``), without the measured ones (times, memory, tokens/s)."""
    import json

    drop = {"tokens_per_s", "iter_s", "max_mem_gb", "max_rss_gb"}  # measured, not computed
    return [{k: v for k, v in json.loads(ln).items() if k not in drop and not k.startswith("time_") and k != "logp_mismatch"}
            for ln in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def main_error(argv: list[str], capsys) -> str:
    """``train.run.main(argv)`` must fail with exit code 2 and exactly one line on stderr; that line."""
    from train import run as R
    from train import algos as A
    from train import dist as D
    from train import loading as L
    from train import models as M
    from train import rollout as RO
    from train import experience as X

    rc = R.main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def digit_reward(prompts, completions, **_):
    """Deterministic, non-trivial: the sum of the completion's digits / 10."""
    return [sum(int(ch) for ch in c if ch.isdigit()) / 10.0 for c in completions]


def parity_reward(prompts, completions, **_):
    """digit_reward plus 1 for every second sample: two samples of a prompt differ even when greedy
    decoding made them identical (groups are contiguous and of even size in the tests that use it)."""
    return [r + i % 2 for i, r in enumerate(digit_reward(prompts, completions))]


def nan_reward(prompts, completions, **_):
    """Every other sample gets a non-number (NaN, then a string)."""
    return [(float("nan") if i % 4 == 1 else "abc") if i % 2 else 1.0 for i in range(len(completions))]


def all_nan_reward(prompts, completions, **_):
    return [float("nan")] * len(completions)


_CALLS = {"n": 0}


def third_call_raises(prompts, completions, **_):
    """digit_reward, except that its third call raises (iteration 3 of a run without evaluations)."""
    _CALLS["n"] += 1
    if _CALLS["n"] == 3:
        raise ValueError("reward server unreachable")
    return digit_reward(prompts, completions)


def third_call_hangs(prompts, completions, **_):
    """digit_reward, except that its third call never returns (in any useful time)."""
    import time

    _CALLS["n"] += 1
    if _CALLS["n"] == 3:
        time.sleep(3600)
    return digit_reward(prompts, completions)


def column_reward(prompts, completions, **_):
    """digit_reward as an (N, 1) numpy array, the shape a batched model head gives."""
    import numpy as np

    return np.array(digit_reward(prompts, completions), dtype=np.float32)[:, None]


def nested_reward(prompts, completions, **_):
    """digit_reward as a list of one-element lists."""
    return [[r] for r in digit_reward(prompts, completions)]


def none_reward(prompts, completions, **_):
    return None


def scalar_reward(prompts, completions, **_):
    return 0.5


def dict_reward(prompts, completions, **_):
    return {"scores": digit_reward(prompts, completions)}


def pair_reward(prompts, completions, **_):
    """Two columns per sample: refused, never read as 2N scores."""
    return torch.ones(len(completions), 2)


def short_reward(prompts, completions, **_):
    return digit_reward(prompts, completions)[:-1]


def policy_loss(m, b, cfg):
    """The algorithm's policy loss on experience ``b`` as the update forms it (fused from hidden states)."""
    import apa_fast
    from train.algos import policy_token_loss

    out = m.policy(b.batch)
    return apa_fast.linear_token_loss(out.hidden, out.head.weight, b.batch.response, policy_token_loss(cfg, b),
                                      **out.head.kw)


def logprobs(policy, batch, backend: str | None = None):
    """The response log-probs of ``batch`` under ``policy`` (0 where masked); ``backend``: apa_fast's, else the
    policy's own."""
    import dataclasses

    out = policy(batch)
    head = out.head if backend is None else dataclasses.replace(out.head, backend=backend)
    return head.logprobs(out.hidden, batch.response, batch.mask)


def tiny_args(model_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model", str(model_dir), "--reward-model", "train_fixtures:digit_reward", "--dataset", PROMPTS,
        "--out", str(out), "--batch-size", "8", "--minibatch-size", "4", "--epochs", "1", "--max-new-tokens", "4",
        "--max-prompt-len", "16", "--lr", "1e-3", "--unfrozen-layers", "-1", "--threads", "1", "--no-progress",
        "--no-tensorboard", "--eval-every", "0", *extra,
    ]


def env() -> dict:
    e = dict(os.environ)
    # the trainer in a child process imports test rewards as ``train_fixtures:<function>``
    e["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), str(REPO), e.get("PYTHONPATH", "")])
    e["OMP_NUM_THREADS"] = "1"
    e.pop("TRITON_INTERPRET", None)
    return e


def run_trainer(args: list[str], timeout: int = 120, nproc: int = 0, entry: tuple[str, ...] = ("-m", "train.run")) -> subprocess.CompletedProcess:
    """``entry`` (the trainer module, or a script such as this file) with ``args``; under torchrun when ``nproc``."""
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *entry, *args]
    else:
        cmd = [sys.executable, *entry, *args]
    return subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)


def cfg_for(model_dir: Path, out: Path, *extra: str):
    from train.config import parse_args

    return parse_args(tiny_args(model_dir, out, *extra))


def experience(m, cfg, d, prompts: list[str], beta: float | None = None, **rollout_kw):
    """rollout -> score -> make_experience on ``prompts`` (unscaled scores); ``beta`` defaults to the
    config's initial KL coefficient for PPO; ``rollout_kw`` go to rollout (greedy, sampling_logprobs).
    Returns (rollout, experience)."""
    from train import run as R
    from train import algos as A
    from train import dist as D
    from train import loading as L
    from train import models as M
    from train import rollout as RO
    from train import experience as X

    if beta is None:
        beta = cfg.kl_init if cfg.algo == "ppo" else cfg.kl_coef
    ro = RO.rollout(m, prompts, cfg, d, **rollout_kw)
    scores = RO.score(m.reward, ro, d, print)
    return ro, X.make_experience(m, ro, scores, scores, cfg, beta, d)


def one_update(model_dir: str, out_file: str, *extra: str) -> None:
    """One rollout (greedy: the same tokens for any world size) and one update on the global batch; ``extra``
    flags go to the config (e.g. a critic-free GRPO setup)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from train import run as R
    from train import algos as A
    from train import dist as D
    from train import loading as L
    from train import models as M
    from train import rollout as RO
    from train import experience as X

    torch.set_num_threads(1)
    # SGD without clipping: unlike Adam, its step shows whether gradients were averaged or summed over ranks
    cfg = cfg_for(Path(model_dir), Path(out_file).parent / "unused", "--batch-size", "8", "--minibatch-size", "8",
                  "--max-grad-norm", "0", "--lr", "0.01", *extra)
    d = D.setup_dist()
    torch.manual_seed(0)
    m = M.build_models(cfg, d, print)
    params = [p for mod in (m.policy, m.critic) if mod is not None for p in mod.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, foreach=False)
    prompts = L.load_prompts(cfg.dataset, "train", "prompt")[:8]
    per = 8 // d.world
    mine = [q for q in prompts[d.rank * per : (d.rank + 1) * per] for _ in range(cfg.samples_per_prompt)]
    ro = RO.rollout(m, mine, cfg, d, greedy=True)
    if cfg.samples_per_prompt > 1:
        # greedy samples of one prompt are identical, and mean-zero group advantages would cancel on them:
        # make every second sample differ in its first response token (the same change for any world size)
        P, V = ro.batch.prompt_len, m.policy.config.vocab_size
        ro.batch.response[1::2, 0] = (ro.batch.response[1::2, 0] + 1) % V
        ro.batch.input_ids[1::2, P] = ro.batch.response[1::2, 0]
    scores = RO.score(m.reward, ro, d, print)
    b = X.make_experience(m, ro, scores, scores, cfg, 0.05, d)
    A.update(m, b, cfg, d, opt, params, torch.Generator().manual_seed(0))
    full = {}
    for name, mod in (("policy", m.policy), ("critic", m.critic)):
        if mod is None:
            continue
        if d.mesh is not None:
            sd = get_model_state_dict(mod, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            sd = mod.state_dict()
        full.update({f"{name}.{k}": v.detach().clone().cpu() for k, v in sd.items()})
    if d.rank == 0:
        torch.save(full, out_file)
    if d.mesh is not None:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[1] == "one-update":
        one_update(*sys.argv[2:])


def make_tiny_seqcls_reward(path: Path, seed: int = 1) -> Path:
    """A random tiny GPTJForSequenceClassification reward model (num_labels=1) with the offline tokenizer."""
    from transformers import GPTJForSequenceClassification

    from train.tasks.offline import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(seed)
    cfg = tiny_config(tok, n_layer=1)
    cfg.num_labels = 1
    GPTJForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return Path(path)


POLICY_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                   "{% if add_generation_prompt %}<|assistant|>{% endif %}")
REWARD_TEMPLATE = "{% for m in messages %}[{{ m['role'] }}]: {{ m['content'] }}|{% endfor %}"
CHAT_CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789+=?.,:|[] \n")


def chat_tokenizer(chars: list[str], specials: list[str], template: str | None, bos: str | None = None):
    """A real ``PreTrainedTokenizerFast`` (``tokenizers`` WordLevel over single characters) whose ``specials`` are
    single tokens; ``bos``: prepended by its post-processor (as Llama's tokenizer does); ``template``: its chat
    template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    named = {"pad_token": "<pad>", "eos_token": "<eos>", "unk_token": "<unk>", **({"bos_token": bos} if bos else {})}
    extra = [t for t in specials if t not in named.values()]
    out = PreTrainedTokenizerFast(tokenizer_object=tok, **named, additional_special_tokens=extra)
    out.chat_template = template
    return out


def make_chat_policy(path: Path, template: str | None = POLICY_TEMPLATE) -> Path:
    """A tiny random Llama whose tokenizer (BOS added by its post-processor) has the chat ``template``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = chat_tokenizer(CHAT_CHARS, ["<pad>", "<eos>", "<unk>", "<s>", "<|system|>", "<|user|>", "<|assistant|>"],
                         template, bos="<s>")
    cfg = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                               pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return Path(path)


def make_foreign_reward(path: Path, template: str | None = REWARD_TEMPLATE) -> Path:
    """A tiny random GPT-2 sequence-classification reward model with a tokenizer of its own (another vocabulary order,
    no BOS) and its own chat ``template``."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    tok = chat_tokenizer(CHAT_CHARS[::-1], ["<unk>", "<eos>", "<pad>"], template)
    cfg = AutoConfig.for_model("gpt2", vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=256,
                               num_labels=1, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(1)
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return Path(path)


CHATS = [[{"role": "system", "content": "be brief."}, {"role": "user", "content": f"{a}+{b}=?"}]
         for a, b in ((1, 2), (7, 11), (3, 4), (10, 12))]


def write_chats(path: Path, column: str = "messages") -> Path:
    import json

    Path(path).write_text("".join(json.dumps({column: c}) + "\n" for c in CHATS))
    return Path(path)


def slow_reward(prompts, completions, **_):
    """digit_reward, 0.25 s per call: a run that lasts long enough to be signalled or raced."""
    import time

    time.sleep(0.25)
    return digit_reward(prompts, completions)


_GATE_CALLS = [0]


def gated_reward(prompts, completions, **_):
    """digit_reward; from its second call on it first waits (up to 60 s) for the file ``$APA_TEST_GATE``: a test
    signals the run while iteration 2 is held there, however late the test itself gets the CPU."""
    import time

    _GATE_CALLS[0] += 1
    gate = os.environ.get("APA_TEST_GATE")
    t0 = time.time()
    while gate and _GATE_CALLS[0] >= 2 and not os.path.exists(gate) and time.time() - t0 < 60:
        time.sleep(0.01)
    return digit_reward(prompts, completions)


SEEN: list[str] = []  # the prompts recording_reward was given (in-process runs)


def recording_reward(prompts, completions, **_):
    """digit_reward, keeping the prompts it is given in SEEN."""
    SEEN.extend(prompts)
    return digit_reward(prompts, completions)
