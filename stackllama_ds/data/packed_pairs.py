"""Shared-prefix packing: texts that start alike (a question and its answers) in ONE row, no padding.

    python -m pytest tests/data/test_packed_pairs.py -q

A group is a few token sequences that begin with the same tokens (a pair's chosen and rejected
``format_qa(q, a)`` texts; ``ask``'s samples of one question). The group's shared prefix (the
longest common token prefix, so every sequence is exactly prefix + its own tokens whatever BPE does
at the question/answer boundary) goes into the row once, then each sequence's own tokens:

    row   = [prefix_0, own_0_0, own_0_1, prefix_1, own_1_0, own_1_1, ...]   (1, L), L = sum of unique tokens
    pos   = [0..P0-1,  P0..,    P0..,    0..P1-1,  P1..,    P1..,    ...]   each branch continues its prefix
    attend: i -> j  iff  same group, j <= i, and j is in the prefix or in i's own branch

so a sequence's every token sees exactly the tokens (at the positions) it sees alone: the scores are
the unshared forward's, and the prefix's activations get the gradient of every branch, as two
padded rows would give it. Each branch keeps at least its last token (the score is read there):
identical sequences, or one a prefix of another, still get one row position each.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

Tokens = Sequence[int] | np.ndarray


class PackedRow(NamedTuple):
    """Groups of prefix-sharing sequences packed into one row; N scored sequences, L unique tokens."""

    input_ids: torch.Tensor  # (1, L) long
    position_ids: torch.Tensor  # (1, L) long: restart at 0 per group; a branch continues its prefix
    group: torch.Tensor  # (L,) long: the group each token belongs to
    branch: torch.Tensor  # (L,) long: 0 = the group's shared prefix, b >= 1 its b-th sequence's own tokens
    ends: torch.Tensor  # (N,) long: row index of each sequence's last token (its score), in the caller's order
    answer_lengths: torch.Tensor  # (N,) float32: answer tokens of each sequence (ODIN's length head)
    unshared_tokens: int  # sum of the N sequences' lengths: what unshared, unpadded rows would hold
    spans: tuple[tuple[int, int, int], ...]  # (start, end, sequences) of each group: attention never leaves one

    @property
    def n_tokens(self) -> int:
        return self.input_ids.shape[1]


def common_prefix(seqs: Sequence[Tokens]) -> int:
    """Length of the longest common token prefix of ``seqs``, leaving each at least one own token."""
    arrs = [np.asarray(s) for s in seqs]
    n = min(len(a) for a in arrs) - 1
    if len(arrs) == 1 or n <= 0:
        return max(n, 0)
    same = np.ones(n, dtype=bool)
    for a in arrs[1:]:
        same &= arrs[0][:n] == a[:n]
    return n if same.all() else int(np.argmin(same))


def pack_groups(groups: Sequence[Sequence[Tokens]], answer_lengths: Sequence[float] | None = None) -> PackedRow:
    """One row of ``groups`` (each: sequences sharing a prefix); ``ends`` and ``answer_lengths`` in the
    flattened order (group 0's sequences, group 1's, ...). ``answer_lengths`` default: each sequence's length."""
    ids: list[np.ndarray] = []
    pos: list[np.ndarray] = []
    grp: list[np.ndarray] = []
    br: list[np.ndarray] = []
    ends: list[int] = []
    spans: list[tuple[int, int, int]] = []
    at, total, lengths = 0, 0, []
    for g, seqs in enumerate(groups):
        start = at
        P = common_prefix(seqs)
        arrs = [np.asarray(s, dtype=np.int64) for s in seqs]
        parts = [(arrs[0][:P], 0)] + [(a[P:], b + 1) for b, a in enumerate(arrs)]
        for k, (toks, b) in enumerate(parts):
            n = len(toks)
            ids.append(toks)
            pos.append(np.arange(n) + (P if b else 0))  # a branch continues its prefix
            grp.append(np.full(n, g))
            br.append(np.full(n, b))
            at += n
            if k:
                ends.append(at - 1)
        spans.append((start, at, len(arrs)))
        total += sum(len(a) for a in arrs)
        lengths += [float(len(a)) for a in arrs]
    if answer_lengths is not None:
        lengths = [float(x) for x in answer_lengths]
    if len(lengths) != len(ends):
        raise ValueError(f"{len(answer_lengths or [])} answer lengths for {len(ends)} sequences")

    def cat(xs: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.concatenate(xs).astype(np.int64))

    return PackedRow(cat(ids)[None], cat(pos)[None], cat(grp), cat(br), torch.tensor(ends, dtype=torch.long),
                     torch.tensor(lengths, dtype=torch.float32), total, tuple(spans))


def pack_pairs(pairs: Sequence) -> PackedRow:
    """A micro batch of B pairs ``(chosen ids, rejected ids[, len chosen, len rejected, ...])`` (``FitPair``)
    as one row; ``ends`` (2B,) in the padded batch's order ``[chosen..., rejected...]``."""
    B = len(pairs)
    row = pack_groups([(p[0], p[1]) for p in pairs],
                      [x for p in pairs for x in ((p[2], p[3]) if len(p) >= 4 else (len(p[0]), len(p[1])))])
    order = torch.arange(2 * B).view(B, 2).T.reshape(-1)  # (2B,): chosen of every pair, then rejected
    return row._replace(ends=row.ends[order], answer_lengths=row.answer_lengths[order])


def attention_bias(row: PackedRow, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """The additive mask (1, 1, L, L) of ``row``: 0 where query i may attend key j, dtype's min elsewhere.

        allowed[i, j] = group[i] == group[j] and j <= i and (branch[j] == 0 or branch[j] == branch[i])

    ``dtype``: the attention's (the model's compute dtype; SDPA wants the query's dtype or bool,
    eager attention adds the mask, so a float mask serves both).
    """
    g, b = row.group.to(device), row.branch.to(device)
    L = g.shape[0]
    idx = torch.arange(L, device=device)
    allowed = (g[:, None] == g[None, :]) & (idx[None, :] <= idx[:, None]) & ((b[None, :] == 0) | (b[:, None] == b[None, :]))
    bias = torch.zeros((L, L), dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)  # (L, L)
    return bias[None, None]  # (1, 1, L, L)


def span_biases(row: PackedRow, dtype: torch.dtype, device: torch.device | str = "cpu") -> tuple:
    """Each group's diagonal block (1, 1, n_g, n_g) of ``attention_bias``, None for a one-sequence group
    (plain causal): what attention needs when it runs group by group (``models.packed.grouped_sdpa``)."""
    out = []
    for s, e, n in row.spans:
        if n == 1:
            out.append(None)
            continue
        b = row.branch[s:e].to(device)
        idx = torch.arange(e - s, device=device)
        allowed = (idx[None, :] <= idx[:, None]) & ((b[None, :] == 0) | (b[:, None] == b[None, :]))  # (n_g, n_g)
        out.append(torch.zeros((e - s, e - s), dtype=dtype, device=device)
                   .masked_fill_(~allowed, torch.finfo(dtype).min)[None, None])
    return tuple(out)
