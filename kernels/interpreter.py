"""Everything that differs when Triton runs under its CPU interpreter (``TRITON_INTERPRET=1``: the tests'
way to check kernels without a GPU; exact, slow, never for timing). Kept here so that the kernels read
as GPU code.

- Block sizes: every block is one numpy op, so big blocks are much faster there.
- bf16: the interpreter's fp32 -> bf16 cast truncates (a GPU rounds to nearest even), and it has no bf16
  matmul, so bf16 gradients are rounded by hand and ``tl.dot`` operands are widened to fp32.
- No vocabulary split across programs (there is no GPU to fill).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

LOGITS_MAX_BLOCK_V = 32768  # vocab block of the row kernels (kernels.logprobs)
LINEAR_MAX_BLOCK_V = 512  # vocab block of the tile kernels (kernels.linear); tests shrink it
GAE_MAX_BLOCK_B = 1024


def on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def linear_blocks(N: int, V: int, H: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_V, BLOCK_H, num_warps) of the tile kernels under the interpreter."""
    bn = max(16, min(64, triton.next_power_of_2(N)))
    bv = max(16, min(LINEAR_MAX_BLOCK_V, triton.next_power_of_2(V)))
    bh = max(16, min(128, triton.next_power_of_2(H)))
    return bn, bv, bh, 4


@triton.jit
def round_bf16(x):
    """fp32 -> fp32 rounded to the nearest bf16 (ties to even), so that the interpreter's truncating cast
    is exact; on a GPU the cast itself rounds and this is not called."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))  # NaN stays NaN
