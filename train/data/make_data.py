"""Regenerates the shipped offline data (deterministic; run once, the .jsonl files are committed).

    python train/data/make_data.py

- ``arith_demos.jsonl``: supervised warm-up demonstrations ``{"prompt": "23+58=", "response": "81"}``.
  About 40% of them carry a *wrong* answer (one digit off), like a sloppy human labeller, so the
  warmed-up policy is a real but imperfect LM and RL has room to raise the reward.
- ``arith_prompts.jsonl``: RL prompts ``{"prompt": "23+58=", "answer": "81"}`` (reward = answer checked).
- ``arith_eval.jsonl``: a few prompts whose greedy completions are shown at each evaluation.
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
MAX = 12  # operands in 0..MAX
NOISE = 0.4  # share of demonstrations with a wrong answer
REPEAT = 4  # each sum appears this many times among the demonstrations (with independent noise)


def corrupt(ans: str, rng: random.Random) -> str:
    digits = list(ans)
    i = rng.randrange(len(digits))
    choices = [d for d in "0123456789" if d != digits[i]]
    digits[i] = rng.choice(choices)
    out = "".join(digits).lstrip("0") or "0"
    return out if out != ans else str(int(ans) + 1)


def main() -> None:
    rng = random.Random(1234)
    pairs = [(a, b) for a in range(MAX + 1) for b in range(MAX + 1)]
    rng.shuffle(pairs)
    eval_pairs, rest = pairs[:8], pairs
    with open(HERE / "arith_demos.jsonl", "w") as f:
        for a, b in rest * REPEAT:
            ans = str(a + b)
            resp = corrupt(ans, rng) if rng.random() < NOISE else ans
            f.write(json.dumps({"prompt": f"{a}+{b}=", "response": resp}) + "\n")
    with open(HERE / "arith_prompts.jsonl", "w") as f:
        for a, b in rest:
            f.write(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n")
    with open(HERE / "arith_eval.jsonl", "w") as f:
        for a, b in eval_pairs:
            f.write(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n")


if __name__ == "__main__":
    main()
