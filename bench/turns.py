"""Step-by-step turn taking between benchmark sides that run at the same time (stdlib only).

On a busy machine two runs timed one after the other see different loads. Here the sides start at once
and side i runs its step k only in slot ``k * n + i`` of a counter kept in a file, so a ratio of two
sides' step times is taken under the same load. A finished side's slots pass by themselves (the
orchestrator marks it done), so a crash leaves nobody waiting; with several ranks rank 0 passes the slot.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

MAX_WAIT_S = 1800.0  # a side stuck longer than this is not waited for (it is reported as done)


def setup(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    _write(folder / "slot", "0")


def mark_done(folder: Path, index: int) -> None:
    (folder / f"done-{index}").write_text("done\n")


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class Turns:
    """Side ``index`` of ``n``: ``wait()`` before a step, ``passed(hold)`` after it."""

    def __init__(self, folder: str | os.PathLike[str], index: int, n: int, rank: int = 0):
        self.folder, self.index, self.n, self.rank = Path(folder), index, n, rank
        self.k = 0  # steps this side has run
        self.t0 = 0.0

    def wait(self) -> None:
        target = self.k * self.n + self.index
        start = time.monotonic()
        while True:
            try:
                s = int((self.folder / "slot").read_text())
            except (OSError, ValueError):  # mid-replace
                s = -1
            while 0 <= s < target and (self.folder / f"done-{s % self.n}").exists():
                s += 1  # a finished side's slots pass by themselves
            if s >= target or time.monotonic() - start > MAX_WAIT_S:
                break
            time.sleep(0.05)
        self.t0 = time.perf_counter()

    def passed(self, hold: bool = False) -> float:
        """The step ended: its seconds, waiting excluded. ``hold``: keep the slot (the side's last step, whose
        untimed end must not overlap the others' steps; the slot moves on when the side is marked done)."""
        dt = time.perf_counter() - self.t0
        if self.rank == 0:
            with open(self.folder / f"times-{self.index}.jsonl", "a") as f:
                f.write(json.dumps({"k": self.k, "t": dt}) + "\n")
            if not hold:
                _write(self.folder / "slot", str(self.k * self.n + self.index + 1))
        self.k += 1
        return dt


def read_times(folder: Path, index: int) -> list[float]:
    path = folder / f"times-{index}.jsonl"
    return [json.loads(x)["t"] for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def from_env() -> Turns | None:
    """``BENCH_TURNS={"folder": ..., "index": i, "n": n}`` as the orchestrator sets it, else None."""
    spec = os.environ.get("BENCH_TURNS")
    if not spec:
        return None
    d = json.loads(spec)
    return Turns(d["folder"], d["index"], d["n"], rank=int(os.environ.get("RANK", "0")))
