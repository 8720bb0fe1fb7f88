"""Loading models, tokenizers and prompt datasets, with one clear line when something cannot be loaded."""

from __future__ import annotations

import functools
import importlib
import os
import socket
from collections.abc import Sequence
from pathlib import Path

from .config import BUILT
from .errors import LoadError


@functools.lru_cache(maxsize=1)
def hub_reachable() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        return False


def _cached(repo: str, filename: str, repo_type: str = "model") -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo, filename, repo_type=repo_type), str)
    except Exception:
        return False


def check_model_source(name: str, what: str = "model", size_hint: str = "") -> None:
    """Fail fast (no 30 s of retries) when ``name`` is neither a local path, nor cached, nor reachable."""
    if Path(name).exists():
        return
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise LoadError(f"cannot load {what} {name!r}: no such local path; pass an existing directory or a Hugging Face id")
    if _cached(name, "config.json") or hub_reachable():
        return
    raise LoadError(
        f"cannot load {what} {name!r}: it is not in the Hugging Face cache and huggingface.co is unreachable; "
        f"download it while online with `huggingface-cli download {name}`{size_hint}, or pass a local directory"
    )


def from_pretrained_with_attn(auto_cls, name: str, attn: str | Sequence[str], **kw):
    """``auto_cls.from_pretrained(name, attn_implementation=a, **kw)`` with the first ``a`` of ``attn`` the model takes.

    transformers refuses an attention implementation that the model class lacks (or whose package is missing)
    with a ValueError (ImportError) while building the model, before it reads weights, so trying the next one is
    cheap; the error of the last one propagates."""
    choices = (attn,) if isinstance(attn, str) else tuple(attn)
    for i, a in enumerate(choices):
        try:
            return auto_cls.from_pretrained(name, attn_implementation=a, **kw)
        except (ValueError, ImportError):
            if i == len(choices) - 1:
                raise
    raise ValueError("no attention implementation to try")


