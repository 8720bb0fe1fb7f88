"""Trainer tests on a tiny random GPT-J (CPU): log-prob agreement, losses, FSDP ranks, resume, export."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from train_fixtures import (REPO, cfg_for, experience, logprobs, make_tiny_model, metric_rows, policy_loss, run_trainer,
                            tiny_args)

from train import run as R
from train import algos as A
from train import dist as D
from train import loading as L
from train import models as M
from train import rollout as RO
from train import experience as X
from train.errors import LoadError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _models(tiny, tmp_path, *extra):
    cfg = cfg_for(tiny, tmp_path / "run", *extra)
    d = D.Dist()
    torch.manual_seed(0)
    return cfg, d, M.build_models(cfg, d, print)


def _experience(m, cfg, d, n=8):
    return experience(m, cfg, d, L.load_prompts(cfg.dataset, "train", "prompt")[:n], sampling_logprobs=True)[1]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("backend", ["auto", "eager"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_generation_logprobs_equal_training_logprobs(tiny, tmp_path, temperature, backend, attn):
    try:
        cfg, d, m = _models(tiny, tmp_path, "--temperature", str(temperature), "--kernel-backend", backend, "--attn", attn)
    except LoadError:
        if attn == "eager":
            raise
        pytest.skip("this transformers' GPT-J has no SDPA path (the pinned one has)")
    torch.manual_seed(1)
    ro, b = experience(m, cfg, d, L.load_prompts(cfg.dataset, "train", "prompt")[:8], sampling_logprobs=True)
    assert b.batch.prompt_len > 1 and (b.batch.attention_mask[:, 0] == 0).any(), "the batch should contain left padding"
    assert b.mask.sum() > 8
    # logp_old comes from the training forward (fused head from hidden states, position ids from the mask)
    torch.testing.assert_close(b.logp_old, ro.logp_sample, atol=2e-5, rtol=0)
    # and the frozen initial policy starts equal to the policy
    torch.testing.assert_close(b.logp_init, b.logp_old, atol=2e-5, rtol=0)


@pytest.mark.parametrize("algo", ["apa", "ppo", "awr"])
def test_each_algorithm_loss_decreases_on_a_fixed_batch(tiny, tmp_path, algo):
    cfg, d, m = _models(tiny, tmp_path, "--algo", algo, "--lr", "3e-3", "--critic", "shared" if algo == "awr" else "separate")
    torch.manual_seed(2)
    b = _experience(m, cfg, d)
    assert torch.isfinite(b.advantages).all() and b.advantages[b.mask].abs().sum() > 0
    params = [p for mod in (m.policy, m.critic) if mod is not None for p in mod.parameters() if p.requires_grad]
    # plain gradient steps: Adam's sign-like first steps can raise PPO's clipped surrogate on some samples
    opt = torch.optim.SGD(params, lr=1e-2)
    with torch.no_grad():
        before = float(policy_loss(m, b, cfg))
    for i in range(2):
        A.update(m, b, cfg, d, opt, params, torch.Generator().manual_seed(i))
    with torch.no_grad():
        after = float(policy_loss(m, b, cfg))
    assert math.isfinite(before) and after < before, (algo, before, after)


def test_apa_loss_is_the_formula(tiny, tmp_path):
    """The fused APA loss of the trainer equals sum(m * (logp - logp_init - A/lam)^2) / n from eager log-probs."""
    cfg, d, m = _models(tiny, tmp_path)
    torch.manual_seed(3)
    b = _experience(m, cfg, d)
    b = dataclasses.replace(b, advantages=torch.randn_like(b.advantages) * b.mask)
    with torch.no_grad():
        fused = float(policy_loss(m, b, cfg))
        logp = logprobs(m.policy, b.batch, backend="reference")  # eager: the logits built
    ref = float(((logp - b.logp_init - b.advantages / cfg.lam) ** 2 * b.mask).sum() / b.mask.sum())
    assert fused == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("algo", ["grpo", "apa"])
@pytest.mark.parametrize("backend", ["auto", "eager"])
def test_on_policy_step_equals_a_separate_behaviour_pass(tiny, tmp_path, monkeypatch, algo, backend):
    """Critic-free, one gradient step per epoch: the experience pass skips the policy, and the first step's own
    log-probs stand in for it. Two epochs (the second uses them as logp_old) give the same parameters, losses
    and KL/entropy metrics as with the separate no-grad pass."""
    extra = ("--algo", algo, "--advantage", "group", "--samples-per-prompt", "2", "--batch-size", "4",
             "--minibatch-size", "4", "--epochs", "2", "--reward-model", "train_fixtures:parity_reward",
             "--kernel-backend", backend, "--kl-loss-coef", "0.1", "--lr", "1e-2")
    cfg = cfg_for(tiny, tmp_path / "run", *extra)
    assert X.on_policy(cfg, 8, D.Dist())
    assert not X.on_policy(cfg_for(tiny, tmp_path / "run", *extra, "--minibatch-size", "2"), 8, D.Dist())
    got = {}
    for separate in (False, True):
        if separate:
            monkeypatch.setattr(X, "on_policy", lambda *a: False)
        cfg, d, m = _models(tiny, tmp_path, *extra)
        prompts = [q for q in L.load_prompts(cfg.dataset, "train", "prompt")[:4] for _ in range(2)]
        torch.manual_seed(5)
        b = experience(m, cfg, d, prompts)[1]
        assert (b.logp_old is None) != separate and (b.entropy is None) != separate
        params = [p for p in m.policy.parameters() if p.requires_grad]
        init = torch.cat([p.detach().flatten() for p in params])
        opt = torch.optim.SGD(params, lr=cfg.lr)
        stats, b = A.update(m, b, cfg, d, opt, params, torch.Generator().manual_seed(0))
        got[separate] = (torch.cat([p.detach().flatten() for p in params]), stats, X.iteration_metrics(b, cfg, d),
                         b.logp_old)
    (p1, s1, m1, lp1), (p2, s2, m2, lp2) = got[False], got[True]
    torch.testing.assert_close(lp1, lp2, atol=1e-5, rtol=0)
    step = float((p2 - init).abs().max())
    assert step > 1e-3 and float((p1 - p2).abs().max()) <= 1e-5 * step
    for k in ("loss", "policy_loss"):
        assert s1[k] == pytest.approx(s2[k], rel=1e-5, abs=1e-7), k
    for k in ("kl", "kl_sqrt_k3", "entropy", "reward_mean"):
        assert m1[k] == pytest.approx(m2[k], rel=1e-5, abs=1e-6), k


@pytest.mark.parametrize("extra", [("--critic", "separate"), ("--critic", "shared"),
                                   ("--algo", "grpo", "--advantage", "group", "--samples-per-prompt", "2",
                                    "--kl-loss-coef", "0.1", "--reward-model", "train_fixtures:parity_reward")],
                         ids=["apa-separate-critic", "apa-shared-critic", "grpo-on-policy"])
def test_micro_batches_give_the_same_step(tiny, tmp_path, extra):
    """Gradient accumulation over micro-batches of --micro-batch-tokens: the same parameters (policy and critic),
    losses and, on-policy, the same behaviour log-probs and entropy as one pass over each minibatch."""
    extra = (*extra, "--batch-size", "4", "--minibatch-size", "4", "--epochs", "2", "--lr", "1e-2", "--max-grad-norm", "0")
    got = {}
    for tokens in (0, 1):  # one pass; one sequence per micro-batch (any budget below one sequence's length)
        cfg, d, m = _models(tiny, tmp_path, *extra, "--micro-batch-tokens", str(tokens))
        n = 4 * cfg.samples_per_prompt
        prompts = [q for q in L.load_prompts(cfg.dataset, "train", "prompt")[:4] for _ in range(cfg.samples_per_prompt)]
        torch.manual_seed(5)
        b = experience(m, cfg, d, prompts)[1]
        assert b.batch.input_ids.shape[0] == n
        params = [p for mod in (m.policy, m.critic) if mod is not None for p in mod.parameters() if p.requires_grad]
        init = torch.cat([p.detach().flatten() for p in params])
        opt = torch.optim.SGD(params, lr=cfg.lr)
        stats, b = A.update(m, b, cfg, d, opt, params, torch.Generator().manual_seed(0))
        got[tokens] = (torch.cat([p.detach().flatten() for p in params]), stats, b.logp_old, b.entropy)
    (p1, s1, lp1, e1), (p2, s2, lp2, e2) = got[0], got[1]
    step = float((p1 - init).abs().max())
    assert step > 1e-3 and float((p1 - p2).abs().max()) <= 1e-5 * step
    for k in ("loss", "policy_loss", "value_loss"):
        assert s1[k] == pytest.approx(s2[k], rel=1e-5, abs=1e-7), k
    torch.testing.assert_close(lp1, lp2, atol=1e-6, rtol=0)
    torch.testing.assert_close(e1, e2, atol=1e-6, rtol=0)


def test_nan_rewards_are_reported_and_left_out(tiny, tmp_path, capsys):
    cfg, d, m = _models(tiny, tmp_path, "--reward-model", "train_fixtures:nan_reward")
    prompts = L.load_prompts(cfg.dataset, "train", "prompt")[:8]
    ro = RO.rollout(m, prompts, cfg, d)
    scores = RO.score(m.reward, ro, d, print)
    assert int((~torch.isfinite(scores)).sum()) == 4
    assert "not a finite number for 4/8 samples" in capsys.readouterr().out
    b = X.make_experience(m, ro, scores, scores, cfg, 0.05, d)
    assert not b.mask[1::2].any() and b.mask[0::2].any()
    assert torch.isfinite(b.rewards).all() and torch.isfinite(b.advantages).all()
    assert (b.advantages[1::2] == 0).all()


@pytest.mark.parametrize("extra", [(), ("--algo", "grpo", "--samples-per-prompt", "2", "--kl-loss-coef", "0.1",
                                         "--reward-model", "train_fixtures:parity_reward"),
                                   ("--micro-batch-tokens", "1")],
                         ids=["apa-gae", "grpo-groups", "apa-gae-micro-batches"])
def test_one_to_two_ranks_same_parameters(tiny, tmp_path, extra):
    outs = {}
    for n in (1, 2):
        f = tmp_path / f"w{n}.pt"
        p = run_trainer(["one-update", str(tiny), str(f), *extra], nproc=n,
                        entry=(str(REPO / "tests" / "train_fixtures.py"),))
        assert p.returncode == 0, p.stderr[-3000:]
        outs[n] = torch.load(f, weights_only=True)
    a, b = outs[1], outs[2]
    assert set(a) == set(b)
    from safetensors.torch import load_file

    init = load_file(str(tiny / "model.safetensors"))
    step = max((a["policy.lm." + k] - v).abs().max().item() for k, v in init.items())
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"1 vs 2 ranks: max |param diff| {diff:.3g} (largest update {step:.3g})")
    assert step > 1e-2
    assert diff <= 1e-5 * step


_rows = metric_rows


def test_end_to_end_kill_resume_and_export(tiny, tmp_path):
    """One run of 4 iterations; another stopped after 2 and resumed: identical metrics. The export loads."""
    full, part = tmp_path / "full", tmp_path / "part"
    p = run_trainer(tiny_args(tiny, full, "--steps", "4", "--save-every", "2", "--eval-every", "2"))
    assert p.returncode == 0, p.stderr[-3000:]
    p = run_trainer(tiny_args(tiny, part, "--steps", "4", "--save-every", "2", "--stop-after", "3"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert len(_rows(part)) == 3  # ran past its last checkpoint (step 2), as a kill would
    # a checkpoint being written when the process died: a temp dir that must never be loaded
    (part / "checkpoints" / "step_000004.tmp-999").mkdir()
    p = run_trainer(["--resume", str(part)])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stdout and "step_000002" in p.stdout
    a, b = _rows(full), _rows(part)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert a == b
    row = a[0]
    for k in ("step", "reward_mean", "kl", "kl_sqrt_k3", "loss", "entropy"):
        assert k in row and math.isfinite(row[k])
    first = json.loads((full / "metrics.jsonl").read_text().splitlines()[0])
    phases = [first[f"time_{k}"] for k in ("rollout", "score", "experience", "update")]
    assert "tokens_per_s" in first and all(x > 0 for x in phases) and sum(phases) <= first["iter_s"] * 1.0001
    rows = [json.loads(ln) for ln in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "logp_mismatch" in r] == [2, 4]  # each evaluation
    assert all(0 <= r["logp_mismatch"] < 1e-4 for r in rows if "logp_mismatch" in r)
    assert first["time_checkpoint"] == 0 and json.loads((full / "metrics.jsonl").read_text().splitlines()[2])["time_checkpoint"] > 0
    assert (full / "plot.png").stat().st_size > 1000
    assert (full / "samples.jsonl").exists()
    # the export: safetensors, loadable as a plain causal LM, equal to the trained policy
    from transformers import AutoModelForCausalLM, GPTJForCausalLM

    final = full / "final"
    assert (final / "model.safetensors").exists()
    lm = AutoModelForCausalLM.from_pretrained(final)
    assert isinstance(lm, GPTJForCausalLM) and type(lm.lm_head) is torch.nn.Linear
    init = AutoModelForCausalLM.from_pretrained(tiny)
    assert not torch.equal(lm.lm_head.weight, init.lm_head.weight)  # trained
    ids = torch.tensor([[5, 6, 13, 7, 14]])
    assert torch.isfinite(lm(ids).logits).all()


def test_sigkill_then_resume_equals_uninterrupted(tiny, tmp_path):
    """A real SIGKILL at an arbitrary moment after the first checkpoint; --resume gives the same metrics."""
    import signal
    import subprocess
    import sys
    import time

    from train_fixtures import env

    args = ["--steps", "16", "--save-every", "3", "--no-export", "--no-plot"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    p = run_trainer(tiny_args(tiny, full, *args))
    assert p.returncode == 0, p.stderr[-3000:]
    proc = subprocess.Popen([sys.executable, "-m", "train.run", *tiny_args(tiny, killed, *args)], cwd=REPO, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = killed / "metrics.jsonl"
    t0 = time.time()
    while time.time() - t0 < 90:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 7:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_before = len(metrics.read_text().splitlines())
    assert 7 <= n_before < 16, "the kill should land mid-run"
    p = run_trainer(["--resume", str(killed)])
    assert p.returncode == 0, p.stderr[-3000:]
    assert _rows(killed) == _rows(full)


def test_two_ranks_fsdp_resume_equals_uninterrupted(tiny, tmp_path):
    """torchrun, 2 processes (FSDP2 + gloo): a run stopped after 3 iterations and resumed from its DCP checkpoint
    at step 2 logs the same metrics as an uninterrupted run."""
    args = ["--steps", "4", "--save-every", "2", "--no-export", "--no-plot"]
    full, part = tmp_path / "full", tmp_path / "part"
    for out, extra in ((full, []), (part, ["--stop-after", "3"])):
        p = run_trainer(tiny_args(tiny, out, *args, *extra), nproc=2)
        assert p.returncode == 0, p.stderr[-3000:]
    p = run_trainer(["--resume", str(part)], nproc=2)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "2 process(es)" in p.stdout and "resumed from" in p.stdout
    assert _rows(part) == _rows(full) and len(_rows(full)) == 4


def test_critic_free_resume_equals_uninterrupted_and_holds_no_critic(tiny, tmp_path):
    """--critic none with group advantages (APA and GRPO): no critic is built or checkpointed, and a run
    stopped after 3 iterations and resumed from step 2 logs what an uninterrupted one does."""
    from torch.distributed.checkpoint import FileSystemReader

    for algo in ("apa", "grpo"):
        args = ["--algo", algo, "--advantage", "group", "--critic", "none", "--samples-per-prompt", "2", "--steps", "4",
                "--save-every", "2", "--no-export", "--no-plot"]
        full, part = tmp_path / f"{algo}-full", tmp_path / f"{algo}-part"
        for out, extra in ((full, []), (part, ["--stop-after", "3"])):
            p = run_trainer(tiny_args(tiny, out, *args, *extra))
            assert p.returncode == 0, p.stderr[-3000:]
        p = run_trainer(["--resume", str(part)])
        assert p.returncode == 0, p.stderr[-3000:]
        assert _rows(part) == _rows(full) and len(_rows(full)) == 4
        assert all(r["sequences"] == 16 and 0 <= r["group_zero_std_frac"] <= 1 for r in _rows(full))
        keys = FileSystemReader(str(full / "checkpoints" / "step_000004")).read_metadata().state_dict_metadata
        assert any(k.startswith("app.model.policy.") for k in keys)
        assert not any("critic" in k for k in keys), [k for k in keys if "critic" in k][:3]
