"""Chat prompts rendered with the policy's chat template, and a reward model of another architecture that reads
the conversation through its own tokenizer and its own template (never the policy's token ids)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from train_fixtures import (CHATS, cfg_for, main_error, make_chat_policy, make_foreign_reward, make_tiny_model,
                            tiny_args, two_steps_with_evals, write_chats)

from train import run as R
from train import dist as D
from train import loading as L
from train import models as M
from train import rollout as RO


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("chat")
    return make_chat_policy(d / "policy"), make_foreign_reward(d / "rm"), write_chats(d / "chats.jsonl")


def test_policy_sees_its_template_and_reward_model_its_own(setup, tmp_path):
    from transformers import AutoTokenizer

    policy, rm, chats = setup
    cfg = cfg_for(policy, tmp_path / "o", "--reward-model", str(rm), "--dataset", str(chats), "--prompt-column",
                  "messages", "--max-new-tokens", "6", "--max-prompt-len", "64")
    d = D.Dist()
    m = M.build_models(cfg, d, print)
    prompts = L.load_prompts(cfg.dataset, "train", "messages")
    assert prompts[0] == CHATS[0]
    ro = RO.rollout(m, prompts, cfg, d)
    # what the policy saw: its own template, the assistant's turn opened, exactly one BOS (the template's)
    assert ro.prompts[0] == "<s><|system|>be brief.\n<|user|>1+2=?\n<|assistant|>"
    ptok = AutoTokenizer.from_pretrained(policy)
    P = ro.batch.prompt_len
    row = ro.batch.input_ids[0, :P][ro.batch.attention_mask[0, :P].bool()].tolist()
    assert row == ptok(ro.prompts[0], add_special_tokens=False)["input_ids"] and row.count(ptok.bos_token_id) == 1
    # what the reward model received: a real forward hook on it records its input ids
    seen = []
    hook = m.reward.model.register_forward_pre_hook(lambda mod, a, kw: seen.append((kw["input_ids"], kw["attention_mask"])),
                                                    with_kwargs=True)
    RO.score(m.reward, ro, d, print)
    hook.remove()
    (ids, mask), = seen
    rtok = AutoTokenizer.from_pretrained(rm)
    for i, (chat, completion) in enumerate(zip(CHATS, ro.completions)):
        text = "".join(f"[{t['role']}]: {t['content']}|" for t in chat) + f"[assistant]: {completion}|"
        want = rtok(text, add_special_tokens=False)["input_ids"]
        assert ids[i][mask[i].bool()].tolist() == want
        assert want != ptok(text, add_special_tokens=False)["input_ids"]  # another vocabulary: not the policy's ids


def test_chat_run_trains_with_exact_logprobs(setup, tmp_path):
    policy, rm, chats = setup
    rows = two_steps_with_evals(policy, tmp_path / "out", "--reward-model", str(rm), "--dataset", str(chats),
                                "--prompt-column", "messages", "--batch-size", "4", "--minibatch-size", "4",
                                "--max-prompt-len", "64")
    assert len(rows) == 2 and all(0 <= r["logp_mismatch"] < 1e-4 and r["reward_nan"] == 0 for r in rows)


def test_reward_without_template_reads_the_policys_text(setup, tmp_path):
    """A reward model with no chat template scores prompt + completion: the text the policy saw."""
    from train.rewards import HFRewardModel

    _, _, _ = setup
    rm = make_foreign_reward(tmp_path / "rm", template=None)
    r = HFRewardModel(str(rm), "cpu", torch.float32, False)
    assert r.texts(["<s><|user|>1+2=?\n<|assistant|>"], ["3"], [CHATS[0]]) == [("<s><|user|>1+2=?\n<|assistant|>3", False)]


def test_chat_prompts_without_a_template_are_refused(setup, tmp_path, capsys):
    _, rm, chats = setup
    policy = make_chat_policy(tmp_path / "p", template=None)
    line = main_error(tiny_args(policy, tmp_path / "out", "--dataset", str(chats), "--prompt-column", "messages"), capsys)
    assert line.startswith("error: --prompt-column 'messages' holds chat messages but the tokenizer of --model") and \
        "has no chat template" in line


@pytest.mark.parametrize("row,what", [('{"messages": []}', "[]"), ('{"messages": [{"role": "user"}]}', "'role': 'user'"),
                                      ('{"messages": [{"role": "user", "content": 3}]}', "'content': 3")])
def test_malformed_message_rows_are_named(setup, tmp_path, capsys, row, what):
    policy, _, chats = setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text(chats.read_text() + row + "\n")
    line = main_error(tiny_args(policy, tmp_path / "out", "--dataset", str(bad), "--prompt-column", "messages"), capsys)
    assert "row 4 (line 5) has 'messages' = " in line and what in line and "list of {" in line


def test_a_reward_model_without_its_tokenizer_is_refused(setup, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    policy, rm, chats = setup
    AutoModelForSequenceClassification.from_pretrained(rm).save_pretrained(tmp_path / "rm-no-tok")  # weights only
    line = main_error(tiny_args(make_tiny_model(tmp_path / "p"), tmp_path / "out", "--reward-model",
                                str(tmp_path / "rm-no-tok")), capsys)
    assert line.startswith(f"error: --reward-model {str(tmp_path / 'rm-no-tok')!r}: cannot load the tokenizer")
