"""Several sites in one data set: folders, ``<site>.7z`` archives read as streams, per-site counts.

    python -m pytest tests/data/test_multisite.py -q

Also: any well-formed Posts.xml layout (rows over several lines, single quotes, any attribute order,
a prolog with DOCTYPE/comments/PIs, everything on one line) gives the rows of the one-row-per-line
dump, and no entity or DTD is ever fetched or expanded into the data.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from _se_dumps import DUMPS, SHARED, need_shared, read_rows
from lxml import etree

from stackllama_ds import cli
from stackllama_ds.config_loader import ConfigError, load_config
from stackllama_ds.data.pair_rules import SPLITS
from stackllama_ds.data.posts import DataError, DumpFile, iter_parsed
from stackllama_ds.data.prepare import load_prepared, prepare

CONLANG = "conlang.meta.stackexchange.com"  # small, with Votes.xml
QUIET = {"log": lambda *a: None}
COUNTS = ("questions", "answers", "questions_with_pairs", "pairs")


def _need(name: str) -> Path:
    need_shared()
    if name not in DUMPS:
        pytest.skip(f"{name} not in {SHARED}")
    return SHARED / name


def _pack(folder: Path, archive: Path, members=("Posts.xml", "Votes.xml"), rename: dict | None = None) -> Path:
    import py7zr

    archive.parent.mkdir(parents=True, exist_ok=True)
    with py7zr.SevenZipFile(archive, "w") as z:
        for m in members:
            if (folder / m).exists():
                z.write(folder / m, (rename or {}).get(m, m))
    return archive


def _rows(dsd) -> dict[str, list[dict]]:
    return {n: dsd[n].to_list() for n in SPLITS}


def _site_rows(dsd, site: str) -> dict[str, list[dict]]:
    return {n: [r for r in dsd[n].to_list() if r["site"] == site] for n in SPLITS}


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    """prepare() over the whole shared folder, once."""
    need_shared()
    out = tmp_path_factory.mktemp("multi") / "out"
    report = prepare(SHARED, out, seed=0, **QUIET)
    assert json.loads((out / "report.json").read_text()) == report
    return load_prepared(out), report


# ---------------------------------------------------------------------------- several sites
def test_folder_of_real_dumps_counts_add_up(multi):
    dsd, report = multi
    assert list(report["sites"]) == DUMPS and report["site"] is None
    sites = report["sites"].values()
    for k in COUNTS:
        assert report[k] == sum(s[k] for s in sites), k
    for n in SPLITS:
        for k in ("questions", "pairs"):
            assert report["splits"][n][k] == sum(s["splits"][n][k] for s in sites), (n, k)
        assert dsd[n].num_rows == report["splits"][n]["pairs"]
    assert report["input_bytes"] == sum(s["input_bytes"] for s in sites)
    assert sum(report["skipped"].values()) == 0
    for name, s in report["sites"].items():
        assert s["source"] == str(SHARED / name / "Posts.xml")
        has_votes = (SHARED / name / "Votes.xml").exists()
        assert s["votes"] == (str(SHARED / name / "Votes.xml") if has_votes else None)
        assert sum(r["site"] == name for n in SPLITS for r in dsd[n]) == s["pairs"] > 0
        assert sum(s["splits"][n]["questions"] for n in SPLITS) == s["questions_with_pairs"]


@pytest.mark.parametrize("name,with_votes", [("beer.stackexchange.com", False), (CONLANG, True)])
def test_each_site_as_if_prepared_alone(multi, prepared, name, with_votes):
    _need(name)
    dsd, report = multi
    alone, alone_report = prepared(name, with_votes=with_votes)
    assert _site_rows(dsd, name) == _rows(alone)
    site = report["sites"][name]
    for k in COUNTS:
        assert site[k] == alone_report[k], k
    assert site["splits"] == alone_report["splits"]


def test_same_qid_on_two_sites_kept_apart(tmp_path, prepared):
    src = _need(CONLANG) / "Posts.xml"
    for site in ("a.example", "b.example"):
        (tmp_path / "in" / site).mkdir(parents=True)
        shutil.copy(src, tmp_path / "in" / site / "Posts.xml")
    report = prepare(tmp_path / "in", tmp_path / "out", **QUIET)
    alone, alone_report = prepared(CONLANG)
    for k in COUNTS:
        assert report[k] == 2 * alone_report[k], k
    dsd = load_prepared(tmp_path / "out")
    qids = {site: sorted(r["qid"] for n in SPLITS for r in _site_rows(dsd, site)[n]) for site in ("a.example", "b.example")}
    assert qids["a.example"] == qids["b.example"] == sorted(r["qid"] for n in SPLITS for r in alone[n])
    for site in ("a.example", "b.example"):  # each site's questions split on their own (seed, site, qid)
        assert report["sites"][site]["splits"] == {
            n: {"questions": len({r["qid"] for r in _site_rows(dsd, site)[n]}), "pairs": len(_site_rows(dsd, site)[n])}
            for n in SPLITS}


def test_7z_archive_gives_the_rows_of_the_unpacked_files(tmp_path, prepared):
    folder = _need(CONLANG)
    archive = _pack(folder, tmp_path / f"{CONLANG}.7z")
    report = prepare(archive, tmp_path / "out", **QUIET)
    alone, alone_report = prepared(CONLANG, with_votes=True)
    assert _rows(load_prepared(tmp_path / "out")) == _rows(alone)
    assert report["site"] == CONLANG and report["votes"] == f"{archive}/Votes.xml"
    assert report["sites"][CONLANG]["source"] == f"{archive}/Posts.xml"
    assert report["input_bytes"] == (folder / "Posts.xml").stat().st_size
    for k in COUNTS:
        assert report[k] == alone_report[k], k


def test_cli_mixes_folders_archives_and_files(tmp_path, capsys):
    _need(CONLANG)
    other = "datascience.meta.stackexchange.com"
    posts = _need(other) / "Posts.xml"
    _pack(SHARED / CONLANG, tmp_path / "dumps" / f"{CONLANG}.7z")
    out = tmp_path / "out"
    rc = cli.main(["prepare", "--posts", str(tmp_path / "dumps"), "--posts", str(posts), "--out", str(out),
                   "--config", str(_fp32_yaml(tmp_path))])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    report = json.loads((out / "report.json").read_text())
    assert list(report["sites"]) == [CONLANG, other]
    assert report["source"] == [str(tmp_path / "dumps"), str(posts)]
    assert report["sites"][other]["votes"] is None  # a file names only its posts


def test_bad_row_in_one_site_names_the_site_and_line(tmp_path):
    src = _need(CONLANG) / "Posts.xml"
    (tmp_path / "in" / "good.example").mkdir(parents=True)
    shutil.copy(src, tmp_path / "in" / "good.example" / "Posts.xml")
    bad = tmp_path / "in" / "bad.example" / "Posts.xml"
    bad.parent.mkdir()
    bad.write_text('<?xml version="1.0" encoding="utf-8"?>\n<posts>\n'
                   '  <row Id="1" PostTypeId="1" Title="t" Body="q" />\n'
                   '  <row Id="2" PostTypeId="2" ParentId="1" Score="x" Body="a" />\n</posts>\n')
    out = tmp_path / "out"
    with pytest.raises(DataError) as e:
        prepare(tmp_path / "in", out, **QUIET)
    assert (e.value.site, e.value.line, e.value.attribute, e.value.reason) == ("bad.example", 4, "Score", "bad_integer")
    assert f"{bad}:4: Score:" in str(e.value) and "(site bad.example)" in str(e.value)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    report = prepare(tmp_path / "in", out, skip_bad_rows=True, **QUIET)
    assert report["sites"]["bad.example"]["skipped"] == {"bad_integer": 1}
    assert report["sites"]["good.example"]["skipped"] == {}
    assert report["skipped"]["bad_integer"] == 1 and sum(report["skipped"].values()) == 1


def test_bad_row_inside_an_archive_names_the_member(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    (folder / "Posts.xml").write_text('<?xml version="1.0"?>\n<posts>\n  <row PostTypeId="1" Title="t" />\n</posts>\n')
    archive = _pack(folder, tmp_path / "in" / "x.example.7z")
    with pytest.raises(DataError) as e:
        prepare(tmp_path / "in", tmp_path / "out", **QUIET)
    assert str(e.value).startswith(f"{archive}/Posts.xml:3: Id:") and e.value.site == "x.example"


def test_inputs_that_cannot_go_together(tmp_path):
    _need(CONLANG)
    posts = SHARED / CONLANG / "Posts.xml"
    with pytest.raises(DataError, match=f"site {CONLANG} is given twice"):
        prepare([posts, SHARED / CONLANG], tmp_path / "out", **QUIET)
    with pytest.raises(DataError, match="votes goes with a single Posts.xml"):
        prepare([posts, SHARED / "beer.stackexchange.com"], tmp_path / "out", votes=SHARED / CONLANG / "Votes.xml",
                **QUIET)
    with pytest.raises(DataError, match="names one site"):
        prepare(SHARED, tmp_path / "out", site="x", **QUIET)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no Posts.xml"):
        prepare(tmp_path / "empty", tmp_path / "out", **QUIET)
    archive = _pack(SHARED / CONLANG, tmp_path / "votes-only.7z", members=("Votes.xml",))
    with pytest.raises(DataError, match=r"no Posts.xml at the top level of the archive \(it holds Votes.xml\)"):
        prepare(archive, tmp_path / "out", **QUIET)
    assert not (tmp_path / "out").exists()


def test_corrupt_archive_is_a_data_error(tmp_path):
    archive = _pack(_need(CONLANG), tmp_path / f"{CONLANG}.7z", members=("Posts.xml",))
    data = bytearray(archive.read_bytes())
    for i in range(200, 400):  # inside the compressed stream, away from the headers at both ends
        data[i] ^= 0x5A
    archive.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"{archive}/Posts.xml") as e:
        prepare(archive, tmp_path / "out", **QUIET)
    assert e.value.site == CONLANG


def _fp32_yaml(tmp_path: Path, extra: str = "") -> Path:
    """A config with every engine's dtype fixed: dtype "auto" would import torch (~5 s) to look at the GPU."""
    p = tmp_path / "fp32.yaml"
    p.write_text("sft: {engine: {dtype: fp32}}\nrm: {engine: {dtype: fp32}}\nppo: {actor: {dtype: fp32}, "
                 "critic: {dtype: fp32}, reference: {dtype: fp32}, reward: {dtype: fp32}}\n" + extra)
    return p


