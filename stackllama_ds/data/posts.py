"""Streaming reader for Stack Exchange ``Posts.xml`` / ``Votes.xml`` dumps (plain files or ``.7z`` members).

    python -c "from stackllama_ds.data.posts import iter_parsed; print(sum(len(c.questions) for c in iter_parsed('data/beer.stackexchange.com/Posts.xml')))"

The dump has one ``<row .../>`` per line (newlines inside values are escaped as ``&#xA;``), a UTF-8
BOM and CRLF line ends. We never parse the file as one document: it is cut into blocks at line
boundaries (byte ranges of a file, or blocks read from an archive member's stream), and each block is
parsed line by line (lxml, one row at a time) and its bodies converted to Markdown, in worker
processes when ``workers > 1``. Results come back in file order, so line numbers are exact and memory
holds a bounded window of blocks whatever the file size.

Any other well-formed layout is read too: a prolog with a DOCTYPE, comments or processing
instructions, rows spread over several lines or several rows on one line. The line scanner stops at
the first line that is not the dump's layout (a line starting with ``<`` that is not one whole
``<row/>``, ``<posts>``, ``</posts>`` or the XML declaration) and the rest of the file, from that
line, goes through lxml's pull parser in this process (the whole file when the break comes before
``<posts>``). That parser never loads a DTD, never fetches anything and never expands an external
entity: an external entity referenced in an attribute is an ``invalid_xml`` error (libxml2 refuses
it), one referenced between rows is an ``invalid_xml`` error like any text outside a row, and an
undeclared entity (declared only in an unread external DTD) reads as nothing. Internal entities
declared in the DOCTYPE are expanded, within libxml2's amplification limit. In that mode a row's
line is where its start tag ends (libxml2's ``sourceline``: the last line of a row spread over
several lines), and a well-formedness error ends the file: with ``skip_bad_rows`` it is counted once
and the rows after it are not read.

Every problem is a ``DataError`` naming file, line and attribute; with ``skip_bad_rows`` the row is
skipped and counted by reason instead (see ``SKIP_REASONS``).
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import re
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from lxml import etree

from stackllama_ds.data.archive import member_sizes, open_member
from stackllama_ds.data.errors import DataError
from stackllama_ds.data.markdown import ConversionFailed, html_to_markdown

# Why a row was skipped (skip_bad_rows=True) or refused (False). orphan_answer is always skipped.
SKIP_REASONS = (
    "invalid_xml",  # a line that is not one well-formed <row .../> element (or XML that is not well-formed)
    "truncated",  # the file ends inside a row or without its closing root tag
    "missing_id",
    "missing_post_type",
    "missing_attribute",  # Title of a question, Score/ParentId of an answer, PostId/VoteTypeId of a vote
    "bad_integer",  # Id, PostTypeId, Score, ParentId, AcceptedAnswerId, PostId, VoteTypeId
    "html_conversion",  # the HTML converter failed on Body
    "duplicate_id",  # a second post with the same Id
    "orphan_answer",  # an answer whose ParentId is no question in the file
)

CHUNK_BYTES = 8 << 20  # one task: ~8 MB of XML, a few thousand rows
MAX_LINE = 16 << 20  # a longer line is not the one-row-per-line layout: the pull parser takes over
STREAM_PIECE = 1 << 20  # bytes fed to the pull parser at a time
STREAM_BATCH = 2000  # rows per ChunkResult from the pull parser

_BOM = b"\xef\xbb\xbf"
_PARSER = etree.XMLParser(resolve_entities=False, huge_tree=True, no_network=True)
_ATTR_BEFORE = re.compile(rb"""([A-Za-z_][\w.-]*)\s*=\s*["']""")
_XML_DECL = re.compile(rb"<\?xml[^<>]*\?>")
_ROOT_OPEN = re.compile(rb"<posts(\s[^<>]*)?>")
_SEP = "\x1f"  # joins metadata strings inside the on-disk store


