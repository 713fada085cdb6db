"""Read one member of a ``.7z`` archive as a stream of bytes, without extracting it to disk.

    python -c "from stackllama_ds.data.archive import open_member; print(open_member('beer.stackexchange.com.7z', 'Posts.xml').read(200))"

The official Stack Exchange dump ships one ``<site>.7z`` per site with ``Posts.xml``, ``Votes.xml``, ... at
its top level (Stack Overflow's Posts archive alone is ~20 GB compressed). py7zr decompresses on a
background thread into our ``WriterFactory`` product (py7zr >= 1.0), whose ``write`` puts pieces of at
most ``PIECE`` bytes on a bounded queue; the reader takes them off. Memory is the queue
(``QUEUE_PIECES * PIECE``) plus the output of one py7zr decompression call (1 MB of packed input: a few
MB of dump XML), whatever the member's size. Closing the reader early stops the thread at its next write.
A CRC or decompression error reaches the reader as an ``ArchiveError`` (a ``DataError``).

In a solid archive the members before ours are decompressed (and dropped) first: reading Posts.xml
and then Votes.xml of one ``<site>.7z`` decompresses the members before Posts.xml twice.
"""

from __future__ import annotations

import io
import os
import queue
import threading
import time
from pathlib import Path

from stackllama_ds.data.errors import DataError

PIECE = 1 << 20
QUEUE_PIECES = 8
_EOF = object()


class ArchiveError(DataError):
    """An archive (or a member of it) that cannot be read; ``file`` is the archive (or ``ARCHIVE/MEMBER``)."""


def _py7zr():
    try:
        import py7zr
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise ArchiveError(f"reading .7z archives needs py7zr (pip install py7zr): {e}") from None
    return py7zr


def _read_errors(py7zr) -> tuple[type[BaseException], ...]:
    import lzma

    return (py7zr.exceptions.ArchiveError, py7zr.PasswordRequired, EOFError, OSError, lzma.LZMAError, ValueError)


def member_sizes(archive: str | os.PathLike[str]) -> dict[str, int]:
    """Uncompressed size of every file in the archive (from its header; nothing is decompressed)."""
    py7zr = _py7zr()
    try:
        with py7zr.SevenZipFile(archive, "r") as z:
            return {i.filename: i.uncompressed for i in z.list() if not i.is_directory}
    except _read_errors(py7zr) as e:
        raise ArchiveError(f"not a readable .7z archive: {e}", archive) from None


class _Cancelled(Exception):
    pass


class _QueueWriter:
    """The py7zr ``Py7zIO`` product: every write goes, in pieces, onto the reader's queue."""

    def __init__(self, q: queue.Queue, cancel: threading.Event):
        self.q, self.cancel = q, cancel

    def _put(self, item) -> None:
        while True:
            if self.cancel.is_set():
                raise _Cancelled()
            try:
                self.q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def write(self, s) -> int:
        view = memoryview(s)
        for i in range(0, len(view), PIECE):
            self._put(bytes(view[i:i + PIECE]))
        return len(view)

    def close(self) -> None:  # py7zr >= 1.1 calls it when the member is written; extract() returning says more
        pass

    def seekable(self) -> bool:  # so that py7zr does not rewind us after the last write
        return False

    def read(self, size=None) -> bytes:
        return b""

    def seek(self, offset: int, whence: int = 0) -> int:
        return 0

    def flush(self) -> None:
        pass

    def size(self) -> int:
        return 0


class MemberReader(io.RawIOBase):
    """A read-only, non-seekable binary stream of one archive member (wrap in ``io.BufferedReader``)."""

    def __init__(self, archive: str | os.PathLike[str], member: str):
        self.archive, self.member = Path(archive), member
        self._q: queue.Queue = queue.Queue(maxsize=QUEUE_PIECES)
        self._cancel = threading.Event()
        self._piece = memoryview(b"")
        self._done = False
        self._thread = threading.Thread(target=self._produce, name=f"7z:{self.archive.name}", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        py7zr = _py7zr()
        writer = _QueueWriter(self._q, self._cancel)
        produced = []

        class Factory(py7zr.WriterFactory):
            def create(self, filename: str):
                produced.append(filename)
                return writer

        try:
            with py7zr.SevenZipFile(self.archive, "r") as z:
                # Returns once our member is written and its CRC checked (members after it are not read).
                z.extract(targets=[self.member], factory=Factory())
            writer._put(_EOF if produced else ArchiveError(f"no member {self.member!r}", self.archive))
        except _Cancelled:
            pass
        except BaseException as e:  # handed to the reader, which raises it in the caller's thread
            try:
                writer._put(ArchiveError(f"cannot decompress: {type(e).__name__}: {e}",
                                         f"{self.archive}/{self.member}"))
            except _Cancelled:
                pass

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self._piece:
            if self._done:
                return 0
            item = self._q.get()
            if item is _EOF:
                self._done = True
                return 0
            if isinstance(item, BaseException):
                self._done = True
                raise item
            self._piece = memoryview(item)
        n = min(len(b), len(self._piece))
        b[:n] = self._piece[:n]
        self._piece = self._piece[n:]
        return n

    def close(self) -> None:
        if not self.closed:
            self._cancel.set()
            # Unblock a pending put; the thread stops at its next write. It may be decompressing
            # members before ours (a solid archive), so we wait a little, not for it to finish.
            deadline = time.monotonic() + 2.0
            while self._thread.is_alive() and time.monotonic() < deadline:
                try:
                    self._q.get(timeout=0.05)
                except queue.Empty:
                    pass
            self._piece = memoryview(b"")
        super().close()


def open_member(archive: str | os.PathLike[str], member: str) -> io.BufferedReader:
    """A buffered binary stream of ``member``; close it (or use ``with``) to stop the decompression."""
    return io.BufferedReader(MemberReader(archive, member), buffer_size=PIECE)
