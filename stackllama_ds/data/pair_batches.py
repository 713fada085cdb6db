"""Reward-model batches: tokenized (chosen, rejected) pairs, sharded by rank, right-padded.

A pair is ``format_qa(question, response_j)`` (chosen) and ``format_qa(question, response_k)``
(rejected), fitted into ``rm.max_length`` by ``data.fit`` (the question is cut, not the answers). A
micro batch of ``B`` pairs is ONE tensor of ``2B`` rows, ``[chosen..., rejected...]``, so both sides
go through the engine in a single forward. Padding is on the right: positions of the
real tokens are the same as unpadded, and the sequence classifier reads the score at the last
non-pad token. ``collate=pack_pairs`` (``data.packed_pairs``) gives one padding-free row per micro
batch instead, each question once. Global pair index ``g`` runs over seeded orders per pass and goes to rank
``g % world``; the data position is the number of global pairs consumed (as in ``packing``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch

from stackllama_ds.data.fit import FitPair
from stackllama_ds.data.packing import epoch_order
from stackllama_ds.models.padding import pad

Pair = FitPair | tuple[Sequence[int], Sequence[int]]  # (chosen ids, rejected ids[, answer lengths, group])


def collate_pairs(pairs: Sequence[Pair], pad_id: int) -> dict[str, torch.Tensor]:
    """``input_ids``/``attention_mask`` (2B, T): rows ``[:B]`` chosen, ``[B:]`` rejected, right-padded;
    ``answer_lengths`` (2B,): each row's answer tokens (the whole row for bare (chosen, rejected) pairs)."""
    rows = [p[0] for p in pairs] + [p[1] for p in pairs]
    ids, mask = pad(rows, pad_id, "right")
    if all(len(p) >= 4 for p in pairs):
        lengths = [p[2] for p in pairs] + [p[3] for p in pairs]
    else:
        lengths = [len(r) for r in rows]
    return {"input_ids": ids, "attention_mask": mask, "answer_lengths": torch.tensor(lengths, dtype=torch.float32)}


def pair_batches(
    pairs: Sequence[Pair], pad_id: int, micro_batch: int, rank: int, world: int, seed: int, start: int = 0,
    collate: Callable[[list[Pair]], object] | None = None,
) -> Iterator:
    """Endless micro batches of this rank's pairs; ``start`` = global pairs already consumed.
    ``collate``: micro batch -> batch, default ``collate_pairs(mb, pad_id)``."""
    collate = collate or (lambda mb: collate_pairs(mb, pad_id))
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
                yield collate(mine)
                mine = []
        g += 1


def eval_pair_batches(
    pairs: Sequence[Pair], pad_id: int, micro_batch: int, rank: int, world: int,
    collate: Callable[[list[Pair]], object] | None = None,
) -> list[tuple[object, torch.Tensor]]:
    """Every held-out pair exactly once over all ranks: ``[(batch, weight (B,)), ...]``.

    Rank ``r`` takes pairs ``i % world == r``. Every rank gets the same number of micro batches
    (ZeRO-3 hangs when ranks run different numbers of forwards): a short shard is filled with
    repeats of a pair with weight 0, so the padding never counts. ``collate`` as in ``pair_batches``.
    """
    collate = collate or (lambda mb: collate_pairs(mb, pad_id))
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
        out.append((collate(mine[s : s + micro_batch]), torch.tensor(weight[s : s + micro_batch])))
    return out
