"""Fused vs eager loss from hidden states, timed interleaved (fused, eager, fused, ...) in one process.

The suites time all rounds of one implementation before the next, which a noisy VM skews when a step takes
seconds; interleaving puts both under the same conditions round by round. The per-token loss is the
trainer's (``apa_fast.losses``), the shape the suites' (N=2048, H=1024, V=50,400, fp32, fwd+bwd).

    python -m bench.interleaved [--loss apa|ppo|awr] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loss", default="apa", choices=["apa", "ppo", "awr"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--N", type=int, default=2048)
    ap.add_argument("--H", type=int, default=1024)
    ap.add_argument("--V", type=int, default=50400)
    a = ap.parse_args(argv)
    import apa_fast

    from .cases import _eager_logp, _per_token_inputs, _token_loss

    g = torch.Generator().manual_seed(0)
    h = torch.randn(a.N, a.H, generator=g).requires_grad_()
    w = (torch.randn(a.V, a.H, generator=g) / a.H**0.5).requires_grad_()
    labels, ref, adv, mask = _per_token_inputs(a.N, a.V, "cpu", g)
    loss = _token_loss(a.loss, ref, adv, mask, a.V, g)
    steps = {
        "apa_fast[torch]": lambda: apa_fast.linear_token_loss(h, w, labels, loss, backend="torch").backward(),
        "eager": lambda: loss(_eager_logp(h @ w.t(), labels)).backward(),
    }
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(a.rounds + 1):  # round 0 warms up
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            if r:
                times[name].append(time.perf_counter() - t0)
            h.grad = w.grad = None
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{a.loss} loss from hidden states, N={a.N} H={a.H} V={a.V:,} fp32 fwd+bwd, {a.rounds} interleaved rounds: "
          f"apa_fast[torch] {med['apa_fast[torch]']:.3f} s, eager {med['eager']:.3f} s (medians), "
          f"ratio {med['apa_fast[torch]'] / med['eager']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