@dataclass(frozen=True)
class DumpFile:
    """One XML file of a dump: a plain file, or the member ``member`` of the ``.7z`` archive ``path``.

    A member is read as a stream (decompressed on a thread, never extracted to disk); its name in
    messages is ``ARCHIVE/MEMBER``.
    """

    path: Path
    member: str | None = None

    def __str__(self) -> str:
        return str(self.path) if self.member is None else f"{self.path}/{self.member}"

    def exists(self) -> bool:
        return self.path.is_file()

    def size(self) -> int:
        """Bytes of XML (uncompressed size for a member, from the archive's header)."""
        if self.member is None:
            return os.path.getsize(self.path)
        return member_sizes(self.path).get(self.member, 0)

    def mtime_ns(self) -> int:
        return self.path.stat().st_mtime_ns

    def open(self) -> BinaryIO:
        if self.member is None:
            return open(self.path, "rb")
        return open_member(self.path, self.member)


def _as_dump(src: str | os.PathLike[str] | DumpFile) -> DumpFile:
    return src if isinstance(src, DumpFile) else DumpFile(Path(src))


# ------------------------------------------------------------------------------------- rows
# A question: (qid, line, title, body_md, date, metadata joined by _SEP, accepted_answer_id or None)
# An answer:  (aid, line, parent_id, score, body_md)
Question = tuple[int, int, str, str, str, str, "int | None"]
Answer = tuple[int, int, int, int, str]


@dataclass
class Problem:
    """One bad row, line relative to its chunk until ``iter_parsed`` makes it absolute."""

    reason: str
    line: int
    attribute: str
    message: str


@dataclass
class ChunkResult:
    questions: list[Question] = field(default_factory=list)
    answers: list[Answer] = field(default_factory=list)
    other_types: Counter = field(default_factory=Counter)  # PostTypeId -> rows ignored
    skipped: Counter = field(default_factory=Counter)  # reason -> rows
    problems: list[Problem] = field(default_factory=list)  # first few (all if not skipping: one)
    newlines: int = 0  # to turn chunk-relative line numbers into file line numbers
    closed: bool | None = None  # last non-blank line is </posts> (None: the chunk is blank)
    nbytes: int = 0
    # Where the one-row-per-line layout stops (the pull parser reads on from there):
    break_line: int | None = None  # chunk-relative line
    break_offset: int = 0  # byte offset of that line in the chunk
    root_open: bool = True  # <posts> was open at the break (False: reparse the whole file)
    root_tag: bytes | None = None  # the <posts ...> start tag, when this chunk holds it


def parse_tags(tags: str) -> list[str]:
    """Tag names from ``<a><b>`` (dumps up to 2023, after XML unescaping) or ``|a|b|`` (2024 on)."""
    if not tags:
        return []
    if tags.startswith("<"):
        return [t for t in tags[1:-1].split("><") if t]
    return [t for t in tags.split("|") if t]


def _int(attrs, name: str, reason_missing: str) -> int:
    raw = attrs.get(name)
    if raw is None:
        raise _RowError(reason_missing, name, f"required attribute {name} is missing")
    try:
        return int(raw)
    except ValueError:
        raise _RowError("bad_integer", name, f"not an integer: {raw[:40]!r}") from None


class _RowError(Exception):
    def __init__(self, reason: str, attribute: str, message: str, continues: bool = False):
        super().__init__(message)
        self.reason, self.attribute, self.message = reason, attribute, message
        self.continues = continues  # the XML error is at the end of the line: it may go on below


class _LayoutBreak(Exception):
    """This line is well-formed XML, but not the one-row-per-line layout."""


def _xml_error(line: bytes, err: etree.XMLSyntaxError, at_eof: bool) -> _RowError:
    col = (err.position or (1, 0))[1]
    names = _ATTR_BEFORE.findall(line[: max(col, 1)])
    attr = names[-1].decode() if names else "<row>"
    msg = str(err.msg or err).split(", line ")[0]
    if at_eof:
        return _RowError("truncated", attr, f"file ends inside this row ({msg})")
    return _RowError("invalid_xml", attr, f"not a well-formed <row/>: {msg}", continues=col > len(line))


