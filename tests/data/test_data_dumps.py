"""prepare() on every real dump in ../shared/data, checked against values computed here from the XML."""

from __future__ import annotations

import re
from collections import Counter

import lxml.html
import pytest
from _se_dumps import DUMPS, SHARED, by_qid, expected_threads, ordered_pairs, read_rows, upvotes_from

from stackllama_ds.data.markdown import html_to_markdown
from stackllama_ds.data.pair_rules import SPLITS
from stackllama_ds.data.posts import parse_tags


def _check_against_xml(dsd, report, exp: dict[int, dict], site: str) -> None:
    rows = by_qid(dsd)
    n_answers = sum(len(t["answers"]) for t in exp.values())
    assert report["questions"] == len(exp)
    assert report["answers"] == n_answers
    # Expected pairs per question: min(10, ordered pairs with different scores).
    want = {q: min(10, ordered_pairs([s for s, _ in t["answers"].values()])) for q, t in exp.items()}
    want = {q: n for q, n in want.items() if n}
    assert {q: len(r) for q, r in rows.items()} == want
    assert report["questions_with_pairs"] == len(want)
    assert report["pairs"] == sum(want.values())
    for qid, qrows in rows.items():
        t = exp[qid]
        md_to_scores: dict[str, set[int]] = {}
        for s, body in t["answers"].values():
            md_to_scores.setdefault(html_to_markdown(body), set()).add(s)
        meta = parse_tags(t["tags"]) + ([f"license:{t['license']}"] if t["license"] else [])
        seen = set()
        for r in qrows:
            assert r["site"] == site
            assert r["question"] == f"{t['title']}\n\n{html_to_markdown(t['body'])}"
            assert r["metadata"] == meta
            assert r["score_j"] > r["score_k"]
            assert r["score_j"] in md_to_scores[r["response_j"]]
            assert r["score_k"] in md_to_scores[r["response_k"]]
            seen.add((r["response_j"], r["response_k"]))
        assert len(seen) == len(qrows) or len(md_to_scores) < len(t["answers"])  # no pair twice


@pytest.mark.parametrize("name", DUMPS or ["<none>"])
def test_prepare_matches_independent_computation(prepared, name):
    dsd, report = prepared(name)
    _check_against_xml(dsd, report, expected_threads(SHARED / name / "Posts.xml"), name)
    # Other post types are ignored and counted.
    types = Counter(r["PostTypeId"] for r in read_rows(SHARED / name / "Posts.xml"))
    assert report["ignored_post_types"] == {t: n for t, n in sorted(types.items()) if t not in ("1", "2")}
    assert report["skipped"]["orphan_answer"] == 0 and not any(report["skipped"].values())


@pytest.mark.parametrize("name", DUMPS or ["<none>"])
def test_splits_are_disjoint_and_complete(prepared, name):
    dsd, report = prepared(name)
    assert list(dsd) == list(SPLITS)
    qids = {n: set(dsd[n]["qid"]) for n in SPLITS}
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1:]:
            assert not qids[a] & qids[b], (a, b)
        assert report["splits"][a] == {"questions": len(qids[a]), "pairs": dsd[a].num_rows}
    counts = [report["splits"][n]["questions"] for n in SPLITS]
    assert counts[0] > 0 and sum(counts) == report["questions_with_pairs"]
    for n in SPLITS:
        f = dsd[n].features
        assert f["qid"].dtype == "int64" and f["score_j"].dtype == "int64"


def test_votes_give_upvotes(prepared):
    name = "conlang.meta.stackexchange.com"
    if name not in DUMPS or not (SHARED / name / "Votes.xml").exists():
        pytest.skip(f"{name}/Votes.xml not in {SHARED}")
    dsd, report = prepared(name, with_votes=True)
    posts, votes = SHARED / name / "Posts.xml", SHARED / name / "Votes.xml"
    _check_against_xml(dsd, report, expected_threads(posts, votes), name)
    assert report["votes"] == str(votes)
    # SOURCES.md: Score == up - down for every post, so upvotes >= Score, and they differ somewhere.
    up = upvotes_from(votes)
    rows = [r for r in read_rows(posts) if r["PostTypeId"] == "2"]
    assert all(up[int(r["Id"])] >= int(r["Score"]) for r in rows)
    assert any(up[int(r["Id"])] != int(r["Score"]) for r in rows)


# ------------------------------------------------------------------------------------- markdown
_PLAIN_URL = re.compile(r"^https?://[\w./?=&%#~+:-]+$")
_PLAIN_TEXT = re.compile(r"^[A-Za-z0-9][\w ,.'-]*$")


def _bodies():
    for name in DUMPS:
        for r in read_rows(SHARED / name / "Posts.xml"):
            if r.get("Body") and r["PostTypeId"] in ("1", "2"):
                yield r["Body"]


def test_markdown_properties_on_real_bodies():
    if not DUMPS:
        pytest.skip(f"no dumps at {SHARED}")
    checked = Counter()
    for html in _bodies():
        md = html_to_markdown(html)
        doc = lxml.html.fragment_fromstring(html, create_parent="div")
        if doc.xpath("//pre/code"):
            assert "```" in md and "<pre" not in md
            checked["fence"] += 1
        # code inside a link may become the link's text (<a href=u><code>u</code></a> -> <u>, an autolink)
        for code in doc.xpath("//code[not(ancestor::pre) and not(ancestor::a)]"):
            text = code.text_content()
            if text and "`" not in text and "\n" not in text and text == text.strip() and len(code) == 0:
                assert f"`{text}`" in md, (text, md)
                checked["inline"] += 1
        for a in doc.xpath("//a[@href]"):
            text, href = a.text_content(), a.get("href")
            if len(a) == 0 and _PLAIN_TEXT.match(text) and _PLAIN_URL.match(href) and text != href \
                    and not a.xpath("ancestor::pre|ancestor::code|ancestor::h1|ancestor::h2|ancestor::h3"):
                # [text](url) or [text](url "title")
                label = re.sub(" +", " ", text.strip())  # HTML collapses runs of spaces
                assert re.search(re.escape(f"[{label}]({href}") + r'(\)| ")', md), (text, href, md)
                checked["link"] += 1
        if doc.xpath("//ul/li"):
            assert re.search(r"^[\s>]*[-*+] ", md, re.M), md
            checked["list"] += 1
        # an emphasis nested in one of its kind (<strong>a <strong>b</strong></strong>) is one run of marks
        for em in doc.xpath("//em[not(ancestor::pre) and not(ancestor::em)]"
                            "|//strong[not(ancestor::pre) and not(ancestor::strong)]"):
            text = re.sub(" +", " ", em.text_content())  # HTML collapses runs of spaces
            if _PLAIN_TEXT.match(text) and len(em) == 0 and text == text.strip():
                mark = "**" if em.tag == "strong" else "*"
                assert f"{mark}{text}{mark}" in md, (text, md)
                checked["emphasis"] += 1
    assert min(checked[k] for k in ("fence", "inline", "link", "list", "emphasis")) >= 10, checked
