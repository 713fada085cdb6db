"""SFT texts tokenized once per (prepared split, tokenizer), cached beside the prepared data, memory-mapped.

    python -c "from stackllama_ds.data.tokens import sft_tokens; from stackllama_ds.models.load import load_tokenizer; print(len(sft_tokens('runs/tiny/data', 'sft', load_tokenizer('runs/tiny/tiny'))))"

``<data>/tokens/<split>-<key>/`` holds

    ids.bin      every SFT text as ``<bos> text <eos>`` (the tokenizer's special tokens, then EOS),
                 concatenated; uint16 when the vocabulary fits, else uint32
    offsets.bin  int64, n_texts + 1: text j is ``ids[offsets[j]:offsets[j + 1]]``
    meta.json    counts and dtype (checked against the files' sizes on open), source files, tokenizer

The texts are the split's distinct (question, response_j) in first-seen row order, formatted with
format_qa: exactly ``prepare.sft_texts``. The key hashes the split's fingerprint and files, the
tokenizer's content and the template, so another tokenizer, a new ``prepare`` (which replaces the
whole data folder, old caches with it) or a new template never reads a stale cache. ``seq_length``
is not in it: packing cuts chunks from these per-text tokens on the fly, so one cache serves every
seq_length, packed and padded mode alike.

One process builds (the stage: rank 0 inside ``rank0.on_main_rank``) into a temporary folder that
is renamed into place, so a reader never sees a partial cache; every rank then memory-maps it and
touches only the pages of its own chunks (file-backed: shared through the page cache, reclaimable).
Nothing here goes through datasets (its import and its mapping of every split's Arrow files
cost each rank memory per record batch). Building streams the split's Arrow files in
record batches (never the whole split, never memory-mapped: mapped pages count in the RSS), so its
memory is flat in the data size but for the duplicate check, 16 bytes per row plus numpy's sort.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from stackllama_ds.data.packing import TokenizedTexts, encode_texts
from stackllama_ds.data.posts import DataError
from stackllama_ds.data.template import format_qa
from stackllama_ds.fsutil import FolderTaken, publish_folder

VERSION = 1  # bump when the file layout or what is tokenized changes
TOKENS = "tokens"
META, IDS, OFFSETS = "meta.json", "ids.bin", "offsets.bin"


# --------------------------------------------------------------------------------- cache keys
def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what decides the ids: the tokenizer's content, not its path, so the same tokenizer
    saved elsewhere shares a cache and a changed one (same folder, new files) does not."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # fast tokenizers: the full pipeline (normalizer ... post-processor adding BOS)
        h.update(backend.to_str().encode())
    else:  # slow ones encode in Python: their vocabulary and model files
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
        folder = Path(str(getattr(tokenizer, "name_or_path", "") or ""))
        if folder.is_dir():
            for f in sorted(folder.iterdir()):
                if f.is_file() and ("token" in f.name or "vocab" in f.name or f.suffix in (".model", ".txt")):
                    h.update(f.name.encode() + f.read_bytes())
    h.update(json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id]).encode())
    return h.hexdigest()


def split_identity(data_dir: Path, split: str) -> tuple[list[Path], str]:
    """The split's Arrow files, and its identity for the key, from ``<data>/<split>/state.json`` (what
    load_from_disk reads, without datasets): datasets' fingerprint (prepare sets it from the source
    and the content's size) and the files' names, sizes and mtimes."""
    state_path = data_dir / split / "state.json"
    try:
        state = json.loads(state_path.read_text())
        files = [data_dir / split / f["filename"] for f in state["_data_files"]]
        stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    except FileNotFoundError as e:
        raise DataError("missing from the prepared data (run prepare again)", e.filename) from None
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"unreadable split state ({e}; run prepare again)", state_path) from None
    return files, json.dumps([state.get("_fingerprint"), stats])


def cache_key(identity: str, tokenizer) -> str:
    parts = [VERSION, identity, tokenizer_fingerprint(tokenizer), format_qa("Q", "A")]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:24]


# ------------------------------------------------------------------------------ open and build
def sft_tokens(data_dir: str | os.PathLike[str], split: str, tokenizer, *, build: bool = True,
               log: Callable[[str], None] | None = None) -> TokenizedTexts:
    """Split ``split`` of the prepared data in ``data_dir`` as SFT texts, tokenized: opened from
    ``<data_dir>/tokens/`` or, when ``build``, built there first.

    A missing, partial or corrupt cache is rebuilt when ``build`` is true; otherwise it raises a
    DataError naming the file (the caller meant rank 0 to have built it). Neither reads the split
    through datasets: a cache hit touches no Arrow file at all.
    """
    data_dir = Path(data_dir)
    files, identity = split_identity(data_dir, split)
    folder = data_dir / TOKENS / f"{split}-{cache_key(identity, tokenizer)}"
    try:
        return open_tokens(folder)
    except DataError as e:
        if not build:
            raise
        if folder.exists():  # not the missing case: say why it is rebuilt
            (log or print)(f"sft data: rebuilding the token cache: {e}")
            shutil.rmtree(folder, ignore_errors=True)
    t0 = time.perf_counter()
    meta = _build(files, folder, tokenizer)
    if log is not None:
        log(f"sft data: tokenized {meta['n_texts']} texts ({meta['n_tokens']} tokens) of {split} "
            f"into {folder} in {time.perf_counter() - t0:.1f} s")
    return open_tokens(folder)


def open_tokens(folder: str | os.PathLike[str]) -> TokenizedTexts:
    """Memory-map a cache folder; a DataError names the file that is missing or of the wrong size."""
    folder = Path(folder)
    meta_path = folder / META
    if not folder.is_dir():
        raise DataError("no token cache", folder)
    try:
        meta = json.loads(meta_path.read_text())
        n_texts, n_tokens, dtype = int(meta["n_texts"]), int(meta["n_tokens"]), np.dtype(meta["dtype"])
    except FileNotFoundError:
        raise DataError("token cache is incomplete: meta.json missing", meta_path) from None
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"token cache metadata is unreadable ({e})", meta_path) from None
    for name, want in ((IDS, n_tokens * dtype.itemsize), (OFFSETS, (n_texts + 1) * 8)):
        p = folder / name
        got = p.stat().st_size if p.exists() else None
        if got != want:
            raise DataError(f"token cache file has {got} bytes, meta.json says {want}", p)
    # np.memmap cannot map 0 bytes: an empty split has no ids to map.
    ids = np.memmap(folder / IDS, dtype=dtype, mode="r") if n_tokens else np.zeros(0, dtype)
    offsets = np.memmap(folder / OFFSETS, dtype=np.int64, mode="r")
    if offsets[0] != 0 or offsets[-1] != n_tokens:
        raise DataError(f"token cache offsets run {offsets[0]}..{offsets[-1]}, not 0..{n_tokens}", folder / OFFSETS)
    return TokenizedTexts(ids, offsets)


def _first_rows(files: list[Path]) -> np.ndarray:
    """Row mask: True on the first row of each distinct (question, response_j), as sft_texts keeps them.

    A 16-byte hash per row stands in for the strings; a collision (odds ~ rows^2 / 2^129) would drop a text.
    """
    digests = bytearray()
    for q, a in _rows(files):
        d = hashlib.blake2b(digest_size=16)
        d.update(len(q).to_bytes(8, "little"))  # the length keeps (q, a) apart from (q + a[:1], a[1:])
        d.update(q.encode())
        d.update(a.encode())
        digests += d.digest()
    keys = np.frombuffer(digests, dtype="V16")
    keep = np.zeros(len(keys), dtype=bool)
    keep[np.unique(keys, return_index=True)[1]] = True  # return_index: the first occurrence of each
    return keep


def _rows(files: list[Path], batch: int = 256):
    """(question, response_j) of every row, read batch by batch from the Arrow stream files."""
    import pyarrow as pa

    for path in files:
        with pa.OSFile(str(path)) as f:
            for rb in pa.ipc.open_stream(f):
                qs, ans = rb.column("question"), rb.column("response_j")
                for i in range(0, rb.num_rows, batch):
                    yield from zip(qs.slice(i, batch).to_pylist(), ans.slice(i, batch).to_pylist())


def _build(files: list[Path], folder: Path, tokenizer, batch: int = 256) -> dict:
    """Tokenize the kept rows ``batch`` texts a call (the tokenizer's Python output grows with the batch)."""
    keep = _first_rows(files)
    n_texts = int(keep.sum())
    dtype = np.dtype(np.uint16 if len(tokenizer) <= 1 << 16 else np.uint32)
    offsets = np.zeros(n_texts + 1, dtype=np.int64)
    try:
        with publish_folder(folder, replace=False) as tmp:
            with open(tmp / IDS, "wb") as out:
                j, pending = 0, []

                def flush() -> None:
                    nonlocal j
                    flat, lens = encode_texts(pending, tokenizer, dtype)
                    out.write(flat.tobytes())
                    offsets[j + 1 : j + 1 + len(lens)] = lens
                    j += len(lens)
                    pending.clear()

                for row, (q, a) in enumerate(_rows(files)):
                    if keep[row]:
                        pending.append(format_qa(q, a))
                        if len(pending) == batch:
                            flush()
                if pending:
                    flush()
            np.cumsum(offsets, out=offsets)
            offsets.tofile(tmp / OFFSETS)
            meta = {"version": VERSION, "n_texts": n_texts, "n_tokens": int(offsets[-1]), "dtype": dtype.name,
                    "eos_token_id": tokenizer.eos_token_id, "rows": len(keep),
                    "split_files": [str(f) for f in files], "tokenizer": getattr(tokenizer, "name_or_path", None)}
            (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
    except FolderTaken:  # another process renamed its build in first: use that one if it is sound
        open_tokens(folder)
    return meta
