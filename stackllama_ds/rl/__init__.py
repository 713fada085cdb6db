"""PPO math for the StackLLaMA recipe: pure functions over tensors; imports only torch.

Semantics follow classic TRL `PPOTrainer` (trl 0.11, `trl/trainer/ppo_trainer.py`, `trl/core.py`):
KL-penalised per-token rewards, GAE, clipped policy and value losses, adaptive KL coefficient.
Differences from TRL: masked reductions return 0 (not NaN) on empty masks, GAE never bootstraps
from padding after a response ends early, and advantages are whitened once per rollout batch
with statistics that may span ranks.
"""

from .core import (
    entropy_from_logits,
    logprobs_from_logits,
    masked_mean,
    masked_moments,
    masked_sum,
    masked_var,
    masked_whiten,
    moments_to_mean_var,
)
from .degenerate import DEGENERATE_SUBSTRINGS, degenerate_fraction, is_degenerate, repeated_ngram_share
from .gae import gae
from .kl import (
    KL_KINDS,
    AdaptiveKLController,
    FixedKLController,
    kl_penalty,
    per_token_rewards,
    rewards_from_kl,
)
from .losses import policy_loss, value_loss
from .moments import RunningMoments
from .odin import OdinStats, odin_penalty, pearson
from .types import Rollout

__all__ = [
    "DEGENERATE_SUBSTRINGS",
    "KL_KINDS",
    "AdaptiveKLController",
    "FixedKLController",
    "OdinStats",
    "Rollout",
    "RunningMoments",
    "degenerate_fraction",
    "entropy_from_logits",
    "gae",
    "is_degenerate",
    "kl_penalty",
    "logprobs_from_logits",
    "masked_mean",
    "masked_moments",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "moments_to_mean_var",
    "odin_penalty",
    "pearson",
    "per_token_rewards",
    "policy_loss",
    "repeated_ngram_share",
    "rewards_from_kl",
    "value_loss",
]
