"""A verifiable chat task for real instruction-tuned models: sums asked as a chat message, checked exactly.

Each prompt is one user message, ``{"role": "user", "content": "What is 7 + 5? Answer with the number only."}``
(the data files' ``messages`` column; the wording and the operand range are calibrated in ``docs/real-model.md``).
``reward`` is the gold checker: 1.0 when the completion's final answer equals the sum, else 0.0. The sum is read
from the prompt itself (the last ``a + b`` in it), so the checker needs no answer column and works on the rendered
prompt text the trainer passes to a ``module:function`` reward.

The final answer is the last number in the completion, cut at the first chat end token: "17 + 25 = 42." reads
42, "42<|im_end|>" reads 42, "1,042" reads 1042, "42.0" reads 42, a completion with no number reads nothing
(wrong).

Data: ``train/data/chat_sums_train.jsonl`` (RL prompts) and ``chat_sums_eval.jsonl`` (held out: no unordered
operand pair of it is in the train file), written by ``train/data/make_chat_sums.py``.
"""

from __future__ import annotations

import re

from ..config import DATA_DIR

TRAIN_FILE = DATA_DIR / "chat_sums_train.jsonl"
EVAL_FILE = DATA_DIR / "chat_sums_eval.jsonl"
PROMPT_COLUMN = "messages"
REWARD = "train.tasks.chat_sums:reward"  # ``reward`` below, as ``--reward-model`` names it


def flags() -> list[str]:
    """``train.run``'s flags for this task: its train file, prompt column, checker and the calibrated prompt length
    (SmolLM2's chat template adds a default system prompt: 64 tokens hold it)."""
    return ["--dataset", str(TRAIN_FILE), "--prompt-column", PROMPT_COLUMN, "--reward-model", REWARD,
            "--max-prompt-len", "64"]

# end-of-turn / end-of-text tokens of common chat templates; a completion is read up to the first of them
END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>", "</s>", "<eos>")
# an optional minus, then digits with thousands commas (1,042) or plain digits, then an optional decimal part
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_QUESTION = re.compile(r"(\d+)\s*\+\s*(\d+)")


def question(a: int, b: int) -> str:
    """The user message asking for ``a + b`` (the calibrated wording)."""
    return f"What is {a} + {b}? Answer with the number only."


def messages(a: int, b: int) -> list[dict]:
    return [{"role": "user", "content": question(a, b)}]


def expected_sum(prompt: str) -> int | None:
    """``a + b`` of the last ``a + b`` in ``prompt`` (a user message or a rendered chat prompt); None if none."""
    found = _QUESTION.findall(prompt)
    if not found:
        return None
    a, b = found[-1]
    return int(a) + int(b)


def final_number(completion: str) -> float | None:
    """The completion's final answer: the last number before the first chat end token; None when there is none."""
    for end in END_TOKENS:
        completion = completion.split(end, 1)[0]
    found = _NUMBER.findall(completion)
    return float(found[-1].replace(",", "")) if found else None


def reward(prompts: list[str], completions: list[str], messages: list | None = None) -> list[float]:
    """1.0 where the completion's final number equals the prompt's ``a + b``, else 0.0.

    ``prompts``: the text the policy saw; ``messages`` (optional): each prompt's chat messages, read instead when
    given (the question is the last user message)."""
    out = []
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        msgs = messages[i] if messages is not None else None
        if msgs:
            p = next((m["content"] for m in reversed(msgs) if m.get("role") == "user"), p)
        want, got = expected_sum(p), final_number(c)
        out.append(1.0 if want is not None and got is not None and got == want else 0.0)
    return out
