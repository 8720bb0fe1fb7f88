"""Trainer inputs: the GPT-J reward converter, reward functions, and each bad input giving one clear line."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from train_fixtures import (cfg_for, main_error, make_tiny_hf_model, make_tiny_model, tiny_args, tiny_config,
                            two_steps_with_evals)

from train import run as R
from train import algos as A
from train import dist as D
from train import models as M
from train import setup as S
from train.config import Config, parse_args
from train.errors import LoadError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", n_layer=1)


_main_error = main_error


# ---------------------------------------------------------------- the paper's GPT-J reward checkpoint


def _tiny_gptj_config():
    from train.tasks.offline import build_tokenizer

    tok = build_tokenizer()
    return tok, tiny_config(tok)


def _raw_rm_checkpoint(path: Path, config) -> dict:
    """A raw state dict in the layout of Dahoas/gptj-rm-static: transformer.* + v_head.weight (+ old buffers)."""
    from transformers import GPTJModel

    torch.manual_seed(0)
    body = GPTJModel(config)
    sd = {f"transformer.{k}": v.clone() for k, v in body.state_dict().items()}
    sd["v_head.weight"] = torch.randn(1, config.n_embd)
    for i in range(config.n_layer):  # causal-mask buffers that older transformers saved
        sd[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 8, 8, dtype=torch.bool))
        sd[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e9)
    torch.save(sd, path)
    return sd


def test_gptj_reward_converter_round_trip(tmp_path):
    from transformers import GPTJModel

    from train.rewards import GPTJRawReward, convert_gptj_reward_checkpoint, load_reward

    tok, config = _tiny_gptj_config()
    sd = _raw_rm_checkpoint(tmp_path / "hf_ckpt.pt", config)
    rm = convert_gptj_reward_checkpoint(tmp_path / "hf_ckpt.pt", config)
    for k, v in rm.state_dict().items():
        if k in sd:
            assert torch.equal(v, sd[k]), k
    # independent oracle: a GPT-J body with the same weights, the head applied by hand where the authors read it:
    # rewards[c_ind - 1], c_ind = the first EOS (their PAD)
    body = GPTJModel(config)
    body.load_state_dict({k[len("transformer."):]: v for k, v in sd.items() if k.startswith("transformer.")
                          and not k.endswith(("attn.bias", "attn.masked_bias"))})
    eos = tok.eos_token_id
    ids = torch.tensor([[5, 6, 13, 7, 14, 8, eos, 9, eos], [5, 13, 6, 14, 9, eos, 0, 0, 0]])
    am = torch.tensor([[1] * 9, [1] * 6 + [0] * 3])
    got = rm(ids, am, eos)
    with torch.no_grad():
        h = body(input_ids=ids, attention_mask=am).last_hidden_state
        want = torch.stack([h[0, 5] @ sd["v_head.weight"][0], h[1, 4] @ sd["v_head.weight"][0]])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # read at the first EOS itself, as the authors' RL scripts do
    at_eos = convert_gptj_reward_checkpoint(tmp_path / "hf_ckpt.pt", config, read_at="eos")
    with torch.no_grad():
        want_eos = torch.stack([h[0, 6] @ sd["v_head.weight"][0], h[1, 5] @ sd["v_head.weight"][0]])
    torch.testing.assert_close(at_eos(ids, am, eos), want_eos, atol=1e-5, rtol=1e-5)
    # through the trainer's reward path: prompt + completion + EOS, read at the token before that EOS (default)
    # or at that EOS
    with torch.no_grad():
        e = tok(["1+2=3<eos>"], return_tensors="pt")
        h = body(**e).last_hidden_state
    for at, pos in (("before_eos", -2), ("eos", -1)):
        reward = load_reward(str(tmp_path / "hf_ckpt.pt"), policy_config=config, tokenizer=tok, device="cpu",
                             dtype=torch.float32, trust_remote_code=False, **({} if at == "before_eos" else
                                                                             {"gptj_reward_at": at}))
        assert isinstance(reward, GPTJRawReward)
        s = reward(["1+2=", "12+3="], ["3", "15"])
        assert s[0] == pytest.approx(float(h[0, pos] @ sd["v_head.weight"][0]), abs=1e-5), at
        assert len(s) == 2 and all(isinstance(x, float) for x in s)


def test_gptj_reward_converter_rejects_other_checkpoints(tmp_path):
    from train.rewards import convert_gptj_reward_checkpoint

    tok, config = _tiny_gptj_config()
    torch.save({"foo.weight": torch.zeros(2)}, tmp_path / "x.pt")
    with pytest.raises(LoadError, match="not a GPT-J reward checkpoint"):
        convert_gptj_reward_checkpoint(tmp_path / "x.pt", config)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(LoadError, match="weights_only=True"):
        convert_gptj_reward_checkpoint(tmp_path / "junk.pt", config)
    # a GPT-J reward checkpoint of another width, or with a block missing: one line naming the misfit
    _raw_rm_checkpoint(tmp_path / "wide.pt", tiny_config(tok, n_embd=64))
    with pytest.raises(LoadError, match="does not fit a GPT-J of this config"):
        convert_gptj_reward_checkpoint(tmp_path / "wide.pt", config)
    sd = _raw_rm_checkpoint(tmp_path / "short.pt", config)
    torch.save({k: v for k, v in sd.items() if not k.startswith("transformer.h.1.")}, tmp_path / "short.pt")
    with pytest.raises(LoadError, match=r"does not fit a GPT-J of this config: missing \['transformer\.h\.1\."):
        convert_gptj_reward_checkpoint(tmp_path / "short.pt", config)


def test_function_reward_and_arith_reward():
    from train.tasks.offline import arith_reward
    from train.rewards import FunctionReward

    assert arith_reward(["3+4=", "10+12=", "hello"], ["7", "21", "1"])[:2] == [1.0, 0.0]
    r = FunctionReward("train_fixtures:nan_reward")(["a"] * 4, ["b"] * 4)
    assert r[0] == 1.0 and all(x != x for x in r[1::2])  # NaN for non-numbers


# ---------------------------------------------------------------- bad input: one clear line


def test_missing_model_path(tmp_path, capsys):
    line = _main_error(tiny_args(tmp_path / "no-such-model", tmp_path / "out"), capsys)
    assert "cannot load" in line and "no-such-model" in line


def test_gptj_preset_offline_says_what_to_download(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from train import loading

    loading.hub_reachable.cache_clear()
    line = _main_error(["--model", "gptj", "--out", str(tmp_path / "o")], capsys)
    assert "Dahoas/gptj-sft-static" in line and "download" in line


def test_unknown_reward_function(tiny, tmp_path, capsys):
    args = tiny_args(tiny, tmp_path / "out")
    args[args.index("--reward-model") + 1] = "train_fixtures:no_such_reward"
    line = _main_error(args, capsys)
    assert "no_such_reward" in line


@pytest.mark.parametrize(
    "content,where",
    [
        ('{"prompt": "1+2="}\n{"prompt": "3+4="\n', "row 1 (line 2)"),
        ('{"prompt": "1+2="}\n\n{"prompt": "3+4="}\n{"prompt": 5}\n', "row 2 (line 4)"),
        ('{"prompt": "1+2="}\n{"question": "3+4="}\n', "row 1 (line 2)"),
    ],
)
def test_malformed_dataset_rows_are_named(tiny, tmp_path, capsys, content, where):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    args = tiny_args(tiny, tmp_path / "out")
    args[args.index("--dataset") + 1] = str(f)
    line = _main_error(args, capsys)
    assert where in line and "bad.jsonl" in line


def test_missing_dataset_and_column(tiny, tmp_path, capsys):
    args = tiny_args(tiny, tmp_path / "out")
    args[args.index("--dataset") + 1] = str(tmp_path / "nope" / "data")
    assert "cannot load dataset" in _main_error(args, capsys)
    args = tiny_args(tiny, tmp_path / "out", "--prompt-column", "question")
    line = _main_error(args, capsys)
    assert "no 'question' field" in line and "row 0" in line


def test_resume_without_a_run(tmp_path, capsys):
    line = _main_error(["--resume", str(tmp_path)], capsys)
    assert "--resume" in line


def test_defaults_are_safe_and_help_explains(capsys):
    cfg = parse_args([])
    assert cfg.trust_remote_code is False and cfg.algo == "apa" and cfg.model == "offline"
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    h = capsys.readouterr().out
    for flag in ("--algo", "--resume", "--kernel-backend", "--critic", "--unfrozen-layers", "--lam", "--precision"):
        assert flag in h
    g = parse_args(["--model", "gptj"])
    assert (g.model, g.reward_model, g.dataset, g.lam, g.lr, g.unfrozen_layers, g.max_new_tokens) == (
        "Dahoas/gptj-sft-static", "Dahoas/gptj-rm-static", "Dahoas/rm-static", 0.1, 1e-6, 2, 128)
    assert (g.gamma, g.gae_lam) == (1.0, 0.95)
    assert parse_args(["--algo", "awr"]).lam == 1.0


def test_hf_sequence_classification_reward(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from train_fixtures import make_tiny_seqcls_reward
    from train.rewards import HFRewardModel, load_reward

    path = make_tiny_seqcls_reward(tmp_path / "rm")
    r = load_reward(str(path), policy_config=None, tokenizer=None, device="cpu", dtype=torch.float32,
                    trust_remote_code=False)
    assert isinstance(r, HFRewardModel)
    got = r(["1+2=", "10+12="], ["3", "22"])
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        want = [float(model(**tok([t], return_tensors="pt")).logits[0, 0]) for t in ("1+2=3", "10+12=22")]
    assert got == pytest.approx(want, abs=1e-5)


def test_gptj_like_setup_end_to_end(tmp_path, capsys):
    """The --model gptj code path in miniature: pad == EOS, the raw GPT-J reward checkpoint, running reward
    scaling, top-1 block trainable, both critics."""
    policy = make_tiny_model(tmp_path / "sft", pad_is_eos=True)
    _, config = _tiny_gptj_config()
    _raw_rm_checkpoint(tmp_path / "hf_ckpt.pt", config)
    for critic in ("separate", "shared"):
        out = tmp_path / f"run-{critic}"
        args = tiny_args(policy, out, "--steps", "2", "--reward-scale", "running", "--unfrozen-layers", "1",
                         "--critic", critic, "--no-plot")
        args[args.index("--reward-model") + 1] = str(tmp_path / "hf_ckpt.pt")
        assert R.main(args) == 0, capsys.readouterr().err[-2000:]
        rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == 2 and all(r["reward_nan"] == 0 for r in rows)
        assert (out / "final" / "model.safetensors").exists()


@pytest.mark.parametrize("at", ["before_eos", "eos"])
def test_gptj_reward_at_flag_reaches_the_reward_model(tmp_path, at):
    from train.rewards import convert_gptj_reward_checkpoint

    policy = make_tiny_model(tmp_path / "sft", pad_is_eos=True)
    tok, config = _tiny_gptj_config()
    _raw_rm_checkpoint(tmp_path / "hf_ckpt.pt", config)
    extra = ("--gptj-reward-at", at) if at == "eos" else ()  # before_eos: the default
    cfg = cfg_for(policy, tmp_path / "o", "--reward-model", str(tmp_path / "hf_ckpt.pt"), *extra)
    m = M.build_models(cfg, D.Dist(), print)
    assert m.reward.model.read_at == at
    ids = tok(["1+2=3<eos>"], return_tensors="pt")["input_ids"]
    want = convert_gptj_reward_checkpoint(tmp_path / "hf_ckpt.pt", config, read_at=at)(ids, torch.ones_like(ids),
                                                                                      tok.eos_token_id)
    assert m.reward(["1+2="], ["3"]) == pytest.approx(want.tolist(), abs=1e-5)


def test_unfrozen_layers_trains_only_the_top_blocks(tmp_path):
    path = make_tiny_model(tmp_path / "m", n_layer=3)
    cfg = cfg_for(path, tmp_path / "o", "--unfrozen-layers", "1")
    m = M.build_models(cfg, D.Dist(), print)
    for model, prefix in ((m.policy, "lm.transformer."), (m.critic, "body.")):
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        assert names and all(n.startswith((f"{prefix}h.2.", f"{prefix}ln_f.", "lm.lm_head.", "head.")) for n in names), names
        assert any(n.startswith(f"{prefix}ln_f.") for n in names)
    assert not any(p.requires_grad for p in m.ref.parameters())


@pytest.mark.parametrize("flags,expect", [
    (("--samples-per-prompt", "0"), "--samples-per-prompt must be >= 1, got 0"),
    (("--advantage", "group"), "--advantage group needs --samples-per-prompt >= 2"),
    (("--critic", "none"), "--critic none needs --advantage group"),
    (("--advantage", "group", "--samples-per-prompt", "2", "--critic", "separate"), "--critic separate has nothing to learn"),
    (("--algo", "grpo", "--samples-per-prompt", "2", "--kl-loss-coef", "-1"), "--kl-loss-coef must be >= 0"),
    (("--warmup-steps", "-1"), "--warmup-steps must be in [0, --steps)"),
    (("--warmup-steps", "2", "--steps", "2"), "--warmup-steps must be in [0, --steps) = [0, 2), got 2"),
    (("--lr", "0"), "--lr must be a positive number, got 0.0"),
    (("--lr", "nan"), "--lr must be a positive number, got nan"),
])
def test_group_flags_refused_in_one_line(tiny, tmp_path, capsys, flags, expect):
    assert expect in _main_error(tiny_args(tiny, tmp_path / "out", *flags), capsys)


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_learning_rate_schedule(tiny, tmp_path, schedule):
    """Warm-up to lr over N iterations, then constant or a decay that reaches 0 after the last iteration; a
    function of the iteration alone, so a resumed run continues on the same curve."""
    import math

    cfg = cfg_for(tiny, tmp_path / "o", "--lr", "0.1", "--steps", "12", "--warmup-steps", "2", "--lr-schedule", schedule)
    got = [A.lr_at(cfg, s) for s in range(12)]
    assert got[:2] == pytest.approx([0.1 / 3, 0.2 / 3])
    x = [(s - 2) / 10 for s in range(2, 12)]
    want = {"constant": [0.1] * 10, "linear": [0.1 * (1 - v) for v in x],
            "cosine": [0.05 * (1 + math.cos(math.pi * v)) for v in x]}[schedule]
    assert got[2:] == pytest.approx(want)
    assert got[2] == pytest.approx(0.1) and all(v > 0 for v in got)


def test_a_batch_that_does_not_split_across_processes_is_refused(tiny, tmp_path):
    """A prompt's samples stay on one rank, so --batch-size (prompts) must divide by the process count."""
    cfg = cfg_for(tiny, tmp_path / "o", "--algo", "grpo", "--samples-per-prompt", "4", "--batch-size", "3",
                  "--minibatch-size", "3")
    with pytest.raises(LoadError, match="--batch-size 3 and --minibatch-size 3 must be multiples of the number of "
                                        r"processes \(2\)"):
        S.check_flags(cfg, D.Dist(world=2))