def load_causal_lm(name: str, *, dtype, attn: str | Sequence[str], trust_remote_code: bool, what: str = "policy"):
    """A causal LM with the first attention implementation of ``attn`` (a name, or names best first) it supports."""
    from transformers import AutoModelForCausalLM

    check_model_source(name, what)
    try:
        return from_pretrained_with_attn(AutoModelForCausalLM, name, attn, dtype=dtype,
                                         trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - turned into one line for the user
        raise LoadError(f"cannot load {what} {name!r} as a causal LM: {first_line(e)}") from None


def load_base_model(name: str, *, dtype, attn: str | Sequence[str], trust_remote_code: bool):
    """The transformer without its LM head (the critic's body)."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the LM head's weights are unused here on purpose: no load report
    try:
        return from_pretrained_with_attn(AutoModel, name, attn, dtype=dtype, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001
        raise LoadError(f"cannot load the critic's body from {name!r}: {first_line(e)}") from None
    finally:
        hf_logging.set_verbosity(level)


def load_tokenizer(name: str, *, trust_remote_code: bool, what: str = "tokenizer"):
    from transformers import AutoTokenizer

    check_model_source(name, what)
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001
        raise LoadError(f"cannot load the tokenizer of {name!r}: {first_line(e)}") from None
    if not tok.vocab_size:  # transformers builds an empty tokenizer where the files are missing: no silent zeros
        raise LoadError(f"cannot load the tokenizer of {name!r}: no tokenizer files there (its vocabulary is empty)")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = tok.truncation_side = "left"  # prompts: left-padded, and truncated from the left
    return tok


def import_object(spec: str, what: str):
    """The object ``module:name`` names; one line naming ``what`` when it cannot be imported."""
    mod, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as e:
        raise LoadError(f"cannot load {what} {spec!r}: {first_line(e)}") from None


def resolve_source(spec: str, cfg, d, log, gguf_file: str = "") -> str:
    """What the loaders read for a ``--model`` / ``--reward-model`` value: a model that a task builds and caches on
    first use (``config.BUILT``), a GGUF file or preset dequantized once into a cached checkpoint (``train.gguf``),
    or the value itself. Built and cached on the main process first."""
    from . import gguf

    if spec in BUILT:
        build = import_object(BUILT[spec], "the builder of")
        return str(d.main_first(lambda: build(cfg.cache_dir or None, log=log)))
    if gguf.is_gguf_spec(spec, gguf_file):
        return str(d.main_first(lambda: gguf.resolve_model(spec, gguf_file or None, cfg.cache_dir or None, log=log)))
    return spec


def first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return f"{type(e).__name__}: {s[0] if s else ''}"


def _text_lines(path: str) -> list[str]:
    """The lines of a text file (UTF-8); an undecodable byte, or a file with no non-blank line, is refused in one line
    naming the file and the line."""
    lines = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                lines.append(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise LoadError(f"{path}: line {lineno} is not UTF-8 text (byte {raw[e.start]:#04x} at column "
                                f"{e.start + 1}); save the file as UTF-8") from None
    if not any(ln.strip() for ln in lines):
        raise LoadError(f"{path}: no rows ({'only blank lines' if lines else 'the file is empty'}); it needs one prompt "
                        f"per line")
    return lines


def _check_json_lines(path: str, column: str) -> None:
    """Name the first malformed row of a JSON-lines file (``datasets`` does not)."""
    import json

    lines = _text_lines(path)
    if lines[0].lstrip("\ufeff").lstrip().startswith("["):  # a JSON array, not JSON lines: leave it to datasets
        return
    row = 0
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise LoadError(f"{path}: row {row} (line {lineno}) is not valid JSON ({e.msg}); fix or remove it") from None
        if isinstance(obj, dict) and column not in obj:
            raise LoadError(f"{path}: row {row} (line {lineno}) has no {column!r} field (it has {sorted(obj)}); "
                            f"fix the row or pass --prompt-column")
        got = obj.get(column) if isinstance(obj, dict) else obj
        if not isinstance(obj, dict) or not is_prompt(got):
            raise LoadError(f"{path}: row {row} (line {lineno}) has {column!r} = {got!r}; expected {PROMPT_FORM}")
        row += 1


PROMPT_FORM = "a non-empty string, or a non-empty list of {\"role\": str, \"content\": str} messages (a chat)"
Prompt = str | list  # a plain string, or a chat: a list of {"role", "content"} messages


def is_prompt(p) -> bool:
    """A non-empty string, or a non-empty list of messages each with a string role and string content."""
    if isinstance(p, str):
        return bool(p.strip())
    return isinstance(p, list) and len(p) > 0 and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in p)


def as_messages(p: Prompt) -> list[dict] | None:
    """A chat prompt's messages as plain {role, content} dicts (``datasets`` may add other keys); None for a string."""
    return None if isinstance(p, str) else [{"role": m["role"], "content": m["content"]} for m in p]


def render_prompt(p: Prompt, tokenizer) -> str:
    """The text the policy is prompted with: a string as it is; a chat rendered with the tokenizer's chat template
    and the assistant's turn opened (``apply_chat_template(..., add_generation_prompt=True, tokenize=False)``)."""
    if isinstance(p, str):
        return p
    return tokenizer.apply_chat_template(as_messages(p), add_generation_prompt=True, tokenize=False)


def check_chat_prompts(prompts: list[Prompt], tokenizer, model: str, column: str) -> None:
    """Chat prompts need a tokenizer with a chat template: refused in one line when it has none."""
    if any(not isinstance(p, str) for p in prompts) and not getattr(tokenizer, "chat_template", None):
        raise LoadError(f"--prompt-column {column!r} holds chat messages but the tokenizer of --model {model!r} has no "
                        "chat template; use a chat model's tokenizer (or set tokenizer.chat_template and save it "
                        "there), or plain-string prompts")


def load_prompts(dataset: str, split: str, column: str) -> list[Prompt]:
    """Prompts as a list of strings or chats (lists of {role, content} messages), loaded through ``datasets``; a
    malformed row is named."""
    import datasets

    datasets.disable_progress_bars()
    try:
        if Path(dataset).is_file():
            ext = Path(dataset).suffix.lstrip(".")
            if ext in ("jsonl", "json"):
                _check_json_lines(dataset, column)
            elif ext in ("csv", "txt"):
                _text_lines(dataset)
            ext = {"jsonl": "json", "txt": "text"}.get(ext, ext)
            if ext not in ("json", "csv", "parquet", "text"):
                raise LoadError(f"cannot read prompts from {dataset!r}: use a .jsonl/.json/.csv/.parquet file")
            ds = datasets.load_dataset(ext, data_files=dataset, split="train")
        else:
            if not Path(dataset).exists() and not hub_reachable() and not _cached(dataset, "README.md", "dataset"):
                raise LoadError(
                    f"cannot load dataset {dataset!r}: no such local path and huggingface.co is unreachable; download "
                    f"it while online (huggingface-cli download --repo-type dataset {dataset}) or pass a local "
                    f".jsonl with a {column!r} column"
                )
            ds = datasets.load_dataset(dataset, split=split)
    except LoadError:
        raise
    except Exception as e:  # noqa: BLE001
        raise LoadError(f"cannot load dataset {dataset!r} (split {split!r}): {first_line(e)}") from None
    if column not in ds.column_names:
        raise LoadError(f"dataset {dataset!r} has no {column!r} column (columns: {ds.column_names}); "
                        f"pass --prompt-column")
    prompts = []
    for i, p in enumerate(ds[column]):
        if not is_prompt(p):
            raise LoadError(f"dataset {dataset!r}: row {i} has {column!r} = {p!r}; expected {PROMPT_FORM}")
        prompts.append(p)
    if not prompts:
        raise LoadError(f"dataset {dataset!r} (split {split!r}) has no rows")
    return prompts
