"""Fixtures for the data tests: the real dumps' prepared outputs, built once per session."""

from __future__ import annotations

import pytest
from _se_dumps import SHARED, need_shared


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """dump name -> (DatasetDict, report), built once per session (conlang also with Votes.xml)."""
    from stackllama_ds.data.prepare import load_prepared, prepare

    need_shared()
    cache: dict[str, tuple] = {}
    root = tmp_path_factory.mktemp("prepared")

    def get(name: str, with_votes: bool = False):
        key = f"{name}+votes" if with_votes else name
        if key not in cache:
            votes = SHARED / name / "Votes.xml" if with_votes else None
            out = root / key
            report = prepare(SHARED / name / "Posts.xml", out, votes=votes, seed=0, log=lambda *a: None)
            cache[key] = (load_prepared(out), report)
        return cache[key]

    return get
