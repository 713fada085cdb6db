"""Reader for the published paired format (lvwerra/stack-exchange-paired style).

    python -c "from stackllama_ds.data.paired_reader import iter_paired; print(next(iter_paired('pairs.jsonl')))"

One row per preference pair with columns ``qid`` (int), ``question``, ``date``, ``response_j``,
``response_k`` (str) and ``metadata`` (list of str); extra columns are ignored. Files: ``.jsonl`` (one
object per line), ``.json`` (JSON lines, or one JSON array: that one is read whole) and ``.parquet``
(streamed by record batch). A missing column or a value of the wrong type is a DataError naming
the file, the line (JSON) or row (parquet) and the column.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from stackllama_ds.data.posts import DataError

PAIRED_SUFFIXES = (".jsonl", ".json", ".parquet")
COLUMNS = {"qid": int, "question": str, "date": str, "metadata": list, "response_j": str, "response_k": str}


def is_paired(path: str | os.PathLike[str]) -> bool:
    return Path(path).suffix.lower() in PAIRED_SUFFIXES


def _check(row: object, file: str, line: int | None, where: str = "") -> dict:
    """Validate one row; ``where`` prefixes the column for files without lines (``row 7: ``)."""
    if not isinstance(row, dict):
        raise DataError(f"expected a JSON object, got {type(row).__name__}", file, line, where.rstrip(": ") or None)
    out = {}
    for col, typ in COLUMNS.items():
        if col not in row:
            raise DataError(f"missing column {col!r}", file, line, f"{where}{col}")
        v = row[col]
        ok = isinstance(v, typ) and not isinstance(v, bool)
        if ok and typ is list:
            ok = all(isinstance(x, str) for x in v)
        if not ok:
            want = "list of str" if typ is list else typ.__name__
            raise DataError(f"column {col!r} must be {want}, got {v!r:.60}", file, line, f"{where}{col}")
        out[col] = v
    return out


def _iter_json(path: str) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        head = f.read(4096).lstrip("\ufeff \t\r\n")
    if head.startswith("["):  # one JSON array: not streamable with the stdlib
        with open(path, encoding="utf-8-sig") as f:
            try:
                rows = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"invalid JSON: {e.msg}", path, e.lineno, f"column {e.colno}") from None
        for i, row in enumerate(rows):
            yield _check(row, path, None, f"item {i}: ")
        return
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"invalid JSON: {e.msg}", path, lineno, f"column {e.colno}") from None
            yield _check(row, path, lineno)


def _iter_parquet(path: str) -> Iterator[dict]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = set(pf.schema_arrow.names)
    for col in COLUMNS:
        if col not in names:
            raise DataError(f"missing column {col!r} (has {sorted(names)})", path, None, col)
    n = 0
    for batch in pf.iter_batches(batch_size=4096, columns=list(COLUMNS)):
        for row in batch.to_pylist():
            n += 1
            yield _check(row, path, None, f"row {n}: ")


def iter_paired(path: str | os.PathLike[str]) -> Iterator[dict]:
    """Validated rows ``{qid, question, date, metadata, response_j, response_k}`` of a paired file."""
    path = str(path)
    if not os.path.exists(path):
        raise DataError("file not found", path)
    if path.lower().endswith(".parquet"):
        return _iter_parquet(path)
    return _iter_json(path)