def test_a_reward_that_is_never_a_number_stops_with_one_line(tiny, tmp_path, capsys):
    args = tiny_args(tiny, tmp_path / "out")
    args[args.index("--reward-model") + 1] = "train_fixtures:all_nan_reward"
    line = _main_error(args, capsys)
    assert "NaN or not a number" in line and "all_nan_reward" in line


def test_a_scaled_head_trains_with_exact_logprobs(tmp_path, capsys):
    """Granite divides its logits by logits_scaling after the head (it used to end in TypeError: unsupported
    operand type(s) for /: 'dict' and 'float'): the scale is folded into the temperature, and the log-probs
    the training forward computes equal the sampler's (logp_mismatch at each evaluation)."""
    path = make_tiny_hf_model(tmp_path / "granite", "granite", n_layer=1, logits_scaling=4.0, tie_word_embeddings=False)
    rows = two_steps_with_evals(path, tmp_path / "out", "--temperature", "0.7")
    assert len(rows) == 2 and all(0 <= r["logp_mismatch"] < 1e-5 for r in rows), [r["logp_mismatch"] for r in rows]


def test_a_head_transform_the_fused_op_does_not_apply_is_refused(tmp_path):
    """Logits post-processed in a way the config does not declare (here a real forward hook on the LM head adds a
    bias the fused op never sees) are refused with one line, never trained on wrong log-probs."""
    from transformers import AutoModelForCausalLM

    from train.models import head_transform

    lm = AutoModelForCausalLM.from_pretrained(make_tiny_hf_model(tmp_path / "llama", "llama", n_layer=1))
    assert head_transform(lm) == (1.0, None)
    lm.lm_head.register_forward_hook(lambda mod, args, out: out + torch.arange(out.shape[-1], dtype=out.dtype))
    with pytest.raises(LoadError, match="^LlamaForCausalLM transforms its logits after the LM head in a way the fused "
                                        "log-probs do not apply"):
        head_transform(lm)


