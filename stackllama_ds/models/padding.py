"""Padding and masks of token batches: one padding helper, positions that skip left padding, EOS cuts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch


def pad(seqs: Sequence[Sequence[int] | np.ndarray], pad_id: int,
        side: Literal["left", "right"] = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists padded to the longest: ``(ids (B, T), mask (B, T))``, mask 1 on real tokens.

    Left padding for prompts that generation continues, right padding for training and scoring
    (under a causal mask no real token then sees a pad).
    """
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        ids[i, cols] = torch.as_tensor(np.asarray(s), dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding (as HF generate computes them): cumsum(mask) - 1, >= 0."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def trim_left_padding(ids: torch.Tensor, mask: torch.Tensor, P: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Drop the leading columns that are padding in every row (a minibatch of short prompts
    padded to the batch's longest): same positions and logits, less work. Returns (ids, mask, P)."""
    real = mask[:, :P].any(0).nonzero()
    c = int(real[0]) if len(real) else max(P - 1, 0)
    c = min(c, P - 1)  # keep position P-1: it predicts the first response token
    return ids[:, c:], mask[:, c:], P - c


def cut_at_eos(resp: torch.Tensor, eos: int) -> torch.Tensor:
    """(B, T) mask: 1 up to and including the first EOS, 0 after it (StackLLaMA's cut)."""
    is_eos = (resp == eos).long()
    return ((is_eos.cumsum(-1) - is_eos) == 0).long()  # no EOS strictly before t
