"""prepare's split files, written by datasets' ArrowWriter, equal what the hand-written pyarrow writer
it replaced made (kept below as the reference); the folder loads with ``load_from_disk`` and the
token cache's reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _se_dumps import SHARED, need_shared

from stackllama_ds.data import prepare as prep
from stackllama_ds.data.pair_rules import SPLITS
from stackllama_ds.data.tokens import split_identity


class HandWrittenSplitWriter:
    """The writer prepare used before ArrowWriter (verbatim but for taking ``features``)."""

    def __init__(self, path: Path, features, batch_rows: int = 1000):
        import pyarrow as pa

        schema = features.arrow_schema
        self.pa, self.path, self.schema, self.batch_rows = pa, path, schema, batch_rows
        self.sink = pa.OSFile(str(path), "wb")
        self.writer = pa.ipc.new_stream(self.sink, schema)
        self.cols: dict[str, list] = {n: [] for n in schema.names}
        self.rows = 0
        self.runs = 0
        self._last_key: tuple[str, int] | None = None
        self._qid_chunks: list = []

    def add(self, qid, site, question, date, metadata, response_j, response_k, score_j, score_k) -> None:
        c = self.cols
        for k, v in zip(self.schema.names, (qid, site, question, date, metadata, response_j, response_k,
                                            score_j, score_k)):
            c[k].append(v)
        self.rows += 1
        if (site, qid) != self._last_key:
            self.runs += 1
            self._last_key = (site, qid)
        if len(c["qid"]) >= self.batch_rows:
            self.flush()

    def flush(self, force: bool = False) -> None:
        if self.cols["qid"] or force:
            self._qid_chunks.append(self.pa.array(self.cols["qid"], self.pa.int64()))
            self.writer.write_batch(self.pa.RecordBatch.from_pydict(self.cols, schema=self.schema))
            self.cols = {n: [] for n in self.schema.names}

    def close(self) -> None:
        self.flush(force=self.rows == 0)
        self.writer.close()
        self.sink.close()

    def distinct_qids(self) -> int:
        import pyarrow.compute as pc

        return len(pc.unique(self.pa.chunked_array(self._qid_chunks, self.pa.int64())))


def _both(monkeypatch, tmp_path: Path, posts, **kw) -> tuple[Path, Path, dict, dict]:
    """prepare ``posts`` with the hand-written writer (``before``) and with today's (``after``)."""
    before, after = tmp_path / "before", tmp_path / "after"
    with monkeypatch.context() as m:
        m.setattr(prep, "_SplitWriter", HandWrittenSplitWriter)
        rep_before = prep.prepare(posts, before, seed=0, log=lambda *a: None, **kw)
    rep_after = prep.prepare(posts, after, seed=0, log=lambda *a: None, **kw)
    return before, after, rep_before, rep_after


def _check_same(before: Path, after: Path, rep_before: dict, rep_after: dict) -> None:
    from datasets import load_from_disk

    timing = ("seconds", "mb_per_s")
    assert {k: v for k, v in rep_after.items() if k not in timing} == \
           {k: v for k, v in rep_before.items() if k not in timing}
    assert json.loads((after / prep.REPORT).read_text()) == rep_after
    assert (after / "dataset_dict.json").read_bytes() == (before / "dataset_dict.json").read_bytes()
    old, new = load_from_disk(str(before)), load_from_disk(str(after))
    assert list(new) == list(old) == list(SPLITS)
    for n in SPLITS:
        assert new[n].features == old[n].features == prep._features()
        assert new[n].num_rows == old[n].num_rows == rep_after["splits"][n]["pairs"]
        assert new[n].to_dict() == old[n].to_dict()
        assert (after / n / "dataset_info.json").read_bytes() == (before / n / "dataset_info.json").read_bytes()
        data = "data-00000-of-00001.arrow"
        if new[n].num_rows:  # an empty split: the old writer added one empty batch, ArrowWriter none
            assert (after / n / data).read_bytes() == (before / n / data).read_bytes()
            # and so the same fingerprint (it hashes the file's size)
            assert (after / n / "state.json").read_bytes() == (before / n / "state.json").read_bytes()
        assert json.loads((after / n / "state.json").read_text())["_data_files"] == [{"filename": data}]
        # the token cache reads the files as Arrow streams, without datasets
        files, _ = split_identity(after, n)
        assert sum(_stream_rows(f) for f in files) == new[n].num_rows


def _stream_rows(path: Path) -> int:
    import pyarrow as pa

    with pa.OSFile(str(path)) as f:
        return sum(rb.num_rows for rb in pa.ipc.open_stream(f))


@pytest.mark.parametrize("name", ["coffee.stackexchange.com", "ai.stackexchange.com"])
def test_arrow_writer_output_equals_the_hand_written_one(monkeypatch, tmp_path, name):
    need_shared()
    if not (SHARED / name).is_dir():
        pytest.skip(f"{name} is not among the shared dumps")
    _check_same(*_both(monkeypatch, tmp_path, SHARED / name))


def test_several_sites_equal_the_hand_written_output(monkeypatch, tmp_path):
    need_shared()
    sites = [SHARED / "coffee.stackexchange.com", SHARED / "ai.meta.stackexchange.com"]
    if not all(s.is_dir() for s in sites):
        pytest.skip("coffee and ai.meta are not among the shared dumps")
    _check_same(*_both(monkeypatch, tmp_path, sites))


def test_paired_input_with_empty_splits_equals_the_hand_written_output(monkeypatch, tmp_path):
    # Three questions, rows of one question apart: most splits stay empty, questions are counted distinct.
    rows = [{"qid": q, "question": f"Q{q}", "date": "2020-01-01", "metadata": ["t"], "response_j": f"a{i}",
             "response_k": f"b{i}"} for i, q in enumerate([1, 2, 1, 3, 2])]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before, after, rep_before, rep_after = _both(monkeypatch, tmp_path, path, site="x")
    assert any(s["pairs"] == 0 for s in rep_after["splits"].values())
    assert rep_after["questions"] == 3 and rep_after["pairs"] == 5
    _check_same(before, after, rep_before, rep_after)
