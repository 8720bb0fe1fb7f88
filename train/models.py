"""Models: the policy scored explicitly from its final hidden states, the critic, and how to build, freeze
and shard them.

``Policy`` wraps a transformers causal LM the way nanoGPT's model reads: ``forward(...)`` runs the
transformer body, takes the final hidden states of the response positions, and calls apa_fast's fused
op with the LM head's weight (log-probs and entropy, or a per-token loss with its gradient formed in the
same pass): the (tokens x vocabulary) logits are never built. Under FSDP2 the policy is the root unit,
so its forward gathers the head's weight as for any forward; ``generate`` is registered as a forward
method so that sampling sees whole weights too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

import apa_fast

from .activations import fuse_layers
from .errors import LoadError
from .lora import add_lora, fuse_lora
from .loading import load_base_model, load_causal_lm, load_tokenizer, resolve_source
from .records import Batch
from .rewards import load_reward
from .sampling import head_logits, sample


@dataclass(frozen=True)
class Head:
    """The LM head as apa_fast's fused ops take it: ``logits = c tanh((h W^T + b) / c) / temperature`` (no tanh
    when ``softcap`` is None), on the apa_fast ``backend`` (``reference``: eager PyTorch, the logits built)."""

    weight: Tensor  # (V, H)
    bias: Tensor | None  # (V,)
    temperature: float
    softcap: float | None
    backend: str

    @property
    def kw(self) -> dict:
        """The keyword arguments of ``apa_fast.linear_token_logprobs`` / ``linear_token_loss`` besides h, W, labels."""
        return dict(bias=self.bias, temperature=self.temperature, softcap=self.softcap, backend=self.backend)

    def logprobs(self, h: Tensor, tokens: Tensor, mask: Tensor, entropy: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """``log pi(y_t)`` of ``tokens`` (and the entropy) where ``mask``, 0 elsewhere; masked rows are skipped."""
        return apa_fast.linear_token_logprobs(h, self.weight, tokens.masked_fill(~mask, -100), return_entropy=entropy,
                                              **self.kw)


@dataclass(frozen=True)
class PolicyOut:
    """One policy forward: the final hidden states of the R positions that predict the response, the head that
    turns them into log-probs, and the shared value head's values (or None)."""

    hidden: Tensor  # (B, R, H)
    head: Head
    values: Tensor | None = None  # (B, R)


class ValueHead(nn.Module):
    """Scalar value per position; zero-initialised so the first values are 0."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.v_head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.v_head.weight)
        nn.init.zeros_(self.v_head.bias)

    def forward(self, h: Tensor) -> Tensor:
        return self.v_head(h).squeeze(-1).float()


def _final_hidden(body: nn.Module, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
    out = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _response_hidden(body: nn.Module, b: Batch) -> Tensor:
    """The final hidden states of the positions ``P-1 .. P+R-2`` that predict the R response tokens."""
    h = _final_hidden(body, b.input_ids, b.attention_mask, b.position_ids)
    return h[:, b.prompt_len - 1 : b.prompt_len - 1 + b.response.shape[1]]


class Policy(nn.Module):
    """A causal LM whose forward stops at the final hidden states and hands back its head, so that the trainer
    scores the response with apa_fast's fused ops (the logits are never built); optionally a value head on the
    same hidden states (``--critic shared``). Under FSDP2 the policy is the root unit: its forward gathers the
    head's weight, which stays gathered until the backward of the loss built on it."""

    def __init__(self, lm: nn.Module, value_head: bool = False, logit_scale: float = 1.0, lora: bool = False,
                 softcap: float | None = None, temperature: float = 1.0, backend: str = "auto"):
        super().__init__()
        self.lm, self.logit_scale, self.lora, self.softcap = lm, logit_scale, lora, softcap
        # a head's scaling folds into the softmax's temperature; "eager" is apa_fast's reference (logits built)
        self.temperature, self.backend = temperature / logit_scale, "reference" if backend == "eager" else backend
        self.v_head = ValueHead(lm.config.get_text_config().hidden_size).to(lm.device) if value_head else None

    @property
    def config(self):
        return self.lm.config

    @property
    def causal_lm(self) -> nn.Module:
        """The transformers causal LM (with LoRA: the model peft wraps, its adapter layers injected in place)."""
        return self.lm.get_base_model() if self.lora else self.lm

    def forward(self, b: Batch, values: bool = False) -> PolicyOut:
        lm = self.causal_lm
        h = _response_hidden(lm.base_model, b)
        head = lm.get_output_embeddings()
        return PolicyOut(h, Head(head.weight, head.bias, self.temperature, self.softcap, self.backend),
                         self.v_head(h) if values else None)

    def generate(self, **kw):
        return self.lm.generate(**kw)

    def sample(self, input_ids: Tensor, attention_mask: Tensor, **kw) -> tuple[Tensor, Tensor | None]:
        """Responses from the built-in sampler (``train.sampling.sample``) on this policy's body and head."""
        lm = self.causal_lm
        head = head_logits(lm.get_output_embeddings(), self.logit_scale, self.softcap)
        return sample(lm.base_model, head, input_ids, attention_mask, **kw)


