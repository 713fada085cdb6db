"""Shared-prefix packing: layout, padding-free length, and the mask against a plain-loop reference.

    python -m pytest tests/data/test_packed_pairs.py -q
"""

from __future__ import annotations

import torch

from stackllama_ds.data.packed_pairs import (
    attention_bias,
    common_prefix,
    pack_groups,
    pack_pairs,
    span_biases,
)


def test_common_prefix_leaves_each_sequence_a_token():
    assert common_prefix([[1, 2, 3, 4], [1, 2, 5]]) == 2
    assert common_prefix([[1, 2, 3], [1, 2, 3]]) == 2  # identical: each keeps its last token
    assert common_prefix([[1, 2], [1, 2, 3, 4]]) == 1  # one a prefix of the other
    assert common_prefix([[7, 8, 9]]) == 2  # alone: all but the scored token
    assert common_prefix([[1, 2], [3, 4]]) == 0
    assert common_prefix([[1, 2, 3, 9], [1, 2, 3, 8], [1, 5, 3, 9]]) == 1


def test_pack_pairs_layout_and_no_padding():
    # pair 0: question [1, 2, 3], answers [4, 5] / [6]; pair 1: question [9], answers [8, 7] / [7]
    pairs = [([1, 2, 3, 4, 5], [1, 2, 3, 6], 2, 1), ([9, 8, 7], [9, 7], 2, 1)]
    row = pack_pairs(pairs)
    assert row.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 9, 8, 7, 7]]
    assert row.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 0, 1, 2, 1]]
    assert row.group.tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]
    assert row.branch.tolist() == [0, 0, 0, 1, 1, 2, 0, 1, 1, 2]
    assert row.ends.tolist() == [4, 8, 5, 9]  # [chosen..., rejected...], as the padded batch's rows
    assert row.answer_lengths.tolist() == [2.0, 2.0, 1.0, 1.0]
    # padding-free: each question once, no pad: 5 + 4 - 3 and 3 + 2 - 1 tokens
    assert row.n_tokens == (5 + 4 - 3) + (3 + 2 - 1) == 10
    assert row.unshared_tokens == 5 + 4 + 3 + 2
    # every sequence's tokens at their positions are the sequence itself
    for seq, end in zip([p[0] for p in pairs] + [p[1] for p in pairs], row.ends.tolist()):
        g, b = int(row.group[end]), int(row.branch[end])
        idx = [i for i in range(end + 1) if row.group[i] == g and row.branch[i] in (0, b)]
        assert row.input_ids[0, idx].tolist() == list(seq)
        assert row.position_ids[0, idx].tolist() == list(range(len(seq)))


def _allowed_by_loop(group: list[int], branch: list[int]) -> list[list[bool]]:
    L = len(group)
    return [[group[i] == group[j] and j <= i and (branch[j] == 0 or branch[j] == branch[i]) for j in range(L)]
            for i in range(L)]


def test_attention_bias_matches_loop_reference():
    g = torch.Generator().manual_seed(0)
    groups = [[torch.randint(1, 9, (int(n),), generator=g).tolist() for n in torch.randint(1, 7, (k,), generator=g)]
              for k in (1, 2, 3, 2)]
    groups[1][1] = groups[1][0][:2] + [5, 5]  # a shared prefix
    row = pack_groups(groups)
    for dtype in (torch.float32, torch.bfloat16):
        bias = attention_bias(row, dtype)
        assert bias.shape == (1, 1, row.n_tokens, row.n_tokens) and bias.dtype == dtype
        want = torch.tensor(_allowed_by_loop(row.group.tolist(), row.branch.tolist()))
        assert torch.equal(bias[0, 0] == 0, want)
        assert (bias[0, 0][~want] == torch.finfo(dtype).min).all()
    assert len(row.ends) == sum(len(s) for s in groups)


def test_span_biases_are_the_diagonal_blocks():
    row = pack_groups([[[1, 2, 3, 4], [1, 2, 5]], [[6, 7]], [[8, 9], [8, 9], [8, 1, 1]]])
    full = attention_bias(row, torch.float32)[0, 0]
    blocks = span_biases(row, torch.float32)
    assert [b is None for b in blocks] == [False, True, False]  # a one-sequence group: plain causal
    for (s, e, _), b in zip(row.spans, blocks):
        want = full[s:e, s:e]
        if b is None:
            assert torch.equal(want == 0, torch.ones(e - s, e - s, dtype=torch.bool).tril())
        else:
            assert b.shape == (1, 1, e - s, e - s) and torch.equal(b[0, 0], want)
    # nothing outside the blocks is allowed
    inside = torch.zeros_like(full, dtype=torch.bool)
    for s, e, _ in row.spans:
        inside[s:e, s:e] = True
    assert (full[~inside] == torch.finfo(torch.float32).min).all()
