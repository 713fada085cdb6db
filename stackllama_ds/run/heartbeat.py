"""Hang localisation: per-rank heartbeats with the current phase, and a watchdog that names the stuck rank.

Each rank writes ``<stage>/heartbeat/rank-R.json`` (phase, step, time) whenever it enters a phase.
A watchdog thread on rank 0 reads every rank's file; when no rank has made progress for
``hang_timeout_s`` (well under the collective timeout), it reports which rank is stuck in which
phase (the one with the oldest heartbeat: the others wait for it in the next collective), writes
``<stage>/hang_report.json``, and ends the process with exit code 86 so the launcher stops the rest.
The files live on the run's (shared) filesystem, so this works across nodes and needs no collective.

Ranks that wait for the stuck one sit in the same phase and step, so the oldest heartbeat alone
can name the wrong rank. While a rank is silent, a sampler thread records where its main thread
is (``rank-R.where.json``: innermost package frame, and whether it is inside a torch.distributed /
deepspeed.comm call); the watchdog names a rank that is *not* waiting in a collective.

Loops of ours that can run for minutes (held-out evaluations, eval's sampling and scoring) beat
per batch through ``each(batches)`` / ``progress(done, total)``: rate-limited to one write per
``beat_every_s``, with ``progress: {done, total}`` in the heartbeat (and so in hang_report.json), and
a batch that hangs stops the beats, so the watchdog still reports it.

A single long library call that cannot beat (rank 0 exporting a 7B model, loading one) runs
inside ``with phase("export"):``, which beats every few seconds from a thread while it lasts. Ranks
waiting for rank 0 meanwhile beat too and watch rank 0's heartbeat (``Silence``): since they keep the
watchdog fed, a rank 0 that stops beating is reported by them, the same way (hang_report.json, 86).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sized
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from stackllama_ds.fsutil import write_atomic
from stackllama_ds.run import testhooks
from stackllama_ds.run.signals import EXIT_HANG

T = TypeVar("T")

_CURRENT: Heartbeat | None = None  # this process's heartbeat, for phase() and the rank-0 waits


def current() -> Heartbeat | None:
    return _CURRENT


_COLLECTIVE_DIRS = (os.path.join("torch", "distributed", ""), os.path.join("deepspeed", "comm", ""))
_RUN_DIR = os.path.dirname(os.path.abspath(__file__))
_PACKAGE_DIR = os.path.dirname(_RUN_DIR)
# Frames that only relay a beat (the stage skeleton, this file, the test hooks): the report names
# the caller, the line of the stage or helper that was running.
_RELAY_FILES = {os.path.join(_RUN_DIR, f) for f in ("heartbeat.py", "stage.py", "testhooks.py")}


def main_thread_where() -> dict:
    """Where the main thread is: innermost stackllama_ds frame outside the beat relays, and whether
    any frame of its stack is inside torch.distributed or deepspeed.comm (waiting for a peer)."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    in_collective, where = False, "?"
    while frame is not None:
        fn = frame.f_code.co_filename
        in_collective = in_collective or any(d in fn for d in _COLLECTIVE_DIRS)
        if where == "?" and fn.startswith(_PACKAGE_DIR) and fn not in _RELAY_FILES:
            where = f"{os.path.relpath(fn, os.path.dirname(_PACKAGE_DIR))}:{frame.f_lineno} in {frame.f_code.co_name}"
        frame = frame.f_back
    return {"in_collective": in_collective, "where": where}


def pick_stuck(beats: list[dict], where: dict[int, dict]) -> dict:
    """The rank to blame: the oldest (step, time) heartbeat among ranks not known to wait in a collective."""
    free = [b for b in beats if not where.get(b["rank"], {}).get("in_collective")]
    return min(free or beats, key=lambda b: (b["step"], b["time"]))


