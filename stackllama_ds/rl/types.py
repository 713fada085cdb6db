"""Typed containers for PPO rollouts and update statistics."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["Rollout"]

_PER_TOKEN = ("response_mask", "logprobs", "ref_logprobs", "values", "rewards", "advantages", "returns")


@dataclass(frozen=True)
class Rollout:
    """One rollout batch: prompts, sampled responses and everything PPO computed about them.

    B responses, prompts left-padded to P tokens, responses left-aligned (right-padded) to T
    tokens. All per-token tensors are aligned with `response_ids`: position t describes response
    token t. Every field is indexed along dim 0, so a minibatch is `rollout.index_select(idx)`.

    Fields:
        query_ids:     (B, P) int64 prompt token ids, left-padded.
        query_mask:    (B, P) prompt attention mask (1 = real token).
        response_ids:  (B, T) int64 sampled response token ids, right-padded.
        response_mask: (B, T) 1 up to and including the last response token (EOS), 0 after.
        logprobs:      (B, T) actor log-probabilities of the response tokens at rollout time.
        ref_logprobs:  (B, T) reference-model log-probabilities of the same tokens.
        values:        (B, T) critic values V_t at rollout time.
        scores:        (B,)   reward-model score per response (after any scaling/clipping).
        rewards:       (B, T) KL-penalised per-token rewards (`per_token_rewards`).
        advantages:    (B, T) GAE advantages, whitened once over the rollout batch.
        returns:       (B, T) value targets A_t + V_t (from the raw advantages).
    """

    query_ids: torch.Tensor
    query_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor

    def __post_init__(self) -> None:
        sizes = {f.name: getattr(self, f.name).shape[0] for f in dataclasses.fields(self)}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"Rollout fields disagree on the batch size: {sizes}")
        shape = self.response_ids.shape
        bad = {n: tuple(getattr(self, n).shape) for n in _PER_TOKEN if getattr(self, n).shape != shape}
        if bad or self.query_mask.shape != self.query_ids.shape or self.scores.dim() != 1:
            raise ValueError(
                f"Rollout shapes: per-token fields must match response_ids {tuple(self.response_ids.shape)}, "
                f"query_mask must match query_ids, scores must be (B,); got mismatches {bad}, "
                f"query_mask {tuple(self.query_mask.shape)}, scores {tuple(self.scores.shape)}"
            )

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    def _map(self, fn) -> Rollout:
        return Rollout(**{f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def index_select(self, idx: torch.Tensor | Sequence[int]) -> Rollout:
        """The minibatch of rows `idx` (a 1-D index tensor or list), in that order."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        return self._map(lambda t: t.index_select(0, idx.to(t.device)))

    def to(self, device: torch.device | str) -> Rollout:
        """A copy with every tensor on `device`."""
        return self._map(lambda t: t.to(device))
