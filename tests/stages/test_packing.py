"""SFT batches (data/packing.py): packed stream coverage, rank shards, resume, padded mode, and equality
with the list-based original (_packing_ref.py) from a memory-mapped token cache. Fast, no ranks."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch

from stackllama_ds.data.packing import (
    IGNORE,
    epoch_order,
    epoch_order_array,
    eval_batches,
    packed_batches,
    packed_chunks,
    padded_batches,
)
from tests.stages import _packing_ref as _ref

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


# --- issue 15: packing from TokenizedTexts (memory-mapped cache or in memory) == the list-based original
@pytest.fixture(scope="module")
def cached(tmp_path_factory, tok, texts):
    """A saved split of `texts`' pairs (3 rows repeated: dropped): its SFT texts and its memory-mapped cache."""
    from datasets import Dataset, DatasetDict, load_from_disk

    from stackllama_ds.data.prepare import sft_texts
    from stackllama_ds.data.tokens import sft_tokens

    qa = [t.removeprefix("Question: ").split("\n\nAnswer: ") for t in texts]
    rows = {"question": [q for q, _ in qa + qa[:3]], "response_j": [a for _, a in qa + qa[:3]]}
    root = tmp_path_factory.mktemp("cached") / "data"
    DatasetDict({"sft": Dataset.from_dict(rows)}).save_to_disk(str(root))
    tokens = sft_tokens(root, "sft", tok)
    assert isinstance(tokens.ids, np.memmap) and len(tokens) == len(texts)
    return sft_texts(load_from_disk(str(root))["sft"]), tokens


def _ref_chunks(gen, n: int) -> list:
    return [next(gen) for _ in range(n)]


@pytest.mark.parametrize("seed", [0, 7])
@pytest.mark.parametrize("seq", [7, 32, 100])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_memmap_packing_equals_the_list_based_original(tok, cached, seed, seq, world):
    """Same chunks, same rank assignment, same stream across passes, from any start (resume)."""
    ref_texts, tokens = cached
    per_pass = tokens.n_tokens // seq  # chunks in one pass: starts past 1 and 2 passes cross boundaries
    for start in (0, 5, per_pass + 1, 2 * per_pass + 3):
        for rank in range(world):
            want = _ref_chunks(_ref.packed_batches(ref_texts, tok, seq, 2, rank, world, seed, start=start), 4)
            for src in (tokens, ref_texts):  # the memory-mapped cache, and a list tokenized in memory
                got = _ref_chunks(packed_batches(src, tok, seq, 2, rank, world, seed, start=start), 4)
                assert all(torch.equal(a[k], b[k]) for a, b in zip(got, want) for k in a), (start, rank)
    gen, ref = packed_chunks(tokens, tok, seq, seed, start=3), _ref.packed_chunks(ref_texts, tok, seq, seed, start=3)
    assert _ref_chunks(gen, 2 * per_pass + 5) == _ref_chunks(ref, 2 * per_pass + 5)


def test_chunk_longer_than_a_pass_spans_several_passes(tok):
    one = ["beer hops"]  # 4 tokens a pass, 16 a chunk
    for start in (0, 2, 6):
        for r in range(2):
            got = _ref_chunks(packed_batches(one, tok, 16, 2, r, 2, 0, start=start), 3)
            want = _ref_chunks(_ref.packed_batches(one, tok, 16, 2, r, 2, 0, start=start), 3)
            assert all(torch.equal(a[k], b[k]) for a, b in zip(got, want) for k in a)


def test_memmap_eval_and_padded_equal_the_original(tok, cached):
    ref_texts, tokens = cached
    for seq, max_b in ((SEQ, 3), (512, 3), (16, 50)):
        for r in range(WORLD):
            got = eval_batches(tokens, tok, seq, MICRO, r, WORLD, max_b)
            want = _ref.eval_batches(ref_texts, tok, seq, MICRO, r, WORLD, max_b)
            assert len(got) == len(want) and all(torch.equal(a[k], b[k]) for a, b in zip(got, want) for k in a)
    for cycle, start in ((False, 0), (True, 0), (True, 3 * len(ref_texts) + 1)):
        for r in range(WORLD):
            rows = []  # each row without its padding
            for b in itertools.islice(padded_batches(tokens, tok, 24, 3, r, WORLD, SEED, start, cycle), 40):
                rows += [ids[:n] for ids, n in zip(b["input_ids"].tolist(), b["attention_mask"].sum(1).tolist())]
            want = list(itertools.islice(_ref.padded_rows(ref_texts, tok, 24, r, WORLD, SEED, start, cycle), len(rows)))
            assert rows == want and rows


def test_epoch_order_array_is_epoch_order():
    for n, seed, epoch in ((1, 0, 0), (23, 7, 3), (1000, 5, 1)):
        assert epoch_order_array(n, seed, epoch).tolist() == epoch_order(n, seed, epoch)
