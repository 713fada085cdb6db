"""On-disk grouping of answers under their questions: one temporary sqlite file.

Rows of a dump are not sorted (answers may precede their question), so we cannot pair answers while
streaming. Parsed rows go into sqlite (no journal, no fsync, bounded page cache); after the last row we
build indexes and read questions and answers back in ``qid`` order with a merge join. Peak memory is the
page cache plus one question's answers, whatever the dump's size.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

from stackllama_ds.data.posts import _SEP, Answer, DataError, Question

_SCHEMA = """
CREATE TABLE questions (qid INTEGER, line INTEGER, title TEXT, body TEXT, date TEXT, meta TEXT,
                        accepted INTEGER);
CREATE TABLE answers (aid INTEGER, line INTEGER, parent INTEGER, score INTEGER, body TEXT);
CREATE TABLE votes (post INTEGER PRIMARY KEY, up INTEGER NOT NULL) WITHOUT ROWID;
"""


class StoredAnswer(NamedTuple):
    aid: int
    score: int  # the row's Score attribute
    upvotes: int | None  # VoteTypeId 2 count from Votes.xml (None when no Votes.xml was read)
    body: str


class Thread(NamedTuple):
    qid: int
    title: str
    body: str
    date: str
    metadata: list[str]
    accepted: int | None
    answers: list[StoredAnswer]  # ordered by aid


class PostStore:
    """Append parsed rows, then ``finish()`` and iterate ``threads()``."""

    def __init__(self, path: str | Path, cache_mb: int = 64):
        self.path = str(path)
        self.conn = sqlite3.connect(self.path, isolation_level=None)
        for pragma in ("journal_mode=OFF", "synchronous=OFF", "locking_mode=EXCLUSIVE",
                       f"cache_size=-{cache_mb * 1024}", "temp_store=FILE"):
            self.conn.execute(f"PRAGMA {pragma}")
        self.conn.executescript(_SCHEMA)
        self.conn.execute("BEGIN")
        self.has_votes = False

    def add(self, questions: list[Question], answers: list[Answer]) -> None:
        self.conn.executemany("INSERT INTO questions VALUES (?,?,?,?,?,?,?)", questions)
        self.conn.executemany("INSERT INTO answers VALUES (?,?,?,?,?)", answers)

    def add_upvotes(self, counts: Iterable[tuple[int, int]]) -> None:
        self.has_votes = True
        self.conn.executemany(
            "INSERT INTO votes VALUES (?, ?) ON CONFLICT(post) DO UPDATE SET up = up + excluded.up", counts
        )

    def finish(self, file: str, skip_bad_rows: bool, skipped: Counter) -> None:
        """Refuse (or drop and count) duplicate Ids, then index for the ordered read."""
        # No UNIQUE index: a failing CREATE cannot be rolled back without a journal. Index, then look.
        for table, key in (("questions", "qid"), ("answers", "aid")):
            self.conn.execute(f"CREATE INDEX {table}_key ON {table} ({key})")
            dup = self.conn.execute(
                f"SELECT {key}, MIN(line), MAX(line) FROM {table} GROUP BY {key} HAVING COUNT(*) > 1 LIMIT 1"
            ).fetchone()
            if dup is None:
                continue
            if not skip_bad_rows:
                self.conn.execute("COMMIT")
                raise DataError(f"duplicate post Id {dup[0]} (first on line {dup[1]})", file, dup[2], "Id",
                                "duplicate_id")
            cur = self.conn.execute(
                f"DELETE FROM {table} WHERE rowid NOT IN (SELECT MIN(rowid) FROM {table} GROUP BY {key})"
            )
            skipped["duplicate_id"] += cur.rowcount
        self.conn.execute("CREATE INDEX answers_parent ON answers (parent, aid)")
        self.conn.execute("COMMIT")

    def counts(self) -> tuple[int, int]:
        nq = self.conn.execute("SELECT COUNT(*) FROM questions").fetchone()[0]
        na = self.conn.execute("SELECT COUNT(*) FROM answers").fetchone()[0]
        return nq, na

    def threads(self, orphans: Counter) -> Iterator[Thread]:
        """Every question in qid order with its answers; answers without a question go to ``orphans``."""
        qcur = self.conn.execute(
            "SELECT qid, title, body, date, meta, accepted FROM questions ORDER BY qid"
        )
        up = "v.up" if self.has_votes else "NULL"
        acur = self.conn.cursor().execute(
            f"SELECT a.parent, a.aid, a.score, {up}, a.body FROM answers a "
            + ("LEFT JOIN votes v ON v.post = a.aid " if self.has_votes else "")
            + "ORDER BY a.parent, a.aid"
        )
        arow = next(acur, None)
        for qid, title, body, date, meta, accepted in qcur:
            while arow is not None and arow[0] < qid:
                orphans["orphan_answer"] += 1
                arow = next(acur, None)
            answers = []
            while arow is not None and arow[0] == qid:
                answers.append(StoredAnswer(arow[1], arow[2], (arow[3] or 0) if self.has_votes else None,
                                            arow[4]))
                arow = next(acur, None)
            yield Thread(qid, title, body, date, meta.split(_SEP) if meta else [], accepted, answers)
        while arow is not None:
            orphans["orphan_answer"] += 1
            arow = next(acur, None)

    def close(self) -> None:
        self.conn.close()
