"""Token log-probs from logits (forward under no_grad; forward+backward in the full profile)."""

import pytest

from .harness import params, run_case


@pytest.mark.parametrize("impl,shape", params("logprobs"))
def test_logprobs(benchmark, impl, shape):
    run_case(benchmark, "logprobs", impl, shape)
