"""LoRA through peft: only the adapters train, the initial policy is the base with the adapters disabled (no second
copy), FSDP2 takes the same step on 1 and 2 ranks, resume is exact, and the export is a merged plain model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train_fixtures import (REPO, logprobs, cfg_for, experience, main_error, make_tiny_model, metric_rows, run_trainer,
                            tiny_args)

from train import run as R
from train import algos as A
from train import dist as D
from train import loading as L
from train import models as M
from train.models import AdaptersOff, Policy

LORA = ("--lora-rank", "4")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _trained(tiny, tmp_path, *extra):
    """LoRA models after one rollout and one update (the adapters' B no longer 0)."""
    cfg = cfg_for(tiny, tmp_path / "run", *LORA, *extra)
    d = D.Dist()
    torch.manual_seed(0)
    m = M.build_models(cfg, d, print)
    params = [p for mod in (m.policy, m.critic) if mod is not None for p in mod.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    _, b = experience(m, cfg, d, L.load_prompts(cfg.dataset, "train", "prompt")[:8])
    A.update(m, b, cfg, d, opt, params, torch.Generator().manual_seed(0))
    return cfg, d, m, b


def test_only_adapters_train_and_the_initial_policy_is_the_base(tiny, tmp_path):
    cfg, d, m, b = _trained(tiny, tmp_path, "--critic", "separate")
    for model, heads in ((m.policy, ()), (m.critic, ("head.",))):
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        assert names and all(".lora_A." in n or ".lora_B." in n or n.startswith(heads) for n in names), names
        assert any(".lora_B." in n for n in names)
    # every Linear of attention and MLP got an adapter, the LM head none
    adapted = {n.split(".lora_A.")[0].rsplit(".", 1)[-1] for n, _ in m.policy.named_parameters() if ".lora_A." in n}
    assert adapted == {"q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"}
    # the initial policy is the policy itself with adapters off: no second model in memory
    assert isinstance(m.ref, AdaptersOff) and m.ref.policy is m.policy
    from transformers import AutoModelForCausalLM

    base = Policy(AutoModelForCausalLM.from_pretrained(tiny)).eval()
    with torch.no_grad():
        want, got, now = (logprobs(p, b.batch) for p in (base, m.ref, m.policy))
    valid = b.mask
    torch.testing.assert_close(got[valid], want[valid], atol=1e-6, rtol=0)
    assert (now - want)[valid].abs().max() > 1e-3  # the adapters moved the policy
    torch.testing.assert_close(b.logp_init[valid], want[valid], atol=1e-6, rtol=0)  # what make_experience stored
    # the adapters are back on (and trainable) after the initial policy's forward
    assert all(p.requires_grad for n, p in m.policy.named_parameters() if ".lora_" in n)


def test_export_is_merged_and_loads_without_peft(tiny, tmp_path):
    from train.checkpoint import export_pretrained

    cfg, d, m, _ = _trained(tiny, tmp_path, "--critic", "shared")
    export_pretrained(m.policy, m.tokenizer, tmp_path / "final")
    ids = torch.tensor([[5, 6, 13, 7, 14, 3]])
    with torch.no_grad():
        want = m.policy.lm(input_ids=ids).logits
    code = ("import sys; sys.modules['peft'] = None\n"  # importing peft now fails: the export must not need it
            "import torch; from transformers import AutoModelForCausalLM\n"
            f"lm = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'final')!r})\n"
            "assert not any('lora' in n for n, _ in lm.named_parameters())\n"
            f"torch.save(lm(input_ids=torch.tensor({ids.tolist()})).logits, {str(tmp_path / 'logits.pt')!r})\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    got = torch.load(tmp_path / "logits.pt")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny)
    assert (got - base(input_ids=ids).logits).abs().max() > 1e-3  # trained, not the base


def test_resume_equals_uninterrupted(tiny, tmp_path):
    args = [*LORA, "--steps", "4", "--save-every", "2", "--no-export", "--no-plot"]
    full, part = tmp_path / "full", tmp_path / "part"
    for out, extra in ((full, []), (part, ["--stop-after", "3"])):
        p = run_trainer(tiny_args(tiny, out, *args, *extra))
        assert p.returncode == 0, p.stderr[-3000:]
    p = run_trainer(["--resume", str(part)])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stdout and "step_000002" in p.stdout
    rows = metric_rows(full)
    assert metric_rows(part) == rows and len(rows) == 4 and rows[-1]["kl"] != 0


def test_fsdp_one_and_two_ranks_same_update(tiny, tmp_path):
    outs = {}
    for n in (1, 2):
        f = tmp_path / f"w{n}.pt"
        p = run_trainer(["one-update", str(tiny), str(f), *LORA], nproc=n, entry=(str(REPO / "tests" / "train_fixtures.py"),))
        assert p.returncode == 0, p.stderr[-3000:]
        outs[n] = torch.load(f, weights_only=True)
    a, b = outs[1], outs[2]
    assert set(a) == set(b)
    lora_b = [k for k in a if ".lora_B." in k]
    assert lora_b and all(k.startswith(("policy.", "critic.")) for k in lora_b)
    step = max(a[k].abs().max().item() for k in lora_b)  # B starts at 0
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert step > 1e-4 and diff <= 1e-5 * step, (diff, step)
    from safetensors.torch import load_file

    init = load_file(str(tiny / "model.safetensors"))
    key = "policy.lm.base_model.model.transformer.h.0.attn.q_proj.base_layer.weight"
    assert torch.equal(a[key], init["transformer.h.0.attn.q_proj.weight"])  # the base stays frozen


@pytest.mark.parametrize("flags,expect", [
    (("--lora-rank", "-1"), "--lora-rank must be >= 1 for LoRA (or 0: off, full fine-tuning), got -1"),
    (("--lora-rank", "4", "--lora-targets", "q_proj,query_key_value"),
     "--lora-targets 'query_key_value' matches no Linear layer in the transformer blocks of GPTJForCausalLM (its "
     "layers: fc_in, fc_out, k_proj, out_proj, q_proj, v_proj); pass some of those"),
    (("--lora-rank", "4", "--unfrozen-layers", "0"), "LoRA finds no Linear layer to adapt"),
])
def test_bad_lora_flags_refused_in_one_line(tiny, tmp_path, capsys, flags, expect):
    assert expect in main_error(tiny_args(tiny, tmp_path / "out", *flags), capsys)


def test_lora_targets_and_unfrozen_layers_choose_the_adapted_layers(tiny, tmp_path):
    cfg = cfg_for(tiny, tmp_path / "o", *LORA, "--lora-targets", "q_proj,v_proj", "--unfrozen-layers", "1",
                  "--critic", "none", "--advantage", "group", "--samples-per-prompt", "2")
    m = M.build_models(cfg, D.Dist(), print)
    names = {n.split(".lora_A.")[0] for n, _ in m.policy.named_parameters() if ".lora_A." in n}
    assert names == {f"lm.base_model.model.transformer.h.1.attn.{p}" for p in ("q_proj", "v_proj")}


def test_lora_without_peft_is_one_line(tmp_path):
    """peft is an extra: with it absent (hidden from the import system), --lora-rank says how to install it."""
    code = ("import sys; sys.modules['peft'] = None; import importlib.util as u; "
            "u.find_spec = (lambda f: (lambda n, *a: None if n == 'peft' else f(n, *a)))(u.find_spec); "
            "from train.run import main; sys.exit(main(sys.argv[1:]))")
    p = subprocess.run([sys.executable, "-c", code, "--lora-rank", "4", "--steps", "1", "--out", str(tmp_path / "o")],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "--lora-rank needs peft" in p.stderr and ".[lora]" in p.stderr


def test_fused_lora_linear_gradients_against_float64_finite_differences():
    from train.lora import LoRALinear

    g = torch.Generator().manual_seed(0)
    x, w, b, a, bb = (torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
                      for s in ((2, 3, 5), (7, 5), (7,), (2, 5), (7, 2)))
    assert torch.autograd.gradcheck(lambda *t: LoRALinear.apply(*t, 0.7), (x, w, b, a, bb))
    ref = x @ w.T + b + 0.7 * (x @ a.T) @ bb.T
    torch.testing.assert_close(LoRALinear.apply(x, w, b, a, bb, 0.7), ref, rtol=1e-14, atol=1e-14)
    # the trainer's case: a frozen base without bias, only x and the adapters differentiated
    w0 = w.detach()
    assert torch.autograd.gradcheck(lambda x_, a_, b_: LoRALinear.apply(x_, w0, None, a_, b_, 2.0), (x, a, bb))


def test_fused_lora_gives_peft_results_and_gradients(tiny, tmp_path):
    """The trainer routes plain adapters through train.lora.LoRALinear; against peft's own forward (the instance's
    forward removed) on the trained adapters: the same log-probs and adapter gradients (float32, a different order of
    the same sums), and the adapters still switch off for the initial policy."""
    from peft.tuners.lora.layer import Linear as PeftLinear

    cfg, d, m, b = _trained(tiny, tmp_path)
    layers = [x for x in m.policy.modules() if type(x) is PeftLinear]
    assert layers and all("forward" in vars(x) for x in layers)  # every adapted layer fused

    def run():
        m.policy.zero_grad(set_to_none=True)
        lp = logprobs(m.policy, b.batch)
        (lp * b.mask).sum().backward()
        grads = {n: p.grad.clone() for n, p in m.policy.named_parameters() if p.requires_grad}
        with torch.no_grad():
            off = logprobs(m.ref, b.batch)
        return lp.detach(), grads, off

    fused = run()
    for x in layers:
        del x.forward  # peft's class forward again
    peft_ = run()
    torch.testing.assert_close(fused[0], peft_[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused[2], peft_[2], rtol=0, atol=0)  # adapters off: the base layers alone, both ways
    assert fused[1].keys() == peft_[1].keys() and any(".lora_A." in k for k in fused[1])
    for k in fused[1]:
        torch.testing.assert_close(fused[1][k], peft_[1][k], rtol=1e-4, atol=1e-5 * float(peft_[1][k].abs().max()),
                                   msg=k)


def test_lora_dropout_keeps_peft_forward(tiny, tmp_path):
    from peft.tuners.lora.layer import Linear as PeftLinear

    m = M.build_models(cfg_for(tiny, tmp_path / "o", *LORA, "--lora-dropout", "0.1"), D.Dist(), print)
    layers = [x for x in m.policy.modules() if type(x) is PeftLinear]
    assert layers and not any("forward" in vars(x) for x in layers)
