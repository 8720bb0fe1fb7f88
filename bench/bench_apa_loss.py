"""The APA loss from logits, forward + backward: the training step's hot path."""

import pytest

from .harness import params, run_case


@pytest.mark.parametrize("impl,shape", params("apa_loss"))
def test_apa_loss(benchmark, impl, shape):
    run_case(benchmark, "apa_loss", impl, shape)
