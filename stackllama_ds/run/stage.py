"""The lifecycle every training stage shares, so that a stage file is its loop and nothing else.

    run = StageRun(cfg, "sft")                       # signal handler first, then process group, seeds
    ...load data, build engines...
    state = run.resume({"model": engine}, meta)      # heartbeat, then the newest complete checkpoint
    log = run.logger(total_steps)
    while state.step < total_steps:
        run.beat("training")
        ...one step; state.step += 1; log.log(row)...
        run.end_step(save=state.step % save_every == 0 or state.step == total_steps)
    run.finish(export_dir)                           # export on rank 0, then DONE

``end_step`` checkpoints when asked and on SIGTERM/SIGUSR1, after which it raises StopForResume
(exit 75: requeue me). What a stage keeps beside ``TrainState`` (a KL controller, running moments)
lives in an object with ``state_dict``/``load_state_dict`` handed to ``resume`` as ``extra``; its
keys sit beside ``meta``'s in the checkpoint's client state.
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from stackllama_ds.config import RunConfig
from stackllama_ds.engines import dist
from stackllama_ds.hardware import release_free_heap
from stackllama_ds.run import entry, heartbeat, testhooks
from stackllama_ds.run.checkpoint import (
    TrainState,
    cleanup_partial,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from stackllama_ds.run.errors import StopForResume, TrainingError
from stackllama_ds.run.export import export_checkpoint
from stackllama_ds.run.heartbeat import Heartbeat
from stackllama_ds.run.layout import RESUMES, mark_done
from stackllama_ds.run.metrics import MetricsLogger
from stackllama_ds.run.rank0 import on_main_rank
from stackllama_ds.run.signals import StopSignal


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, d: dict[str, Any]) -> None: ...


def checkpoint_meta(kind: str, base: Path | str, cfg: RunConfig, lora, dtype: str) -> dict[str, Any]:
    """What a checkpoint records of the model it holds (read back by export)."""
    return {"kind": kind, "base": str(base), "model": cfg.model.model_dump(), "lora": lora.model_dump(),
            "dtype": dtype}


def release_memory() -> None:
    """Collect garbage and hand the freed heap back to the kernel (``release_free_heap``)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    release_free_heap()


