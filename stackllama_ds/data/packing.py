"""SFT batches: StackLLaMA packing (texts joined by EOS, cut into seq_length chunks) or padded.

Packing builds one global token stream ``<s> text </s> <s> text </s> ...`` over the texts in a
seeded order per pass, running on across passes (no remainder dropped, so every token is trained
exactly once per pass), and cuts it into ``seq_length`` chunks. Chunk ``k`` of the global stream
goes to rank ``k % world``; the data position is the number of global chunks consumed, which stays
meaningful when a run resumes on another world size.

Texts come tokenized (``TokenizedTexts``: one flat id array plus offsets; in training memory-mapped
from the cache of data/tokens.py) or as strings, tokenized here in memory. Chunk ``k`` is tokens
``k*seq_length ..`` of the stream; ``TokenStream`` finds them arithmetically, so a rank reads only
its own chunks and a resume at any chunk neither re-tokenizes nor walks the stream.
"""

from __future__ import annotations

import array
import itertools
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from stackllama_ds.models.padding import pad

IGNORE = -100


@dataclass(frozen=True, eq=False)  # eq would compare arrays elementwise
class TokenizedTexts:
    """Texts as one flat token array: text j is ``ids[offsets[j]:offsets[j + 1]]``, ``<bos> text <eos>``.

    ``ids`` (N,) any integer dtype, ``offsets`` (n + 1,) int64 from 0 to N: numpy arrays,
    memory-mapped (data/tokens.py) or in memory (``from_texts``).
    """

    ids: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    @classmethod
    def from_texts(cls, texts: Sequence[str], tokenizer, batch: int = 256) -> TokenizedTexts:
        """Tokenize ``texts`` in memory, for callers that hold a list of strings."""
        lengths = np.zeros(len(texts) + 1, dtype=np.int64)
        parts = [np.zeros(0, dtype=np.int64)]
        for i in range(0, len(texts), batch):
            flat, lens = encode_texts(list(texts[i : i + batch]), tokenizer, np.int64)
            parts.append(flat)
            lengths[i + 1 : i + 1 + len(lens)] = lens
        return cls(np.concatenate(parts), np.cumsum(lengths))


def encode_texts(texts: list[str], tokenizer, dtype) -> tuple[np.ndarray, list[int]]:
    """Each text as ``tokenizer(text, add_special_tokens=True)`` + EOS, concatenated; and each one's length."""
    seqs = tokenizer(texts, add_special_tokens=True)["input_ids"]
    for s in seqs:
        s.append(tokenizer.eos_token_id)
    lens = [len(s) for s in seqs]
    return np.fromiter(itertools.chain.from_iterable(seqs), dtype=dtype, count=sum(lens)), lens


def as_tokenized(texts: Sequence[str] | TokenizedTexts, tokenizer) -> TokenizedTexts:
    return texts if isinstance(texts, TokenizedTexts) else TokenizedTexts.from_texts(texts, tokenizer)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(f"{seed}-{epoch}").shuffle(order)
    return order


def epoch_order_array(n: int, seed: int, epoch: int) -> np.ndarray:
    """``epoch_order`` as (n,) int64, 8 bytes per text instead of a list of ints. Random.shuffle only
    swaps items in place, so shuffling an array.array gives the same permutation."""
    order = array.array("q", range(n))
    random.Random(f"{seed}-{epoch}").shuffle(order)
    return np.frombuffer(order, dtype=np.int64)


class TokenStream:
    """The infinite packed stream, read at any token position without walking to it.

    Pass e holds every text once, in ``epoch_order(n, seed, e)`` (text order when not ``shuffle``),
    T tokens in all; stream token p is token ``p % T`` of pass ``p // T``. Inside a pass,
    ``cum = cumsum(len(text) for text in the pass's order)`` (n int64, built once per pass, positions
    only move forward) finds the text that holds a position by binary search.
    """

    def __init__(self, tokens: TokenizedTexts, seed: int, shuffle: bool = True):
        if len(tokens) == 0:
            raise ValueError("no texts to train on (empty split)")
        self.tokens, self.seed, self.shuffle = tokens, seed, shuffle
        self.lengths = np.diff(tokens.offsets)  # (n,) every one >= 1: the EOS
        self.total = tokens.n_tokens  # T
        self.epoch = -1

    def _enter(self, epoch: int) -> None:
        if epoch != self.epoch:
            n = len(self.tokens)
            self.order = epoch_order_array(n, self.seed, epoch) if self.shuffle else np.arange(n)
            self.cum = np.cumsum(self.lengths[self.order])  # (n,) token count up to each text's end
            self.epoch = epoch

    def read(self, pos: int, count: int) -> np.ndarray:
        """Stream tokens ``pos .. pos + count - 1``, (count,) int64."""
        out = np.empty(count, dtype=np.int64)
        epoch, q = divmod(pos, self.total)
        self._enter(epoch)
        i = int(np.searchsorted(self.cum, q, side="right"))  # the text holding in-pass token q
        skip = q - (int(self.cum[i - 1]) if i else 0)
        ids, offsets = self.tokens.ids, self.tokens.offsets
        filled = 0
        while filled < count:
            if i == len(self.order):  # no remainder dropped: run on into the next pass
                epoch, i = epoch + 1, 0
                self._enter(epoch)
            j = int(self.order[i])
            a, b = int(offsets[j]) + skip, int(offsets[j + 1])
            m = min(b - a, count - filled)
            out[filled : filled + m] = ids[a : a + m]
            filled, i, skip = filled + m, i + 1, 0
        return out


