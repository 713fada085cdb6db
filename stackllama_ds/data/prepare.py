"""Build the StackLLaMA datasets from Stack Exchange dumps (one or more sites) or a published paired file.

    python -c "from stackllama_ds.data.prepare import prepare; prepare(['data/beer.stackexchange.com', 'data/ai.stackexchange.com.7z'], 'runs/data', workers=2)"

The inputs (Posts.xml files, folders of sites, ``<site>.7z`` dump archives; see sources.py) give one
or more sites. For each site in turn: (1) parse Posts.xml in blocks (workers), bodies HTML -> Markdown;
(2) store rows in a temporary sqlite file of that site (question ids are unique per site only);
(3) count up-votes from its Votes.xml when there is one; (4) read each question with its answers,
score answers, pair them, assign the question to a split by (seed, site, qid), its rows streamed to
the split's Arrow file by datasets' ``ArrowWriter``. Then (5) put the files in a ``DatasetDict`` folder
(``save_to_disk``'s layout and metadata) built next to ``out``, and swap it into place.

Every split has the same columns, one row per preference pair:

    qid int, site str, question str ("{title}\\n\\n{body markdown}"), date str (question CreationDate),
    metadata list[str] (tag names in order, then "license:<ContentLicense>" when the row has one),
    response_j str (preferred answer), response_k str, score_j int, score_k int (answer scores, see
    pairs.answer_score; null for the paired input format)

``out/report.json`` holds the counts (questions, answers, pairs, per split, skipped rows by reason),
summed over the sites, and the same counts per site under ``sites``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from array import array
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stackllama_ds.config import DataConfig
from stackllama_ds.data.markdown import converter_name
from stackllama_ds.data.pair_rules import SPLITS, answer_score, make_pairs, pair_key, split_of
from stackllama_ds.data.paired_reader import iter_paired
from stackllama_ds.data.posts import SKIP_REASONS, DataError, iter_parsed, iter_upvotes
from stackllama_ds.data.sources import SiteSource, resolve_sources
from stackllama_ds.data.store import PostStore
from stackllama_ds.data.template import format_qa
from stackllama_ds.fsutil import publish_folder

if TYPE_CHECKING:
    from datasets import Features

__all__ = ["DataError", "check_prepared", "load_prepared", "prepare", "sft_texts"]

REPORT = "report.json"
ORPHAN_NOTE = (
    "orphan_answer counts answers whose ParentId is no question in the file (common in partial dumps); "
    "they are always skipped, with or without skip_bad_rows, and included in 'answers'"
)


def _features() -> Features:
    from datasets import Features, List, Value

    s = Value("string")
    return Features({
        "qid": Value("int64"), "site": s, "question": s, "date": s, "metadata": List(s),
        "response_j": s, "response_k": s, "score_j": Value("int64"), "score_k": Value("int64"),
    })


class _SplitWriter:
    """One split's rows, written by datasets' ``ArrowWriter`` (the writer ``save_to_disk`` uses) in
    batches of ``batch_rows`` straight into the split's data file, with the counts the report needs.

    We never read the output back: ``save_to_disk`` of a ``Dataset.from_file`` copy memory-maps the
    data and adds all of it to our RSS (measured: +290 MB for a 300 MB split).
    """

    def __init__(self, path: Path, features: Features, batch_rows: int = 1000):
        from datasets.arrow_writer import ArrowWriter

        self.path = path
        self.writer = ArrowWriter(features=features, path=str(path), writer_batch_size=batch_rows)
        self.rows = 0
        self.runs = 0  # runs of equal (site, qid) = distinct questions when a question's rows are contiguous
        self._last_key: tuple[str, int] | None = None
        self._qids = array("q")  # 8 bytes a row, for distinct questions when rows are not contiguous (paired)

    def add(self, qid: int, site: str, question: str, date: str, metadata: list[str], response_j: str,
            response_k: str, score_j: int | None, score_k: int | None) -> None:
        self.writer.write({"qid": qid, "site": site, "question": question, "date": date, "metadata": metadata,
                           "response_j": response_j, "response_k": response_k, "score_j": score_j,
                           "score_k": score_k})
        self._qids.append(qid)
        self.rows += 1
        if (site, qid) != self._last_key:
            self.runs += 1
            self._last_key = (site, qid)

    def close(self) -> None:
        self.writer.finalize()  # an empty split: the schema alone, which loads as 0 rows
        self.writer.close()

    def distinct_qids(self) -> int:
        import numpy as np

        return int(np.unique(np.frombuffer(self._qids, dtype=np.int64)).size)


# ----------------------------------------------------------------------------------- builders
def _from_posts(src: SiteSource, cfg: DataConfig, seed: int, workers: int, skip_bad_rows: bool, work: Path,
                writers: dict[str, _SplitWriter], log) -> dict[str, Any]:
    """One site's questions -> pairs appended to ``writers``; returns its counts."""
    t_start = time.perf_counter()
    skipped: Counter = Counter()
    other_types: Counter = Counter()
    site = src.site
    store_path = work / "posts.sqlite"
    store = PostStore(store_path)
    try:
        # step 1-2. parse blocks (in workers), store rows in sqlite.
        total = src.posts.size()
        done, next_log = 0, 0.1
        for res in iter_parsed(src.posts, workers=workers, skip_bad_rows=skip_bad_rows, log=log):
            store.add(res.questions, res.answers)
            skipped.update(res.skipped)
            other_types.update(res.other_types)
            done += res.nbytes
            if total >= 64 << 20 and done >= next_log * total:
                log(f"prepare: {site}: parsed {done / 1e6:.0f} / {total / 1e6:.0f} MB")
                next_log += 0.1
        # step 3. up-votes per post from Votes.xml.
        if src.votes is not None:
            for batch in iter_upvotes(src.votes, skip_bad_rows=skip_bad_rows, skipped=skipped):
                store.add_upvotes(batch)
        t_parse = time.perf_counter()
        store.finish(str(src.posts), skip_bad_rows, skipped)
        n_questions, n_answers = store.counts()
        t_index = time.perf_counter()
        # step 4. score, pair, split; one question at a time in qid order.
        skipped["orphan_answer"] += 0
        with_pairs = 0
        for th in store.threads(skipped):
            scores = [
                answer_score(a.score, a.score if a.upvotes is None else a.upvotes, a.aid == th.accepted)
                for a in th.answers
            ]
            pairs = make_pairs(scores, cfg.max_pairs_per_question, pair_key(seed, site, th.qid))
            if not pairs:
                continue
            with_pairs += 1
            question = f"{th.title}\n\n{th.body}"
            w = writers[split_of(seed, site, th.qid, cfg.splits)]
            for j, k in pairs:
                w.add(th.qid, site, question, th.date, th.metadata, th.answers[j].body, th.answers[k].body,
                      scores[j], scores[k])
        t_pairs = time.perf_counter()
    finally:
        store.close()
        store_path.unlink(missing_ok=True)
    log(f"prepare: {site}: parse {t_parse - t_start:.1f} s, index {t_index - t_parse:.1f} s, "
        f"pair {t_pairs - t_index:.1f} s")
    return {
        "source": str(src.posts),
        "votes": str(src.votes) if src.votes is not None else None,
        "format": "posts_xml",
        "questions": n_questions,
        "answers": n_answers,
        "questions_with_pairs": with_pairs,
        "skipped": skipped,
        "ignored_post_types": other_types,
        "input_bytes": done,
    }