def test_config_posts_may_be_a_list(tmp_path):
    _need(CONLANG)
    cfg = _fp32_yaml(tmp_path, f"data:\n  posts:\n    - {SHARED / CONLANG}\n    - {SHARED / CONLANG}.7z\n")
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert e.value.lines == [f"{cfg}:7: data.posts.1: file not found: {SHARED / CONLANG}.7z"]
    cfg = _fp32_yaml(tmp_path, f"data:\n  posts:\n    - {SHARED / CONLANG}\n    - {SHARED}\n")
    assert load_config(cfg).data.posts == [str(SHARED / CONLANG), str(SHARED)]
    assert load_config(cfg, [f"data.posts={SHARED}"]).data.posts == str(SHARED)


@pytest.mark.slow  # importing the pipeline imports torch (~4 s)
def test_pipeline_resolves_each_posts_entry(tmp_path, monkeypatch):
    import stackllama_ds.data.prepare as prepare_mod
    from stackllama_ds.pipeline import run_pipeline

    need_shared()
    (tmp_path / "site.example").mkdir()
    shutil.copy(SHARED / DUMPS[0] / "Posts.xml", tmp_path / "site.example" / "Posts.xml")
    cfg_path = _fp32_yaml(tmp_path, f"output_root: {tmp_path / 'run'}\ndata:\n  posts: [site.example, {SHARED}]\n")
    seen = {}

    class Stop(Exception):
        pass

    def fake_prepare(posts, out, **kw):
        seen["posts"] = posts
        raise Stop

    monkeypatch.setattr(prepare_mod, "prepare", fake_prepare)
    with pytest.raises(Stop):  # a relative entry resolves from the config's folder
        run_pipeline(load_config(cfg_path), str(cfg_path), [], run_stage=lambda *a: pytest.fail("no stage runs"))
    assert seen["posts"] == [tmp_path / "site.example", SHARED]