def _take_row(el, rel: int, out: ChunkResult) -> None:
    """Add one parsed ``<row/>`` element (a question or an answer) to ``out``."""
    tag = el.tag
    if tag != "row" and not tag.endswith("}row"):  # {namespace}row under a <posts xmlns=...>
        raise _RowError("invalid_xml", f"<{tag}>", "expected a <row .../> element")
    a = el.attrib
    pid = _int(a, "Id", "missing_id")
    ptype = _int(a, "PostTypeId", "missing_post_type")
    if ptype != 1 and ptype != 2:
        out.other_types[ptype] += 1
        return
    body_html = a.get("Body", "")
    if ptype == 1:
        title = a.get("Title")
        if title is None:
            raise _RowError("missing_attribute", "Title", "a question (PostTypeId 1) needs a Title")
        accepted = _int(a, "AcceptedAnswerId", "missing_attribute") if "AcceptedAnswerId" in a else None
        meta = parse_tags(a.get("Tags", ""))
        lic = a.get("ContentLicense")
        if lic:
            meta.append(f"license:{lic}")
        body = _convert(body_html)
        out.questions.append((pid, rel, title, body, a.get("CreationDate", ""), _SEP.join(meta), accepted))
    else:
        parent = _int(a, "ParentId", "missing_attribute")
        score = _int(a, "Score", "missing_attribute")
        out.answers.append((pid, rel, parent, score, _convert(body_html)))


def _parse_row(s: bytes, rel: int, out: ChunkResult, at_eof: bool) -> None:
    try:
        el = etree.fromstring(s, _PARSER)
    except etree.XMLSyntaxError as e:
        if not at_eof and _several_nodes(s):
            raise _LayoutBreak() from None
        raise _xml_error(s, e, at_eof) from None
    _take_row(el, rel, out)


def _several_nodes(s: bytes) -> bool:
    """A line that is well-formed content but not one element (``<row/><row/>``, a row and a comment)."""
    try:
        etree.fromstring(b"<_>" + s + b"</_>", _PARSER)
    except etree.XMLSyntaxError:
        return False
    return True


def _next_starts_row(lines: list[bytes], rel: int) -> bool:
    """The next non-blank line of the chunk is a row or ``</posts>`` (False at the chunk's end)."""
    for line in itertools.islice(lines, rel + 1, None):
        s = line.strip()
        if s:
            return s.startswith(b"<row") or s == b"</posts>"
    return False


def _convert(html: str) -> str:
    try:
        return html_to_markdown(html)
    except ConversionFailed as e:
        raise _RowError("html_conversion", "Body", f"HTML->Markdown failed: {e}") from None


def parse_block(data: bytes, first: bool, at_file_end: bool, skip_bad_rows: bool,
                keep_problems: int = 20) -> ChunkResult:
    """Parse the rows of one block of whole lines (``first``: it starts the file). Lines are 0-based.

    Stops at the first line that is not the one-row-per-line layout and says where (``break_line``).
    """
    out = ChunkResult(newlines=data.count(b"\n"), nbytes=len(data))
    skip = 0
    if first and data.startswith(_BOM):
        skip = len(_BOM)
        data = data[skip:]
    lines = data.split(b"\n")
    last = len(lines) - 1
    root = not first  # a later block is inside <posts>
    pos = 0
    # The final line of the file is unterminated; a row there that fails to parse is a truncation.
    for rel, line in enumerate(lines):
        start, pos = pos, pos + len(line) + 1
        s = line.strip()
        if not s:
            continue
        out.closed = s == b"</posts>"
        at_eof = at_file_end and rel == last
        try:
            if root and s.startswith(b"<row"):
                _parse_row(s, rel, out, at_eof)
            elif out.closed:
                pass
            elif not root:  # the prolog: anything but the dump's goes to the XML parser, whole file
                if rel == 0 and _XML_DECL.fullmatch(s):
                    continue
                if not _ROOT_OPEN.fullmatch(s):
                    raise _LayoutBreak()
                root = True
                out.root_tag = s
            elif s.startswith(b"<") and not at_eof:
                raise _LayoutBreak()
            else:
                raise _RowError("truncated" if at_eof else "invalid_xml", "<row>",
                                f"not a <row .../> line: {s[:60]!r}")
        except _LayoutBreak:
            out.closed = None
            if root:
                out.break_line, out.break_offset = rel, start + skip
            else:
                out.break_line, out.break_offset, out.root_open = 0, 0, False
            out.nbytes = out.break_offset  # the pull parser counts the rest
            return out
        except _RowError as e:
            if e.continues and not _next_starts_row(lines, rel):  # a row spread over several lines
                out.closed = None
                out.break_line, out.break_offset = rel, start + skip
                out.nbytes = out.break_offset
                return out
            if not skip_bad_rows:
                out.problems.append(Problem(e.reason, rel, e.attribute, e.message))
                return out
            out.skipped[e.reason] += 1
            if len(out.problems) < keep_problems:
                out.problems.append(Problem(e.reason, rel, e.attribute, e.message))
    if not root:  # the whole first block is prolog: the XML parser reads the file
        out.closed = None
        out.break_line, out.break_offset, out.root_open = 0, 0, False
        out.nbytes = 0
    return out


