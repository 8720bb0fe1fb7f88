"""apa-fast: token log-probs, the APA loss and GAE without a full-vocabulary softmax.

Public API (docs/design.md): ``token_logprobs``, ``apa_loss``, ``gae``, ``masked_whiten``,
``group_advantages``, ``awr_loss``, ``ppo_loss``, ``grpo_loss``, ``value_loss``, ``linear_token_logprobs``, ``linear_apa_loss``, and the
fused engine every loss goes through: ``token_loss`` / ``linear_token_loss`` with a per-token loss from
``apa_fast.losses`` (``apa_token_loss``, ``ppo_token_loss``, ``awr_token_loss``, ...).
Every op takes ``backend="auto" | "triton" | "torch" | "reference"`` where it has kernels.
"""

from .gae import gae, group_advantages, masked_whiten
from .linear import linear_apa_loss, linear_token_logprobs, linear_token_loss
from .logprobs import apa_loss, token_logprobs, token_loss
from .losses import awr_loss, grpo_loss, ppo_loss, value_loss

__all__ = [
    "token_logprobs",
    "apa_loss",
    "gae",
    "masked_whiten",
    "group_advantages",
    "grpo_loss",
    "awr_loss",
    "ppo_loss",
    "value_loss",
    "linear_token_logprobs",
    "linear_apa_loss",
    "token_loss",
    "linear_token_loss",
]
__version__ = "0.1.0"
