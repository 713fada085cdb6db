"""KL penalty, KL-penalised per-token rewards and the KL-coefficient controllers.

Reference: Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences",
https://arxiv.org/abs/1909.08593 (reward r = score - beta * KL, adaptive beta), as implemented by
classic TRL (`PPOTrainer.compute_rewards`, `_kl_penalty`, `AdaptiveKLController`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .core import _float_chunk, _valid

__all__ = ["KL_KINDS", "AdaptiveKLController", "FixedKLController", "kl_penalty", "per_token_rewards"]

KL_KINDS = ("kl", "abs", "mse", "full")


def _full_kl(logits: torch.Tensor, ref_logits: torch.Tensor, chunk_rows: int = 1) -> torch.Tensor:
    out = []
    for start in range(0, logits.shape[0], chunk_rows):
        logp = F.log_softmax(_float_chunk(logits[start : start + chunk_rows]), dim=-1)  # (b, T, V)
        logq = F.log_softmax(_float_chunk(ref_logits[start : start + chunk_rows]), dim=-1)  # (b, T, V)
        out.append(F.kl_div(logq, logp, reduction="none", log_target=True).sum(-1))  # sum_v p (logp - logq)
    return torch.cat(out, dim=0)


def kl_penalty(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    kind: str = "kl",
    logits: torch.Tensor | None = None,
    ref_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens (TRL's `_kl_penalty`).

    Formula, with d_t = logp_t - logq_t the log-ratio of the sampled token:
        kl:   d_t                                 (unbiased single-sample estimate, can be < 0)
        abs:  |d_t|
        mse:  0.5 * d_t^2
        full: sum_v p_t(v) * (log p_t(v) - log q_t(v))   (exact KL over the vocabulary)

    Args:
        logprobs: (B, T) log-probabilities of the sampled tokens under the policy.
        ref_logprobs: (B, T) the same under the reference model.
        kind: one of "kl", "abs", "mse", "full".
        logits: (B, T, V) policy logits, aligned with the tokens; required (only) for "full".
        ref_logits: (B, T, V) reference logits; required (only) for "full".

    Returns:
        (B, T) penalty per token (unmasked; the caller masks).

    Raises:
        ValueError: unknown `kind`, or "full" without `logits` and `ref_logits`.
    """
    log_ratio = logprobs - ref_logprobs  # d_t = logp - logq
    if kind == "kl":
        return log_ratio  # d_t
    if kind == "abs":
        return log_ratio.abs()  # |d_t|
    if kind == "mse":
        return 0.5 * log_ratio.square()  # 0.5 * d_t^2
    if kind == "full":
        if logits is None or ref_logits is None:
            raise ValueError('kl_penalty(kind="full") needs `logits` and `ref_logits` of shape (B, T, V)')
        if logits.shape != ref_logits.shape or logits.shape[:-1] != logprobs.shape:
            raise ValueError(
                f"kl_penalty(kind='full'): logits {tuple(logits.shape)} and ref_logits "
                f"{tuple(ref_logits.shape)} must both be (B, T, V) with (B, T) = {tuple(logprobs.shape)}"
            )
        return _full_kl(logits, ref_logits)  # sum_v p (log p - log q)
    raise ValueError(f"unknown KL penalty kind {kind!r}; expected one of {KL_KINDS}")


def per_token_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float | torch.Tensor,
    kind: str = "kl",
    logits: torch.Tensor | None = None,
    ref_logits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL-penalised per-token rewards: the reward-model score lands on the last response token.

    Formula:
        kl_rewards_t = -kl_coef * kl_penalty_t * m_t
        rewards_t    = kl_rewards_t + score * [t == last t' with m_t' = 1]

    (Ziegler et al. 2019, https://arxiv.org/abs/1909.08593, eq. 2; TRL's `compute_rewards`.)
    A row with no unmasked position gets no score and all-zero rewards.

    Args:
        scores: (B,) reward-model score per response.
        logprobs: (B, T) policy log-probabilities of the response tokens (at rollout time).
        ref_logprobs: (B, T) reference-model log-probabilities of the same tokens.
        mask: (B, T) 0/1 response mask; responses are left-aligned and may end early.
        kl_coef: beta, e.g. `AdaptiveKLController.value`.
        kind: KL estimator, see `kl_penalty`.
        logits, ref_logits: (B, T, V), only for kind="full".

    Returns:
        (rewards, kl_rewards), both (B, T), zero where `mask` is 0.
    """
    kl = kl_penalty(logprobs, ref_logprobs, kind, logits=logits, ref_logits=ref_logits)  # (B, T)
    return rewards_from_kl(scores, kl, mask, kl_coef)


def rewards_from_kl(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_token_rewards` from a precomputed per-token KL estimate (B, T).

    Formula: rewards_t = -kl_coef * KL_t * m_t + score * [t == last unmasked t'].
    Used when the KL is computed chunk by chunk (kind="full" needs both full distributions).
    Returns (rewards, kl_rewards), both (B, T).
    """
    valid = _valid(mask)  # (B, T)
    kl_rewards = torch.where(valid, -kl_coef * kl, torch.zeros_like(kl))  # -beta * KL_t * m_t
    positions = torch.arange(valid.shape[1], device=valid.device)  # (T,)
    last = torch.where(valid, positions, -1).amax(dim=1, keepdim=True)  # (B, 1); -1 for empty rows
    at_last = positions == last  # (B, T), one True per non-empty row
    score_part = torch.where(at_last, scores.to(kl_rewards.dtype).unsqueeze(1), torch.zeros_like(kl_rewards))
    return kl_rewards + score_part, kl_rewards  # r_t = -beta KL_t + score at the last token


class AdaptiveKLController:
    """Adaptive KL coefficient that steers the measured KL towards a target (Ziegler et al. 2019).

    Formula:
        e = clip(current_kl / target - 1, -0.2, 0.2)
        beta <- beta * (1 + e * n_steps / horizon)

    (https://arxiv.org/abs/1909.08593, section 2.2; TRL's `AdaptiveKLController`.) `current_kl` is
    the KL of a whole response, summed over its tokens and averaged over the responses of the batch
    (TRL logs it as `objective/kl`); `n_steps` is the number of responses in the batch over all ranks.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"AdaptiveKLController: target ({target}) and horizon ({horizon}) must be > 0")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Update beta from the measured KL; returns the new value."""
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)  # clip(kl/target - 1, +-0.2)
        self.value *= 1.0 + error * n_steps / self.horizon  # beta *= 1 + e * n / horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        # Only the evolving coefficient; target and horizon come from the config.
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])

    def __repr__(self) -> str:
        return f"AdaptiveKLController(value={self.value}, target={self.target}, horizon={self.horizon})"


class FixedKLController:
    """Constant KL coefficient with the interface of `AdaptiveKLController` (`update` is a no-op)."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Leaves beta unchanged; returns it."""
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])

    def __repr__(self) -> str:
        return f"FixedKLController(value={self.value})"