def parse_range(path: str, start: int, end: int, at_file_end: bool, skip_bad_rows: bool,
                keep_problems: int = 20) -> ChunkResult:
    """Parse the rows in bytes ``[start, end)`` (both at line starts). Lines are 0-based in the chunk."""
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    return parse_block(data, start == 0, at_file_end, skip_bad_rows, keep_problems)


def byte_ranges(path: str | os.PathLike[str], chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[int, int]]:
    """``[start, end)`` ranges of about ``chunk_bytes`` that start and end at line boundaries.

    A line longer than ``MAX_LINE`` is cut (it is not the dump's layout; the parser falls back there).
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        start = 0
        while start < size:
            f.seek(min(start + chunk_bytes, size))
            if f.tell() < size:
                f.readline(max(chunk_bytes, MAX_LINE))  # finish the line we landed in
            end = min(f.tell(), size)
            yield start, end
            start = end


def stream_blocks(f: BinaryIO, chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[bytes, bool]]:
    """``(block, is_last)`` of about ``chunk_bytes`` from a stream, each ending at a line boundary."""
    limit = max(chunk_bytes, MAX_LINE)
    pending: bytes | None = None
    rest = b""
    while True:
        data = f.read(chunk_bytes)
        if not data:
            break
        buf = rest + data
        cut = buf.rfind(b"\n") + 1
        if cut == 0 and len(buf) < limit:
            rest = buf
            continue
        cut = cut or len(buf)
        block, rest = buf[:cut], buf[cut:]
        if pending is not None:
            yield pending, False
        pending = block
    if rest:
        if pending is not None:
            yield pending, False
        pending = rest
    if pending is not None:
        yield pending, True


def _run_range(args: tuple) -> ChunkResult:
    return parse_range(*args)


def _run_block(args: tuple) -> ChunkResult:
    return parse_block(*args)


# ------------------------------------------------------------------- the fallback: a pull parser
class _PullRows:
    """What the pull parser has read into the batch being filled (``out``), and its checks of the
    document between rows. Lines are 0-based file lines; the first fed line is ``line_base + 1``."""

    def __init__(self, line_base: int, skip_bad_rows: bool, keep_problems: int):
        self.line_base, self.skip_bad_rows, self.keep_problems = line_base, skip_bad_rows, keep_problems
        self.out = ChunkResult()
        self.root_checked = False

    def line_of(self, n: int | None) -> int:  # fed line -> 0-based file line
        return self.line_base + (n or 1) - 1

    def problem(self, e: _RowError, line: int) -> bool:
        """Record a bad row; True when parsing must stop (not skipping)."""
        if len(self.out.problems) < self.keep_problems:
            self.out.problems.append(Problem(e.reason, line, e.attribute, e.message))
        if not self.skip_bad_rows:
            return True
        self.out.skipped[e.reason] += 1
        return False

    def outside(self, nodes, root) -> tuple[_RowError, int] | None:
        """What is wrong between the root's elements: text, or an entity reference (never expanded)."""
        if not self.root_checked:
            self.root_checked = True
            if root.text and root.text.strip():
                return _RowError("invalid_xml", "<posts>", f"text outside a <row/>: {root.text.strip()[:40]!r}"), \
                    self.line_of(root.sourceline)
        for n in nodes:
            if isinstance(n, etree._Entity):
                return _RowError("invalid_xml", str(n), "entity reference outside a <row/> (entities are "
                                 "never expanded)"), self.line_of(n.sourceline)
            if n.tail and n.tail.strip():
                return _RowError("invalid_xml", "<posts>", f"text outside a <row/>: {n.tail.strip()[:40]!r}"), \
                    self.line_of(n.sourceline)
        return None

    def take(self, events) -> bool:
        """Handle parsed elements; True when parsing must stop."""
        for _, el in events:
            parent = el.getparent()
            if parent is None:  # the root closed: check what follows the last row
                bad = self.outside(list(el), el)
                if bad is not None and self.problem(*bad):
                    return True
                self.out.closed = True
                continue
            if parent.getparent() is not None:  # inside a row: read with the row
                continue
            before = []
            p = el.getprevious()
            while p is not None:
                before.append(p)
                p = p.getprevious()
            bad = self.outside(reversed(before), parent)
            if bad is not None and self.problem(*bad):
                return True
            del parent[:len(before)]  # rows already read, comments, PIs: drop them
            try:
                _take_row(el, self.line_of(el.sourceline), self.out)
            except _RowError as e:
                if self.problem(e, self.line_of(el.sourceline)):
                    return True
        return False


