"""SFT batches (data/packing.py): packed stream coverage, rank shards, resume, padded mode. Fast, no ranks."""

from __future__ import annotations

import random

import pytest
import torch

from stackllama_ds.data.packing import (
    IGNORE,
    epoch_order,
    eval_batches,
    packed_batches,
    packed_chunks,
    padded_batches,
)

WORLD, MICRO, SEQ, SEED = 2, 2, 32, 7


@pytest.fixture(scope="module")
def tok():
    from stackllama_ds.models.tiny import train_tokenizer

    rnd = random.Random(0)
    words = ["beer", "hops", "malt", "yeast", "ale", "lager", "stout", "brew", "IPA", "wort", "barrel"]
    corpus = [" ".join(rnd.choice(words) for _ in range(rnd.randint(3, 40))) for _ in range(200)]
    return train_tokenizer(corpus, vocab_size=300)


@pytest.fixture(scope="module")
def texts():
    rnd = random.Random(1)
    words = ["beer", "hops", "malt", "yeast", "ale", "lager", "stout", "brew", "IPA", "wort"]
    # Lengths vary from a few tokens to several chunks, so texts straddle chunk boundaries.
    return [
        f"Question: q{i}\n\nAnswer: " + " ".join(rnd.choice(words) for _ in range(rnd.randint(1, 60)))
        for i in range(23)
    ]


def expected_pass(texts, tok, epoch: int) -> list[int]:
    """The token stream of one pass, built independently: <s> text </s> per text, seeded order."""
    out: list[int] = []
    for j in epoch_order(len(texts), SEED, epoch):
        out += tok(texts[j], add_special_tokens=True)["input_ids"] + [tok.eos_token_id]
    return out


