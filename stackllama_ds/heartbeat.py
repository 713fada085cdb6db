"""Hang localisation: per-rank heartbeats with the current phase, and a watchdog that names the stuck rank.

Each rank writes ``<stage>/heartbeat/rank-R.json`` (phase, step, time) whenever it enters a phase.
A watchdog thread on rank 0 reads every rank's file; when no rank has made progress for
``hang_timeout_s`` (well under the collective timeout), it reports which rank is stuck in which
phase (the one with the oldest heartbeat: the others wait for it in the next collective), writes
``<stage>/hang_report.json``, and ends the process with exit code 86 so the launcher stops the rest.
The files live on the run's (shared) filesystem, so this works across nodes and needs no collective.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

EXIT_HANG = 86


class Heartbeat:
    def __init__(self, stage_dir: Path, rank: int, world: int, hang_timeout_s: float, poll_s: float = 1.0):
        self.dir = Path(stage_dir) / "heartbeat"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rank, self.world = rank, world
        self.timeout = hang_timeout_s
        self.poll_s = poll_s
        self.on_hang = None  # callable run before exiting (flush logs)
        self.beat("start", 0)
        if rank == 0 and hang_timeout_s > 0:
            threading.Thread(target=self._watch, name="hang-watchdog", daemon=True).start()

    def beat(self, phase: str, step: int) -> None:
        """Record that this rank entered ``phase`` at ``step`` (atomic small-file write)."""
        p = self.dir / f"rank-{self.rank}.json"
        tmp = p.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"rank": self.rank, "phase": phase, "step": step, "time": time.time(),
                                   "host": os.environ.get("SLURMD_NODENAME") or os.uname().nodename,
                                   "pid": os.getpid()}))
        os.replace(tmp, p)
        # Fault injection for tests: STACKLLAMA_FAULT=sleep:<phase>:<rank> parks that rank in that phase.
        if os.environ.get("STACKLLAMA_FAULT") == f"sleep:{phase}:{self.rank}":
            time.sleep(3600)

    def read(self) -> list[dict]:
        out = []
        for r in range(self.world):
            try:
                out.append(json.loads((self.dir / f"rank-{r}.json").read_text()))
            except (OSError, ValueError):
                out.append({"rank": r, "phase": "not started", "step": -1, "time": 0.0, "host": "?"})
        return out

    def _watch(self) -> None:
        while True:
            time.sleep(self.poll_s)
            beats = self.read()
            now = time.time()
            newest = max(b["time"] for b in beats)
            if now - newest < self.timeout:
                continue
            stuck = min(beats, key=lambda b: (b["step"], b["time"]))
            msg = (f"hang: no progress on any rank for {now - newest:.0f}s (hang_timeout_s={self.timeout:g}); "
                   f"rank {stuck['rank']} on {stuck['host']} is stuck in phase '{stuck['phase']}' at step "
                   f"{stuck['step']}; " + "; ".join(f"rank {b['rank']}: '{b['phase']}' step {b['step']}"
                                                    for b in beats))
            print(msg, file=sys.stderr, flush=True)
            try:
                (self.dir.parent / "hang_report.json").write_text(json.dumps(
                    {"message": msg, "stuck_rank": stuck["rank"], "phase": stuck["phase"], "step": stuck["step"],
                     "ranks": beats}, indent=1))
                if self.on_hang is not None:
                    self.on_hang()
            finally:
                os._exit(EXIT_HANG)