def _pull_parse(pieces: Iterable[bytes], prefix: bytes, line_base: int, skip_bad_rows: bool,
                keep_problems: int = 20) -> Iterator[ChunkResult]:
    """Rows of well-formed XML in any layout, fed piece by piece to lxml's pull parser.

    ``prefix`` (the ``<posts>`` start tag, or nothing) precedes ``pieces``; the first fed line is file
    line ``line_base + 1``. Yields ChunkResults of up to STREAM_BATCH rows whose (0-based) lines are
    absolute. Parsed rows are deleted from the tree, so memory stays flat.
    """
    parser = etree.XMLPullParser(events=("end",), resolve_entities=False, no_network=True, load_dtd=False,
                                 huge_tree=True)
    rows = _PullRows(line_base, skip_bad_rows, keep_problems)
    if prefix:
        parser.feed(prefix)
    for data in itertools.chain(pieces, [None]):
        try:
            if data is None:
                parser.close()
            else:
                rows.out.nbytes += len(data)
                parser.feed(data)
        except etree.XMLSyntaxError as e:
            if rows.take(parser.read_events()):
                yield rows.out
                return
            msg = str(e.msg or e).split(", line ")[0]
            err = (_RowError("truncated", "", f"file ends before the XML document does ({msg})") if data is None
                   else _RowError("invalid_xml", "", f"not well-formed XML: {msg}"))
            if skip_bad_rows:
                err.message += "; the rest of the file is not read"
            rows.problem(err, rows.line_of(e.lineno))
            yield rows.out
            return
        if rows.take(parser.read_events()):
            yield rows.out
            return
        if len(rows.out.questions) + len(rows.out.answers) >= STREAM_BATCH:
            yield rows.out
            rows.out = ChunkResult()
    yield rows.out


def _pieces(f: BinaryIO) -> Iterator[bytes]:
    with f:
        yield from iter(lambda: f.read(STREAM_PIECE), b"")


