"""Running mean and standard deviation of rewards across PPO updates (Welford / Chan merge)."""

from __future__ import annotations

import math

import torch

__all__ = ["RunningMoments"]


def _as_float(x: float | torch.Tensor) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


class RunningMoments:
    """Running mean and unbiased standard deviation of a stream of batches.

    Each `update` takes a batch's moments (sum, sum of squares, count), already all-reduced over
    ranks if needed (see `core.masked_moments`), and merges them with Chan et al.'s parallel rule:

        n_b = count,  mean_b = sum / n_b,  M2_b = sum_sq - sum * mean_b
        delta = mean_b - mean,   n' = n + n_b
        mean' = mean + delta * n_b / n'
        M2'   = M2 + M2_b + delta^2 * n * n_b / n'
        std   = sqrt(M2' / (n' - 1))

    (https://en.wikipedia.org/wiki/Algorithms_for_calculating_variance#Parallel_algorithm; TRL's
    `RunningMoments`, used for reward scaling.) State is kept in Python floats (float64). Until two
    values have been seen, `std` is 1.0 so that dividing by it is a no-op.
    """

    def __init__(self) -> None:
        self.mean = 0.0
        self.m2 = 0.0  # sum of squared deviations from the running mean
        self.count = 0.0

    @property
    def var(self) -> float:
        """Unbiased running variance M2 / (n - 1); 1.0 before two values were seen."""
        return self.m2 / (self.count - 1) if self.count > 1 else 1.0

    @property
    def std(self) -> float:
        """Unbiased running standard deviation; 1.0 before two values were seen."""
        return math.sqrt(self.var)

    def update(
        self, total: float | torch.Tensor, total_sq: float | torch.Tensor, count: float | torch.Tensor
    ) -> tuple[float, float]:
        """Merge one batch; returns the batch's own (mean, unbiased std)."""
        total, total_sq, n_b = _as_float(total), _as_float(total_sq), _as_float(count)
        if n_b <= 0:
            return 0.0, 0.0
        mean_b = total / n_b  # sum / n_b
        m2_b = max(total_sq - total * mean_b, 0.0)  # sum (x - mean_b)^2
        delta = mean_b - self.mean
        n_new = self.count + n_b
        self.mean += delta * n_b / n_new  # mean + delta n_b / n'
        self.m2 += m2_b + delta * delta * self.count * n_b / n_new  # M2 + M2_b + delta^2 n n_b / n'
        self.count = n_new
        batch_std = math.sqrt(m2_b / (n_b - 1)) if n_b > 1 else 0.0
        return mean_b, batch_std

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "m2": self.m2, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.m2, self.count = float(state["mean"]), float(state["m2"]), float(state["count"])

    def __repr__(self) -> str:
        return f"RunningMoments(mean={self.mean}, std={self.std}, count={self.count})"
