"""The offline default: a tiny GPT-J that learns two-digit addition, with no network.

- Tokenizer: one token per character (digits, ``+``, ``=``) plus ``<pad>``, ``<eos>``, ``<unk>``, built
  with the ``tokenizers`` library and wrapped as a ``PreTrainedTokenizerFast`` (left padding).
- Model: ``GPTJForCausalLM`` with a few small layers.
- Warm-up: a short supervised pass on ``data/arith_demos.jsonl``, where about a third of the answers
  are wrong (one digit off). The warmed-up policy is a real LM that gets roughly 60% of the sums right
  when sampled, so APA has room to raise the reward. The result is cached (``save_pretrained``) under
  the cache directory, keyed by a hash of the recipe, so a second run starts at once.
- Reward: ``arith_reward`` checks the sum: 1.0 if the completion is exactly ``a+b``, else 0.0.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..config import DATA_DIR, default_cache_dir
from ..sampling import position_ids_from_mask

CHARS = list("0123456789+=")
SPECIALS = ["<pad>", "<eos>", "<unk>"]


def build_tokenizer():
    """A character-level tokenizer (``tokenizers`` WordLevel model over single characters)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", padding_side="left"
    )


@dataclass(frozen=True)
class WarmupRecipe:
    n_layer: int = 2
    n_embd: int = 96
    n_head: int = 4
    rotary_dim: int = 16
    n_positions: int = 32
    steps: int = 600
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0


def tiny_gptj_config(tokenizer, n_layer=2, n_embd=96, n_head=4, rotary_dim=16, n_positions=32):
    from transformers import GPTJConfig

    return GPTJConfig(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        rotary_dim=rotary_dim,
        n_inner=4 * n_embd,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        attn_pdrop=0.0,
        embd_pdrop=0.0,
        resid_pdrop=0.0,
    )


def _recipe_key(recipe: WarmupRecipe) -> str:
    h = hashlib.sha256(json.dumps(asdict(recipe), sort_keys=True).encode())
    h.update((DATA_DIR / "arith_demos.jsonl").read_bytes())
    return h.hexdigest()[:12]


def warmed_up_model(cache_dir: str | Path | None = None, recipe: WarmupRecipe = WarmupRecipe(), log=print) -> Path:
    """Path to the warmed-up policy (``save_pretrained`` dir with tokenizer); trains it on a cache miss."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    path = cache / f"offline-arith-{_recipe_key(recipe)}"

    def build(tmp: Path) -> None:
        tokenizer = build_tokenizer()
        supervised_warmup(tokenizer, recipe).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _cached(path, build, f"warm-up: supervised pass on {DATA_DIR / 'arith_demos.jsonl'} ({recipe.steps} steps)",
                   log)


def _cached(path: Path, build, what: str, log) -> Path:
    """``path`` once complete (a ``DONE`` marker); else ``build(tmp)`` writes it into a temporary directory that
    is renamed into place, so a killed build never leaves a half-written model behind."""
    if (path / "config.json").exists() and (path / "DONE").exists():
        return path
    log(f"{what}, cached at {path}")
    t0 = time.time()
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    build(tmp)
    (tmp / "DONE").write_text("ok\n")
    try:
        os.replace(tmp, path)
    except OSError:  # another process finished first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    log(f"done in {time.time() - t0:.0f}s")
    return path


def supervised_warmup(tokenizer, recipe: WarmupRecipe):
    """Teacher-forced cross-entropy on the response (answer + EOS) of each demonstration."""
    from datasets import load_dataset
    from transformers import GPTJForCausalLM

    g = torch.Generator().manual_seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    model = GPTJForCausalLM(
        tiny_gptj_config(tokenizer, recipe.n_layer, recipe.n_embd, recipe.n_head, recipe.rotary_dim, recipe.n_positions)
    )
    model.train()
    rows = load_dataset("json", data_files=str(DATA_DIR / "arith_demos.jsonl"), split="train")
    texts = [(r["prompt"], r["response"]) for r in rows]
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / recipe.steps))
    )
    eos = tokenizer.eos_token
    for step in range(recipe.steps):
        idx = torch.randint(len(texts), (recipe.batch_size,), generator=g).tolist()
        enc = tokenizer([texts[i][0] + texts[i][1] + eos for i in idx], padding=True, return_tensors="pt")
        plen = [len(texts[i][0]) for i in idx]
        labels = enc["input_ids"].clone()
        am = enc["attention_mask"]
        T = labels.shape[1]
        for b in range(len(idx)):
            n = int(am[b].sum())
            labels[b, : T - n + plen[b]] = -100  # pads and prompt: no loss
        pos = position_ids_from_mask(am)
        out = model(input_ids=enc["input_ids"], attention_mask=am, position_ids=pos, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return model


_SUM = re.compile(r"^\s*(\d+)\s*\+\s*(\d+)\s*=\s*$")


def arith_reward(prompts: list[str], completions: list[str], **_) -> list[float]:
    """1.0 when the completion is exactly the sum asked for by the prompt ``"a+b="``, else 0.0."""
    out = []
    for p, c in zip(prompts, completions):
        m = _SUM.match(p)
        if m is None:
            out.append(float("nan"))  # not an addition prompt: reported by the trainer, never trained on
            continue
        out.append(1.0 if c.strip() == str(int(m.group(1)) + int(m.group(2))) else 0.0)
    return out


# --------------------------------------------------------------------------------------------------
# the learned proxy reward (``--reward-model offline-proxy``): a reward model that can be over-optimised

@dataclass(frozen=True)
class ProxyRecipe:
    """A GPT-J sequence classifier, initialised from the warmed-up policy (as reward models start from the SFT
    model), trained on ``samples`` completions of the warmed-up policy per training prompt, labelled by the
    exact-sum checker, plus each prompt's right sum once (a demonstration). From so few labels it learns the
    answers the initial policy tends to give, not the rule:
    it ranks fresh samples of that policy well and answers it never saw poorly, the gap that RL can exploit
    (Gao et al. 2022)."""

    samples: int = 8
    demonstrations: bool = True
    steps: int = 600
    batch_size: int = 32
    lr: float = 5e-4
    seed: int = 0


def proxy_reward_model(cache_dir: str | Path | None = None, recipe: ProxyRecipe = ProxyRecipe(), log=print) -> Path:
    """Path to the proxy reward model (``AutoModelForSequenceClassification``, ``save_pretrained`` dir with its
    tokenizer and ``proxy_stats.json``); trained and cached on a miss, keyed by its recipe and the warm-up's."""
    warm = warmed_up_model(cache_dir, log=log)
    key = hashlib.sha256((json.dumps(asdict(recipe), sort_keys=True) + warm.name).encode()).hexdigest()[:12]
    path = warm.parent / f"offline-proxy-rm-{key}"
    return _cached(path, lambda tmp: _train_proxy(warm, recipe, tmp, log),
                   f"proxy reward model: {recipe.samples} labelled samples per prompt", log)