def test_tied_head_trains_and_exports_tied(tmp_path, capsys):
    """A head tied to the input embeddings (Llama-3.2 / Qwen2.5 small style) is read as the tied weight:
    two iterations run, the loss is finite, and the export stays tied."""
    from transformers import AutoModelForCausalLM

    path = make_tiny_hf_model(tmp_path / "llama", "llama", n_layer=1, tie_word_embeddings=True)
    out = tmp_path / "out"
    assert R.main(tiny_args(path, out, "--steps", "2", "--no-plot")) == 0, capsys.readouterr().err[-2000:]
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    lm = AutoModelForCausalLM.from_pretrained(out / "final")
    assert lm.lm_head.weight.data_ptr() == lm.get_input_embeddings().weight.data_ptr()
    init = AutoModelForCausalLM.from_pretrained(path)
    assert not torch.equal(lm.lm_head.weight, init.lm_head.weight)  # trained, through the tie


# ---------------------------------------------------------------- every numeric flag: one line, before any model


@pytest.mark.parametrize("flags,expect", [
    (("--steps", "0"), "--steps must be >= 1, got 0"),
    (("--steps", "-1"), "--steps must be >= 1, got -1"),  # no longer "the preset's"
    (("--batch-size", "0"), "--batch-size must be >= 1, got 0"),
    (("--minibatch-size", "0"), "--minibatch-size must be >= 1, got 0"),
    (("--epochs", "0"), "--epochs must be >= 1, got 0"),
    (("--micro-batch-tokens", "-2"), "--micro-batch-tokens must be >= 0 (0: one pass; -1: auto), got -2"),
    (("--lr", "-1"), "--lr must be a positive number, got -1.0"),
    (("--lr", "inf"), "--lr must be a positive number, got inf"),
    (("--lam", "-1"), "--lam must be a positive number, got -1.0"),
    (("--lam", "0"), "--lam must be a positive number, got 0.0"),
    (("--weight-decay", "-0.1"), "--weight-decay must be >= 0, got -0.1"),
    (("--max-grad-norm", "nan"), "--max-grad-norm must be >= 0 (0: off), got nan"),
    (("--gamma", "1.5"), "--gamma must be in [0, 1], got 1.5"),
    (("--gae-lam", "-0.1"), "--gae-lam must be in [0, 1], got -0.1"),
    (("--vf-coef", "-1"), "--vf-coef must be >= 0, got -1.0"),
    (("--ppo-clip", "0"), "--ppo-clip must be a positive number, got 0.0"),
    (("--value-clip", "0"), "--value-clip must be a positive number, got 0.0"),
    (("--kl-init", "-1"), "--kl-init must be >= 0, got -1.0"),
    (("--kl-target", "-1"), "--kl-target must be >= 0 (0: a fixed beta of --kl-init), got -1.0"),
    (("--kl-horizon", "0"), "--kl-horizon must be a positive number, got 0.0"),
    (("--kl-coef", "-0.1"), "--kl-coef must be >= 0, got -0.1"),
    (("--awr-max-weight", "-1"), "--awr-max-weight must be >= 0 (0: no clamp), got -1.0"),
    (("--reward-clip", "-1"), "--reward-clip must be >= 0 (0: off), got -1.0"),
    (("--reward-timeout", "-5"), "--reward-timeout must be >= 0 seconds (0: no limit), got -5.0"),
    (("--max-new-tokens", "0"), "--max-new-tokens must be >= 1, got 0"),
    (("--min-new-tokens", "-1"), "--min-new-tokens must be >= 0 (0: off), got -1"),
    (("--max-prompt-len", "0"), "--max-prompt-len must be >= 1, got 0"),
    (("--temperature", "0"), "--temperature must be a positive number, got 0.0"),
    (("--temperature", "-1"), "--temperature must be a positive number, got -1.0"),
    (("--top-k", "-3"), "--top-k must be >= 0 (0: off), got -3"),
    (("--top-p", "0"), "--top-p must be in (0, 1] (1: off), got 0.0"),
    (("--top-p", "1.5"), "--top-p must be in (0, 1] (1: off), got 1.5"),
    (("--unfrozen-layers", "-2"), "--unfrozen-layers must be >= 0, or -1 (all), got -2"),
    (("--lora-rank", "-1"), "--lora-rank must be >= 1 for LoRA (or 0: off, full fine-tuning), got -1"),
    (("--save-every", "-1"), "--save-every must be >= 0 (0: only at the end), got -1"),
    (("--keep-checkpoints", "0"), "--keep-checkpoints must be >= 1 (the one just written is kept), got 0"),
    (("--eval-every", "-1"), "--eval-every must be >= 0 (0: never), got -1"),
    (("--eval-samples", "-1"), "--eval-samples must be >= 0, got -1"),
    (("--threads", "-1"), "--threads must be >= 0 (0: torch's default), got -1"),
    (("--stop-after", "-1"), "--stop-after must be >= 0 (0: off), got -1"),
    (("--seed", "-1"), "--seed must be >= 0, got -1"),
    (("--batch-size", "x"), "argument --batch-size: invalid int value: 'x' (python -m train.run --help lists the flags)"),
    (("--no-such-flag",), "unrecognized arguments: --no-such-flag (python -m train.run --help lists the flags)"),
])
def test_every_bad_number_is_one_line_before_any_model(tiny, tmp_path, capsys, flags, expect):
    out = tmp_path / "out"
    args = tiny_args(tiny, out, *flags)
    if flags[0] == "--no-such-flag" or flags[1] == "x":
        with pytest.raises(SystemExit) as e:
            parse_args(args)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err == f"error: {expect}\n"
        return
    assert _main_error(args, capsys) == f"error: {expect}"
    assert not out.exists()  # refused before the run directory, let alone a model


