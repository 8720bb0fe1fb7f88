"""The README's "bring your own model" commands, run as written: only the run-size flags are added and the
placeholder paths replaced by tiny models built here (a tied Llama, a chat Llama, a GPT-2 reward model with its own
tokenizer and template)."""

from __future__ import annotations

import json
import shlex

import pytest
import torch

from train_fixtures import (PROMPTS, REPO, make_chat_policy, make_foreign_reward, make_tiny_hf_model, write_chats)

from train import run as R


def _commands() -> list[list[str]]:
    text = (REPO / "README.md").read_text()
    block = text.split("<!-- byom-commands -->", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [shlex.split(ln)[3:] for ln in block.splitlines() if ln.startswith("python -m train.run ")]


def test_readme_has_one_command_per_case():
    cmds = _commands()
    assert len(cmds) == 4
    assert any("--lora-rank" in c for c in cmds) and any("--prompt-column" in c for c in cmds)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("byom")
    return {"./my-llama-tied": str(make_tiny_hf_model(d / "tied", "llama", tie_word_embeddings=True)),
            "./my-llama": str(make_tiny_hf_model(d / "llama", "llama")),
            "./my-chat-llama": str(make_chat_policy(d / "chat")),
            "./my-gpt2-rm": str(make_foreign_reward(d / "rm")),
            "prompts.jsonl": PROMPTS, "chats.jsonl": str(write_chats(d / "chats.jsonl")),
            "my_rewards:score": "train_fixtures:digit_reward"}


@pytest.mark.parametrize("i", range(4))
def test_readme_command_runs(i, paths, tmp_path):
    args = [paths.get(a, a) for a in _commands()[i]]
    out = tmp_path / "out"
    size = ["--out", str(out), "--steps", "2", "--batch-size", "4", "--minibatch-size", "4", "--max-new-tokens", "4",
            "--max-prompt-len", "64", "--lr", "1e-3", "--threads", "1", "--no-progress", "--no-tensorboard", "--no-plot",
            "--eval-every", "1"]
    assert R.main(args + size) == 0
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(0 <= r["logp_mismatch"] < 1e-4 and r["reward_nan"] == 0 for r in rows)
    assert (out / "final" / "model.safetensors").exists()