class Heartbeat:
    def __init__(self, stage_dir: Path, rank: int, world: int, hang_timeout_s: float, poll_s: float = 1.0):
        self.dir = Path(stage_dir) / "heartbeat"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rank, self.world = rank, world
        self.timeout = hang_timeout_s
        self.poll_s = poll_s
        self.on_hang = None  # callable run before exiting (flush logs)
        self._last_beat = 0.0
        self._phase, self._step = "start", 0  # what progress() beats in: the phase last entered
        self._lock = threading.Lock()  # the main thread and a phase's beat thread write the same file
        self._closed = threading.Event()  # stops the sampler and the watchdog (close())
        global _CURRENT
        _CURRENT = self
        self.beat("start", 0)
        if hang_timeout_s > 0:
            threading.Thread(target=self._sample, name="hang-sampler", daemon=True).start()
        if rank == 0 and hang_timeout_s > 0:
            threading.Thread(target=self._watch, name="hang-watchdog", daemon=True).start()

    def beat(self, phase: str, step: int) -> None:
        """Record that this rank entered ``phase`` at ``step`` (atomic small-file write)."""
        self._write(phase, step)
        testhooks.on_beat(phase, self.rank)

    def progress(self, done: int, total: int | None = None) -> None:
        """``done`` of ``total`` batches of the current phase are through. Writes (with the counts)
        only when the last write is ``beat_every_s`` old, so a fast loop writes no file per batch."""
        testhooks.batch_sleep(self._phase)
        if time.time() - self._last_beat >= self.beat_every_s:
            self._write(self._phase, self._step, {"done": done, "total": total})

    def _write(self, phase: str, step: int, progress: dict | None = None) -> None:
        p = self.dir / f"rank-{self.rank}.json"
        rec = {"rank": self.rank, "phase": phase, "step": step, "time": time.time(),
               "host": os.environ.get("SLURMD_NODENAME") or os.uname().nodename, "pid": os.getpid()}
        if progress is not None:
            rec["progress"] = progress
        with self._lock:
            write_atomic(p, json.dumps(rec), tmp_name=p.with_suffix(f".tmp{os.getpid()}").name)
            self._last_beat = time.time()
            self._phase, self._step = phase, step

    @property
    def beat_every_s(self) -> float:
        """How often a long phase beats: a few times per hang timeout, at most every 5 s."""
        return max(0.5, min(5.0, self.timeout / 4)) if self.timeout > 0 else 5.0

    def read(self) -> list[dict]:
        out = []
        for r in range(self.world):
            try:
                out.append(json.loads((self.dir / f"rank-{r}.json").read_text()))
            except (OSError, ValueError):
                out.append({"rank": r, "phase": "not started", "step": -1, "time": 0.0, "host": "?"})
        return out

    def _sample(self) -> None:
        """While this rank is silent (half the timeout), record where its main thread is."""
        p = self.dir / f"rank-{self.rank}.where.json"
        while not self._closed.wait(self.poll_s):
            if time.time() - self._last_beat < self.timeout / 2:
                continue
            rec = {"time": time.time(), **main_thread_where()}
            try:
                write_atomic(p, json.dumps(rec), tmp_name=p.with_suffix(f".tmp{os.getpid()}w").name)
            except OSError:
                pass

    def read_where(self, since: float) -> dict[int, dict]:
        """Each rank's sampled location, if taken after ``since`` (the newest heartbeat)."""
        out = {}
        for r in range(self.world):
            try:
                rec = json.loads((self.dir / f"rank-{r}.where.json").read_text())
            except (OSError, ValueError):
                continue
            if rec.get("time", 0.0) >= since:
                out[r] = rec
        return out

    def close(self) -> None:
        """Stop watching: the threads end at their next poll (a process that outlives its stage)."""
        self._closed.set()

    def _watch(self) -> None:
        while not self._closed.wait(self.poll_s):
            beats = self.read()
            now = time.time()
            newest = max(b["time"] for b in beats)
            if now - newest < self.timeout:
                continue
            where = self.read_where(newest)
            stuck = pick_stuck(beats, where)
            self.report_hang(stuck, beats, where, now - newest, "any rank")

    def report_hang(self, stuck: dict, beats: list[dict], where: dict[int, dict], silent_s: float,
                    who: str) -> None:
        """Print and write ``hang_report.json`` naming ``stuck``, then end the process with exit 86."""
        at = f" at {where[stuck['rank']]['where']}" if stuck["rank"] in where else ""
        done = stuck.get("progress")
        at += f" after batch {done['done']} of {done['total']}" if done else ""
        waiting = {r: " (waiting in a collective)" if w.get("in_collective") else "" for r, w in where.items()}
        msg = (f"hang: no progress on {who} for {silent_s:.0f}s (hang_timeout_s={self.timeout:g}); "
               f"rank {stuck['rank']} on {stuck['host']} is stuck in phase '{stuck['phase']}' at step "
               f"{stuck['step']}{at}; " + "; ".join(f"rank {b['rank']}: '{b['phase']}' step {b['step']}{waiting.get(b['rank'], '')}"
                                                   for b in beats))
        print(msg, file=sys.stderr, flush=True)
        try:
            (self.dir.parent / "hang_report.json").write_text(json.dumps(
                {"message": msg, "stuck_rank": stuck["rank"], "phase": stuck["phase"], "step": stuck["step"],
                 "progress": stuck.get("progress"), "where": where.get(stuck["rank"], {}).get("where"),
                 "ranks": beats}, indent=1))
            if self.on_hang is not None:
                self.on_hang()
        finally:
            os._exit(EXIT_HANG)


