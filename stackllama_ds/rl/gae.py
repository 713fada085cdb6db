"""Generalised advantage estimation over left-aligned responses that may end early.

Reference: Schulman et al. 2015, "High-Dimensional Continuous Control Using Generalized Advantage
Estimation", https://arxiv.org/abs/1506.02438; TRL's `PPOTrainer.compute_advantages`.
"""

from __future__ import annotations

import torch

from .core import _valid

__all__ = ["gae"]


def gae(
    values: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw GAE advantages and value targets (returns), computed backwards over the response.

    Formula:
        delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}          (A_T = 0; i.e. A_t = sum_l (gamma*lam)^l * delta_{t+l})
        R_t     = A_t + V_t
    with r, V, A and R set to 0 where m_t = 0.

    The value after the last unmasked token counts as 0: the recursion never bootstraps from
    padding, so a response that ends early is treated as a finished episode. Masks are expected
    to be a contiguous prefix per row (left-aligned responses); a masked position cuts the
    recursion. For all-ones masks this equals TRL's `compute_advantages` before its whitening.

    The advantages are returned unwhitened. Whiten them once per rollout batch (over all ranks,
    with `masked_moments` + `masked_whiten(mean=, var=)`) before the PPO epochs; the blog-era TRL
    code whitened per minibatch instead. The returns use the raw advantages.

    Args:
        values: (B, T) value estimates V_t at rollout time.
        rewards: (B, T) per-token rewards, e.g. from `per_token_rewards`.
        mask: (B, T) 0/1 response mask.
        gamma: discount factor.
        lam: GAE lambda.

    Returns:
        (advantages, returns), both (B, T), zero where `mask` is 0.
    """
    valid = _valid(mask)  # (B, T)
    zeros = torch.zeros_like(values)
    values = torch.where(valid, values, zeros)  # V_t * m_t
    rewards = torch.where(valid, rewards.to(values.dtype), zeros)  # r_t * m_t
    next_value = values.new_zeros(values.shape[0])  # (B,) V_{t+1} * m_{t+1}; 0 past the end
    next_adv = values.new_zeros(values.shape[0])  # (B,) A_{t+1}
    advantages_reversed = []
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # r_t + gamma V_{t+1} m_{t+1} - V_t
        adv = delta + gamma * lam * next_adv  # A_t = delta_t + gamma lam A_{t+1}
        adv = torch.where(valid[:, t], adv, torch.zeros_like(adv))
        advantages_reversed.append(adv)
        next_value, next_adv = values[:, t], adv
    if not advantages_reversed:
        return zeros, zeros
    advantages = torch.stack(advantages_reversed[::-1], dim=1)  # (B, T)
    returns = torch.where(valid, advantages + values, zeros)  # R_t = A_t + V_t
    return advantages, returns
