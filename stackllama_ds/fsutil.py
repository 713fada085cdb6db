"""File modes of outputs that are built in a temporary folder and renamed into place; atomic writes; error logs.

    python -c "from stackllama_ds.fsutil import umask; print(oct(umask()))"

``tempfile.mkdtemp`` creates its folder 0700 and safetensors writes its files 0600, whatever the
umask; a plain ``mkdir``/``open`` gives 0777/0666 minus the umask. ``follow_umask`` gives a finished
temporary folder (and everything in it) the plain modes before it is renamed into place, so exported
models, tiny models and prepared data are shared as checkpoints and metrics are.
"""

from __future__ import annotations

import hashlib
import os
import time
import traceback
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


def write_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` through ``<path>.tmp`` and a rename: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