class Silence:
    """How long (on this host's clock) a rank's heartbeat has not changed; clock skew between hosts
    does not matter, only that the file's recorded time moves."""

    def __init__(self, hb: Heartbeat, rank: int):
        self.hb, self.rank = hb, rank
        self._seen: float | None = None
        self._since = time.monotonic()

    def check(self) -> tuple[float, dict]:
        """(seconds since the rank's heartbeat last changed, its heartbeat record)."""
        beat = self.hb.read()[self.rank]
        if beat["time"] != self._seen:
            self._seen, self._since = beat["time"], time.monotonic()
        return time.monotonic() - self._since, beat


@contextmanager
def phase(name: str, step: int = -1) -> Iterator[None]:
    """Run the body in phase ``name``, beating every few seconds from a thread while it lasts.

    For long work whose loop cannot beat (a 7B export, a consolidation, a model load; a loop of
    ours beats per batch instead, with ``each``). The thread beats whatever the main thread does,
    so a body that hangs for good is not caught by the watchdog: use it for work that ends (file
    I/O, compute) or that a collective timeout bounds. No-op (beyond the body) when this process
    has no Heartbeat.
    """
    hb = _CURRENT
    if hb is None:
        testhooks.phase_sleep(name)
        yield
        return
    hb.beat(name, step)
    stop = threading.Event()

    def beat_on() -> None:
        while not stop.wait(hb.beat_every_s):
            try:
                hb._write(name, step)
            except OSError:
                pass

    t = threading.Thread(target=beat_on, name=f"heartbeat-{name}", daemon=True)
    t.start()
    try:
        testhooks.phase_sleep(name)
        yield
    finally:
        stop.set()
        t.join()


def progress(done: int, total: int | None = None) -> None:
    """Batch ``done`` of ``total`` of the current phase is through (``Heartbeat.progress``); no-op
    without a Heartbeat."""
    if _CURRENT is not None:
        _CURRENT.progress(done, total)


def each(items: Iterable[T], name: str | None = None, step: int | None = None) -> Iterator[T]:
    """Yield ``items``, reporting ``progress`` after each one is processed (when the next is asked
    for, and at the end); first enters phase ``name`` (at ``step``, default the current step) if given.

    ``for batch in each(batches):`` makes a loop of ours beat per batch, so it may run for longer
    than hang_timeout_s while any one batch stuck for that long is still reported.
    """
    hb = _CURRENT
    if hb is not None and name is not None:
        hb.beat(name, hb._step if step is None else step)
    total = len(items) if isinstance(items, Sized) else None
    for done, item in enumerate(items, 1):
        yield item
        progress(done, total)
