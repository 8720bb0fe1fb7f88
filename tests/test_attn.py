"""Attention implementation: --attn auto takes sdpa where the model supports it and eager where it does not.

Support is asked of transformers through its public loading path only (``from_pretrained`` refuses an
implementation a model lacks); which kernel ran is read from torch's profiler (the ATen op), not from a
transformers attribute.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.profiler import profile

from train_fixtures import cfg_for, make_tiny_model

from train.errors import LoadError
from train.loading import load_causal_lm
from train.models import attn_implementation


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", n_layer=1)


def _ran_sdpa(model: nn.Module) -> bool:
    """Whether a forward of ``model`` (with left padding) calls PyTorch's scaled_dot_product_attention op."""
    with torch.no_grad(), profile() as prof:
        model(input_ids=torch.tensor([[0, 3, 4, 5]]), attention_mask=torch.tensor([[0, 1, 1, 1]]))
    return any(e.key == "aten::scaled_dot_product_attention" for e in prof.key_averages())


def test_auto_order_on_cpu(tiny, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("the CPU order; on CUDA flash_attention_2 comes first when flash_attn imports")
    assert attn_implementation(cfg_for(tiny, tmp_path / "o").attn) == ("sdpa", "eager")
    assert attn_implementation(cfg_for(tiny, tmp_path / "o", "--attn", "eager").attn) == ("eager",)


def test_auto_takes_sdpa_where_the_model_has_it_and_eager_stays_eager(tiny, tmp_path):
    def load(attn):
        return load_causal_lm(str(tiny), dtype=torch.float32, attn=attn, trust_remote_code=False)

    try:  # asked the public way: GPT-J has an SDPA path in transformers 5 (pinned), none in 4.x
        has_sdpa = _ran_sdpa(load(("sdpa",)))
    except LoadError:
        has_sdpa = False
    assert _ran_sdpa(load(attn_implementation(cfg_for(tiny, tmp_path / "o").attn))) == has_sdpa
    assert not _ran_sdpa(load(("eager",)))


def _no_sdpa_model(path: Path) -> Path:
    """A real transformers model class that declares no SDPA support (the PreTrainedModel default)."""
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutput

    class NoSdpaConfig(PretrainedConfig):
        model_type = "apa_fast_test_no_sdpa"

        def __init__(self, vocab_size: int = 16, hidden_size: int = 8, **kw):
            self.vocab_size, self.hidden_size = vocab_size, hidden_size
            super().__init__(**kw)

    class NoSdpaLM(PreTrainedModel):
        config_class = NoSdpaConfig

        def __init__(self, config):
            super().__init__(config)
            self.emb = nn.Embedding(config.vocab_size, config.hidden_size)
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            self.post_init()

        def forward(self, input_ids=None, **kw):
            return CausalLMOutput(logits=self.lm_head(self.emb(input_ids)))

    AutoConfig.register(NoSdpaConfig.model_type, NoSdpaConfig, exist_ok=True)
    AutoModelForCausalLM.register(NoSdpaConfig, NoSdpaLM, exist_ok=True)
    NoSdpaLM(NoSdpaConfig()).save_pretrained(path)
    return path


def test_auto_falls_back_to_eager_where_sdpa_is_refused(tiny, tmp_path):
    path = str(_no_sdpa_model(tmp_path / "no-sdpa"))
    with pytest.raises(LoadError, match="cannot load policy"):  # --attn sdpa: the model's refusal, as one line
        load_causal_lm(path, dtype=torch.float32, attn=("sdpa",), trust_remote_code=False)
    m = load_causal_lm(path, dtype=torch.float32, attn=attn_implementation(cfg_for(tiny, tmp_path / "o").attn),
                       trust_remote_code=False)
    assert m(input_ids=torch.tensor([[1, 2]])).logits.shape == (1, 2, 16)
