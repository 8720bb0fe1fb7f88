"""``python -m bench.chat_sums_calibration [--model smollm2-135m-instruct] [--n 64] [--samples 4] [VARIANT ...]``:
how often the initial model answers the chat-sums task right, greedily and sampled, per task variant.

``--dataset FILE`` instead asks every prompt of a data file (its ``messages`` column: e.g. the shipped held-out
set ``train/data/chat_sums_eval.jsonl``), for each variant ``T:N`` given.

A variant is ``WORDING:LO-HI:T:N`` (a wording key of ``WORDINGS``, operands drawn from LO..HI, sampling temperature
T, at most N new tokens), e.g. ``w0:0-9:0.7:8``. Each variant asks the same ``--n`` seeded operand pairs (drawn once
per operand range), decodes each prompt once greedily and ``--samples`` times at temperature T (no top-k, no top-p:
the trainer's defaults), with the trainer's own sampler (``train.sampling.sample``, the policy's body and head), and
scores every completion with the gold checker ``train.tasks.chat_sums.reward``. Prints one JSON line per variant:
greedy accuracy, sampled accuracy (mean over all samples), the share of prompts with at least one right sample,
and two greedy completions. The calibration in ``docs/real-model.md`` was made with it.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from train.tasks.chat_sums import reward

WORDINGS = {
    "w0": "What is {a} + {b}? Answer with the number only.",
    "w1": "{a} + {b} =",
    "w2": "What is {a} + {b}?",
    "w3": "Add {a} + {b}. Reply with just the result, no explanation.",
    "w4": "Calculate {a} + {b}. Give only the final number.",
}


def pairs(lo: int, hi: int, n: int, seed: int = 0) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randint(lo, hi), rng.randint(lo, hi)) for _ in range(n)]


@torch.no_grad()
def complete(model, tok, texts: list[str], max_new_tokens: int, greedy: bool, temperature: float,
             batch: int = 32) -> list[str]:
    """Completions of the rendered chat prompts ``texts`` by the trainer's sampler (left padding, EOS stops)."""
    from train.sampling import head_logits, sample

    out = []
    for i in range(0, len(texts), batch):
        enc = tok(texts[i:i + batch], padding=True, return_tensors="pt", add_special_tokens=False)
        resp, _ = sample(model.model, head_logits(model.lm_head, 1.0, None), enc["input_ids"], enc["attention_mask"],
                         max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         greedy=greedy, temperature=temperature)
        is_eos = resp == tok.eos_token_id
        keep = (is_eos.long().cumsum(-1) - is_eos.long()) == 0
        out += tok.batch_decode(torch.where(keep & ~is_eos, resp, tok.pad_token_id), skip_special_tokens=True)
    return out


def evaluate(model, tok, variant: str, n: int, samples: int, seed: int = 0, dataset: str = "") -> dict:
    if dataset:
        t, m = variant.split(":")
        msgs = [json.loads(ln)["messages"] for ln in open(dataset) if ln.strip()]
        n = len(msgs)
    else:
        wording, rng_s, t, m = variant.split(":")
        lo, hi = (int(x) for x in rng_s.split("-"))
        msgs = [[{"role": "user", "content": WORDINGS[wording].format(a=a, b=b)}] for a, b in pairs(lo, hi, n, seed)]
    temperature, max_new = float(t), int(m)
    texts = [tok.apply_chat_template(x, add_generation_prompt=True, tokenize=False) for x in msgs]
    t0 = time.time()
    greedy = complete(model, tok, texts, max_new, True, temperature)
    g = reward(texts, greedy)
    torch.manual_seed(seed)
    sampled = [complete(model, tok, texts, max_new, False, temperature) for _ in range(samples)]
    s = [reward(texts, c) for c in sampled]
    per_prompt = [sum(col) / samples for col in zip(*s)]
    return {"variant": variant, **({"dataset": dataset} if dataset else {}), "n": n, "samples": samples,
            "greedy": round(sum(g) / n, 3), "sampled": round(sum(per_prompt) / n, 3),
            "any_right": round(sum(p > 0 for p in per_prompt) / n, 3),
            "examples": [msgs[0][0]["content"] + " -> " + repr(greedy[0]), msgs[1][0]["content"] + " -> " + repr(greedy[1])],
            "seconds": round(time.time() - t0, 1)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("variants", nargs="*", default=["w0:0-9:0.7:8"])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="a GGUF preset/file or a local checkpoint")
    ap.add_argument("--n", type=int, default=64, help="prompts per variant")
    ap.add_argument("--samples", type=int, default=4, help="sampled completions per prompt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dataset", default="", help="ask every prompt of this .jsonl (messages column); variants T:N")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from train.gguf import resolve_model

    path = resolve_model(args.model) or args.model
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for v in args.variants:
        print(json.dumps(evaluate(model, tok, v, args.n, args.samples, args.seed, args.dataset)), flush=True)


if __name__ == "__main__":
    main()