def _packed(rows: list[np.ndarray]) -> dict[str, torch.Tensor]:
    ids = torch.from_numpy(np.stack(rows))  # (B, T) int64
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def packed_chunks(
    texts: Sequence[str] | TokenizedTexts, tokenizer, seq_length: int, seed: int, start: int = 0,
    shuffle: bool = True,
) -> Iterator[tuple[int, list[int]]]:
    """Yield ``(global_chunk_index, token_ids)`` from ``start`` on; chunks are exactly seq_length long."""
    stream = TokenStream(as_tokenized(texts, tokenizer), seed, shuffle)
    k = start
    while True:
        yield k, stream.read(k * seq_length, seq_length).tolist()
        k += 1


def packed_batches(
    texts: Sequence[str] | TokenizedTexts,
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
    stream = TokenStream(as_tokenized(texts, tokenizer), seed)
    k = start + (rank - start) % world  # this rank's first chunk at or after start
    while True:
        rows = []
        for _ in range(micro_batch):
            rows.append(stream.read(k * seq_length, seq_length))
            k += world
        yield _packed(rows)


def pad_right(seqs: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence on the right; padding is masked from attention and loss."""
    ids, mask = pad(seqs, pad_id, "right")
    return {"input_ids": ids, "labels": ids.masked_fill(mask == 0, IGNORE), "attention_mask": mask}


def padded_batches(
    texts: Sequence[str] | TokenizedTexts,
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
    tokens = as_tokenized(texts, tokenizer)
    n = len(tokens)
    if not n:
        raise ValueError("no texts to train on (empty split)")
    ids, offsets, eos = tokens.ids, tokens.offsets, tokenizer.eos_token_id
    g = start
    mine: list[list[int]] = []
    order, order_epoch = np.zeros(0, dtype=np.int64), -1
    while True:
        epoch, i = divmod(g, n)
        if not cycle and epoch > 0:
            break
        if g % world == rank:
            if cycle and epoch != order_epoch:
                order, order_epoch = epoch_order_array(n, seed, epoch), epoch
            j = int(order[i]) if cycle else i
            a, b = int(offsets[j]), int(offsets[j + 1]) - 1  # the text without its stored EOS
            mine.append(ids[a : min(b, a + seq_length - 1)].tolist() + [eos])
            if len(mine) == micro_batch:
                yield pad_right(mine, tokenizer.pad_token_id)
                mine = []
        g += 1
    if mine:
        yield pad_right(mine, tokenizer.pad_token_id)


def eval_batches(
    texts: Sequence[str] | TokenizedTexts, tokenizer, seq_length: int, micro_batch: int, rank: int, world: int,
    max_batches: int,
) -> list[dict[str, torch.Tensor]]:
    """A fixed held-out set: the same number of packed micro batches on every rank, in text order.

    Every rank gets exactly ``n`` batches (ZeRO-3 hangs when ranks run different numbers of
    forwards); ``n = min(max_batches, chunks // (micro_batch x world))``, at least 1.
    """
    tokens = as_tokenized(texts, tokenizer)
    if not len(tokens):
        return []
    n = max(1, min(max_batches, tokens.n_tokens // seq_length // (micro_batch * world)))
    stream = TokenStream(tokens, seed=0, shuffle=False)
    # Batch b holds this rank's chunks b*micro_batch .. : global chunk rank + (b*micro_batch + i) * world.
    return [
        _packed([stream.read((rank + (b * micro_batch + i) * world) * seq_length, seq_length)
                 for i in range(micro_batch)])
        for b in range(n)
    ]
