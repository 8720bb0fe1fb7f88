"""train.activations: the lean gated MLP and RMSNorm give the model's own results and gradients, save less for
backward (counted bytes, not timed), and leave alone what they do not reproduce."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from train.activations import GatedMLP, RMSNorm, _GatedMLP, _RMSNorm, fuse_layers


@pytest.mark.parametrize("act", [nn.SiLU(), nn.GELU(approximate="tanh")], ids=["silu", "gelu_tanh"])
def test_gated_mlp_gradients_against_float64_finite_differences(act):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    wg = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    wu = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    wd = torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: _GatedMLP.apply(*t, act), (x, wg, wu, wd))
    ref = F.linear(act(F.linear(x, wg)) * F.linear(x, wu), wd)
    torch.testing.assert_close(_GatedMLP.apply(x, wg, wu, wd, act), ref, rtol=1e-14, atol=1e-14)


def test_rmsnorm_gradients_against_float64_finite_differences():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: _RMSNorm.apply(a, b, 1e-6), (x, w))
    ref = w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(_RMSNorm.apply(x, w, 1e-6), ref, rtol=1e-14, atol=1e-14)


def _llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4)
    return LlamaForCausalLM(cfg)


def _saved_bytes(model, ids) -> int:
    """Bytes of activations autograd saves for backward in one forward (parameters not counted)."""
    params = {p.data_ptr() for p in model.parameters()}
    seen: set[int] = set()

    def pack(t):
        if t.data_ptr() not in params and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total[0] += t.numel() * t.element_size()
        return t

    total = [0]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    return total[0]


def test_llama_same_loss_and_gradients_and_less_saved():
    a, b = _llama(), _llama()
    b.load_state_dict(a.state_dict())
    assert fuse_layers(b) == 2 + 2 * 2 + 1  # 2 MLPs, 2 norms per block, the final norm
    assert isinstance(b.model.layers[0].mlp, GatedMLP) and isinstance(b.model.norm, RMSNorm)
    assert list(a.state_dict()) == list(b.state_dict())  # same names: checkpoints and save_pretrained unchanged
    ids = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(2))
    la, lb = a(input_ids=ids, labels=ids).loss, b(input_ids=ids, labels=ids).loss
    la.backward()
    lb.backward()
    assert float(la.detach()) == pytest.approx(float(lb.detach()), rel=1e-6)
    # float32: both compute the norms in float32, in a different order of operations
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-5, atol=1e-6 * float(pa.grad.abs().max()), msg=n)
    before, after = _saved_bytes(a, ids), _saved_bytes(b, ids)
    # per token and block: MLP 4 x 128 -> 2 x 128 floats, norms 2 x 2 x 32 -> 2 x 32 (+ 1/rms)
    print(f"saved for backward: {before} -> {after} bytes ({after / before:.2f}x)")
    assert after < 0.75 * before, (before, after)


def test_left_alone_where_they_do_not_reproduce_the_module(tmp_path):
    from transformers import GemmaConfig, GemmaForCausalLM, GPTJConfig, GPTJForCausalLM

    gptj = GPTJForCausalLM(GPTJConfig(vocab_size=64, n_embd=32, n_layer=2, n_head=4, rotary_dim=8, n_positions=32))
    assert fuse_layers(gptj) == 0  # LayerNorm and an ungated MLP
    gemma = GemmaForCausalLM(GemmaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=4, head_dim=8))
    with torch.no_grad():
        for mod in gemma.modules():
            if type(mod).__name__.endswith("RMSNorm"):
                mod.weight.normal_()  # Gemma scales by (1 + w): an RMSNorm with w would differ
    assert fuse_layers(gemma) == 1  # its gated GELU MLP only
    assert isinstance(gemma.model.layers[0].mlp, GatedMLP) and not isinstance(gemma.model.norm, RMSNorm)

    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(_llama(), peft.LoraConfig(r=2, target_modules=["gate_proj", "up_proj", "down_proj"]))
    fuse_layers(lora)
    assert not any(isinstance(m, GatedMLP) for m in lora.modules())  # the adapters would be bypassed
