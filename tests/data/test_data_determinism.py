"""Same seed -> same datasets (any worker count); the paired input format round-trips."""

from __future__ import annotations

import json

import pytest
from _se_dumps import DUMPS, SHARED, need_shared

from stackllama_ds.data.pair_rules import SPLITS
from stackllama_ds.data.posts import DataError
from stackllama_ds.data.prepare import load_prepared, prepare, sft_texts
from stackllama_ds.data.template import format_qa

COLS = ["qid", "question", "date", "metadata", "response_j", "response_k"]


def _dump(name="datascience.meta.stackexchange.com"):
    need_shared()
    return SHARED / (name if name in DUMPS else DUMPS[0]) / "Posts.xml"


def _as_dicts(dsd):
    return {n: dsd[n].to_dict() for n in SPLITS}


def test_same_seed_same_data_any_workers(tmp_path, prepared):
    posts = _dump()
    base, _ = prepared(posts.parent.name)
    prepare(posts, tmp_path / "w2", workers=2, seed=0, log=lambda *a: None)
    assert _as_dicts(load_prepared(tmp_path / "w2")) == _as_dicts(base)
    prepare(posts, tmp_path / "s1", seed=1, log=lambda *a: None)
    other = load_prepared(tmp_path / "s1")
    assert {n: set(other[n]["qid"]) for n in SPLITS} != {n: set(base[n]["qid"]) for n in SPLITS}


def test_sft_texts(prepared):
    dsd, _ = prepared(_dump().parent.name)
    texts = sft_texts(dsd["sft"])
    want = list(dict.fromkeys(format_qa(q, a) for q, a in zip(dsd["sft"]["question"], dsd["sft"]["response_j"])))
    assert texts == want and len(set(texts)) == len(texts)
    assert all(t.startswith("Question: ") and "\n\nAnswer: " in t for t in texts)


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet"])
def test_paired_round_trip(tmp_path, prepared, fmt):
    posts = _dump()
    site = posts.parent.name
    base, _ = prepared(site)
    rows = [{c: r[c] for c in COLS} for n in SPLITS for r in base[n]]
    path = tmp_path / f"pairs.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    report = prepare(path, tmp_path / "out", site=site, seed=0, log=lambda *a: None)
    got = load_prepared(tmp_path / "out")
    assert report["format"] == "paired" and report["pairs"] == len(rows)
    for n in SPLITS:  # same (seed, site, qid) -> same split; scores are null in this format
        want = base[n].to_dict()
        have = got[n].to_dict()
        assert have["score_j"] == [None] * len(want["qid"]) == have["score_k"]
        for c in COLS + ["site"]:
            assert have[c] == want[c], (n, c)


def test_paired_missing_column(tmp_path):
    path = tmp_path / "pairs.jsonl"
    row = {"qid": 1, "question": "q", "date": "d", "metadata": [], "response_j": "a"}
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match=r"pairs\.jsonl:1: response_k: missing column 'response_k'"):
        prepare(path, tmp_path / "out", log=lambda *a: None)
    assert not (tmp_path / "out").exists()


def test_paired_wrong_type(tmp_path):
    path = tmp_path / "pairs.jsonl"
    good = {"qid": 1, "question": "q", "date": "d", "metadata": ["t"], "response_j": "a", "response_k": "b"}
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "qid": "7"}) + "\n")
    with pytest.raises(DataError, match=r"pairs\.jsonl:2: qid: column 'qid' must be int"):
        prepare(path, tmp_path / "out", log=lambda *a: None)


def test_paired_parquet_missing_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"qid": [1], "question": ["q"]}), path)
    with pytest.raises(DataError, match=r"pairs\.parquet: date: missing column"):
        prepare(path, tmp_path / "out", log=lambda *a: None)
