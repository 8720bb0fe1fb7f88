"""Regenerates the chat-sums data (deterministic; run once, the .jsonl files are committed).

    python train/data/make_chat_sums.py

Every ordered pair (a, b) with a, b in 0..MAX becomes one prompt, ``{"messages": [{"role": "user", "content":
"What is a + b? Answer with the number only."}], "answer": "a+b"}`` (wording and range: ``docs/real-model.md``).
The unordered pairs {a, b} are shuffled with a fixed seed and EVAL_PAIRS of them are held out, with both their
orders: no sum asked in ``chat_sums_eval.jsonl`` is asked in ``chat_sums_train.jsonl``, in either order.
"""

import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from train.tasks.chat_sums import EVAL_FILE, TRAIN_FILE, messages  # noqa: E402

MAX = 12  # operands in 0..MAX: 91 unordered pairs
EVAL_PAIRS = 30  # unordered pairs held out (57 prompts)
SEED = 21


def rows(unordered: list[tuple[int, int]]) -> list[dict]:
    out = []
    for a, b in unordered:
        for x, y in ((a, b), (b, a)) if a != b else ((a, b),):
            out.append({"messages": messages(x, y), "answer": str(x + y)})
    return out


def main(out_dir: Path | None = None) -> None:
    """Write the two files (into ``out_dir`` instead of their shipped place when given: the tests compare)."""
    unordered = [(a, b) for a in range(MAX + 1) for b in range(a, MAX + 1)]
    rng = random.Random(SEED)
    rng.shuffle(unordered)
    held, rest = unordered[:EVAL_PAIRS], unordered[EVAL_PAIRS:]
    for path, pairs in ((EVAL_FILE, held), (TRAIN_FILE, rest)):
        data = rows(pairs)
        random.Random(SEED + 1).shuffle(data)  # no run of one operand pair's two orders in a row
        with open(Path(out_dir) / path.name if out_dir else path, "w") as f:
            for r in data:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
