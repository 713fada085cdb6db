"""The SFT token cache (data/tokens.py): same texts as sft_texts, built once, keyed by tokenizer and
split, rebuilt or named when damaged. Fast: a small saved split and an in-memory tokenizer."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from stackllama_ds.data import tokens as tokens_mod
from stackllama_ds.data.packing import TokenizedTexts
from stackllama_ds.data.posts import DataError
from stackllama_ds.data.prepare import sft_texts
from stackllama_ds.data.tokens import IDS, META, OFFSETS, TOKENS, sft_tokens

WORDS = ["beer", "hops", "malt", "yeast", "ale", "lager", "stout", "brew", "IPA", "wort"]


def _tok(vocab_size: int):
    from stackllama_ds.models.tiny import train_tokenizer

    rnd = random.Random(vocab_size)
    return train_tokenizer([" ".join(rnd.choices(WORDS, k=30)) for _ in range(100)], vocab_size=vocab_size)


@pytest.fixture(scope="module")
def tok():
    return _tok(300)


@pytest.fixture
def data(tmp_path):
    """A saved ``sft`` split: 40 pairs, some repeated (and one pair that differs only in where q ends)."""
    from datasets import Dataset, DatasetDict

    rnd = random.Random(0)
    qs = [f"q{i} " + " ".join(rnd.choices(WORDS, k=rnd.randint(1, 20))) for i in range(10)]
    rows = [(rnd.choice(qs), " ".join(rnd.choices(WORDS, k=rnd.randint(0, 50)))) for _ in range(40)]
    rows += rows[5:12] + [("q0 x", "y"), ("q0 ", "xy")]
    cols = {"question": [q for q, _ in rows], "response_j": [a for _, a in rows]}
    DatasetDict({"sft": Dataset.from_dict(cols)}).save_to_disk(str(tmp_path / "data"))
    return tmp_path / "data"


def _folders(data) -> list:
    return sorted(p for p in (data / TOKENS).iterdir() if not p.name.startswith("."))


def _texts(data, split: str = "sft") -> list[str]:
    from datasets import load_from_disk

    return sft_texts(load_from_disk(str(data))[split])


def _same(a: TokenizedTexts, b: TokenizedTexts) -> bool:
    return np.array_equal(a.ids, b.ids) and np.array_equal(a.offsets, b.offsets)


def test_cache_holds_sft_texts_tokenized(data, tok):
    got = sft_tokens(data, "sft", tok)
    want = TokenizedTexts.from_texts(_texts(data), tok)
    assert len(got) == len(_texts(data)) == 42  # 40 pairs + 2, the 7 repeats dropped
    assert _same(got, want)
    assert isinstance(got.ids, np.memmap) and got.ids.dtype == np.uint16  # vocab 300 fits 16 bits
    assert all(got.ids[e - 1] == tok.eos_token_id for e in got.offsets[1:])


def test_built_once_and_keyed_by_tokenizer(data, tok, monkeypatch):
    calls = []
    real = tokens_mod.encode_texts
    monkeypatch.setattr(tokens_mod, "encode_texts", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = sft_tokens(data, "sft", tok)
    assert calls, "the first call tokenizes"
    calls.clear()
    again = sft_tokens(data, "sft", tok, build=False)
    assert not calls and _same(first, again), "a second call reads the cache, no tokenizing"
    assert len(_folders(data)) == 1
    assert not [p for p in (data / TOKENS).iterdir() if p.name.startswith(".")], "temp folder left"
    other = _tok(280)
    theirs = sft_tokens(data, "sft", other)
    assert calls, "another tokenizer gets its own cache"
    assert len(_folders(data)) == 2 and _same(theirs, TokenizedTexts.from_texts(_texts(data), other))
    calls.clear()
    same_content = _tok(300)  # the same tokenizer built again: content-keyed, so the same cache
    sft_tokens(data, "sft", same_content)
    assert not calls and len(_folders(data)) == 2


def _truncate(p, n=2):
    p.write_bytes(p.read_bytes()[:-n])


@pytest.mark.parametrize("damage, named", [
    (lambda f: (f / META).unlink(), META),
    (lambda f: (f / META).write_text("{not json"), META),
    (lambda f: _truncate(f / IDS), IDS),
    (lambda f: (f / OFFSETS).unlink(), OFFSETS),
    (lambda f: (f / META).write_text(json.dumps({**json.loads((f / META).read_text()), "n_texts": 3})), OFFSETS),
])
def test_damaged_cache_is_named_or_rebuilt(data, tok, damage, named):
    sft_tokens(data, "sft", tok)
    want = TokenizedTexts.from_texts(_texts(data), tok)  # not the mapping: damage rewrites its file
    (folder,) = _folders(data)
    damage(folder)
    with pytest.raises(DataError, match=rf"{folder}/{named}: .*"):
        sft_tokens(data, "sft", tok, build=False)
    lines = []
    assert _same(sft_tokens(data, "sft", tok, log=lines.append), want), "build=True rebuilds it"
    assert any("rebuilding the token cache" in x and named in x for x in lines), lines


def test_offsets_that_do_not_add_up_are_named(data, tok):
    sft_tokens(data, "sft", tok)
    (folder,) = _folders(data)
    off = np.fromfile(folder / OFFSETS, dtype=np.int64)
    off[-1] -= 1  # right size, wrong content
    off.tofile(folder / OFFSETS)
    with pytest.raises(DataError, match=rf"{folder}/{OFFSETS}: token cache offsets"):
        sft_tokens(data, "sft", tok, build=False)


def test_empty_split_gives_an_empty_cache(tmp_path, tok):
    from stackllama_ds.data.prepare import prepare

    posts = tmp_path / "Posts.xml"  # one question, no answers: every split empty
    posts.write_text('<?xml version="1.0" encoding="utf-8"?>\n<posts>\n  <row Id="1" PostTypeId="1" '
                     'CreationDate="2020-01-01T00:00:00.000" Score="1" Body="&lt;p&gt;b&lt;/p&gt;" Title="t" />\n</posts>')
    prepare(posts, tmp_path / "data", log=lambda *a: None)
    t = sft_tokens(tmp_path / "data", "sft", tok)
    assert len(t) == 0 and t.n_tokens == 0


def test_missing_split_is_named(data, tok):
    with pytest.raises(DataError, match=r"rm_eval/state.json: missing from the prepared data"):
        sft_tokens(data, "rm_eval", tok)
    (data / "sft" / "data-00000-of-00001.arrow").unlink()
    with pytest.raises(DataError, match=r"sft/data-00000-of-00001.arrow: missing from the prepared data"):
        sft_tokens(data, "sft", tok)


def test_real_prepared_dump_matches_sft_texts(tmp_path, tok):
    """prepare's own output (Arrow stream files it writes itself), the beer dump shipped in data/."""
    from pathlib import Path

    from stackllama_ds.data.prepare import load_prepared, prepare

    beer = Path(__file__).resolve().parents[2] / "data" / "beer.stackexchange.com" / "Posts.xml"
    if not beer.exists():
        pytest.skip("data/beer.stackexchange.com not present")
    prepare(beer, tmp_path / "data", log=lambda *a: None)
    dsd = load_prepared(tmp_path / "data")
    for name in ("sft", "rm_eval"):
        assert _same(sft_tokens(tmp_path / "data", name, tok), TokenizedTexts.from_texts(sft_texts(dsd[name]), tok))
    assert len(_folders(tmp_path / "data")) == 2  # one per split
