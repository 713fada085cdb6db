"""Bad input through ``stackllama-ds prepare``: exit 2, ``FILE:LINE`` (and the attribute or column)
on stderr, no traceback, no output folder; ``--skip-bad-rows`` counts the row instead.

    python -m pytest tests/faults/test_bad_input_cli.py -q

The parser itself (every reason, line numbers across chunks and workers, Votes.xml, keeping a
previous output) is tested in tests/data/test_data_bad_input.py; this file checks the command.
Most cases call ``cli.main`` in this process (an escaping exception fails the test just as a
traceback would); two run the real command in a subprocess.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from stackllama_ds import cli
from stackllama_ds.data import markdown
from tests.conftest import run_cli
from tests.faults import _harness as h

HEAD = '<?xml version="1.0" encoding="utf-8"?>\n<posts>\n'
GOOD = [
    '  <row Id="1" PostTypeId="1" CreationDate="2014-01-21T20:26:05.383" Score="3" Body="&lt;p&gt;Why?&lt;/p&gt;" '
    'Title="Q one" Tags="&lt;a&gt;" />',
    '  <row Id="2" PostTypeId="2" ParentId="1" Score="1" Body="&lt;p&gt;low&lt;/p&gt;" />',
    '  <row Id="3" PostTypeId="2" ParentId="1" Score="7" Body="&lt;p&gt;high&lt;/p&gt;" />',
]
BAD_LINE = 6  # 1 <?xml, 2 <posts>, 3-5 the good rows, 6 the bad one

BAD_ROWS = {  # reason -> (row, attribute named in the message)
    "invalid_xml": ('  <row Id="9" PostTypeId="2" ParentId="1" Score="1" Body="a < b" />', "Body"),
    "missing_id": ('  <row PostTypeId="2" ParentId="1" Score="1" Body="x" />', "Id"),
    "missing_post_type": ('  <row Id="9" ParentId="1" Score="1" Body="x" />', "PostTypeId"),
    "bad_integer": ('  <row Id="9" PostTypeId="2" ParentId="1" Score="lots" Body="x" />', "Score"),
}


def dump(tmp_path: Path, extra: list[str], tail: str = "</posts>\n") -> Path:
    p = tmp_path / "site.example" / "Posts.xml"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(HEAD + "\n".join(GOOD + extra) + "\n" + tail)
    return p


def prepare_cli(capsys, posts: Path, out: Path, *extra: str) -> tuple[int, str]:
    rc = cli.main(["prepare", "--posts", str(posts), "--out", str(out), *extra])
    return rc, capsys.readouterr().err


def assert_refused(rc: int, err: str, where: str, out: Path) -> None:
    assert rc == 2, err
    assert where in err, err
    assert len(err.strip().splitlines()) == 1, err  # one line, no traceback
    assert not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


@pytest.mark.parametrize("reason", sorted(BAD_ROWS))
def test_bad_row_exit_2_names_line_and_attribute(tmp_path, capsys, reason):
    row, attr = BAD_ROWS[reason]
    posts, out = dump(tmp_path, [row]), tmp_path / "out"
    rc, err = prepare_cli(capsys, posts, out)
    assert_refused(rc, err, f"{posts}:{BAD_LINE}: {attr}:", out)
    rc, err = prepare_cli(capsys, posts, out, "--skip-bad-rows")
    assert rc == 0, err
    assert json.loads((out / "report.json").read_text())["skipped"][reason] == 1


def test_truncated_file_real_command(tmp_path):
    posts = dump(tmp_path, ['  <row Id="9" PostTypeId="2" ParentId="1" Score="1" Body="x" />'])
    data = posts.read_bytes()
    posts.write_bytes(data[: data.index(b'Id="9"') + 25])  # cut inside the last row
    out = tmp_path / "out"
    t0 = time.time()
    r = run_cli("prepare", "--posts", posts, "--out", out, timeout=120)
    h.record("truncated Posts.xml (CLI prepare)", f"exit {r.returncode}: '{r.stderr.strip()[:90]}...'",
             time.time() - t0, "nothing (no output folder)")
    assert_refused(r.returncode, r.stderr, f"{posts}:{BAD_LINE}:", out)
    assert "truncated" in r.stderr or "file ends" in r.stderr, r.stderr
    r = run_cli("prepare", "--posts", posts, "--out", out, "--skip-bad-rows", timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "report.json").read_text())["skipped"]["truncated"] == 1


def test_missing_closing_tag(tmp_path, capsys):
    posts, out = dump(tmp_path, [], tail=""), tmp_path / "out"
    rc, err = prepare_cli(capsys, posts, out)
    assert_refused(rc, err, f"{posts}:{BAD_LINE}: </posts>:", out)


def test_orphan_answer_is_counted_not_fatal(tmp_path, capsys):
    posts, out = dump(tmp_path, ['  <row Id="9" PostTypeId="2" ParentId="404" Score="1" Body="x" />']), tmp_path / "o"
    rc, err = prepare_cli(capsys, posts, out)
    assert rc == 0, err
    assert json.loads((out / "report.json").read_text())["skipped"]["orphan_answer"] == 1


def test_html_the_converter_chokes_on(tmp_path, capsys, monkeypatch):
    posts = dump(tmp_path, ['  <row Id="9" PostTypeId="2" ParentId="1" Score="1" Body="&lt;p&gt;BOOM" />'])
    out = tmp_path / "out"

    def convert(html):
        if "BOOM" in html:
            raise RecursionError("maximum recursion depth exceeded")
        return html

    monkeypatch.setattr(markdown, "_CONVERTER", ("test", convert))
    rc, err = prepare_cli(capsys, posts, out)
    assert_refused(rc, err, f"{posts}:{BAD_LINE}: Body:", out)
    rc, err = prepare_cli(capsys, posts, out, "--skip-bad-rows")
    assert rc == 0 and json.loads((out / "report.json").read_text())["skipped"]["html_conversion"] == 1


def test_missing_posts_file(tmp_path, capsys):
    rc, err = prepare_cli(capsys, tmp_path / "nope.xml", tmp_path / "out")
    assert rc == 2 and "nope.xml" in err and "file not found" in err, err


# ------------------------------------------------------------------------------ paired files
PAIR = {"qid": 1, "question": "q?", "date": "2020-01-01", "metadata": ["a"], "response_j": "good", "response_k": "bad"}


def write_jsonl(tmp_path: Path, rows: list[dict]) -> Path:
    p = tmp_path / "pairs.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


PAIRED_CASES = {  # name -> (second row, fragment naming the column)
    "missing_column": ({k: v for k, v in PAIR.items() if k != "response_k"}, ":2: response_k: missing column"),
    "qid_not_int": ({**PAIR, "qid": "seven"}, ":2: qid: column 'qid' must be int"),
    "metadata_not_list": ({**PAIR, "metadata": "a,b"}, ":2: metadata: column 'metadata' must be list of str"),
    "response_null": ({**PAIR, "response_j": None}, ":2: response_j: column 'response_j' must be str"),
}


@pytest.mark.parametrize("case", sorted(PAIRED_CASES))
def test_paired_jsonl_names_line_and_column(tmp_path, capsys, case):
    row, frag = PAIRED_CASES[case]
    posts, out = write_jsonl(tmp_path, [PAIR, row]), tmp_path / "out"
    rc, err = prepare_cli(capsys, posts, out)
    assert_refused(rc, err, f"{posts}{frag}", out)


def test_paired_json_array_names_item(tmp_path, capsys):
    p = tmp_path / "pairs.json"
    p.write_text(json.dumps([PAIR, {**PAIR, "date": 20200101}]))
    rc, err = prepare_cli(capsys, p, tmp_path / "out")
    assert_refused(rc, err, "item 1: date: column 'date' must be str", tmp_path / "out")


def test_paired_parquet_missing_column_real_command(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist([{k: v for k, v in PAIR.items() if k != "metadata"}]), p)
    r = run_cli("prepare", "--posts", p, "--out", tmp_path / "out", timeout=120)
    assert_refused(r.returncode, r.stderr, f"{p}: metadata: missing column 'metadata'", tmp_path / "out")
