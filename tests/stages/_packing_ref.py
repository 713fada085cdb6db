"""The list-based SFT packing as it was before the token cache (issue 15), kept verbatim as a reference.

tests/stages/test_packing.py checks that packing from TokenizedTexts (memory-mapped or in memory)
gives exactly these chunks; bench/data_bench.py sft-rss runs it as the "before" data path. Not for
production: it re-tokenizes every text on every rank at every start and resume.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch


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
    mine: list[list[int]] = []
    for k, chunk in packed_chunks(texts, tokenizer, seq_length, seed, start):
        if k % world == rank:
            mine.append(chunk)
            if len(mine) == micro_batch:
                ids = torch.tensor(mine, dtype=torch.long)  # (B, T)
                yield {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
                mine = []


def eval_batches(
    texts: Sequence[str], tokenizer, seq_length: int, micro_batch: int, rank: int, world: int, max_batches: int
) -> list[dict[str, torch.Tensor]]:
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


def padded_rows(texts: Sequence[str], tokenizer, seq_length: int, rank: int, world: int, seed: int,
                start: int = 0, cycle: bool = True) -> Iterator[list[int]]:
    """The unpadded rows padded_batches took, in order (its padding itself is unchanged)."""
    n = len(texts)
    eos = tokenizer.eos_token_id
    g = start
    while True:
        epoch, i = divmod(g, n)
        if not cycle and epoch > 0:
            break
        if g % world == rank:
            text = texts[epoch_order(n, seed, epoch)[i]] if cycle else texts[i]
            yield tokenizer(text, add_special_tokens=True)["input_ids"][: seq_length - 1] + [eos]
        g += 1
