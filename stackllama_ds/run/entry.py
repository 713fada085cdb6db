"""A stage on this rank from start to exit code: process group, seeds, logs, then ``run_entry``'s
mapping of the outcome to 0 (done), 75 (resume me) or 1 (failed, traceback kept)."""

from __future__ import annotations

import os
import random
import signal
import socket
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from stackllama_ds import logs
from stackllama_ds.config import RunConfig
from stackllama_ds.engines import dist
from stackllama_ds.fsutil import append_traceback
from stackllama_ds.hardware import has_cuda
from stackllama_ds.run import testhooks
from stackllama_ds.run.checkpoint import CheckpointError
from stackllama_ds.run.errors import StopForResume, TrainingError
from stackllama_ds.run.layout import RunLayout
from stackllama_ds.run.signals import EXIT_RESUME, StopSignal


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


def _keep_traceback(e: BaseException, cfg: RunConfig, stage: str | None) -> Path | None:
    """Append ``e``'s traceback to this rank's error log; None without a stage or a writable folder."""
    if stage is None:
        return None
    rank = dist.rank()
    path = RunLayout(cfg).error_log(stage, rank)
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
