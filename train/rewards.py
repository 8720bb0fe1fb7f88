"""Rewards: Python functions, HF sequence-classification models, and the paper's raw GPT-J reward checkpoint.

Every reward maps ``(prompts, completions, messages)`` to one float per sample: ``prompts`` are the texts the
policy saw, ``messages`` each chat prompt's original messages (None for a plain-string prompt; the whole argument
may be None). A ``module:function`` reward is called as ``function(prompts, completions)``. Non-numbers and NaN are
kept as NaN here; the trainer reports them and drops those samples from the loss (``score`` in ``rollout.py``);
any other answer (None, a scalar, another length or shape) is refused in one line (``as_scores``).

The paper's reward model (``Dahoas/gptj-rm-static``) is not a transformers checkpoint: it is a raw
``torch.save``d state dict of a GPT-J ``transformer`` (keys ``transformer.*``) plus a bias-free
``v_head = Linear(n_embd, 1)``. The text is scored with an EOS appended. Where the score is read
(``--gptj-reward-at``):

- ``before_eos`` (default): the head's output at the last token before the first EOS, as the authors'
  reward-model *training* code reads it (``c_ind = first index of PAD(=EOS); score = rewards[c_ind - 1]``),
  so the model is queried where it was trained;
- ``eos``: at the first EOS itself, as the reward function of the authors' RL scripts reads it
  (``examples/apa_hh.py`` / ``sppo_hh.py``: ``argmax(input_ids == eos)``).

``convert_gptj_reward_checkpoint`` loads it (``weights_only=True``) through transformers' public loading
path (``GPTJModel.from_pretrained(None, config=..., state_dict=...)``: built on the meta device, no random
initialisation of the 6B weights, non-persistent buffers set by transformers itself) plus a plain
``nn.Linear`` head.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path

import torch
from torch import Tensor, nn

from .loading import check_model_source, first_line, hub_reachable, import_object, load_tokenizer
from .errors import LoadError


class FunctionReward:
    """``module:function`` taking ``(prompts, completions)`` and returning a list of numbers."""

    def __init__(self, spec: str):
        self.fn = import_object(spec, "reward function")
        self.name = spec

    def __call__(self, prompts: list[str], completions: list[str], messages: list | None = None) -> list[float]:
        return as_scores(self.fn(prompts, completions), len(completions), f"the reward {self.name}")


def _as_float(x) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return math.nan
    return v


def _short(x, n: int = 80) -> str:
    r = repr(x)
    return r if len(r) <= n else r[: n - 3] + "..."


def as_scores(raw, n: int, name: str) -> list[float]:
    """A reward's answer for ``n`` completions as ``n`` floats: a sequence (or a (n,) / (n, 1) array or tensor, or a
    list of one-element lists) of numbers; an element that is not a number becomes NaN (the trainer reports it and
    leaves the sample out). Anything else (None, a scalar, a string, a dict, another length or shape) is refused in
    one line naming ``name``, what it returned and what was expected."""
    expected = f"expected a list of {n} numbers, one per completion"
    if hasattr(raw, "shape") and hasattr(raw, "tolist"):  # a tensor or an array (numpy, jax, ...)
        shape = tuple(raw.shape)
        if shape not in ((n,), (n, 1)):
            raise LoadError(f"{name} returned a {type(raw).__name__} of shape {shape}; {expected} (shape ({n},) or "
                            f"({n}, 1))")
        vals = raw.reshape(-1).tolist()
    elif raw is None or isinstance(raw, (str, bytes, dict, int, float, complex)) or not hasattr(raw, "__iter__"):
        raise LoadError(f"{name} returned {_short(raw)} ({type(raw).__name__}); {expected}")
    else:
        vals = list(raw)
        if len(vals) != n:
            raise LoadError(f"{name} returned {len(vals)} scores for {n} completions; {expected}")
        if vals and all(isinstance(v, (list, tuple)) and len(v) == 1 for v in vals):  # (n, 1) as nested lists
            vals = [v[0] for v in vals]
    return [_as_float(x) for x in vals]


class RewardTimeout(TimeoutError):
    """A reward that did not answer within ``--reward-timeout`` seconds."""


def call_reward(reward, prompts: list[str], completions: list[str], messages: list | None, timeout: float,
                name: str) -> list[float]:
    """``reward(prompts, completions, messages)`` checked by ``as_scores``. With ``timeout`` > 0 it runs in a daemon
    thread and ``RewardTimeout`` is raised after ``timeout`` seconds: a hung reward cannot keep the process alive."""
    if timeout <= 0:
        return as_scores(reward(prompts, completions, messages), len(completions), name)
    box: dict = {}
    device = torch.cuda.current_device() if torch.cuda.is_available() else None
    grad = torch.is_grad_enabled()

    def target() -> None:
        try:
            if device is not None:  # the current CUDA device and grad mode are per thread: the caller's
                torch.cuda.set_device(device)
            with torch.set_grad_enabled(grad):
                box["out"] = reward(prompts, completions, messages)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["err"] = e

    t = threading.Thread(target=target, name="reward", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        HUNG.append(name)
        raise RewardTimeout(f"{name} did not answer within --reward-timeout {timeout:g} s")
    if "err" in box:
        raise box["err"]
    return as_scores(box["out"], len(completions), name)


HUNG: list[str] = []  # rewards still running in a daemon thread after their timeout (the process then ends hard)


class HFRewardModel:
    """An ``AutoModelForSequenceClassification`` reward model reading text through its own tokenizer, never the
    policy's token ids: a chat prompt's messages plus ``{"role": "assistant", "content": completion}`` rendered with
    the reward model's own chat template, or ``prompt + completion`` (the text the policy saw) when the prompt is a
    plain string or the reward tokenizer has no template."""

    def __init__(self, name: str, device, dtype, trust_remote_code: bool):
        from transformers import AutoModelForSequenceClassification

        check_model_source(name, "reward model")
        try:
            self.model = AutoModelForSequenceClassification.from_pretrained(
                name, dtype=dtype, num_labels=1, trust_remote_code=trust_remote_code
            ).to(device).eval()
        except Exception as e:  # noqa: BLE001
            raise LoadError(f"cannot load reward model {name!r} as sequence classification: {first_line(e)}") from None
        try:
            self.tok = load_tokenizer(name, trust_remote_code=trust_remote_code, what="reward tokenizer")
        except LoadError as e:
            raise LoadError(f"--reward-model {name!r}: {e}; the reward model reads text with its own tokenizer, so save "
                            "it beside the model (tokenizer.save_pretrained(DIR))") from None
        self.tok.padding_side = "right"
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tok.pad_token_id
        self.device, self.name = device, name

    def texts(self, prompts: list[str], completions: list[str], messages: list | None = None) -> list[tuple[str, bool]]:
        """What the reward model reads for each sample, and whether that text came from its chat template (which
        holds its own special tokens, so none are added when tokenising)."""
        out = []
        for i, (p, c) in enumerate(zip(prompts, completions)):
            msgs = messages[i] if messages is not None else None
            if msgs is not None and getattr(self.tok, "chat_template", None):
                conv = [*msgs, {"role": "assistant", "content": c}]
                out.append((self.tok.apply_chat_template(conv, tokenize=False), True))
            else:
                out.append((p + c, False))
        return out

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str], messages: list | None = None) -> list[float]:
        ids = [self.tok(t, add_special_tokens=not templated, truncation=True)["input_ids"]
               for t, templated in self.texts(prompts, completions, messages)]
        enc = self.tok.pad({"input_ids": ids}, return_tensors="pt").to(self.device)
        return self.model(**enc).logits[:, 0].float().cpu().tolist()


GPTJ_REWARD_AT = ("before_eos", "eos")


class GPTJRewardModel(nn.Module):
    """The APA authors' GPT-J reward model: a GPT-J transformer and a bias-free scalar head, read at the first EOS
    (``read_at="eos"``) or at the token before it (``"before_eos"``, the default)."""

    def __init__(self, transformer: nn.Module, v_head: nn.Linear, read_at: str = "before_eos"):
        super().__init__()
        if read_at not in GPTJ_REWARD_AT:
            raise ValueError(f"read_at must be one of {GPTJ_REWARD_AT}, got {read_at!r}")
        self.transformer, self.v_head, self.read_at = transformer, v_head, read_at

    def forward(self, input_ids: Tensor, attention_mask: Tensor, eos_token_id: int) -> Tensor:
        """Right-padded ``input_ids`` that end with an EOS: the score at the first EOS, or the token before it
        (the authors' ``rewards[c_ind - 1]``); the last token when a row has no EOS."""
        h = self.transformer(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        r = self.v_head(h).squeeze(-1)
        is_eos = (input_ids == eos_token_id) & attention_mask.bool()
        T = input_ids.shape[1]
        last = attention_mask.long().sum(-1) - 1
        shift = 1 if self.read_at == "before_eos" else 0
        end = torch.where(is_eos.any(-1), is_eos.float().argmax(-1) - shift, last)
        return r.gather(1, end.clamp(0, T - 1).unsqueeze(1)).squeeze(1).float()


def find_raw_checkpoint(name: str) -> Path | None:
    """The raw state-dict file for ``name``: a file, a dir holding one .pt/.bin, or a cached/downloadable Hub repo."""
    p = Path(name)
    if p.is_file():
        return p
    if p.is_dir():
        if (p / "config.json").exists() and any(p.glob("*.safetensors")):
            return None  # an ordinary transformers checkpoint
        cands = sorted(list(p.glob("*.pt")) + list(p.glob("*.bin")))
        return cands[0] if len(cands) == 1 else None
    if name == "Dahoas/gptj-rm-static":
        try:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(name, "hf_ckpt.pt", local_files_only=not hub_reachable()))
        except Exception:  # noqa: BLE001
            raise LoadError(
                f"cannot load reward model {name!r}: its raw checkpoint hf_ckpt.pt is not in the Hugging Face cache "
                f"and huggingface.co is unreachable; download it while online (huggingface-cli download {name} "
                f"hf_ckpt.pt, 24 GB) or pass --reward-model /path/to/hf_ckpt.pt"
            ) from None
    return None


def convert_gptj_reward_checkpoint(path: str | Path, config, *, dtype: torch.dtype | None = None,
                                   read_at: str = "before_eos") -> GPTJRewardModel:
    """Load the raw GPT-J reward state dict (``transformer.*`` + ``v_head.weight``) into ``GPTJRewardModel``.

    The body goes through ``GPTJModel.from_pretrained(None, config=config, state_dict=...)``: transformers builds
    it on the meta device and fills it from the (memory-mapped) state dict, cast to ``dtype`` tensor by tensor, so
    the 24 GB checkpoint is never copied into a randomly initialised model."""
    from transformers import GPTJModel
    from transformers.utils import logging as hf_logging

    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001
        raise LoadError(f"cannot read reward checkpoint {str(path)!r} (torch.load, weights_only=True): {first_line(e)}") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    sd = {k.removeprefix("module.").removeprefix("model."): v for k, v in sd.items()}
    if "v_head.weight" not in sd or not any(k.startswith("transformer.") for k in sd):
        raise LoadError(f"{str(path)!r} is not a GPT-J reward checkpoint: expected keys transformer.* and v_head.weight")
    old_buffers = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers that older transformers saved
    body = {k.removeprefix("transformer."): v for k, v in sd.items()
            if k.startswith("transformer.") and not k.endswith(old_buffers)}
    unexpected = [k for k in sd if not k.startswith("transformer.") and k != "v_head.weight"]
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a misfit is reported below in one line, not as transformers' load table
    try:
        transformer, info = GPTJModel.from_pretrained(None, config=config, state_dict=body, dtype=dtype,
                                                      output_loading_info=True)
    except Exception as e:  # noqa: BLE001 - e.g. a shape that does not fit this config
        raise LoadError(f"{str(path)!r} does not fit a GPT-J of this config: {first_line(e)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = sorted(f"transformer.{k}" for k in info["missing_keys"])  # named as in the checkpoint
    unexpected += sorted(f"transformer.{k}" for k in info["unexpected_keys"])
    if missing or unexpected or info["mismatched_keys"]:
        raise LoadError(f"{str(path)!r} does not fit a GPT-J of this config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    v_head = nn.Linear(config.n_embd, 1, bias=False, dtype=dtype)
    try:
        v_head.load_state_dict({"weight": sd["v_head.weight"]})
    except RuntimeError as e:
        raise LoadError(f"{str(path)!r} does not fit a GPT-J of this config: v_head.weight: {first_line(e)}") from None
    return GPTJRewardModel(transformer, v_head, read_at).eval()


class GPTJRawReward:
    """Scores ``prompt + completion + EOS`` with a converted GPT-J reward checkpoint."""

    def __init__(self, path: Path, config, tokenizer, device, dtype, read_at: str = "before_eos"):
        self.model = convert_gptj_reward_checkpoint(path, config, dtype=dtype, read_at=read_at).to(device)
        self.model.requires_grad_(False)
        self.tok, self.device, self.name = tokenizer, device, str(path)

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str], messages: list | None = None) -> list[float]:
        eos = self.tok.eos_token  # the policy's tokenizer (the GPT-J setup shares it): plain text, no template
        texts = [p + c + eos for p, c in zip(prompts, completions)]
        side = self.tok.padding_side
        self.tok.padding_side = "right"
        try:
            enc = self.tok(texts, padding=True, return_tensors="pt", add_special_tokens=False).to(self.device)
        finally:
            self.tok.padding_side = side
        return self.model(enc["input_ids"], enc["attention_mask"], self.tok.eos_token_id).cpu().tolist()


def load_reward(spec: str, *, policy_config, tokenizer, device, dtype, trust_remote_code: bool,
                gptj_reward_at: str = "before_eos"):
    """A callable ``(prompts, completions, messages=None) -> list[float]`` from ``--reward-model``; ``gptj_reward_at`` is where a
    raw GPT-J reward checkpoint is read (``before_eos`` or ``eos``, see the module docstring)."""
    if ":" in spec and not Path(spec).exists() and "/" not in spec.partition(":")[0]:
        return FunctionReward(spec)
    raw = find_raw_checkpoint(spec)
    if raw is not None:
        if getattr(policy_config, "model_type", None) != "gptj":
            raise LoadError(f"the raw GPT-J reward checkpoint {spec!r} needs a GPT-J config; use a GPT-J policy")
        return GPTJRawReward(raw, policy_config, tokenizer, device, dtype, read_at=gptj_reward_at)
    return HFRewardModel(spec, device, dtype, trust_remote_code)


class RewardScaler:
    """Scores divided by their running std (the authors' 'running' mode), then clipped; a Stateful."""

    def __init__(self, mode: str = "none", clip: float = 0.0):
        self.mode, self.clip = mode, clip
        self.count, self.mean, self.m2 = 0.0, 0.0, 0.0

    def update(self, scores: Tensor) -> None:
        """Fold the finite scores of the whole (all-rank) batch into the running moments."""
        if scores.numel() == 0:
            return
        x = scores.double()
        n, mean = float(x.numel()), float(x.mean())
        m2 = float(((x - mean) ** 2).sum())
        tot = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / tot
        self.m2 += m2 + delta**2 * self.count * n / tot
        self.count = tot

    def __call__(self, scores: Tensor) -> Tensor:
        """Scaled (and clipped) scores; NaN stays NaN."""
        if self.mode == "running" and self.count > 1:
            scores = scores / max(math.sqrt(self.m2 / (self.count - 1)), 1e-8)
        if self.clip > 0:
            scores = scores.clamp(-self.clip, self.clip)
        return scores

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, sd: dict) -> None:
        self.count, self.mean, self.m2 = float(sd["count"]), float(sd["mean"]), float(sd["m2"])
