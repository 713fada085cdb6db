"""Work done by rank 0 alone (an export, a report, a tokenization) while the other ranks wait beating."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from stackllama_ds.engines import dist
from stackllama_ds.fsutil import write_atomic
from stackllama_ds.run import heartbeat
from stackllama_ds.run.errors import TrainingError

T = TypeVar("T")


def on_main_rank(name: str, fn: Callable[[], T], step: int = -1, poll_s: float = 1.0) -> T | None:
    """Run ``fn`` on rank 0 in heartbeat phase ``name`` while the other ranks wait for it in phase
    ``waiting for rank 0: <name>``; returns rank 0's result (None on the other ranks). Collective.

    The wait is not a collective, so rank 0's work may outlast ``launch.timeout_s``: the waiting
    ranks poll a flag file beside the heartbeats (the run's filesystem is shared, as checkpoints
    already require) and beat meanwhile. They end the job when rank 0 fails (its error, exit 1) or
    its heartbeat stops changing for ``hang_timeout_s`` (else the collective timeout): hang report
    naming rank 0, exit 86. A rank 0 that dies is caught sooner by the launcher.
    """
    hb = heartbeat.current()
    out = None
    if hb is None or dist.world_size() == 1:
        if dist.is_main():
            with heartbeat.phase(name, step):
                out = fn()
        dist.barrier()
        return out
    # A fresh name per call: a flag left by an earlier (killed) run is never mistaken for this one.
    token = dist.broadcast_object(uuid.uuid4().hex if dist.is_main() else None)
    flag = hb.dir / f"rank0-done-{token}.json"
    if dist.is_main():
        try:
            with heartbeat.phase(name, step):
                out = fn()
        except BaseException as e:
            write_atomic(flag, json.dumps({"error": f"{type(e).__name__}: {e}"}))
            raise
        write_atomic(flag, json.dumps({"error": ""}))
    else:
        _wait_for_main(hb, flag, name, step, poll_s)
    dist.barrier()  # every rank is already here: quick
    if dist.is_main():
        flag.unlink(missing_ok=True)
    return out


def _wait_for_main(hb: heartbeat.Heartbeat, flag: Path, name: str, step: int, poll_s: float) -> None:
    limit = hb.timeout if hb.timeout > 0 else dist.collective_timeout_s()
    rank0 = heartbeat.Silence(hb, 0)
    with heartbeat.phase(f"waiting for rank 0: {name}", step):
        while not flag.exists():
            silent_s, beat = rank0.check()
            if silent_s > limit:
                hb.report_hang(beat, hb.read(), {}, silent_s, "rank 0")
            time.sleep(poll_s)
    error = json.loads(flag.read_text())["error"]
    if error:
        raise TrainingError(f"rank 0 failed in phase '{name}': {error}")
