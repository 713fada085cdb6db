"""Helpers for the data tests: where the real dumps are, and expected values computed without the package."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
DUMPS = sorted(p.parent.name for p in SHARED.glob("*/Posts.xml")) if SHARED.is_dir() else []


def need_shared() -> None:
    if not DUMPS:
        pytest.skip(f"no Stack Exchange dumps at {SHARED} (the shared fixture folder is absent)")


def read_rows(path: Path) -> list[dict[str, str]]:
    """All <row> attributes of an XML dump, parsed the slow, obvious way."""
    return [el.attrib for el in ET.parse(path).getroot().iter("row")]


def upvotes_from(votes: Path) -> Counter:
    return Counter(int(r["PostId"]) for r in read_rows(votes) if r["VoteTypeId"] == "2")


def expected_threads(posts: Path, votes: Path | None = None) -> dict[int, dict]:
    """qid -> {title, tags, answers: {aid: (pm_score, body_html)}}, computed independently of the package."""
    import math

    rows = read_rows(posts)
    up = upvotes_from(votes) if votes is not None else None
    questions = {int(r["Id"]): r for r in rows if r["PostTypeId"] == "1"}
    out: dict[int, dict] = {
        qid: {"title": r["Title"], "tags": r.get("Tags", ""), "license": r.get("ContentLicense"),
              "body": r.get("Body", ""), "answers": {}}
        for qid, r in questions.items()
    }
    for r in rows:
        if r["PostTypeId"] != "2" or int(r["ParentId"]) not in questions:
            continue
        aid, score = int(r["Id"]), int(r["Score"])
        accepted = questions[int(r["ParentId"])].get("AcceptedAnswerId") == r["Id"]
        n_up = score if up is None else up[aid]
        pm = -1 if score < 0 else round(math.log2(1 + n_up)) + (1 if accepted else 0)
        out[int(r["ParentId"])]["answers"][aid] = (pm, r.get("Body", ""))
    return out


def ordered_pairs(scores: list[int]) -> int:
    return sum(1 for a in scores for b in scores if a > b)


def by_qid(dsd) -> dict[int, list[dict]]:
    rows = defaultdict(list)
    for split in dsd.values():
        for r in split:
            rows[r["qid"]].append(r)
    return rows
