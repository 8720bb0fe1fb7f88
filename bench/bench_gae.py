"""GAE over (B, T): the blocked torch scan against the reverse Python loops of verl and trlx."""

import pytest

from .harness import params, run_case


@pytest.mark.parametrize("impl,shape", params("gae"))
def test_gae(benchmark, impl, shape):
    run_case(benchmark, "gae", impl, shape)
