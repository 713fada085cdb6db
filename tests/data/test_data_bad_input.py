"""Malformed dumps: DataError naming file, line and attribute; skip_bad_rows counts; no output left."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stackllama_ds.data import markdown
from stackllama_ds.data.posts import DataError, iter_parsed
from stackllama_ds.data.prepare import load_prepared, prepare

HEAD = '\ufeff<?xml version="1.0" encoding="utf-8"?>\r\n<posts>\r\n'
ROWS = [
    '  <row Id="1" PostTypeId="1" AcceptedAnswerId="3" CreationDate="2014-01-21T20:26:05.383" Score="3" '
    'Body="&lt;p&gt;Why &lt;code&gt;x&lt;/code&gt;?&lt;/p&gt;&#xA;" Title="Q one" Tags="&lt;a&gt;&lt;b&gt;" />',
    '  <row Id="2" PostTypeId="2" ParentId="1" Score="1" Body="&lt;p&gt;low&lt;/p&gt;" />',
    '  <row Id="3" PostTypeId="2" ParentId="1" Score="7" Body="&lt;p&gt;high&lt;/p&gt;" />',
    '  <row Id="4" PostTypeId="2" ParentId="1" Score="-2" Body="&lt;p&gt;bad&lt;/p&gt;" />',
]
TAIL = "</posts>"
BAD_LINE = 7  # 1 header, 2 <posts>, 3-6 the rows above, 7 the bad row


def write(tmp_path: Path, extra: list[str], tail: str = TAIL, name: str = "site.example") -> Path:
    p = tmp_path / name / "Posts.xml"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes((HEAD + "\r\n".join(ROWS + extra) + "\r\n" + tail).encode())
    return p


def leftovers(parent: Path) -> list[str]:
    return sorted(x.name for x in parent.iterdir() if x.name.startswith("."))


CASES = {
    "invalid_xml": ('  <row Id="9" PostTypeId="2" ParentId="1" Score="1" Body="a < b" />', "Body"),
    "missing_id": ('  <row PostTypeId="2" ParentId="1" Score="1" Body="x" />', "Id"),
    "missing_post_type": ('  <row Id="9" ParentId="1" Score="1" Body="x" />', "PostTypeId"),
    "bad_integer": ('  <row Id="9" PostTypeId="2" ParentId="1" Score="lots" Body="x" />', "Score"),
    "missing_attribute": ('  <row Id="9" PostTypeId="2" Score="1" Body="x" />', "ParentId"),
    "duplicate_id": ('  <row Id="3" PostTypeId="2" ParentId="1" Score="2" Body="again" />', "Id"),
}


@pytest.mark.parametrize("reason", sorted(CASES))
def test_bad_row_names_line_and_attribute(tmp_path, reason):
    row, attr = CASES[reason]
    posts = write(tmp_path, [row])
    out = tmp_path / "out"
    with pytest.raises(DataError) as e:
        prepare(posts, out, log=lambda *a: None)
    assert e.value.reason == reason
    assert e.value.line == BAD_LINE and e.value.attribute == attr
    assert f"{posts}:{BAD_LINE}: {attr}:" in str(e.value)
    assert not out.exists() and leftovers(tmp_path) == []
    report = prepare(posts, out, skip_bad_rows=True, log=lambda *a: None)
    assert report["skipped"][reason] == 1
    assert sum(report["skipped"].values()) == 1
    assert report["pairs"] == 3  # the good rows: 7 > 1 > -1 (the accepted answer scores 3+1)
    assert json.loads((out / "report.json").read_text()) == report


def test_truncated_inside_a_row(tmp_path):
    full = write(tmp_path, ['  <row Id="9" PostTypeId="2" ParentId="1" Score="1" Body="x" />'])
    data = full.read_bytes()
    full.write_bytes(data[: data.index(b'Id="9"') + 30])
    with pytest.raises(DataError, match="file ends inside this row") as e:
        prepare(full, tmp_path / "out", log=lambda *a: None)
    assert e.value.line == BAD_LINE and e.value.reason == "truncated"
    report = prepare(full, tmp_path / "out", skip_bad_rows=True, log=lambda *a: None)
    assert report["skipped"]["truncated"] == 1 and report["pairs"] == 3


def test_truncated_at_a_line_boundary(tmp_path):
    posts = write(tmp_path, [], tail="")
    with pytest.raises(DataError, match="no closing </posts>") as e:
        prepare(posts, tmp_path / "out", log=lambda *a: None)
    assert e.value.attribute == "</posts>" and e.value.line == BAD_LINE
    report = prepare(posts, tmp_path / "out", skip_bad_rows=True, log=lambda *a: None)
    assert report["skipped"]["truncated"] == 1


def test_orphan_answer_is_always_counted(tmp_path):
    posts = write(tmp_path, ['  <row Id="9" PostTypeId="2" ParentId="404" Score="1" Body="x" />'])
    for skip in (False, True):
        report = prepare(posts, tmp_path / "out", skip_bad_rows=skip, log=lambda *a: None)
        assert report["skipped"]["orphan_answer"] == 1 and report["answers"] == 4
        assert any("orphan_answer" in n for n in report["notes"])


def test_html_the_converter_fails_on(tmp_path, monkeypatch):
    posts = write(tmp_path, ['  <row Id="9" PostTypeId="2" ParentId="1" Score="1" Body="&lt;p&gt;BOOM" />'])

    def convert(html):
        if "BOOM" in html:
            raise RuntimeError("panic")
        return html

    monkeypatch.setattr(markdown, "_CONVERTER", ("test", convert))
    with pytest.raises(DataError) as e:
        prepare(posts, tmp_path / "out", log=lambda *a: None)
    assert (e.value.reason, e.value.line, e.value.attribute) == ("html_conversion", BAD_LINE, "Body")
    report = prepare(posts, tmp_path / "out", skip_bad_rows=True, log=lambda *a: None)
    assert report["skipped"]["html_conversion"] == 1


def test_failed_run_keeps_previous_output(tmp_path):
    good = write(tmp_path, [])
    out = tmp_path / "out"
    first = prepare(good, out, log=lambda *a: None)
    bad = write(tmp_path, [CASES["bad_integer"][0]], name="other.example")
    with pytest.raises(DataError):
        prepare(bad, out, log=lambda *a: None)
    assert json.loads((out / "report.json").read_text()) == first
    kept = load_prepared(out)  # still loads, with the rows its report counts
    assert {n: kept[n].num_rows for n in first["splits"]} == {n: x["pairs"] for n, x in first["splits"].items()}
    assert leftovers(tmp_path) == []
    second = prepare(bad, out, skip_bad_rows=True, log=lambda *a: None)  # replaces the complete output
    assert json.loads((out / "report.json").read_text()) == second and second["site"] == "other.example"
    assert leftovers(tmp_path) == []


def test_refuses_to_replace_a_foreign_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="refusing"):
        prepare(write(tmp_path, []), out, log=lambda *a: None)
    assert (out / "notes.txt").read_text() == "mine"


def test_load_prepared_names_the_folder(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "nope")):
        load_prepared(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "dataset_dict.json").write_text("{}")
    with pytest.raises(DataError, match="incomplete.*report.json"):
        load_prepared(tmp_path / "half")


def test_bad_votes_row(tmp_path):
    posts = write(tmp_path, [])
    votes = posts.parent / "Votes.xml"
    votes.write_text(HEAD.replace("posts", "votes") + '  <row Id="1" PostId="3" VoteTypeId="2" />\r\n'
                     '  <row Id="2" VoteTypeId="2" />\r\n</votes>')
    with pytest.raises(DataError) as e:
        prepare(posts, tmp_path / "out", votes=votes, log=lambda *a: None)
    assert (e.value.file, e.value.line, e.value.attribute) == (str(votes), 4, "PostId")
    report = prepare(posts, tmp_path / "out", votes=votes, skip_bad_rows=True, log=lambda *a: None)
    assert report["skipped"]["votes_missing_attribute"] == 1


def test_line_numbers_across_chunks_and_workers(tmp_path):
    rows = [f'  <row Id="{i}" PostTypeId="2" ParentId="1" Score="1" Body="x" />' for i in range(10, 400)]
    rows[300] = rows[300].replace('Score="1"', 'Score="1.5"')
    posts = write(tmp_path, rows)
    for workers in (1, 2):
        with pytest.raises(DataError) as e:
            for _ in iter_parsed(posts, workers=workers, chunk_bytes=2000):
                pass
        assert (e.value.line, e.value.attribute) == (BAD_LINE + 300, "Score")
        got = [a for c in iter_parsed(posts, workers=workers, chunk_bytes=2000, skip_bad_rows=True)
               for a in c.answers]
        assert [a[1] for a in got] == [4, 5, 6] + [BAD_LINE + i for i in range(390) if i != 300]