class StageRun:
    """One stage on this rank: setup, resume, heartbeat, metrics, checkpoints, stop, export."""

    def __init__(self, cfg: RunConfig, name: str, checkpoints: bool = True):
        """``checkpoints=False``: a stage that saves nothing to resume from (eval): no stop-signal
        handler (SIGTERM ends it as usual) and no ``resume``; ``start_heartbeat`` then ``done``."""
        # First: a SIGUSR1/SIGTERM during the (slow) setup would otherwise kill the rank outright.
        self.stop = StopSignal() if checkpoints else None
        entry.setup(cfg, name)
        self.cfg, self.name = cfg, name
        self.dir = cfg.stage_dir(name)
        self.ckpt_root = self.dir / "checkpoints"
        self.rank, self.world = dist.rank(), dist.world_size()
        self.state = TrainState()
        self.engines: dict[str, Any] = {}
        self.meta: dict[str, Any] = {}
        self.extra: Stateful | None = None
        self.hb: Heartbeat | None = None
        self.log: MetricsLogger | None = None

    def resume(self, engines: dict[str, Any], meta: dict[str, Any], extra: Stateful | None = None) -> TrainState:
        """Seed each rank's own stream, start the heartbeat, then load the newest complete checkpoint
        (its ``extra`` state too). Returns the loop's TrainState (fresh when there is none).
        A stop signal during setup ends the stage here: StopForResume (exit 75), nothing to save."""
        assert self.stop is not None, "a stage without checkpoints has nothing to resume"
        if self.stop.requested():  # every rank gets here once its engines are built
            raise StopForResume(f"{self.name}: stop signal during setup, before any step")
        self.engines, self.meta, self.extra = engines, meta, extra
        entry.seed_ranks(self.cfg)
        # Before the load: verifying and loading a 7B checkpoint beats in its own phase.
        self.start_heartbeat()
        self.state, client = resume(engines, self.ckpt_root)
        if client and extra is not None:
            extra.load_state_dict(client)
        if self.stop.requested():  # during the checkpoint load (minutes at 7B): the state is the checkpoint's
            raise StopForResume(f"{self.name}: stop signal while resuming step {self.state.step}")
        return self.state

    def start_heartbeat(self) -> Heartbeat:
        """This rank's heartbeat (``resume`` starts it; a stage without checkpoints calls this)."""
        self.hb = Heartbeat(self.dir, self.rank, self.world, self.cfg.launch.hang_timeout_s)
        return self.hb

    def logger(self, total_steps: int, bar_keys: tuple[str, ...] = ("loss", "tokens_per_s"),
               log_every: int = 1) -> MetricsLogger:
        c = self.cfg
        self.log = MetricsLogger(self.dir, self.name, c.logging, total_steps, self.state.step, c.output_root,
                                 c.model_dump(), bar_keys=bar_keys, log_every=log_every)
        return self.log

    def text(self, msg: str) -> None:
        """A line for the log, from rank 0 only."""
        if self.rank == 0 and self.log is not None:
            self.log.text(msg)

    def beat(self, phase: str, step: int | None = None) -> None:
        """This rank enters ``phase`` of step ``step`` (default: the step being trained)."""
        assert self.hb is not None, "resume() starts the heartbeat"
        self.hb.beat(phase, self.state.step + 1 if step is None else step)

    def checkpoint(self) -> None:
        """Save every engine, the RNG streams, TrainState and the extra state. Collective."""
        self.beat("checkpoint save", self.state.step)
        client = {**self.meta, **(self.extra.state_dict() if self.extra is not None else {})}
        save_checkpoint(self.engines, self.ckpt_root, self.state, self.cfg.checkpoint.keep_last, client)

    def end_step(self, save: bool) -> None:
        """After a step: checkpoint when ``save`` or on a stop signal; after a signal, exit 75."""
        testhooks.after_step()
        assert self.stop is not None, "a stage without checkpoints has no steps to end"
        stopping = self.stop.requested()
        if save or stopping:
            self.checkpoint()
        if stopping:
            self.close()
            raise StopForResume(f"{self.name} checkpointed at step {self.state.step}")

    def close(self) -> None:
        if self.log is not None:
            self.log.close()

    def done(self, info: str) -> None:
        """A stage without checkpoints: DONE, written by rank 0."""
        if self.rank == 0:
            mark_done(self.dir, info)

    def finish(self, export_to: Path) -> None:
        """Rank 0 exports the last checkpoint as a HF folder; DONE once every rank is through.

        The engines are let go first (the stage drops its own names for them before calling): the
        export reads the checkpoint and loads a full-precision copy of the model, which would
        otherwise sit on top of them (peak RSS).
        """
        self.close()
        self.engines = self.extra = None
        release_memory()
        export_and_finish(self.ckpt_root, export_to, self.dir, self.state.step)


def resume(engines: dict, ckpt_root: Path, log: Callable[[str], None] = print) -> tuple[TrainState, dict]:
    """Load the newest complete checkpoint, if any; half-written ones are ignored and removed."""
    cleanup_partial(ckpt_root)
    dist.barrier()
    ckpt = latest_checkpoint(ckpt_root)
    if ckpt is None:
        return TrainState(), {}
    with heartbeat.phase("checkpoint load"):  # verifies every file's sha256: minutes at 7B
        state, client = load_checkpoint(engines, ckpt)
    if dist.is_main():
        log(f"resumed from {ckpt} (step {state.step})")
        # One line per resume beside the stage's metrics: an operator's (and a test's) record of
        # preemptions and restarts, machine-readable.
        with open(ckpt_root.parent / RESUMES, "a") as f:
            f.write(json.dumps({"checkpoint": str(ckpt), "step": state.step, "time": time.time()}) + "\n")
    return state, client


def export_and_finish(ckpt_root: Path, out: Path, stage_dir: Path, step: int) -> None:
    """Rank 0 exports the last complete checkpoint as a HF folder; DONE once every rank is through."""
    final = latest_checkpoint(ckpt_root)
    if final is None:
        raise TrainingError(f"{ckpt_root}: no complete checkpoint to export")
    # Verify, consolidate, merge LoRA, save: minutes at 7B, longer than launch.timeout_s may be.
    on_main_rank("export", lambda: export_checkpoint(final, out), step)
    if dist.is_main():
        mark_done(stage_dir, f"step {step}")
