"""The trainer on tiny random models of the architectures people align today, built locally (no hub):
2 iterations run, and the log-probs the training forward computes equal the sampler's (logp_mismatch) and
``log_softmax`` of the model's own logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from train_fixtures import tiny_args

from train import run as R

ARCHS = {  # model_type -> extra config (tiny sizes are common to all)
    "gpt_neox": {},
    "llama": {},
    "mistral": {},
    "qwen2": {"tie_word_embeddings": True},
    "qwen2-untied": {"tie_word_embeddings": False},
    "qwen3": {"head_dim": 16},
    "gemma": {"head_dim": 16},
    "gemma3_text": {"head_dim": 16, "final_logit_softcapping": None},
    "gpt2": {"n_inner": 64},
    "phi3": {},
}


def _build(path: Path, name: str) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    from train.offline import build_tokenizer

    tok = build_tokenizer()
    cfg = AutoConfig.for_model(name.split("-")[0], vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                               max_position_embeddings=64, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, **ARCHS[name])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("name", list(ARCHS))
def test_architecture_trains_with_exact_logprobs(name, tmp_path, capsys):
    path = _build(tmp_path / name, name)
    out = tmp_path / "out"
    args = tiny_args(path, out, "--steps", "2", "--no-plot", "--no-export", "--critic", "shared")
    args[args.index("--eval-every") + 1] = "1"
    assert R.main(args) == 0, capsys.readouterr().err[-2000:]
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(0 <= r["logp_mismatch"] < 1e-4 for r in rows), [r["logp_mismatch"] for r in rows]

    # the fused log-probs against log_softmax of the model's own logits
    from transformers import AutoModelForCausalLM

    from train.models import Policy, head_logit_scale

    lm = AutoModelForCausalLM.from_pretrained(path).eval()
    pol = Policy(lm, logit_scale=head_logit_scale(lm))
    ids = torch.tensor([[3, 5, 6, 4, 7, 8, 2]])
    mask = torch.ones_like(ids)
    pos = torch.arange(ids.shape[1]).unsqueeze(0)
    labels = ids[:, 3:]
    with torch.no_grad():
        fused = pol(ids, mask, pos, labels, 2).logprobs
        own = torch.log_softmax(lm(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, 2:-1].float(), -1)
    torch.testing.assert_close(fused, own.gather(-1, labels.unsqueeze(-1)).squeeze(-1), atol=2e-5, rtol=0)


def test_tied_head_fsdp_one_and_two_ranks_same_update(tmp_path):
    """A head tied to the embeddings under FSDP2 (both in the root unit): 1 and 2 ranks take the same step,
    and the tie survives it."""
    from safetensors.torch import load_file

    from train_fixtures import REPO, run_trainer

    path = _build(tmp_path / "qwen2", "qwen2")
    outs = {}
    for n in (1, 2):
        f = tmp_path / f"w{n}.pt"
        p = run_trainer(["one-update", str(path), str(f), "--reward-model", "train_fixtures:parity_reward"], nproc=n,
                        entry=(str(REPO / "tests" / "train_fixtures.py"),))
        assert p.returncode == 0, p.stderr[-3000:]
        outs[n] = torch.load(f, weights_only=True)
    a, b = outs[1], outs[2]
    init = load_file(str(path / "model.safetensors"))
    step = max((a["policy.lm." + k] - v).abs().max().item() for k, v in init.items())
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert step > 1e-3 and diff <= 1e-5 * step, (diff, step)
    for sd in (a, b):
        assert torch.equal(sd["policy.lm.lm_head.weight"], sd["policy.lm.model.embed_tokens.weight"])