class AdaptersOff:
    """The initial policy under LoRA: the policy itself with its adapters disabled (peft's ``disable_adapter``),
    i.e. the frozen base weights, so no second copy of the model is loaded. Called like a ``Policy``."""

    def __init__(self, policy: Policy):
        self.policy = policy

    def __call__(self, b: Batch, **kw) -> PolicyOut:
        with self.policy.lm.disable_adapter():
            return self.policy(b, **kw)


class Critic(nn.Module):
    """A separate copy of the policy's transformer with a scalar head (as the APA authors did)."""

    def __init__(self, body: nn.Module, hidden_size: int):
        super().__init__()
        self.body = body
        self.head = ValueHead(hidden_size)

    def forward(self, b: Batch) -> Tensor:
        """Values (B, R) at the positions that predict the response."""
        return self.head(_response_hidden(self.body, b))


@torch.no_grad()
def head_transform(lm: nn.Module) -> tuple[float, float | None]:
    """``(s, c)`` with ``logits = c' tanh(s z / c')`` (c' the config's soft-cap; no tanh when none) and
    ``z = hidden @ W.T + b``, given as the fused op's arguments: ``s`` folds into the temperature
    (``softmax(s x / tau) = softmax(x / (tau / s))``) and ``c = c' / s`` is the cap on ``z`` itself
    (``c' tanh(s z / c') = s c tanh(z / c)``), both exact. ``s``: Granite's ``1 / logits_scaling``, Cohere's
    ``logit_scale``; ``c'``: Gemma 2's ``final_logit_softcapping``, all read from the config. One tiny forward
    compares the model's own logits with that transform of the head applied to its hidden states; a model that
    does anything else after its head is refused with one line, never trained on wrong log-probs."""
    head = lm.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise LoadError(f"{type(lm).__name__}: its output layer is {type(head).__name__}, not a Linear LM head")
    c = lm.config.get_text_config()
    s = 1.0 / float(getattr(c, "logits_scaling", None) or 1.0) * float(getattr(c, "logit_scale", None) or 1.0)
    cap = getattr(c, "final_logit_softcapping", None)
    cap = float(cap) / s if cap else None
    ids = torch.arange(min(4, head.out_features), device=head.weight.device).unsqueeze(0)
    mask, pos = torch.ones_like(ids), torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
    was_training = lm.training
    lm.eval()
    logits = lm(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits.float()
    ours = head_logits(head, s, cap)(_final_hidden(lm.base_model, ids, mask, pos))
    lm.train(was_training)
    if not torch.allclose(logits, ours, rtol=1e-3, atol=1e-3 * max(1.0, float(ours.abs().max()))):
        raise LoadError(f"{type(lm).__name__} transforms its logits after the LM head in a way the fused log-probs "
                        "do not apply (they apply a constant scale and final_logit_softcapping only), so --model is "
                        "refused; pass a model whose logits are its LM head's output (scaled or soft-capped)")
    return s, cap


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks (GPT-J: transformer.h; Llama-like: model.layers)."""
    best = None
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0 and (best is None or len(m) > len(best)):
            best = m
    if best is None:
        raise LoadError(f"{type(model).__name__}: found no list of transformer blocks to shard/freeze")
    return best


def freeze_bottom(model: Policy | Critic, unfrozen_layers: int) -> None:
    """Train only the top ``unfrozen_layers`` blocks, the final norm and the heads (-1: everything)."""
    if unfrozen_layers < 0:
        return
    blocks = transformer_blocks(model)
    model.requires_grad_(False)
    for m in list(blocks)[len(blocks) - unfrozen_layers :] if unfrozen_layers > 0 else []:
        m.requires_grad_(True)
    body = model.lm.base_model if isinstance(model, Policy) else model.body
    for name in ("ln_f", "norm", "final_layer_norm"):
        if isinstance(getattr(body, name, None), nn.Module):
            getattr(body, name).requires_grad_(True)
    heads = (model.lm.get_output_embeddings(), model.v_head) if isinstance(model, Policy) else (model.head,)
    for head in heads:
        if head is not None:
            head.requires_grad_(True)


def shard(model: nn.Module, mesh, mp_policy=None) -> nn.Module:
    """FSDP2, torchtitan style: ``fully_shard`` each transformer block, then the root (which keeps the
    embeddings, the final norm and the heads); a policy's ``generate`` and ``sample`` gather like its forward."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    kw = {"mesh": mesh} if mp_policy is None else {"mesh": mesh, "mp_policy": mp_policy}
    for block in transformer_blocks(model):
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    if isinstance(model, Policy):
        register_fsdp_forward_method(model, "generate")
        register_fsdp_forward_method(model, "sample")
    return model


def make_critic(body: nn.Module, config) -> Critic:
    """A critic on ``body`` (the transformer of the SFT model): values from its final hidden states."""
    return Critic(body, config.get_text_config().hidden_size).to(next(body.parameters()).device)


# ---- building all four models ----------------------------------------------------------------------


@dataclass
class Models:
    policy: Policy  # trainable
    ref: Policy | AdaptersOff | None  # the frozen initial policy (None when nothing reads it: GRPO with
    # --kl-loss-coef 0); with LoRA the policy with its adapters disabled
    critic: Critic | None  # None when the value head is on the policy (--critic shared)
    tokenizer: object
    reward: object  # (prompts, completions, messages=None) -> list of floats (train/rewards.py)
    gold: object | None = None  # --gold-reward: the same form; scored and logged, never trained on


def attn_implementation(attn: str) -> tuple[str, ...]:
    """The attention implementations to try, best first; the loaders take the first one the model accepts.

    ``--attn X``: X only. ``auto``: ``flash_attention_2`` on CUDA when ``flash_attn`` imports, then ``sdpa``
    (PyTorch's fused attention), then ``eager``. Whether a model supports one is asked of transformers itself:
    ``from_pretrained`` refuses an implementation the model lacks with a ValueError (``load_causal_lm``)."""
    if attn != "auto":
        return (attn,)
    order = ("sdpa", "eager")
    if torch.cuda.is_available():
        try:
            import flash_attn  # noqa: F401

            order = ("flash_attention_2", *order)
        except Exception:  # noqa: BLE001 - absent or broken build: sdpa then
            pass
    return order


def build_models(cfg, d, log) -> Models:
    """Policy, initial policy, critic and reward, loaded and placed one at a time (peak host memory: one model).

    Single process: each model moves to the device. FSDP2: each is sharded (``shard``); ``fully_shard``
    moves each unit to the mesh's device as it shards it, so no model ever sits whole on one GPU.
    """
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and d.device.type == "cuda")
    attn = attn_implementation(cfg.attn)
    frozen_dtype = torch.bfloat16 if bf16 else torch.float32
    mp = None
    if d.mesh is not None and bf16:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)

    def place(model: nn.Module, trainable: bool = False) -> nn.Module:
        if d.mesh is None:  # single process (CPU): --precision bf16 trains in plain bf16
            return model.to(d.device, torch.bfloat16 if bf16 and trainable else None)
        return shard(model, d.mesh, mp if trainable else None)

    path = resolve_source(cfg.model, cfg, d, log, cfg.gguf_file)
    tokenizer = load_tokenizer(path, trust_remote_code=cfg.trust_remote_code)
    # the trainable policy keeps fp32 master weights; FSDP2's MixedPrecisionPolicy computes in bf16 on GPU
    lm = load_causal_lm(path, dtype=torch.float32, attn=attn, trust_remote_code=cfg.trust_remote_code)
    scale, softcap = head_transform(lm)
    lm.generation_config.pad_token_id = tokenizer.pad_token_id
    lora = cfg.lora_rank > 0  # the base frozen whole (peft), adapters (and a value head) trained
    head = dict(logit_scale=scale, softcap=softcap, temperature=cfg.temperature, backend=cfg.kernel_backend)
    policy = Policy(add_lora(lm, cfg, causal_lm=True) if lora else lm, value_head=cfg.critic == "shared", lora=lora,
                    **head)
    if not lora:
        freeze_bottom(policy, cfg.unfrozen_layers)
    if cfg.fused_layers:
        fuse_layers(policy)
        fuse_lora(policy)
    policy = place(policy, trainable=True)

    ref = None
    if cfg.algo != "grpo" or cfg.kl_loss_coef > 0 or cfg.kl_coef != 0:
        if lora:  # the initial policy is the base: the same weights with the adapters off
            ref = AdaptersOff(policy)
        else:
            ref_lm = load_causal_lm(path, dtype=frozen_dtype, attn=attn, trust_remote_code=cfg.trust_remote_code,
                                    what="initial policy")
            ref = place(Policy(ref_lm, **head).requires_grad_(False).eval())

    critic = None
    if cfg.critic == "separate":  # the authors' separate critic: the SFT model's transformer + a scalar head
        body = load_base_model(path, dtype=torch.float32, attn=attn, trust_remote_code=cfg.trust_remote_code)
        critic = make_critic(add_lora(body, cfg, causal_lm=False) if lora else body, lm.config)
        if not lora:
            freeze_bottom(critic, cfg.unfrozen_layers)
        if cfg.fused_layers:
            fuse_layers(critic)
            fuse_lora(critic)
        critic = place(critic, trainable=True)

    def reward(spec: str):
        r = load_reward(resolve_source(spec, cfg, d, log), policy_config=lm.config, tokenizer=tokenizer,
                        device=d.device if d.mesh is None else torch.device("cpu"), dtype=frozen_dtype,
                        trust_remote_code=cfg.trust_remote_code, gptj_reward_at=cfg.gptj_reward_at)
        rm = getattr(r, "model", None)  # a reward model (not a function): sharded like the frozen policy
        if isinstance(rm, nn.Module) and d.mesh is not None:
            shard(rm, d.mesh, None)
            r.device = d.device
        return r

    return Models(policy, ref, critic, tokenizer, reward(cfg.reward_model),
                  reward(cfg.gold_reward) if cfg.gold_reward else None)