# ---------------------------------------------------------------------- any well-formed layout
def _esc(v: str, q: str) -> str:
    v = v.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    v = v.replace("\n", "&#xA;").replace("\r", "&#xD;").replace("\t", "&#x9;")
    return v.replace(q, "&quot;" if q == '"' else "&apos;")


def _row(a: dict, q: str = '"', sep: str = " ", reverse: bool = False) -> str:
    items = list(a.items())[::-1] if reverse else list(a.items())
    return "<row" + "".join(f"{sep}{k}={q}{_esc(v, q)}{q}" for k, v in items) + " />"


DECL = '<?xml version="1.0" encoding="utf-8"?>\n'


def _layouts(rows: list[dict]) -> dict[str, str]:
    half = len(rows) // 2
    pairs = [_row(a) + (_row(b) if b else "") for a, b in zip(rows[::2], rows[1::2] + [None])]
    return {
        "multi_line_rows": DECL + "<posts>\n" + "\n".join(_row(a, sep="\n    ") for a in rows) + "\n</posts>\n",
        "single_quotes_any_order": DECL + "<posts>\n" + "\n".join(_row(a, "'", reverse=True) for a in rows)
        + "\n</posts>\n",
        "prolog_doctype_comments_pi": DECL + "<!DOCTYPE posts [\n  <!ELEMENT posts ANY>\n]>\n<!-- a comment -->\n"
        "<?app data?>\n<posts>\n" + "\n<!-- between rows -->\n".join(_row(a) for a in rows) + "\n<?app y?>\n</posts>\n",
        "break_half_way": DECL + "<posts>\n" + "\n".join(_row(a) for a in rows[:half]) + "\n<!-- from here -->\n"
        + "\n".join(_row(a, sep="\n  ") for a in rows[half:]) + "\n</posts>\n",
        "all_on_one_line": DECL.strip() + "<posts>" + "".join(_row(a) for a in rows) + "</posts>",
        "two_rows_a_line": DECL + "<posts>\n" + "\n".join(pairs) + "\n</posts>\n",
    }


