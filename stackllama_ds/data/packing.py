"""SFT batches: StackLLaMA packing (texts joined by EOS, cut into seq_length chunks) or padded.

Packing builds one global token stream ``<s> text </s> <s> text </s> ...`` over the texts in a
seeded order per pass, running on across passes (no remainder dropped, so every token is trained
exactly once per pass), and cuts it into ``seq_length`` chunks. Chunk ``k`` of the global stream
goes to rank ``k % world``; the data position is the number of global chunks consumed, which stays
meaningful when a run resumes on another world size.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch

IGNORE = -100


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(f"{seed}-{epoch}").shuffle(order)
    return order


def token_stream(
    texts: Sequence[str], tokenizer, seed: int, batch: int = 256, shuffle: bool = True
) -> Iterator[tuple[int, int]]:
    """Yield ``(token_id, epoch)`` forever: each text tokenized (with BOS) and followed by EOS."""
    if not texts:
        raise ValueError("no texts to train on (empty split)")
    eos = tokenizer.eos_token_id
    epoch = 0
    while True:
        order = epoch_order(len(texts), seed, epoch) if shuffle else list(range(len(texts)))
        for i in range(0, len(order), batch):
            ids = tokenizer([texts[j] for j in order[i : i + batch]], add_special_tokens=True)["input_ids"]
            for seq in ids:
                for t in seq:
                    yield t, epoch
                yield eos, epoch
        epoch += 1


def packed_chunks(
    texts: Sequence[str], tokenizer, seq_length: int, seed: int, start: int = 0, shuffle: bool = True
) -> Iterator[tuple[int, list[int]]]:
    """Yield ``(global_chunk_index, token_ids)`` from ``start`` on; chunks are exactly seq_length long."""
    buf: list[int] = []
    k = 0
    for t, _ in token_stream(texts, tokenizer, seed, shuffle=shuffle):
        buf.append(t)
        if len(buf) == seq_length:
            if k >= start:
                yield k, buf
            buf = []
            k += 1


def packed_batches(
    texts: Sequence[str],
    tokenizer,
    seq_length: int,
    micro_batch: int,
    rank: int,
    world: int,
    seed: int,
    start: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Micro batches of this rank's chunks: ``input_ids`` and ``labels`` (B, T), no padding anywhere.

    ``start`` is the number of global chunks already consumed (a multiple of micro_batch x world).
    """
    mine: list[list[int]] = []
    for k, chunk in packed_chunks(texts, tokenizer, seq_length, seed, start):
        if k % world == rank:
            mine.append(chunk)
            if len(mine) == micro_batch:
                ids = torch.tensor(mine, dtype=torch.long)  # (B, T)
                yield {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
                mine = []


def pad_right(seqs: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence on the right; padding is masked from attention and loss."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    labels = ids.masked_fill(mask == 0, IGNORE)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def padded_batches(
    texts: Sequence[str],
    tokenizer,
    seq_length: int,
    micro_batch: int,
    rank: int,
    world: int,
    seed: int,
    start: int = 0,
    cycle: bool = True,
) -> Iterator[dict[str, torch.Tensor]]:
    """Non-packed mode: one text per row (BOS text EOS, cut to seq_length), padded to the batch max.

    The global sample index ``g`` runs over passes of seeded orders; rank ``g % world`` takes it.
    """
    if not texts:
        raise ValueError("no texts to train on (empty split)")
    n = len(texts)
    eos = tokenizer.eos_token_id
    g = start
    mine: list[list[int]] = []
    while True:
        epoch, i = divmod(g, n)
        if not cycle and epoch > 0:
            break
        if g % world == rank:
            text = texts[epoch_order(n, seed, epoch)[i]] if cycle else texts[i]
            ids = tokenizer(text, add_special_tokens=True)["input_ids"][: seq_length - 1] + [eos]
            mine.append(ids)
            if len(mine) == micro_batch:
                yield pad_right(mine, tokenizer.pad_token_id)
                mine = []
        g += 1
    if mine:
        yield pad_right(mine, tokenizer.pad_token_id)


def eval_batches(
    texts: Sequence[str], tokenizer, seq_length: int, micro_batch: int, rank: int, world: int, max_batches: int
) -> list[dict[str, torch.Tensor]]:
    """A fixed held-out set: the same number of packed micro batches on every rank, in text order.

    Every rank gets exactly ``n`` batches (ZeRO-3 hangs when ranks run different numbers of
    forwards); ``n = min(max_batches, chunks // (micro_batch x world))``, at least 1.
    """
    if not texts:
        return []
    total_tokens = sum(len(t) + 1 for t in tokenizer(list(texts))["input_ids"])
    n = max(1, min(max_batches, total_tokens // seq_length // (micro_batch * world)))
    limit = n * micro_batch * world
    out, mine = [], []
    for k, chunk in packed_chunks(texts, tokenizer, seq_length, seed=0, shuffle=False):
        if k >= limit:
            break
        if k % world == rank:
            mine.append(chunk)
            if len(mine) == micro_batch:
                ids = torch.tensor(mine, dtype=torch.long)
                out.append({"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)})
                mine = []
    return out
