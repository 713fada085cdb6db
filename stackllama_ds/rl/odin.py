"""ODIN's length-disentangled reward model: the terms added to the ranking loss of a two-head reward.

Reference: Chen et al. 2024, "ODIN: Disentangled Reward Mitigates Hacking in RLHF",
https://arxiv.org/abs/2402.07319 (section 4). Two linear heads read the same final hidden state: a
quality head r_Q and a length head r_L. The ranking loss is taken on r_Q + r_L; the terms here push
the length into r_L and out of r_Q, so PPO can be given r_Q alone. Stats are returned detached.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["OdinStats", "odin_penalty", "pearson"]

_VAR_EPS = 1e-6  # variance floor: a constant input gives rho 0 with finite gradients, not 0/0


@dataclass(frozen=True)
class OdinStats:
    """The terms of ``odin_penalty``, detached scalars."""

    corr_length: torch.Tensor  # rho(r_L, len): ODIN wants it near 1
    corr_quality: torch.Tensor  # rho(r_Q, len): ODIN wants it near 0
    ortho: torch.Tensor  # |cos(w_Q, w_L)|
    penalty: torch.Tensor  # the weighted sum added to the ranking loss


def pearson(x: torch.Tensor, y: torch.Tensor, eps: float = _VAR_EPS) -> torch.Tensor:
    """Pearson correlation of two (N,) tensors, differentiable in both.

    Formula:
        rho = mean((x - mean x) * (y - mean y)) / (sqrt(max(var x, eps)) * sqrt(max(var y, eps)))

    with population variances. A constant x or y gives rho = 0 (its centred values are all 0) and
    finite gradients: the variance floor keeps the denominator off 0. Computed in float32.
    Returns a scalar.
    """
    x, y = x.float(), y.float()
    xc, yc = x - x.mean(), y - y.mean()  # (N,)
    sx = xc.square().mean().clamp_min(eps).sqrt()  # sqrt(max(var x, eps))
    sy = yc.square().mean().clamp_min(eps).sqrt()
    return (xc * yc).mean() / (sx * sy)  # cov / (sx * sy)


def odin_penalty(
    r_quality: torch.Tensor,
    r_length: torch.Tensor,
    lengths: torch.Tensor,
    head_weight: torch.Tensor,
    length_corr_weight: float,
    quality_corr_weight: float,
    ortho_weight: float,
) -> tuple[torch.Tensor, OdinStats]:
    """ODIN's disentangling terms, to add to the ranking loss taken on r_Q + r_L.

    Formula:
        rho_L   = pearson(r_L, len)          rho_Q = pearson(r_Q, len)
        ortho   = |w_Q . w_L| / (|w_Q| |w_L|)
        penalty = lambda_L * (-rho_L) + lambda_Q * |rho_Q| + lambda_O * ortho

    and ODIN's whole loss is  -log sigmoid((r_Q + r_L)_chosen - (r_Q + r_L)_rejected) + penalty.
    The correlations run over every row of the batch, chosen and rejected answers alike (2B rows).
    The orthogonality term is taken on the unit-normalised head weights, as ODIN's code does: the
    raw dot product would also reward shrinking both heads, which the ranking loss then undoes.
    (https://arxiv.org/abs/2402.07319, section 4.)

    Args:
        r_quality, r_length: (2B,) the two heads' scores (with grad).
        lengths: (2B,) response lengths in tokens, in the same row order.
        head_weight: (2, H) the score layer's weight, row 0 the quality head, row 1 the length head.
        length_corr_weight, quality_corr_weight, ortho_weight: lambda_L, lambda_Q, lambda_O (>= 0).

    Returns:
        (penalty, stats): the penalty is a scalar with grad; stats detached.
    """
    rho_l = pearson(r_length, lengths.to(r_length.device))  # rho(r_L, len)
    rho_q = pearson(r_quality, lengths.to(r_quality.device))  # rho(r_Q, len)
    w = head_weight.float()
    norms = w.norm(dim=1).clamp_min(1e-12)  # (2,)
    ortho = (w[0] @ w[1]).abs() / (norms[0] * norms[1])  # |w_Q . w_L| / (|w_Q| |w_L|)
    # lambda_L * (-rho_L) + lambda_Q * |rho_Q| + lambda_O * |cos(w_Q, w_L)|
    penalty = -length_corr_weight * rho_l + quality_corr_weight * rho_q.abs() + ortho_weight * ortho
    return penalty, OdinStats(rho_l.detach(), rho_q.detach(), ortho.detach(), penalty.detach())