def _parsed(src, **kw):
    qs, ans = [], []
    for c in iter_parsed(src, **kw):
        qs += c.questions
        ans += c.answers
    return qs, ans


def _row_lines(text: str) -> dict[int, int]:
    """Id -> line of its ``<row`` (the expected line numbers), from the text itself."""
    out = {}
    for el in etree.fromstring(text.encode(), etree.XMLParser(resolve_entities=False, no_network=True)).iter("row"):
        out[int(el.get("Id"))] = el.sourceline
    return out


@pytest.fixture(scope="module")
def conlang_rows():
    posts = _need(CONLANG) / "Posts.xml"
    qs, ans = _parsed(posts)
    drop_line = ([q[:1] + q[2:] for q in qs], [a[:1] + a[2:] for a in ans])
    return read_rows(posts), drop_line


@pytest.mark.parametrize("layout", list(_layouts([{"Id": "1"}])))
def test_well_formed_layouts_give_the_same_rows(tmp_path, conlang_rows, layout):
    rows, want = conlang_rows
    text = _layouts(rows)[layout]
    posts = tmp_path / CONLANG / "Posts.xml"
    posts.parent.mkdir()
    posts.write_text(text)
    lines = _row_lines(text)
    for chunk_bytes in (8 << 20, 3000):
        qs, ans = _parsed(posts, chunk_bytes=chunk_bytes)
        assert ([q[:1] + q[2:] for q in qs], [a[:1] + a[2:] for a in ans]) == want
        assert [q[1] for q in qs] == [lines[q[0]] for q in qs]
        assert [a[1] for a in ans] == [lines[a[0]] for a in ans]
    # through an archive too: the break is found in a stream, blocks already read are not lost
    archive = _pack(posts.parent, tmp_path / f"{CONLANG}.7z", members=("Posts.xml",))
    qs, ans = _parsed(DumpFile(archive, "Posts.xml"), chunk_bytes=3000)
    assert ([q[:1] + q[2:] for q in qs], [a[:1] + a[2:] for a in ans]) == want