def iter_parsed(path: str | os.PathLike[str] | DumpFile, *, workers: int = 1, skip_bad_rows: bool = False,
                chunk_bytes: int = CHUNK_BYTES, log=None) -> Iterator[ChunkResult]:
    """Parse Posts.xml (a file or a ``DumpFile``) into ChunkResults in file order, with absolute (1-based) lines.

    ``workers > 1`` parses blocks in that many spawned processes; at most ``2 * workers`` blocks are in
    flight, so memory stays flat however large the file. Raises DataError on the first bad row unless
    ``skip_bad_rows``; then problems are counted (and the first few logged). Where the file leaves the
    one-row-per-line layout, the rest is read by the pull parser in this process.
    """
    dump = _as_dump(path)
    name = str(dump)
    if not dump.exists():
        raise DataError("file not found", dump.path)
    fin = _Finisher(name, skip_bad_rows, log)
    root_tag = b"<posts>"
    stream: BinaryIO | None = None
    try:
        if dump.member is not None:  # an archive member: its blocks travel to the workers as bytes
            stream = dump.open()
        size, fn, tasks = _block_tasks(dump, stream, chunk_bytes, skip_bad_rows)
        rest: Iterator[bytes] | None = None  # the bytes from the layout break on
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(workers) if workers > 1 else _NoPool() as pool:
            pending: deque = deque()

            def fill() -> None:
                while len(pending) < max(1, 2 * workers):
                    t = next(tasks, None)
                    if t is None:
                        return
                    pending.append((t, pool.apply_async(fn, (t,)) if workers > 1 else None))

            fill()
            while pending:
                t, handle = pending.popleft()
                res = handle.get() if handle is not None else fn(t)
                root_tag = res.root_tag or root_tag
                if res.break_line is None:
                    yield fin.finish(res)
                    fill()
                    continue
                # The layout breaks here: rows before it count, the pull parser reads the rest.
                res.newlines = 0
                yield fin.finish(res)
                line_base = fin.lines_before + res.break_line
                prefix = root_tag if res.root_open else b""
                rest = _rest_after_break(dump, stream, t, res.break_offset, pending, tasks)
                break
        if rest is not None:
            if log is not None:
                log(f"{name}: not one <row/> per line from line {line_base + 1}; reading on with the XML parser")
            fin.lines_before = 0
            for res in _pull_parse(rest, prefix, line_base, skip_bad_rows):
                yield fin.finish(res)
            return
    finally:
        if stream is not None:
            stream.close()
    if size and not fin.saw_closed and not fin.last_line_truncated:
        yield fin.missing_close()


class _Finisher:
    """Makes ``iter_parsed``'s ChunkResults absolute (1-based file lines) in file order, raises on
    the first problem unless ``skip_bad_rows`` (then logs the first 50), and notes whether the
    document was closed."""

    def __init__(self, name: str, skip_bad_rows: bool, log: Callable[[str], None] | None):
        self.name, self.skip_bad_rows, self.log = name, skip_bad_rows, log
        self.lines_before = 0  # file lines before the next result's first line
        self.logged = 0  # skipped rows echoed to the log (the report has every count)
        self.saw_closed = False
        self.last_line_truncated = False

    def finish(self, res: ChunkResult) -> ChunkResult:
        """``res`` (the next in file order) with absolute lines; raises or logs its problems."""
        for p in res.problems:
            p.line += self.lines_before + 1
        if res.problems and not self.skip_bad_rows:
            p = res.problems[0]
            raise DataError(p.message, self.name, p.line, p.attribute, p.reason)
        if self.log is not None:
            for p in res.problems[: max(0, 50 - self.logged)]:
                self.log(f"skipped {p.reason}: {self.name}:{p.line}: {p.attribute}: {p.message}")
            self.logged += len(res.problems)
        res.questions = [(q[0], q[1] + self.lines_before + 1, *q[2:]) for q in res.questions]
        res.answers = [(a[0], a[1] + self.lines_before + 1, *a[2:]) for a in res.answers]
        self.lines_before += res.newlines
        if res.closed is not None:
            self.saw_closed = res.closed
        self.last_line_truncated = res.skipped.get("truncated", 0) > 0
        return res

    def missing_close(self) -> ChunkResult:
        """A non-empty file ended without ``</posts>``: DataError, or (skipping) one counted problem."""
        msg = "file is truncated: no closing </posts> after the last row"
        if not self.skip_bad_rows:
            raise DataError(msg, self.name, self.lines_before + 1, "</posts>", "truncated")
        if self.log is not None:
            self.log(f"skipped truncated: {self.name}:{self.lines_before + 1}: {msg}")
        extra = ChunkResult()
        extra.skipped["truncated"] += 1
        return extra


def _block_tasks(dump: DumpFile, stream: BinaryIO | None, chunk_bytes: int,
                 skip_bad_rows: bool) -> tuple[int, Callable[[tuple], ChunkResult], Iterator[tuple]]:
    """(size, parse function, its argument tuples) for the dump's blocks: byte ranges of a plain file
    (each worker reads its own), or blocks read from the archive member's open ``stream``."""
    if stream is None:
        size = os.path.getsize(dump.path)
        return size, _run_range, ((str(dump.path), s, e, e >= size, skip_bad_rows)
                                  for s, e in byte_ranges(dump.path, chunk_bytes))
    return dump.size(), _run_block, ((data, i == 0, last, skip_bad_rows)
                                     for i, (data, last) in enumerate(stream_blocks(stream, chunk_bytes)))