def _train_proxy(warm: Path, recipe: ProxyRecipe, out: Path, log) -> None:
    from datasets import load_dataset
    from transformers import AutoModelForSequenceClassification, GPTJForCausalLM, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(warm)
    torch.manual_seed(recipe.seed)
    prompts = [r["prompt"] for r in load_dataset("json", data_files=str(DATA_DIR / "arith_prompts.jsonl"), split="train")]
    policy = GPTJForCausalLM.from_pretrained(warm).eval()
    train_set = _labelled_samples(policy, tok, prompts, recipe.samples)
    # and each prompt's right sum once, as preference data holds demonstrations beside the policy's own samples
    train_set += [(p, 1.0) for p in _right_sums(prompts)] if recipe.demonstrations else []
    heldout = _labelled_samples(policy, tok, prompts, 2)  # fresh samples, for the stats only
    del policy

    rm = AutoModelForSequenceClassification.from_pretrained(warm, num_labels=1)
    rm.config.pad_token_id = tok.pad_token_id
    opt = torch.optim.AdamW(rm.parameters(), lr=recipe.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(recipe.seed)
    tok.padding_side = "right"
    rm.train()
    for _ in range(recipe.steps):
        idx = torch.randint(len(train_set), (recipe.batch_size,), generator=g).tolist()
        enc = tok([train_set[i][0] for i in idx], padding=True, return_tensors="pt")
        y = torch.tensor([train_set[i][1] for i in idx])
        loss = torch.nn.functional.binary_cross_entropy_with_logits(rm(**enc).logits[:, 0], y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    rm.eval()
    stats = {"train": _accuracy(rm, tok, train_set), "heldout": _accuracy(rm, tok, heldout),
             "recipe": asdict(recipe)}
    log(f"proxy reward model: accuracy {stats['train']['accuracy']:.3f} on its {len(train_set)} training samples, "
        f"{stats['heldout']['accuracy']:.3f} on {len(heldout)} fresh ones (AUC {stats['train']['auc']:.3f}, "
        f"{stats['heldout']['auc']:.3f})")
    rm.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "proxy_stats.json").write_text(json.dumps(stats, indent=1))


def _right_sums(prompts: list[str]) -> list[str]:
    return [p + str(int(m.group(1)) + int(m.group(2))) for p in prompts if (m := _SUM.match(p))]


@torch.no_grad()
def _labelled_samples(policy, tok, prompts: list[str], k: int) -> list[tuple[str, float]]:
    """``k`` sampled completions (temperature 1, 4 new tokens: the offline preset's) per prompt, as
    ``(prompt + completion, exact-sum label)``."""
    tok.padding_side = "left"
    rep = [p for p in prompts for _ in range(k)]
    enc = tok(rep, padding=True, return_tensors="pt")
    gen = policy.generate(**enc, position_ids=position_ids_from_mask(enc["attention_mask"]), do_sample=True,
                          max_new_tokens=4, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    completions = [c.split(tok.eos_token)[0].replace(tok.pad_token, "")
                   for c in tok.batch_decode(gen[:, enc["input_ids"].shape[1]:])]
    return [(p + c, y) for p, c, y in zip(rep, completions, arith_reward(rep, completions))]


@torch.no_grad()
def _accuracy(rm, tok, samples: list[tuple[str, float]]) -> dict:
    """Sign accuracy of the classifier's logit against the exact-sum label, and its AUC (the chance that a right
    completion outscores a wrong one: what an RL update relies on)."""
    tok.padding_side = "right"
    logits = rm(**tok([t for t, _ in samples], padding=True, return_tensors="pt")).logits[:, 0]
    y = torch.tensor([lab for _, lab in samples])
    pos, neg = logits[y == 1], logits[y == 0]
    auc = float((pos[:, None] > neg[None, :]).float().mean()) if len(pos) and len(neg) else float("nan")
    return {"accuracy": float(((logits > 0).float() == y).float().mean()), "auc": auc, "n": len(samples),
            "positive_rate": float(y.mean())}
