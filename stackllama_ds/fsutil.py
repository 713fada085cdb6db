"""Atomic writes: a file through a temporary file and a rename, a folder built in a temporary folder
and renamed into place; the file modes of such folders; error logs.

    python -c "from stackllama_ds.fsutil import umask; print(oct(umask()))"

``tempfile.mkdtemp`` creates its folder 0700 and safetensors writes its files 0600, whatever the
umask; a plain ``mkdir``/``open`` gives 0777/0666 minus the umask. ``follow_umask`` gives a finished
temporary folder (and everything in it) the plain modes before it is renamed into place, so exported
models, tiny models, fetched models, token caches and prepared data are shared as checkpoints and
metrics are. (Checkpoints publish their own ``.tmp-step-N`` folders: every rank writes into one and
the files are fsynced before the rename; see run/checkpoint.py.)
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import shutil
import tempfile
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path


def umask() -> int:
    """The process umask, read without changing it (os.umask can only read by setting)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    # Fallback: set and restore; other threads creating files in between would see umask 0o077.
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def follow_umask(root: str | os.PathLike[str]) -> None:
    """chmod ``root`` and every folder under it to 0o777 & ~umask, every file to 0o666 & ~umask.

    Symlinks are left alone (chmod would change their targets).
    """
    mask = umask()
    dmode, fmode = 0o777 & ~mask, 0o666 & ~mask
    root = Path(root)
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        os.chmod(d, dmode)
        for name in filenames:
            p = d / name
            if not p.is_symlink():
                os.chmod(p, fmode)
        dirnames[:] = [n for n in dirnames if not (d / n).is_symlink()]


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's content, read in 4 MiB blocks (checkpoint manifests, fetched models)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_by_name(path: str | os.PathLike[str], wait_s: float = 30.0) -> str:
    """``sha256_file``, retrying a missing file for up to ``wait_s``: on a shared filesystem a file
    another node has just written can be invisible here for seconds (attribute and negative-lookup
    caches); opening it by name again reaches the server."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return sha256_file(path)
        except FileNotFoundError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.5)


def append_traceback(path: str | os.PathLike[str], exc: BaseException, header: str) -> bool:
    """Append ``header`` and ``exc``'s full traceback to ``path`` (folders made as needed), so a
    failure reported in one console line keeps its stack. False when the file cannot be written."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(f"{header}\n{''.join(traceback.format_exception(exc))}")
        return True
    except OSError:
        return False


@contextmanager
def atomic_file(path: str | os.PathLike[str], tmp_name: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on success rename it onto ``path``, so a reader
    sees the old file or the new one, never half of one. On failure the temporary file is removed and
    ``path`` is left as it was.

    ``tmp_name``: the temporary file's name in the same folder (default ``<name>.tmp``): a hidden name
    where others list the folder, a per-process one where processes may write the same file.
    """
    path = Path(path)
    tmp = path.with_name(tmp_name or path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike[str], data: str | bytes, tmp_name: str | None = None) -> None:
    """Write ``data`` (text or bytes) to ``path`` through ``<path>.tmp`` and a rename (``atomic_file``)."""
    with atomic_file(path, tmp_name) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)


class FolderTaken(FileExistsError):
    """``publish_folder(..., replace=False)``: the target could not be renamed over (another process
    published it first); the temporary folder is gone."""


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def replace_folder(new: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Rename the folder ``new`` onto ``target``, removing the folder that was there.

    An existing target is swapped out in one step where the kernel can (renameat2), so a reader (or a
    crash) sees the old folder or the new one, never none; elsewhere it is renamed aside to
    ``<new>.old`` first and renamed back if ``new`` cannot take its place.
    """
    new, target = Path(new), Path(target)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(target))  # as rmtree said
    if not target.exists():
        os.rename(new, target)
        return
    if _exchange(new, target):  # target is the new folder; new now holds the old one
        shutil.rmtree(new, ignore_errors=True)
        return
    old = target.parent / f"{new.name}.old"
    os.rename(target, old)
    try:
        os.rename(new, target)
    except OSError:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def publish_folder(target: str | os.PathLike[str], replace: bool = True) -> Iterator[Path]:
    """Yield an empty temporary folder ``.<name>.tmp-XXXX`` beside ``target`` to build in; on success
    give it the umask's modes (``follow_umask``) and rename it into place (``replace_folder``), so a
    reader never sees a half-built folder. On failure it is removed and ``target`` is left as it was.

        with publish_folder(out) as tmp:
            model.save_pretrained(tmp)

    ``replace=False``: never replace a finished target; when ``target`` holds a folder already (another
    process got there first) raise ``FolderTaken``.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        follow_umask(tmp)  # mkdtemp made it 0700, safetensors its files 0600
        if replace:
            replace_folder(tmp, target)
        else:
            try:
                os.rename(tmp, target)  # refused when target is a non-empty folder
            except OSError as e:
                raise FolderTaken(f"{target} was published by another process") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; what is left of a failure