def global_chunks(texts, tok, n_chunks: int, start: int = 0) -> list[list[int]]:
    """Interleave the ranks' packed batches back into global chunk order (chunk k -> rank k % world)."""
    per_rank = []
    for r in range(WORLD):
        it = packed_batches(texts, tok, SEQ, MICRO, r, WORLD, SEED, start=start)
        rows: list[list[int]] = []
        while len(rows) < n_chunks // WORLD + MICRO:
            rows += next(it)["input_ids"].tolist()
        per_rank.append(rows)
    return [per_rank[k % WORLD][k // WORLD] for k in range(n_chunks)]


def test_packed_batches_have_no_padding_and_train_every_token(tok, texts):
    it = packed_batches(texts, tok, SEQ, MICRO, 0, WORLD, SEED)
    for _ in range(10):
        b = next(it)
        assert b["input_ids"].shape == (MICRO, SEQ)
        assert not (b["input_ids"] == tok.pad_token_id).any(), "pad token inside a packed batch"
        assert torch.equal(b["labels"], b["input_ids"]), "packed labels must equal inputs (nothing masked)"
        assert bool(b["attention_mask"].all())


def test_stream_is_texts_joined_by_eos_each_token_once_per_pass(tok, texts):
    p0, p1 = expected_pass(texts, tok, 0), expected_pass(texts, tok, 1)
    assert p0 != p1, "each pass should use its own seeded order"
    n = (len(p0) + len(p1)) // SEQ  # whole chunks in two passes
    n -= n % (MICRO * WORLD)
    stream = [t for c in global_chunks(texts, tok, n) for t in c]
    # Pass 0 exactly once, in order, then pass 1 continues with no remainder dropped.
    assert stream[: len(p0)] == p0
    assert stream[len(p0) :] == p1[: len(stream) - len(p0)]
    # EOS between texts: every <s> after the first is preceded by </s>.
    bos, eos = tok.bos_token_id, tok.eos_token_id
    starts = [i for i, t in enumerate(stream) if t == bos]
    assert len(starts) > len(texts) and all(stream[i - 1] == eos for i in starts[1:])


def test_ranks_see_distinct_shards(tok, texts):
    chunks = {r: [] for r in range(WORLD)}
    for r in range(WORLD):
        it = packed_batches(texts, tok, SEQ, MICRO, r, WORLD, SEED)
        for _ in range(4):
            chunks[r] += [tuple(x) for x in next(it)["input_ids"].tolist()]
    # Global indices: rank r owns chunks r, r + world, ...; compare with packed_chunks directly.
    gen = packed_chunks(texts, tok, SEQ, SEED)
    first = [tuple(next(gen)[1]) for _ in range(4 * MICRO * WORLD)]
    for r in range(WORLD):
        assert chunks[r] == first[r::WORLD]
    assert not set(chunks[0]) & set(chunks[1])


@pytest.mark.parametrize("batches_done", [1, 5])
def test_resume_start_gives_the_continuation(tok, texts, batches_done):
    start = batches_done * MICRO * WORLD  # global chunks consumed after `batches_done` micro steps
    for r in range(WORLD):
        full = packed_batches(texts, tok, SEQ, MICRO, r, WORLD, SEED)
        for _ in range(batches_done):
            next(full)
        resumed = packed_batches(texts, tok, SEQ, MICRO, r, WORLD, SEED, start=start)
        for _ in range(6):  # runs on into the second pass
            a, b = next(full), next(resumed)
            assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_on_another_world_size_keeps_the_stream(tok, texts):
    """The data position counts global chunks, so 2 ranks -> 1 rank continues the same stream."""
    start = 3 * MICRO * WORLD
    one = packed_batches(texts, tok, SEQ, MICRO, 0, 1, SEED, start=start)
    got = [row for _ in range(4) for row in next(one)["input_ids"].tolist()]
    gen = packed_chunks(texts, tok, SEQ, SEED, start=start)
    assert got == [next(gen)[1] for _ in range(len(got))]


def test_padded_mode_pads_to_longest_and_masks_padding(tok, texts):
    seq = 24  # shorter than many texts: those are cut
    rows_seen = []
    for r in range(WORLD):
        it = padded_batches(texts, tok, seq, 3, r, WORLD, SEED, cycle=False)
        for b in it:
            ids, mask, labels = b["input_ids"], b["attention_mask"], b["labels"]
            lengths = mask.sum(1)
            assert ids.shape[1] == int(lengths.max()) <= seq, "pad to the longest row of the batch"
            assert torch.equal(labels == IGNORE, mask == 0), "labels are -100 exactly on padding"
            assert bool((ids[mask == 0] == tok.pad_token_id).all())
            assert bool((labels[mask == 1] == ids[mask == 1]).all())
            for i, n in enumerate(lengths.tolist()):
                assert ids[i, n - 1].item() == tok.eos_token_id and ids[i, 0].item() == tok.bos_token_id
                rows_seen.append(tuple(ids[i, :n].tolist()))
    # One pass (cycle=False): every text once across the two ranks.
    expected = [tuple(tok(t)["input_ids"][: seq - 1] + [tok.eos_token_id]) for t in texts]
    assert sorted(rows_seen) == sorted(expected)


def test_padded_resume_start(tok, texts):
    start = 2 * 2 * WORLD
    full = padded_batches(texts, tok, 64, 2, 1, WORLD, SEED)
    for _ in range(2):
        next(full)
    resumed = padded_batches(texts, tok, 64, 2, 1, WORLD, SEED, start=start)
    for _ in range(8):
        a, b = next(full), next(resumed)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_eval_batches_equal_count_on_every_rank(tok, texts):
    per_rank = [eval_batches(texts, tok, SEQ, MICRO, r, WORLD, max_batches=3) for r in range(WORLD)]
    assert len(per_rank[0]) == len(per_rank[1]) >= 1  # ZeRO-3 hangs when forward counts differ
    short = [eval_batches(texts[:1], tok, 512, MICRO, r, WORLD, max_batches=3) for r in range(WORLD)]
    assert len(short[0]) == len(short[1]) == 1, "a held-out set shorter than one step still gives 1 batch"
    for b in per_rank[0]:
        assert b["input_ids"].shape == (MICRO, SEQ)


def test_empty_split_is_an_error(tok):
    with pytest.raises(ValueError, match="no texts"):
        next(packed_batches([], tok, SEQ, MICRO, 0, WORLD, SEED))
    with pytest.raises(ValueError, match="no texts"):
        next(padded_batches([], tok, SEQ, MICRO, 0, WORLD, SEED))