def _from_paired(src: SiteSource, cfg: DataConfig, seed: int, writers: dict[str, _SplitWriter],
                 log) -> dict[str, Any]:
    if src.votes is not None:
        log(f"prepare: {src.posts} is a paired file; votes {src.votes} are not used")
    for row in iter_paired(src.posts.path):
        w = writers[split_of(seed, src.site, row["qid"], cfg.splits)]
        w.add(row["qid"], src.site, row["question"], row["date"], row["metadata"], row["response_j"],
              row["response_k"], None, None)
    return {"source": str(src.posts), "votes": None, "format": "paired", "questions": None, "answers": None,
            "questions_with_pairs": None, "skipped": Counter(), "ignored_post_types": Counter(),
            "input_bytes": src.posts.size()}


def _full_skipped(skipped: Counter) -> dict[str, int]:
    out = {r: skipped.get(r, 0) for r in SKIP_REASONS}
    out.update({r: n for r, n in sorted(skipped.items()) if r not in out})
    return out


# ------------------------------------------------------------------------------ the entry point
def prepare(
    posts: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    votes: str | os.PathLike[str] | None = None,
    cfg: DataConfig | None = None,
    seed: int = 0,
    workers: int = 1,
    skip_bad_rows: bool = False,
    site: str | None = None,
    log=print,
) -> dict[str, Any]:
    """Build the five splits from ``posts`` (one input or a list, see sources.py) into ``out`` (atomically).

    ``cfg`` supplies ``max_pairs_per_question`` and ``splits``; the paths, ``workers``,
    ``skip_bad_rows`` and ``site`` come from the arguments (callers pass ``cfg``'s values).
    ``votes`` goes with a single Posts.xml; ``site`` renames a single site (default: its folder or
    archive name). Returns the report. On any error (a DataError names the file, line and site)
    nothing is left at ``out`` (an existing complete ``out`` stays as it was) and no temporary files remain.
    """
    cfg = cfg or DataConfig()
    workers = max(1, int(workers))
    out = Path(out)
    _check_replaceable(out)
    sources = resolve_sources(posts, votes=votes, site=site)
    for src in sources:
        if not src.posts.exists():
            raise DataError("file not found", src.posts.path)
    t0 = time.perf_counter()
    with publish_folder(out) as tmp:  # built beside out, renamed into place when complete
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.work-", dir=out.parent))
        try:
            sites, writers = _write_sites(sources, cfg, seed, workers, skip_bad_rows, work, log)
            # step 5. the DatasetDict folder around the finished data files.
            identity = f"{seed}|" + ";".join(f"{s.site}|{s.posts}|{s.posts.mtime_ns()}" for s in sources)
            _write_dataset_dict(tmp, writers, identity)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        inputs = [str(p) for p in posts] if isinstance(posts, (list, tuple)) else [str(posts)]
        report = _report(inputs, sources, sites, cfg, seed, workers, time.perf_counter() - t0)
        (tmp / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    _log_summary(report, out, log)
    return report


def _write_sites(sources: list[SiteSource], cfg: DataConfig, seed: int, workers: int, skip_bad_rows: bool,
                 work: Path, log) -> tuple[dict[str, dict[str, Any]], dict[str, _SplitWriter]]:
    """Steps 1-4 for each site in turn, its pairs written to the splits' files in ``work``; returns
    site -> its counts, and the closed writers."""
    writers = {n: _SplitWriter(work / f"{n}.arrow", _features()) for n in SPLITS}
    sites: dict[str, dict[str, Any]] = {}
    try:
        for src in sources:
            if len(sources) > 1:
                log(f"prepare: site {src.site} from {src.posts}")
            before = {n: (w.rows, w.runs) for n, w in writers.items()}
            try:
                if src.paired:
                    rep = _from_paired(src, cfg, seed, writers, log)
                else:
                    rep = _from_posts(src, cfg, seed, workers, skip_bad_rows, work, writers, log)
            except DataError as e:
                raise e.with_site(src.site) from None
            # Rows of one question are written together (posts_xml), so new runs = new questions.
            rep["splits"] = {n: {"questions": w.runs - before[n][1], "pairs": w.rows - before[n][0]}
                             for n, w in writers.items()}
            rep["pairs"] = sum(x["pairs"] for x in rep["splits"].values())
            sites[src.site] = rep
    finally:
        for w in writers.values():
            w.close()
    if sources[0].paired:  # a paired file need not keep a question's rows together
        only = sites[sources[0].site]
        only["splits"] = {n: {"questions": w.distinct_qids(), "pairs": w.rows} for n, w in writers.items()}
        only["questions"] = only["questions_with_pairs"] = sum(x["questions"] for x in only["splits"].values())
    return sites, writers


def _report(inputs: list[str], sources: list[SiteSource], sites: dict[str, dict[str, Any]], cfg: DataConfig,
            seed: int, workers: int, seconds: float) -> dict[str, Any]:
    """report.json: the counts summed over the sites, and each site's own under ``sites``."""
    paired = sources[0].paired
    splits = {n: {k: sum(r["splits"][n][k] for r in sites.values()) for k in ("questions", "pairs")}
              for n in SPLITS}
    skipped = sum((r["skipped"] for r in sites.values()), Counter())
    other_types = sum((r["ignored_post_types"] for r in sites.values()), Counter())
    nbytes = sum(r["input_bytes"] for r in sites.values())
    one = sites[sources[0].site] if len(sites) == 1 else None
    return {
        "source": inputs[0] if len(inputs) == 1 else inputs,
        "votes": one["votes"] if one else None,
        "site": sources[0].site if one else None,
        "seed": seed,
        "format": "paired" if paired else "posts_xml",
        "questions": sum(r["questions"] for r in sites.values()),
        "answers": None if paired else sum(r["answers"] for r in sites.values()),
        "questions_with_pairs": sum(r["questions_with_pairs"] for r in sites.values()),
        "ignored_post_types": {str(k): v for k, v in sorted(other_types.items())},
        "pairs": sum(s["pairs"] for s in splits.values()),
        "splits": splits,
        "skipped": _full_skipped(skipped),
        "sites": {
            name: {**{k: v for k, v in r.items() if k != "format"},
                   "skipped": {k: v for k, v in sorted(r["skipped"].items()) if v},
                   "ignored_post_types": {str(k): v for k, v in sorted(r["ignored_post_types"].items())}}
            for name, r in sites.items()
        },
        "notes": [ORPHAN_NOTE],
        "max_pairs_per_question": cfg.max_pairs_per_question,
        "split_shares": cfg.splits.model_dump(),
        "converter": None if paired else converter_name(),
        "workers": workers,
        "input_bytes": nbytes,
        "seconds": round(seconds, 3),
        "mb_per_s": round(nbytes / 1e6 / seconds, 2) if seconds > 0 else None,
    }


def _log_summary(report: dict[str, Any], out: Path, log) -> None:
    if len(report["sites"]) > 1:
        for name, r in report["sites"].items():
            log(f"prepare: {name}: {r['questions']} questions, {r['answers']} answers, {r['pairs']} pairs")
    log(
        f"prepare: {report['questions']} questions, {report['pairs']} pairs "
        + " ".join(f"{n}={s['pairs']}" for n, s in report["splits"].items())
        + f" -> {out} ({report['seconds']:.1f} s, {report['mb_per_s']} MB/s)"
    )


def _write_dataset_dict(folder: Path, writers: dict[str, _SplitWriter], identity: str) -> None:
    """``DatasetDict.save_to_disk``'s folder, with the finished data files of ``writers`` as the splits' data.

    ``save_to_disk`` of empty splits writes the metadata (dataset_dict.json, each split's
    dataset_info.json and state.json; no data file for 0 rows); we move each split's data file in,
    list it in state.json and give it a fingerprint of the content's identity, so that ``.map()``
    caches of different outputs never collide.
    """
    import hashlib

    from datasets import Dataset, DatasetDict
    from datasets.utils import logging as ds_logging

    features = _features()
    empty = {c: [] for c in features}
    skeleton = DatasetDict({n: Dataset.from_dict(empty, features=features) for n in writers})
    was = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        skeleton.save_to_disk(str(folder))
    finally:
        if was:
            ds_logging.enable_progress_bar()
    for n, w in writers.items():
        name = "data-00000-of-00001.arrow"
        os.replace(w.path, folder / n / name)
        state_path = folder / n / "state.json"
        state = json.loads(state_path.read_text())
        key = f"{identity}|{n}|{w.rows}|{(folder / n / name).stat().st_size}"
        state["_data_files"] = [{"filename": name}]
        state["_fingerprint"] = hashlib.blake2b(key.encode(), digest_size=8).hexdigest()
        state_path.write_text(json.dumps(state, indent=2, sort_keys=True))


def _check_replaceable(out: Path) -> None:
    """Only an empty folder or an earlier prepare output may be replaced."""
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError("output exists and is not a folder", out)
    ours = (out / REPORT).exists() or (out / "dataset_dict.json").exists()
    if not ours and any(out.iterdir()):
        raise DataError("output folder is not empty and holds no prepared data; refusing to replace it", out)


# ------------------------------------------------------------------------------------ readers
def check_prepared(path: str | os.PathLike[str]) -> Path:
    """``path`` when it holds a complete ``prepare`` output, else a DataError naming the folder and what is missing."""
    p = Path(path)
    if not p.is_dir():
        raise DataError("prepared data folder not found (run prepare first)", p)
    missing = [n for n in ("dataset_dict.json", REPORT) if not (p / n).exists()]
    missing += [n for n in SPLITS if not (p / n / "state.json").exists()]
    if missing:
        raise DataError(f"incomplete prepared data folder, missing {', '.join(missing)} (run prepare again)", p)
    return p


def load_prepared(path: str | os.PathLike[str]):
    """``load_from_disk`` for a ``prepare`` output, with an error naming the folder when it is not one."""
    p = check_prepared(path)
    from datasets import load_from_disk

    return load_from_disk(str(p))


def sft_texts(split) -> list[str]:
    """Distinct (question, response_j) of a split, formatted with format_qa, in first-seen row order."""
    seen: dict[tuple[str, str], None] = {}
    for batch in split.select_columns(["question", "response_j"]).iter(batch_size=1024):
        seen.update(dict.fromkeys(zip(batch["question"], batch["response_j"])))
    return [format_qa(q, a) for q, a in seen]