def test_layout_prepare_matches_the_dump(tmp_path, conlang_rows, prepared):
    rows, _ = conlang_rows
    posts = tmp_path / CONLANG / "Posts.xml"
    posts.parent.mkdir()
    posts.write_text(_layouts(rows)["prolog_doctype_comments_pi"])
    report = prepare(posts, tmp_path / "out", **QUIET)
    alone, alone_report = prepared(CONLANG)
    assert _rows(load_prepared(tmp_path / "out")) == _rows(alone)
    assert report["ignored_post_types"] == alone_report["ignored_post_types"]
    assert report["input_bytes"] == posts.stat().st_size


def _bad_after_break(tmp_path, row: str) -> tuple[Path, int]:
    good = '<row Id="1" PostTypeId="1" Title="t" Body="q" />'
    text = DECL + "<posts>\n" + good + "\n<!-- c -->\n<row Id=\"2\" PostTypeId=\"2\"\n  ParentId=\"1\" Score=\"1\" />\n" \
        + row + '\n<row Id="4" PostTypeId="2" ParentId="1" Score="2" />\n</posts>\n'
    p = tmp_path / "s.example" / "Posts.xml"
    p.parent.mkdir(exist_ok=True)
    p.write_text(text)
    return p, 8  # the line where the bad row's start tag ends (libxml2's sourceline)


def test_bad_row_after_the_layout_break(tmp_path):
    posts, line = _bad_after_break(tmp_path, '<row PostTypeId="2"\n  ParentId="1" Score="1" />')
    with pytest.raises(DataError) as e:
        _parsed(posts)
    assert (e.value.line, e.value.attribute, e.value.reason) == (line, "Id", "missing_id")
    assert str(e.value).startswith(f"{posts}:{line}: Id:")
    qs, ans = _parsed(posts, skip_bad_rows=True)
    assert [q[0] for q in qs] == [1] and [(a[0], a[1]) for a in ans] == [(2, 6), (4, 9)]


def test_not_well_formed_after_the_layout_break(tmp_path):
    posts, line = _bad_after_break(tmp_path, '<row Id="3" PostTypeId="2"\n  ParentId="1" Score="1" Body="a < b" />')
    with pytest.raises(DataError, match="not well-formed XML") as e:
        _parsed(posts)
    assert (e.value.line, e.value.reason) == (line, "invalid_xml")
    chunks = list(iter_parsed(posts, skip_bad_rows=True))  # counted once; the rest is not read
    assert sum(c.skipped["invalid_xml"] for c in chunks) == 1
    assert [a[0] for c in chunks for a in c.answers] == [2]
    text = posts.read_text().replace("a < b", "ok")
    posts.write_text(text[: text.index('<row Id="4"') + 12])
    with pytest.raises(DataError, match="file ends before the XML document does") as e:
        _parsed(posts)
    assert e.value.reason == "truncated"


# ------------------------------------------------------------------- entities and DTDs: never read
SECRET = "TOP-SECRET-CONTENT-4711"


def _xxe_files(tmp_path: Path) -> tuple[str, str]:
    (tmp_path / "secret.txt").write_text(SECRET)
    dtd = tmp_path / "posts.dtd"
    dtd.write_text(f'<!ENTITY dtdent SYSTEM "{(tmp_path / "secret.txt").as_uri()}">\n'
                   '<!ATTLIST row Score CDATA "99">\n')
    doctype = (f'<!DOCTYPE posts SYSTEM "{dtd.as_uri()}" [\n'
               f'  <!ENTITY xxe SYSTEM "{(tmp_path / "secret.txt").as_uri()}">\n]>\n')
    return DECL + doctype, '<row Id="1" PostTypeId="1" Title="t" Body="q" />\n'


