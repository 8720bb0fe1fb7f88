"""train.sampling against transformers: the same filters, the same greedy tokens and logits as ``generate``, and
draws with the softmax's frequencies."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from train_fixtures import make_tiny_model

from train.sampling import draw, filter_logits, head_logits, sample


def test_draw_frequencies_match_the_softmax():
    z = torch.randn(1, 12, generator=torch.Generator().manual_seed(0)) * 2
    z[0, 5] = float("-inf")  # never drawn
    p = torch.softmax(z, -1)[0].double()
    n = 200_000
    toks = draw(z.expand(n, -1).contiguous(), torch.Generator().manual_seed(1))
    freq = torch.bincount(toks, minlength=12).double() / n
    assert freq[5] == 0
    ok = p > 0
    z_scores = (freq[ok] - p[ok]).abs() / (p[ok] * (1 - p[ok]) / n).sqrt()
    assert float(z_scores.max()) < 5, (freq, p)


@pytest.mark.parametrize("top_k,top_p", [(3, 1.0), (0, 0.5), (0, 0.9), (5, 0.8), (0, 1.0)])
def test_filters_equal_transformers_warpers(top_k, top_p):
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    z = torch.randn(6, 40, generator=torch.Generator().manual_seed(2)) * 3
    ref = z.clone()
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1:
        ref = TopPLogitsWarper(top_p)(None, ref)
    torch.testing.assert_close(filter_logits(z, top_k, top_p), ref, rtol=0, atol=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def test_greedy_tokens_and_logits_equal_generate(tiny):
    """Left-padded prompts of different lengths, EOS and padding after it: greedy decoding gives generate's
    tokens, and the kept logits are generate's ``output_logits``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    tok.padding_side = "left"
    lm = AutoModelForCausalLM.from_pretrained(tiny, attn_implementation="eager").eval()
    enc = tok(["1+2=", "13+4=", "7+18=", "9="], padding=True, return_tensors="pt")
    for eos in (tok.eos_token_id, int(enc["input_ids"][0, -1])):  # the second: a token it does emit, so rows stop
        gen = lm.generate(**enc, do_sample=False, max_new_tokens=6, pad_token_id=tok.pad_token_id, eos_token_id=eos,
                          return_dict_in_generate=True, output_logits=True)
        ours, logits = sample(lm.base_model, head_logits(lm.get_output_embeddings(), 1.0, None), enc["input_ids"],
                              enc["attention_mask"], max_new_tokens=6, eos_token_id=eos, pad_token_id=tok.pad_token_id,
                              greedy=True, keep_logits=True)
        ref = gen.sequences[:, enc["input_ids"].shape[1]:]
        assert torch.equal(ours, ref[:, : ours.shape[1]]) and (ref[:, ours.shape[1]:] == tok.pad_token_id).all()
        torch.testing.assert_close(logits, torch.stack(gen.logits, 1)[:, : logits.shape[1]], rtol=1e-5, atol=1e-5)


def test_min_new_tokens_suppresses_eos(tiny):
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(tiny).eval()
    ids = torch.tensor([[5, 6, 7]] * 64)
    head = head_logits(lm.get_output_embeddings(), 1.0, None)
    with torch.no_grad():
        z = head(lm.base_model(input_ids=ids[:1]).last_hidden_state[:, -1])
    eos = int(z.argmax())  # the most likely next token: drawn often unless suppressed
    toks, _ = sample(lm.base_model, head, ids, torch.ones_like(ids), max_new_tokens=4, eos_token_id=eos,
                     pad_token_id=0, min_new_tokens=3)
    assert not (toks[:, :3] == eos).any() and (toks[:, 3] == eos).any()


@pytest.mark.parametrize("model_type,extra", [("llama", {}), ("gptj", None), ("mistral", {"sliding_window": 4}),
                                              ("gemma2", {"sliding_window": 4, "head_dim": 16})])
def test_preallocated_cache_gives_the_default_caches_logits(tmp_path, monkeypatch, model_type, extra):
    """The sampler's preallocated KV cache (written in place, no concatenation) is used for models whose cache is
    all plain layers, and keeps the logits of the model's own cache; models with sliding-window layers get their
    own cache (the preallocated one would attend past the window)."""
    import train.sampling as S
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from train_fixtures import make_tiny_hf_model

    path = make_tiny_model(tmp_path / "m") if extra is None else make_tiny_hf_model(tmp_path / "m", model_type, **extra)
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    attn = "eager" if model_type == "gemma2" else "sdpa"  # Gemma 2 has no SDPA path
    lm = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn).eval()
    enc = tok(["1+2=", "13+4=", "7+18=", "9="], padding=True, return_tensors="pt")
    cache = S.preallocated_cache(lm.config, 20)
    assert (cache is None) == (model_type in ("mistral", "gemma2")), cache
    runs = []
    for own in (False, True):
        if own:
            monkeypatch.setattr(S, "preallocated_cache", lambda *a: None)
        torch.manual_seed(3)
        runs.append(sample(lm.base_model, head_logits(lm.get_output_embeddings(), 1.0, None), enc["input_ids"],
                           enc["attention_mask"], max_new_tokens=8, min_new_tokens=8, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id, keep_logits=True))
    (t1, z1), (t2, z2) = runs
    assert torch.equal(t1, t2)
    torch.testing.assert_close(z1, z2, atol=1e-5, rtol=0)
