"""Step-by-step turn taking between benchmark sides that run at the same time (stdlib only).

On a shared, busy machine the load changes within minutes, so two runs timed one after the other
see different machines. Here every side (ours, the peer, ...) starts at once and they take turns
at each training step: side i runs its step k only in slot ``k * n + i`` of a counter kept in a
file, and the other sides sleep meanwhile. Each step is timed alone, next to the other sides'
same step, so a ratio of two sides' step times is taken under the same load.

A side that is done (its process ended: the orchestrator marks it) is skipped, so a crash cannot
leave the others waiting. With several ranks every rank waits for the slot and rank 0 passes it on.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

MAX_WAIT_S = 1800.0  # a side stuck longer than this is not waited for (it is reported as done)


def setup(folder: Path, n: int) -> None:
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
    """Side ``index`` of ``n``: ``wait()`` before a step, ``passed(hold)`` after it (rank 0 hands the slot on)."""

    def __init__(self, folder: str | os.PathLike[str], index: int, n: int, rank: int = 0, name: str = ""):
        self.folder, self.index, self.n, self.rank = Path(folder), index, n, rank
        self.name = name or str(index)
        self.k = 0  # steps this side has run
        self.t0 = 0.0
        self.times: list[float] = []  # wall seconds of each step, waiting excluded

    def _done(self, side: int) -> bool:
        return (self.folder / f"done-{side}").exists()

    def wait(self) -> None:
        target = self.k * self.n + self.index
        start = time.monotonic()
        while True:
            try:
                s = int((self.folder / "slot").read_text())
            except (OSError, ValueError):  # mid-replace
                s = -1
            while 0 <= s < target and self._done(s % self.n):
                s += 1  # a finished side's slots pass by themselves
            if s >= target or time.monotonic() - start > MAX_WAIT_S:
                break
            time.sleep(0.05)
        self.t0 = time.perf_counter()

    def passed(self, hold: bool = False) -> float:
        """The step ended; ``hold``: keep the slot (the side's last step: what follows is not timed and
        must not overlap the others' steps; the slot moves on when the side is marked done)."""
        dt = time.perf_counter() - self.t0
        self.times.append(dt)
        if self.rank == 0:
            with open(self.folder / f"times-{self.index}.jsonl", "a") as f:
                f.write(json.dumps({"k": self.k, "t": dt}) + "\n")
            if not hold:
                _write(self.folder / "slot", str(self.k * self.n + self.index + 1))
        self.k += 1
        return dt


def read_times(folder: Path, index: int) -> list[float]:
    path = folder / f"times-{index}.jsonl"
    if not path.exists():
        return []
    return [json.loads(x)["t"] for x in path.read_text().splitlines() if x.strip()]


def from_env() -> Turns | None:
    """``BENCH_TURNS={"folder": ..., "index": i, "n": n}`` as the orchestrator sets it, else None."""
    spec = os.environ.get("BENCH_TURNS")
    if not spec:
        return None
    d = json.loads(spec)
    return Turns(d["folder"], d["index"], d["n"], rank=int(os.environ.get("RANK", "0")))