def test_external_entities_and_dtds_are_never_read(tmp_path):
    head, question = _xxe_files(tmp_path)
    posts = tmp_path / "x.example" / "Posts.xml"
    posts.parent.mkdir()
    # 1. an entity declared in the unread SYSTEM DTD reads as nothing; its ATTLIST default is not applied
    posts.write_text(head + "<posts>\n" + question + '<row Id="2" PostTypeId="2" ParentId="1" Score="3" '
                     'Body="x&dtdent;y" />\n<row Id="3" PostTypeId="2" ParentId="1" Body="z" />\n</posts>\n')
    qs, ans = _parsed(posts, skip_bad_rows=True)
    assert [(a[0], a[3], a[4]) for a in ans] == [(2, 3, "xy")]  # row 3 has no Score: the DTD's 99 is not used
    out = tmp_path / "out"
    prepare(posts, out, skip_bad_rows=True, **QUIET)
    assert SECRET not in "".join(p.read_text(errors="replace") for p in out.rglob("*") if p.is_file())
    # 2. an external entity in an attribute: libxml2 refuses it
    posts.write_text(head + "<posts>\n" + question + '<row Id="2" PostTypeId="2" ParentId="1" Score="3" '
                     'Body="a&xxe;" />\n</posts>\n')
    with pytest.raises(DataError, match="external entity") as e:
        _parsed(posts)
    assert (e.value.line, e.value.reason) == (7, "invalid_xml") and SECRET not in str(e.value)
    # 3. an external entity between rows is not expanded: an error, or skipped with skip_bad_rows
    posts.write_text(head + "<posts>\n" + question + "&xxe;\n" + '<row Id="2" PostTypeId="2" ParentId="1" '
                     'Score="3" Body="a" />\n</posts>\n')
    with pytest.raises(DataError, match="entity reference outside a <row/>") as e:
        _parsed(posts)
    assert e.value.line == 7 and e.value.attribute == "&xxe;" and SECRET not in str(e.value)
    qs, ans = _parsed(posts, skip_bad_rows=True)
    assert [q[0] for q in qs] == [1] and [a[0] for a in ans] == [2]
    assert SECRET not in repr((qs, ans))


def test_text_between_rows_is_invalid(tmp_path):
    posts = tmp_path / "t.example" / "Posts.xml"
    posts.parent.mkdir()
    posts.write_text(DECL + "<posts>\n<!-- c -->\n<row Id=\"1\" PostTypeId=\"1\" Title=\"t\" />\nstray words\n"
                     "<row Id=\"2\" PostTypeId=\"1\" Title=\"u\" />\n</posts>\n")
    with pytest.raises(DataError, match="text outside a <row/>: 'stray words'") as e:
        _parsed(posts)
    assert e.value.line == 4  # the row the text follows


# ------------------------------------------------------------------------------------- memory
@pytest.mark.slow
def test_archive_stream_memory_is_flat(tmp_path):
    """Peak RSS of reading a 7z member does not grow with the member (16 MB vs 96 MB of real rows).

    py7zr decompresses 1 MB of packed input per call, so memory is that block's output (a few MB for
    dump XML) plus our bounded queue, whatever the archive's size.
    """
    import subprocess
    import sys

    import py7zr

    src = _need("beer.stackexchange.com") / "Posts.xml"
    rows = b"".join(ln + b"\n" for ln in src.read_bytes().split(b"\n") if ln.strip().startswith(b"<row"))
    peaks = []
    for mb in (16, 96):
        xml = tmp_path / f"{mb}" / "Posts.xml"
        xml.parent.mkdir()
        with open(xml, "wb") as f:
            f.write(b"<posts>\n")
            while f.tell() < mb * 1_000_000:
                f.write(rows)
            f.write(b"</posts>")
        archive = tmp_path / f"{mb}.7z"
        with py7zr.SevenZipFile(archive, "w", filters=[{"id": py7zr.FILTER_LZMA2, "preset": 1}]) as z:
            z.write(xml, "Posts.xml")
        code = ("import resource, sys\nfrom stackllama_ds.data.archive import open_member\n"
                "n = 0\nwith open_member(sys.argv[1], 'Posts.xml') as f:\n"
                "    while (b := f.read(1 << 20)):\n        n += len(b)\n"
                "print(n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
        r = subprocess.run([sys.executable, "-c", code, str(archive)], capture_output=True, text=True, check=True)
        n, peak_kb = map(int, r.stdout.split())
        assert n == xml.stat().st_size
        peaks.append(peak_kb)
    assert peaks[1] - peaks[0] < 16 * 1024, peaks  # 80 MB more XML, not 16 MB more memory
