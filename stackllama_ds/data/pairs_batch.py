"""Reward-model batches: tokenized (chosen, rejected) pairs, sharded by rank, right-padded.

A pair is ``format_qa(question, response_j)`` (chosen) and ``format_qa(question, response_k)``
(rejected). A micro batch of ``B`` pairs is ONE tensor of ``2B`` rows, ``[chosen..., rejected...]``,
so both sides go through the engine in a single forward. Padding is on the right: positions of the
real tokens are the same as unpadded, and the sequence classifier reads the score at the last
non-pad token. Global pair index ``g`` runs over seeded orders per pass and goes to rank
``g % world``; the data position is the number of global pairs consumed (as in ``packing``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch

from stackllama_ds.data.packing import epoch_order
from stackllama_ds.data.template import format_qa
from stackllama_ds.models.padding import pad

Pair = tuple[Sequence[int], Sequence[int]]  # (chosen ids, rejected ids)


class TokenizedPairs(NamedTuple):
    """Pairs of a split after the ``max_length`` policy; ``overlength`` pairs were cut or dropped."""

    pairs: list[Pair]
    overlength: int  # pairs with either text over max_length (truncated or filtered)
    total: int  # pairs in the split before filtering


def tokenize_pairs(split, tokenizer, max_length: int, overlength: str, batch_size: int = 1024) -> TokenizedPairs:
    """Tokenize every row of a prepared split (with BOS, as the tokenizer adds it, no EOS).

    ``overlength`` is "filter" (drop a pair when either text exceeds ``max_length`` tokens, as
    StackLLaMA's reward_modeling.py did) or "truncate" (keep the first ``max_length`` tokens of each).
    Ids are kept as int32 arrays (4 bytes a token, not a Python int's 28+).
    """
    if overlength not in ("filter", "truncate"):
        raise ValueError(f"overlength must be 'filter' or 'truncate', got {overlength!r}")
    pairs: list[Pair] = []
    over = total = 0
    cols = split.select_columns(["question", "response_j", "response_k"])
    for b in cols.iter(batch_size=batch_size):
        chosen = tokenizer([format_qa(q, a) for q, a in zip(b["question"], b["response_j"])])["input_ids"]
        rejected = tokenizer([format_qa(q, a) for q, a in zip(b["question"], b["response_k"])])["input_ids"]
        for j, k in zip(chosen, rejected):
            total += 1
            if len(j) > max_length or len(k) > max_length:
                over += 1
                if overlength == "filter":
                    continue
                j, k = j[:max_length], k[:max_length]
            pairs.append((np.asarray(j, dtype=np.int32), np.asarray(k, dtype=np.int32)))
    return TokenizedPairs(pairs, over, total)


def collate_pairs(pairs: Sequence[Pair], pad_id: int) -> dict[str, torch.Tensor]:
    """``input_ids``/``attention_mask`` (2B, T): rows ``[:B]`` chosen, ``[B:]`` rejected, right-padded."""
    ids, mask = pad([j for j, _ in pairs] + [k for _, k in pairs], pad_id, "right")
    return {"input_ids": ids, "attention_mask": mask}


def pair_batches(
    pairs: Sequence[Pair], pad_id: int, micro_batch: int, rank: int, world: int, seed: int, start: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless micro batches of this rank's pairs; ``start`` = global pairs already consumed."""
    if not pairs:
        raise ValueError("no reward-model pairs to train on (empty split or all filtered)")
    n = len(pairs)
    g = start
    mine: list[Pair] = []
    order, order_epoch = epoch_order(n, seed, g // n), g // n
    while True:
        epoch, i = divmod(g, n)
        if epoch != order_epoch:
            order, order_epoch = epoch_order(n, seed, epoch), epoch
        if g % world == rank:
            mine.append(pairs[order[i]])
            if len(mine) == micro_batch:
                yield collate_pairs(mine, pad_id)
                mine = []
        g += 1


def eval_pair_batches(
    pairs: Sequence[Pair], pad_id: int, micro_batch: int, rank: int, world: int
) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """Every held-out pair exactly once over all ranks: ``[(batch, weight (B,)), ...]``.

    Rank ``r`` takes pairs ``i % world == r``. Every rank gets the same number of micro batches
    (ZeRO-3 hangs when ranks run different numbers of forwards): a short shard is filled with
    repeats of a pair with weight 0, so the padding never counts.
    """
    if not pairs:
        return []
    shard = math.ceil(len(pairs) / world)  # the largest shard (rank 0's)
    n_batches = math.ceil(shard / micro_batch)
    mine = list(pairs[rank::world])
    weight = [1.0] * len(mine)
    fill = mine[0] if mine else pairs[0]
    while len(mine) < n_batches * micro_batch:
        mine.append(fill)
        weight.append(0.0)
    out = []
    for s in range(0, len(mine), micro_batch):
        out.append((collate_pairs(mine[s : s + micro_batch], pad_id), torch.tensor(weight[s : s + micro_batch])))
    return out
