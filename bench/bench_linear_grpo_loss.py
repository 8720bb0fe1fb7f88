"""GRPO loss from hidden states and the LM head against Liger-Kernel's LigerFusedLinearGRPOLoss and eager PyTorch
(the grid and the chunk-size sweep, interleaved: python -m bench.liger)."""

import pytest

from .harness import params, run_case


@pytest.mark.parametrize("impl,shape", params("linear_grpo_loss"))
def test_linear_grpo_loss(benchmark, impl, shape):
    run_case(benchmark, "linear_grpo_loss", impl, shape)
