"""The trainer on tiny random models of the architectures people align today, built locally (no hub):
2 iterations run, and the log-probs the training forward computes equal the sampler's (logp_mismatch) and
``log_softmax`` of the model's own logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from train_fixtures import logprobs, make_tiny_hf_model, two_steps_with_evals

ARCHS = {  # model_type -> extra config (tiny sizes are common to all)
    "gpt_neox": {},
    "llama": {},
    "mistral": {},
    "qwen2": {"tie_word_embeddings": True},
    "qwen2-untied": {"tie_word_embeddings": False},
    "qwen3": {"head_dim": 16},
    "gemma": {"head_dim": 16},
    "gemma2": {"head_dim": 16, "final_logit_softcapping": 0.1},  # soft-capped inside the fused op, deep in tanh's curve
    "gemma3_text": {"head_dim": 16, "final_logit_softcapping": None},
    "gpt2": {"n_inner": 64},
    "phi3": {},
}


def _build(path: Path, name: str) -> Path:
    return make_tiny_hf_model(path, name.split("-")[0], **ARCHS[name])


@pytest.mark.parametrize("name", list(ARCHS))
def test_architecture_trains_with_exact_logprobs(name, tmp_path, capsys):
    path = _build(tmp_path / name, name)
    rows = two_steps_with_evals(path, tmp_path / "out", "--critic", "shared")
    assert len(rows) == 2 and all(0 <= r["logp_mismatch"] < 1e-4 for r in rows), [r["logp_mismatch"] for r in rows]

    # the fused log-probs against log_softmax of the model's own logits
    from transformers import AutoModelForCausalLM

    from train.models import Policy, head_transform
    from train.records import Batch

    lm = AutoModelForCausalLM.from_pretrained(path).eval()
    scale, cap = head_transform(lm)
    pol = Policy(lm, logit_scale=scale, softcap=cap)
    ids = torch.tensor([[3, 5, 6, 4, 7, 8, 2]])
    mask = torch.ones_like(ids)
    pos = torch.arange(ids.shape[1]).unsqueeze(0)
    labels = ids[:, 3:]
    b = Batch(input_ids=ids, attention_mask=mask, position_ids=pos, prompt_len=3, response=labels,
              mask=torch.ones_like(labels, dtype=torch.bool))
    with torch.no_grad():
        fused = logprobs(pol, b)
        own = torch.log_softmax(lm(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, 2:-1].float(), -1)
        uncapped = logprobs(Policy(lm, logit_scale=scale), b)
    want = own.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(fused, want, atol=2e-5, rtol=0)
    if cap is not None:  # the cap changes the log-probs by far more than the tolerance: it is really applied
        assert (uncapped - want).abs().max() > 1e-3


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


def test_gemma2_trains_with_the_triton_kernels(tmp_path, monkeypatch):
    """Gemma 2's soft-capped head through the Triton kernels (interpreted on CPU): the training log-probs still
    equal the sampler's, and the kernels really ran with the config's cap."""
    pytest.importorskip("triton")
    import kernels.linear as kl

    caps = []
    for name in ("token_fwd", "token_bwd"):
        def spy(*a, _f=getattr(kl, name), softcap=None, **kw):
            caps.append(softcap)
            return _f(*a, softcap=softcap, **kw)

        monkeypatch.setattr(kl, name, spy)
    path = _build(tmp_path / "gemma2", "gemma2")
    rows = two_steps_with_evals(path, tmp_path / "out", "--critic", "shared", "--kernel-backend", "triton")
    assert len(rows) == 2 and all(0 <= r["logp_mismatch"] < 1e-4 for r in rows), [r["logp_mismatch"] for r in rows]
    assert caps and set(caps) == {ARCHS["gemma2"]["final_logit_softcapping"]}, caps
