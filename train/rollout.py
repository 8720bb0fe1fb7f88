"""Rollout and scoring: sample responses to left-padded prompts, decode them, and ask the reward."""

from __future__ import annotations

import torch
from torch import Tensor

import apa_fast

from .config import Config
from .dist import Dist
from .loading import Prompt, as_messages, render_prompt
from .models import Models
from .records import Batch, Rollout
from .rewards import call_reward
from .sampling import position_ids_from_mask


@torch.no_grad()
def rollout(m: Models, prompts: list[Prompt], cfg: Config, d: Dist, greedy: bool = False,
            sampling_logprobs: bool = False) -> Rollout:
    """Sample responses (``train.sampling``, or transformers' ``generate`` with ``--hf-generate``) from
    left-padded prompts (strings, or chats rendered with the policy tokenizer's chat template).
    ``sampling_logprobs``: also keep the log-probs of the sampled tokens under the distribution they were drawn
    from, to check against the training forward's."""
    tok = m.tokenizer
    texts = [render_prompt(p, tok) for p in prompts]
    chat = any(not isinstance(p, str) for p in prompts)  # a rendered template holds its own special tokens (BOS)
    enc = tok(texts, padding=True, truncation=True, max_length=cfg.max_prompt_len, return_tensors="pt",
              add_special_tokens=not chat).to(d.device)
    # an over-long prompt is cut from the left: the reward gets it as the policy saw it (the kept tokens, decoded)
    full = tok(texts, add_special_tokens=not chat, verbose=False)["input_ids"]
    cut = [i for i, ids in enumerate(full) if len(ids) > cfg.max_prompt_len]
    for i in cut:
        kept = enc["input_ids"][i][enc["attention_mask"][i].bool()]
        texts[i] = tok.decode(kept, skip_special_tokens=not chat)
    P = enc["input_ids"].shape[1]
    sample = {} if greedy else dict(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
    if cfg.min_new_tokens:  # EOS suppressed until then (a benchmark's fixed response length)
        sample["min_new_tokens"] = min(cfg.min_new_tokens, cfg.max_new_tokens)
    m.policy.eval()
    if cfg.hf_generate:
        gen = m.policy.generate(
            **enc, do_sample=not greedy, max_new_tokens=cfg.max_new_tokens, pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id, synced_gpus=d.world > 1, return_dict_in_generate=True,
            output_logits=sampling_logprobs, **sample,
        )
        response, logits = gen.sequences[:, P:], torch.stack(gen.logits, 1) if sampling_logprobs else None
    else:  # every rank runs forwards until all are done (FSDP gathers weights in each)
        response, logits = m.policy.sample(
            enc["input_ids"], enc["attention_mask"], max_new_tokens=cfg.max_new_tokens, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id, greedy=greedy, keep_logits=sampling_logprobs, **sample,
            **({"all_done": lambda done: d.sum(float(not done))[0] == 0} if d.world > 1 else {}))
    if response.shape[1] == 0:
        raise RuntimeError("generate returned no new tokens")
    is_eos = response == tok.eos_token_id
    mask = (is_eos.long().cumsum(-1) - is_eos.long()) == 0  # up to and including the first EOS
    response = torch.where(mask, response, tok.pad_token_id)
    attn = torch.cat([enc["attention_mask"].bool(), mask], 1).long()
    completions = tok.batch_decode(torch.where(mask & ~is_eos, response, tok.pad_token_id), skip_special_tokens=True)
    logp_sample = None
    if sampling_logprobs:
        logp_sample = apa_fast.token_logprobs(logits, torch.where(mask, response, -100),
                                             temperature=1.0 if greedy else cfg.temperature)
    batch = Batch(input_ids=torch.cat([enc["input_ids"], response], 1), attention_mask=attn,
                  position_ids=position_ids_from_mask(attn), prompt_len=P, response=response, mask=mask)
    return Rollout(batch=batch, prompts=texts, completions=completions, messages=[as_messages(p) for p in prompts],
                   logp_sample=logp_sample, truncated=len(cut))


def reward_name(reward, flag: str = "--reward-model") -> str:
    """How a failure names a reward: ``the reward <spec>`` (``the gold reward`` for ``--gold-reward``)."""
    return f"the {'gold ' if flag == '--gold-reward' else ''}reward {getattr(reward, 'name', type(reward).__name__)}"


def score(reward, ro: Rollout, d: Dist, log, flag: str = "--reward-model", timeout: float = 0.0) -> Tensor:
    """``reward``'s scores of the decoded text, (B,) float32; a NaN or non-number score is reported (and left NaN).
    An answer of the wrong type or shape is refused (``rewards.as_scores``); ``timeout`` > 0: at most that many
    seconds (``rewards.call_reward``)."""
    raw = call_reward(reward, ro.prompts, ro.completions, ro.messages, timeout, reward_name(reward, flag))
    scores = torch.tensor(raw, dtype=torch.float32, device=d.device)
    bad = ~torch.isfinite(scores)
    if bad.any():
        i = int(bad.nonzero()[0])
        log(f"warning: {flag} is not a finite number for {int(bad.sum())}/{len(raw)} samples on rank {d.rank} "
            f"(e.g. prompt {ro.prompts[i]!r} -> {ro.completions[i]!r}: {raw[i]!r}); they are left out of the "
            f"{'loss' if flag == '--reward-model' else 'mean'}")
    return scores
