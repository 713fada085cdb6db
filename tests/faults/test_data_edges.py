"""Data at its edges, per rank: one text or one pair for two ranks (an empty shard), end of data
(finite eval sets, cycling train streams), everything filtered. No hang: each test has a timeout.

    python -m pytest tests/faults/test_data_edges.py -q

Covered elsewhere: empty SFT split and 1-text held-out set (tests/stages/test_packing.py), equal
eval forwards on 3 ranks (tests/stages/test_rm.py), prompt sharding (tests/stages/test_ppo.py).
The multi-rank "every prompt too long" run is in test_ppo_faults.py.
"""

from __future__ import annotations

import itertools
import random

import pytest

from stackllama_ds.data.packing import eval_batches, packed_batches, padded_batches
from stackllama_ds.data.pair_batches import eval_pair_batches, pair_batches
from stackllama_ds.data.prompts import prompt_batch

pytestmark = pytest.mark.timeout(60)
WORLD = 2


@pytest.fixture(scope="module")
def tok():
    from stackllama_ds.models.tiny import train_tokenizer

    rnd = random.Random(0)
    words = ["beer", "hops", "malt", "yeast", "ale", "lager", "stout", "brew"]
    return train_tokenizer([" ".join(rnd.choice(words) for _ in range(20)) for _ in range(100)], vocab_size=300)


@pytest.mark.parametrize("make", [packed_batches, padded_batches])
def test_one_short_text_two_ranks_both_train_by_cycling(tok, make):
    per_rank = [list(itertools.islice(make(["beer hops"], tok, 16, 2, r, WORLD, seed=0), 3)) for r in range(WORLD)]
    assert [len(b) for b in per_rank] == [3, 3], "a rank ran dry: its next() would block the other in a collective"
    for r in range(WORLD):
        assert all(b["input_ids"].shape[0] == 2 for b in per_rank[r])


def test_one_eval_pair_two_ranks_same_forwards_padding_weightless():
    shards = [eval_pair_batches([([1, 5], [1, 6])], 0, 4, r, WORLD) for r in range(WORLD)]
    assert [len(s) for s in shards] == [1, 1]
    (_, w0), (_, w1) = shards[0][0], shards[1][0]
    assert w0.tolist() == [1.0, 0.0, 0.0, 0.0] and w1.tolist() == [0.0] * 4  # rank 1's shard is empty


def test_one_train_pair_two_ranks_cycles():
    per_rank = [list(itertools.islice(pair_batches([([1, 5], [1, 6])], 0, 2, r, WORLD, seed=0), 2)) for r in range(WORLD)]
    assert [len(b) for b in per_rank] == [2, 2]


def test_all_pairs_filtered_is_a_clear_error():
    with pytest.raises(ValueError, match="no reward-model pairs to train on"):
        next(pair_batches([], 0, 2, 0, WORLD, seed=0))


def test_empty_held_out_set_gives_no_batches_on_every_rank(tok):
    # Same count (0) on both ranks, so no rank waits in a collective. (SFT then reports eval_loss 0.0.)
    assert [eval_batches([], tok, 16, 2, r, WORLD, 4) for r in range(WORLD)] == [[], []]


def test_one_prompt_two_ranks_both_roll_out():
    per_rank = [prompt_batch(1, start=0, batch=3, rank=r, world=WORLD, seed=0) for r in range(WORLD)]
    assert per_rank == [[0, 0, 0], [0, 0, 0]]
