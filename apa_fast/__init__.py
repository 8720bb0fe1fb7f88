"""apa-fast: token log-probs, the APA loss and GAE without a full-vocabulary softmax.

Public API (see DESIGN.md): ``token_logprobs``, ``apa_loss``, ``gae``, ``masked_whiten``,
``awr_loss``, ``ppo_loss``, ``value_loss``, ``linear_token_logprobs``, ``linear_apa_loss``.
Every op takes ``backend="auto" | "triton" | "torch" | "reference"`` where it has kernels.
"""

from .gae import gae, masked_whiten
from .linear import linear_apa_loss, linear_token_logprobs
from .logprobs import apa_loss, token_logprobs
from .losses import awr_loss, ppo_loss, value_loss

__all__ = [
    "token_logprobs",
    "apa_loss",
    "gae",
    "masked_whiten",
    "awr_loss",
    "ppo_loss",
    "value_loss",
    "linear_token_logprobs",
    "linear_apa_loss",
]
__version__ = "0.1.0"