def _rest_after_break(dump: DumpFile, stream: BinaryIO | None, t: tuple, offset: int, pending: deque,
                      tasks: Iterator[tuple]) -> Iterator[bytes]:
    """The bytes from ``offset`` into block ``t`` (where the one-row-per-line layout breaks) to the end."""
    if stream is None:
        f = open(dump.path, "rb")
        f.seek(t[1] + offset)
        return _pieces(f)
    # blocks read ahead, then the rest of the stream (through the block reader)
    return itertools.chain([t[0][offset:]], [p[0][0] for p in pending], (t2[0] for t2 in tasks))


class _NoPool:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


# ------------------------------------------------------------------------------------ votes
_VOTE_TYPE = re.compile(rb'\sVoteTypeId="([^"]*)"')
_POST_ID = re.compile(rb'\sPostId="([^"]*)"')


def iter_upvotes(path: str | os.PathLike[str] | DumpFile, *, skip_bad_rows: bool = False,
                 flush_every: int = 1_000_000, skipped: Counter | None = None) -> Iterator[list[tuple[int, int]]]:
    """Count VoteTypeId 2 (up) votes per PostId in Votes.xml; yields ``[(post_id, n), ...]`` batches.

    A post may appear in several batches (counts add up). Rows are checked for shape and for the two
    attributes we read (a regex on each line, far faster than an XML parse of these tiny rows), so
    Votes.xml must be in the dump's one-row-per-line layout.
    """
    dump = _as_dump(path)
    name = str(dump)
    if not dump.exists():
        raise DataError("file not found", dump.path)
    counts: Counter = Counter()
    closed = False
    lineno = 0
    with dump.open() as f:
        for lineno, line in enumerate(f, 1):
            s = line.strip()
            if lineno == 1 and s.startswith(_BOM):
                s = s[len(_BOM):].strip()
            if not s:
                continue
            if not s.startswith(b"<row"):
                closed = s == b"</votes>"
                if closed or s.startswith(b"<?xml") or s.startswith(b"<votes"):
                    continue
            closed = False
            try:
                if not (s.startswith(b"<row ") and s.endswith(b"/>")):
                    raise _RowError("truncated" if not line.endswith(b"\n") else "invalid_xml", "<row>",
                                    f"not a <row .../> line: {s[:60]!r}")
                m = _VOTE_TYPE.search(s)
                if m is None:
                    raise _RowError("missing_attribute", "VoteTypeId", "required attribute VoteTypeId is missing")
                if m.group(1) != b"2":
                    if not m.group(1).isdigit():
                        raise _RowError("bad_integer", "VoteTypeId", f"not an integer: {m.group(1)[:40]!r}")
                    continue
                m = _POST_ID.search(s)
                if m is None:
                    raise _RowError("missing_attribute", "PostId", "required attribute PostId is missing")
                if not m.group(1).isdigit():
                    raise _RowError("bad_integer", "PostId", f"not an integer: {m.group(1)[:40]!r}")
            except _RowError as e:
                if not skip_bad_rows:
                    raise DataError(e.message, name, lineno, e.attribute, e.reason) from None
                if skipped is not None:
                    skipped[f"votes_{e.reason}"] += 1
                continue
            counts[int(m.group(1))] += 1
            if len(counts) >= flush_every:
                yield list(counts.items())
                counts.clear()
    if not closed:
        if not skip_bad_rows:
            raise DataError("file is truncated: no closing </votes>", name, lineno + 1, "</votes>", "truncated")
        if skipped is not None:
            skipped["votes_truncated"] += 1
    if counts:
        yield list(counts.items())


def site_of(path: str | os.PathLike[str]) -> str:
    """The site a dump belongs to: its folder's name (``beer.stackexchange.com``)."""
    return Path(path).resolve().parent.name
