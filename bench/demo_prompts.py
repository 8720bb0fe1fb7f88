"""``python -m bench.demo_prompts FINAL [--init DIR] [--samples N]``: where the offline demo's reward is missing.

Samples every training prompt of the offline task N times (temperature 1, ``generate``) from the initial policy
(the cached warm-up) and from a trained policy (a run's ``final/``), scores each completion with the exact-sum
checker, and prints how many prompts each policy gets right at which rate, and the prompts the trained policy lost.
p(right) of a prompt = the share of its N samples whose sum is right.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from train.tasks.offline import DATA_DIR, arith_reward, warmed_up_model

BINS = [(0.0, 0.05), (0.05, 0.5), (0.5, 0.95), (0.95, 1.01)]


@torch.no_grad()
def right_rates(model_dir: str, prompts: list[str], n: int, seed: int = 0) -> list[float]:
    """p(right) of each prompt over ``n`` samples of the policy in ``model_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    lm = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    torch.manual_seed(seed)
    rates = []
    for q in prompts:
        enc = tok([q] * n, return_tensors="pt")
        out = lm.generate(**enc, do_sample=True, top_k=0, max_new_tokens=4,
                          pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        done = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        rates.append(sum(arith_reward([q] * n, done)) / n)
    return rates


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.demo_prompts", description=__doc__.split("\n\n")[0])
    ap.add_argument("final", help="the trained policy (a run's final/ directory)")
    ap.add_argument("--init", default="", help="the initial policy (default: the cached offline warm-up)")
    ap.add_argument("--samples", type=int, default=64, help="samples per prompt")
    args = ap.parse_args(argv)
    if args.samples < 1:
        ap.error(f"--samples must be >= 1, got {args.samples}")
    torch.set_num_threads(1)
    prompts = [json.loads(ln)["prompt"] for ln in (DATA_DIR / "arith_prompts.jsonl").read_text().splitlines() if ln]
    init = right_rates(args.init or str(warmed_up_model()), prompts, args.samples)
    final = right_rates(args.final, prompts, args.samples)
    print(f"mean p(right) over {len(prompts)} prompts: initial {statistics.mean(init):.3f}, trained "
          f"{statistics.mean(final):.3f} ({args.samples} samples each)")
    for lo, hi in BINS:
        idx = [i for i, p in enumerate(final) if lo <= p < hi]
        mean0 = statistics.mean(init[i] for i in idx) if idx else float("nan")
        print(f"trained p in [{lo:.2f}, {min(hi, 1.0):.2f}{']' if hi > 1 else ')'}: {len(idx):3d} prompts "
              f"(their initial p: {mean0:.3f})")
    lost = sorted((i for i, p in enumerate(final) if p == 0), key=lambda i: -init[i])
    print(f"never right in {args.samples} samples: {len(lost)} prompts, e.g. "
          + ", ".join(f"{prompts[i]} (initial {init[i]:.2f})" for i in lost[:8]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
