"""APA loss from hidden states and the LM head (logits never built) against PyTorch's chunked linear_cross_entropy and eager linear + log_softmax."""

import pytest

from .harness import params, run_case


@pytest.mark.parametrize("impl,shape", params("linear_apa_loss"))
def test_linear_apa_loss(benchmark, impl, shape):
    run_case(benchmark, "linear_apa_loss", impl, shape)
