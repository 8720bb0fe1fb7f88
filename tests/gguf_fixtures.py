"""A tiny Llama written to a GGUF file with the ``gguf`` package, as llama.cpp's converter lays one out, and the
transformers model holding exactly the weights that file stores (for comparing logits after a round trip)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _byte_vocab() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return SPECIALS + list(bytes_to_unicode().values()) + MERGED


MERGED = ["\u0120+", "\u0120="]  # two merges ("Ġ +", "Ġ ="): a byte-level BPE vocabulary with merges, as real ones


def tiny_llama(seed: int = 0, tied: bool = False):
    """A random ``LlamaForCausalLM`` (hidden 32, 2 layers, 4 heads, 2 KV heads) over a byte-level vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(_byte_vocab()), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                      rope_theta=10000.0, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms: a wrong mapping of a norm weight shows in the logits
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's reordering of q/k rows (rotary halves interleaved); transformers undoes it on load."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_llama_gguf(path: Path, seed: int = 0, tied: bool = False, quantize: bool = True):
    """Write ``tiny_llama(seed, tied)`` to ``path`` as a GGUF (the block matrices in Q8_0 when ``quantize``, the rest
    F32), with a byte-level BPE tokenizer and a ChatML template; returns the transformers model whose weights are
    what the file decodes to (the Q8_0 matrices dequantized)."""
    import gguf

    model = tiny_llama(seed, tied)
    cfg = model.config
    vocab = _byte_vocab()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama-test")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(len(vocab))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(vocab)
    w.add_token_types([gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * (len(vocab) - len(SPECIALS)))
    w.add_token_merges([" ".join(m) for m in MERGED])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_chat_template(CHATML)

    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    sd = {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()}
    stored: dict[str, np.ndarray] = {}

    def put(gguf_name: str, hf_name: str, a: np.ndarray, permute_heads: int = 0) -> None:
        file_a = _permute(a, permute_heads) if permute_heads else a
        if quantize and file_a.ndim == 2 and gguf_name.startswith("blk."):
            q = gguf.quants.quantize(file_a, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gguf_name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            back = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)
            # what the file holds, in transformers' row order (the permutation only reorders rows)
            stored[hf_name] = _permute_back(back, permute_heads) if permute_heads else back
        else:
            w.add_tensor(gguf_name, np.ascontiguousarray(file_a, dtype=np.float32))
            stored[hf_name] = a

    put("token_embd.weight", "model.embed_tokens.weight", sd["model.embed_tokens.weight"])
    put("output_norm.weight", "model.norm.weight", sd["model.norm.weight"])
    if not tied:
        put("output.weight", "lm_head.weight", sd["lm_head.weight"])
    for i in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            key = f"model.layers.{i}.{hf}.weight"
            heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}.get(gg, 0)
            put(f"blk.{i}.{gg}.weight", key, sd[key], heads)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with torch.no_grad():
        for k, v in stored.items():
            model.state_dict()[k].copy_(torch.from_numpy(np.ascontiguousarray(v)))
    return model


def _permute_back(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