def test_an_unwritable_out_is_refused_first(tiny, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "run"
    line = _main_error(tiny_args(tiny, out), capsys)
    assert line == f"error: --out {out}: cannot create or write the run directory (Not a directory)"


@pytest.mark.parametrize("content,expect", [
    (b"", "no rows (the file is empty); it needs one prompt per line"),
    (b"\n  \n\n", "no rows (only blank lines); it needs one prompt per line"),
    (b'{"prompt": "1+2="}\n{"prompt": "3+\xff4="}\n', "line 2 is not UTF-8 text (byte 0xff at column 15); save the "
                                                      "file as UTF-8"),
])
@pytest.mark.parametrize("ext", ["jsonl", "csv"])
def test_empty_and_undecodable_datasets_are_named(tiny, tmp_path, capsys, content, expect, ext):
    f = tmp_path / f"data.{ext}"
    f.write_bytes(content.replace(b'{"prompt": ', b"").replace(b"}", b"") if ext == "csv" and content else content)
    if ext == "csv" and b"\xff" in content:
        expect = "line 2 is not UTF-8 text (byte 0xff at column 4); save the file as UTF-8"
    args = tiny_args(tiny, tmp_path / "out")
    args[args.index("--dataset") + 1] = str(f)
    assert _main_error(args, capsys) == f"error: {f}: {expect}"


def _saved_run(tiny: Path, out: Path) -> Path:
    import dataclasses

    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg_for(tiny, out, "--steps", "4"))))
    return out


