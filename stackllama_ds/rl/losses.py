"""PPO clipped surrogate policy loss and clipped value loss, with their diagnostics.

Reference: Schulman et al. 2017, "Proximal Policy Optimization Algorithms",
https://arxiv.org/abs/1707.06347 (eq. 7 and the clipped value loss of the baselines code), as in
TRL's `PPOTrainer.loss`. Token means go through `masked_mean`; pass `denom` for means that stay
correct across data-parallel ranks (see `masked_mean`). Stats are returned detached.
"""

from __future__ import annotations

import torch

from .core import masked_mean

__all__ = ["policy_loss", "value_loss"]


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    denom: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate objective, as a loss to minimise.

    Formula:
        r_t  = exp(logp_t - logp_old_t)
        loss = masked_mean( max(-A_t * r_t, -A_t * clip(r_t, 1 - c, 1 + c)) )

    (https://arxiv.org/abs/1707.06347, eq. 7.)

    Args:
        logprobs: (B, T) log-probabilities under the current policy (with grad).
        old_logprobs: (B, T) log-probabilities at rollout time.
        advantages: (B, T) advantages, whitened once per rollout batch.
        mask: (B, T) 0/1 response mask.
        clip_range: c.
        denom: token-count denominator for cross-rank means, see `masked_mean`.

    Returns:
        (loss, stats). loss is a scalar with grad. stats (detached scalars):
        clipfrac   = masked share of tokens where -A*clip(r) > -A*r (the clipped term is used),
        approx_kl  = 0.5 * masked_mean((logp - logp_old)^2),
        ratio_mean = masked_mean(r),
        policy_kl  = masked_mean(logp_old - logp).
    """
    log_ratio = logprobs - old_logprobs  # (B, T) logp - logp_old
    ratio = torch.exp(log_ratio)  # r_t
    unclipped = -advantages * ratio  # -A r
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)  # -A clip(r, 1-c, 1+c)
    loss = masked_mean(torch.max(unclipped, clipped), mask, denom=denom)  # mean max(-A r, -A clip(r))
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
            "approx_kl": 0.5 * masked_mean(log_ratio.square(), mask),  # 0.5 * mean d^2
            "ratio_mean": masked_mean(ratio, mask),
            "policy_kl": masked_mean(-log_ratio, mask),  # mean (logp_old - logp)
        }
    return loss, {k: v.detach() for k, v in stats.items()}


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float,
    denom: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value-function loss.

    Formula:
        v_clip = clip(v_t, v_old_t - c, v_old_t + c)
        loss   = 0.5 * masked_mean( max((v_t - R_t)^2, (v_clip - R_t)^2) )

    (PPO baselines' clipped value loss, https://arxiv.org/abs/1707.06347; TRL's `vf_loss`.)

    Args:
        values: (B, T) current value predictions (with grad).
        old_values: (B, T) value predictions at rollout time.
        returns: (B, T) value targets R_t from `gae`.
        mask: (B, T) 0/1 response mask.
        clip_range_value: c.
        denom: token-count denominator for cross-rank means, see `masked_mean`.

    Returns:
        (loss, stats). loss is a scalar with grad. stats (detached scalars):
        clipfrac    = masked share of tokens where (v_clip - R)^2 > (v - R)^2,
        value_error = masked_mean((v - R)^2).
    """
    values_clipped = torch.clamp(values, old_values - clip_range_value, old_values + clip_range_value)
    unclipped = (values - returns).square()  # (v - R)^2
    clipped = (values_clipped - returns).square()  # (v_clip - R)^2
    loss = 0.5 * masked_mean(torch.max(unclipped, clipped), mask, denom=denom)  # 0.5 mean max(...)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(values.dtype), mask),
            "value_error": masked_mean(unclipped, mask),
        }
    return loss, {k: v.detach() for k, v in stats.items()}
