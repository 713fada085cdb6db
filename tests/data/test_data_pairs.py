"""Scores, pairing and splits against plain reference implementations."""

from __future__ import annotations

import math
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from stackllama_ds.config import SplitsConfig
from stackllama_ds.data.pair_rules import SPLITS, answer_score, make_pairs, split_of
from stackllama_ds.data.posts import parse_tags


def test_answer_score_rule():
    assert answer_score(0, 0, False) == 0
    assert answer_score(1, 1, False) == 1  # log2(2) = 1
    assert answer_score(2, 2, False) == 2  # log2(3) = 1.58 -> 2
    assert answer_score(5, 5, True) == 4  # log2(6) = 2.58 -> 3, +1 accepted
    assert answer_score(-1, 10, True) == -1  # negative Score wins over everything
    assert answer_score(3, 0, True) == 1  # upvotes from Votes.xml, Score only for the < 0 test
    for up in range(0, 2000, 7):
        assert answer_score(up, up, False) == round(math.log2(1 + up))


def _reference_pairs(scores):
    return [(j, k) for i in range(len(scores)) for k2 in range(i + 1, len(scores))
            for j, k in [(i, k2) if scores[i] > scores[k2] else (k2, i)] if scores[i] != scores[k2]]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-1, 6), max_size=12), st.integers(1, 12), st.text(max_size=8))
def test_make_pairs(scores, cap, key):
    ref = _reference_pairs(scores)
    got = make_pairs(scores, cap, key)
    assert len(got) == min(cap, len(ref))
    assert all(scores[j] > scores[k] for j, k in got)
    assert len(set(got)) == len(got) and set(got) <= set(ref)
    assert got == make_pairs(scores, cap, key)  # deterministic in the key
    if len(ref) <= cap:
        assert got == ref


def test_make_pairs_sample_depends_on_key():
    scores = list(range(10))  # 45 pairs
    samples = {tuple(make_pairs(scores, 10, f"0-site-{q}")) for q in range(20)}
    assert len(samples) > 1


def test_split_shares_and_stability():
    splits = SplitsConfig()
    counts = Counter(split_of(0, "s", q, splits) for q in range(20000))
    for name in SPLITS:
        assert abs(counts[name] / 20000 - getattr(splits, name)) < 0.015
    assert split_of(0, "s", 123, splits) == split_of(0, "s", 123, splits)
    assert [split_of(1, "s", q, splits) for q in range(50)] != [split_of(0, "s", q, splits) for q in range(50)]


def test_zero_share_never_chosen():
    splits = SplitsConfig(sft=0.5, rm_train=0.5, rm_eval=0, rl_train=0, rl_eval=0)
    assert {split_of(0, "s", q, splits) for q in range(5000)} == {"sft", "rm_train"}


def test_parse_tags_both_formats():
    assert parse_tags("<hops><history>") == ["hops", "history"]
    assert parse_tags("|feature-request|status-completed|") == ["feature-request", "status-completed"]
    assert parse_tags("") == []