def test_resume_refuses_flags_that_change_the_run(tiny, tmp_path, capsys):
    out = _saved_run(tiny, tmp_path / "run")
    line = _main_error(["--resume", str(out), "--algo", "ppo", "--lr", "0.5", "--batch-size", "8", "--out",
                        str(tmp_path / "other")], capsys)
    assert line.startswith(f"error: --resume {out}: --out {tmp_path / 'other'} (a resumed run writes into --resume "
                           f"{out}); --algo ppo (saved: apa); --lr 0.5 (saved: 0.001): a resumed run keeps the "
                           "settings it started with; only --steps, --stop-after, --save-every,"), line
    assert "--batch-size" not in line.split(":")[2]  # the same value as saved: not a change


def test_resume_applies_the_flags_that_may_change(tiny, tmp_path):
    out = _saved_run(tiny, tmp_path / "run")
    argv = ["--resume", str(out), "--steps", "9", "--save-every", "3", "--no-plot", "--reward-timeout", "5",
            "--lr", "1e-3"]
    cfg = S.resume_config(parse_args(argv), argv)
    assert (cfg.steps, cfg.save_every, cfg.plot, cfg.reward_timeout, cfg.lr, cfg.out) == (9, 3, False, 5.0, 1e-3, str(out))
    assert cfg.batch_size == 8 and cfg.max_new_tokens == 4  # the saved ones, not the preset's
    resume_help = dataclasses.fields(Config)[[f.name for f in dataclasses.fields(Config)].index("resume")].metadata["help"]
    assert all(f"--{k.replace('_', '-')}" in resume_help for k in S.RESUMABLE)  # the help lists each
