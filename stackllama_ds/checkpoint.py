"""Atomic, verified checkpoints and resume; stop signals (SIGTERM/SIGUSR1 -> exit 75).

Layout: ``<stage>/checkpoints/step-N/`` holding one DeepSpeed folder per engine, ``rng/rank-R.pt``
per rank, ``state.pt`` (the loop's resumable counters) and ``manifest.json`` written last, with
the sha256 of every file. Every rank writes into ``.tmp-step-N/``; only when all ranks report
success does rank 0 write the manifest and rename the folder, so a killed save never looks
complete. A folder without a valid manifest is ignored and cleaned up.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stackllama_ds.engines import dist

MANIFEST = "manifest.json"
EXIT_RESUME = 75  # EX_TEMPFAIL: stopped on a signal after a checkpoint; resume me


class CheckpointError(RuntimeError):
    pass


@dataclass
class TrainState:
    """Resumable counters of a loop (saved in every checkpoint)."""

    step: int = 0  # optimizer steps done
    samples: int = 0  # global samples (packed chunks, pairs, prompts) consumed
    tokens: int = 0  # global tokens trained
    elapsed_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _step_of(p: Path) -> int:
    return int(p.name.split("-")[-1])


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints (a manifest exists and parses), oldest first."""
    if not ckpt_root.is_dir():
        return []
    out = []
    for p in ckpt_root.glob("step-*"):
        try:
            m = json.loads((p / MANIFEST).read_text())
            if m.get("complete") and m.get("step") == _step_of(p):
                out.append(p)
        except (OSError, ValueError):
            continue
    return sorted(out, key=_step_of)


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    c = complete_checkpoints(Path(ckpt_root))
    return c[-1] if c else None


def verify_checkpoint(path: Path) -> dict:
    """Check every file against the manifest's sha256; raise CheckpointError naming the file."""
    m = json.loads((path / MANIFEST).read_text())
    for rel, digest in m["files"].items():
        f = path / rel
        if not f.exists():
            raise CheckpointError(f"checkpoint {path}: file missing: {rel}")
        if _sha256(f) != digest:
            raise CheckpointError(f"checkpoint {path}: checksum mismatch in {rel} (altered after saving)")
    return m


def cleanup_partial(ckpt_root: Path) -> list[Path]:
    """Remove half-written folders (``.tmp-*`` and step folders without a valid manifest); rank 0 only."""
    removed = []
    if not dist.is_main() or not ckpt_root.is_dir():
        return removed
    complete = set(complete_checkpoints(ckpt_root))
    for p in ckpt_root.iterdir():
        if p.is_dir() and (p.name.startswith(".tmp-") or (p.name.startswith("step-") and p not in complete)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def rng_state() -> dict:
    s = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# Fault injection for tests: STACKLLAMA_FAULT=ckpt_between_files kills rank 0 mid-save;
# STACKLLAMA_FAULT=enospc_save[:RANK] makes that rank's write fail with ENOSPC (default rank 0).
def _fault(point: str, where: Path | None = None) -> None:
    fault = os.environ.get("STACKLLAMA_FAULT", "")
    if fault == point == "ckpt_between_files" and dist.is_main():
        os.kill(os.getpid(), signal.SIGKILL)
    if point == "enospc_save" and fault.split(":")[0] == point:
        victim = int(fault.split(":")[1]) if ":" in fault else 0
        if dist.rank() == victim:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(where))


def _write_error(e: BaseException, tmp: Path) -> str:
    """One line for a failed write. torch.save reports a full disk as a RuntimeError, not ENOSPC."""
    if isinstance(e, OSError):
        return f"rank {dist.rank()}: {e.strerror or e} while writing {getattr(e, 'filename', '') or tmp}"
    first = (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]
    try:
        free = shutil.disk_usage(tmp.parent).free
    except OSError:
        free = None
    if free is not None and free < (16 << 20):
        return f"rank {dist.rank()}: {os.strerror(errno.ENOSPC)} ({free} bytes free) while writing {tmp} ({first})"
    return f"rank {dist.rank()}: write failed while writing {tmp}: {first}"


def save_checkpoint(
    engines: dict[str, Any], ckpt_root: Path, state: TrainState, keep_last: int, client: dict | None = None
) -> Path:
    """Save every engine, per-rank RNG and ``state`` atomically; keep the last ``keep_last``. Collective."""
    ckpt_root = Path(ckpt_root)
    final = ckpt_root / f"step-{state.step}"
    tmp = ckpt_root / f".tmp-step-{state.step}"
    if dist.is_main():
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    error = ""
    # Every rank calls every engine's save (each is a collective), even after a failed write.
    for name, engine in engines.items():
        try:
            engine.save_checkpoint(str(tmp / name), tag="ds", save_latest=False)
        except (OSError, RuntimeError) as e:
            error = error or _write_error(e, tmp)
            dist.barrier()  # the other ranks wait in the barrier that ends DeepSpeed's save_checkpoint
    try:
        if not error:
            (tmp / "rng").mkdir(exist_ok=True)
            torch.save(rng_state(), tmp / "rng" / f"rank-{dist.rank()}.pt")
            if dist.is_main():
                torch.save({"state": asdict(state), "client": client or {}}, tmp / "state.pt")
            _fault("ckpt_between_files")
            _fault("enospc_save", tmp / "rng" / f"rank-{dist.rank()}.pt")
    except (OSError, RuntimeError) as e:
        error = _write_error(e, tmp)
    errors = [e for e in dist.all_gather_object(error) if e]
    if errors:
        if dist.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        prev = latest_checkpoint(ckpt_root)
        raise CheckpointError(
            f"checkpoint of step {state.step} failed ({'; '.join(errors)}); "
            f"previous checkpoint kept: {prev if prev else 'none'}"
        )
    # Each rank hashes a share of the files; rank 0 writes the manifest and renames.
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    mine = {str(p.relative_to(tmp)): _sha256(p) for i, p in enumerate(files) if i % dist.world_size() == dist.rank()}
    digests: dict[str, str] = {}
    for part in dist.all_gather_object(mine):
        digests.update(part)
    if dist.is_main():
        try:
            manifest = {
                "complete": True,
                "step": state.step,
                "world_size": dist.world_size(),
                "engines": sorted(engines),
                "time": time.time(),
                "files": digests,
            }
            mf = tmp / MANIFEST
            with open(mf, "w") as f:
                json.dump(manifest, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(ckpt_root)
            for old in complete_checkpoints(ckpt_root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
            cleanup_partial(ckpt_root)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            error = f"{e.strerror or e} while finishing {final}"
    error = dist.broadcast_object(error)
    dist.barrier()
    if error:
        raise CheckpointError(f"checkpoint of step {state.step} failed: {error}")
    return final


def universal_checkpoint(path: Path, name: str) -> Path:
    """Convert (once, on rank 0) an engine's folder to DeepSpeed's universal checkpoint. Collective."""
    out = path / "universal" / name
    if dist.is_main() and not (out / "latest_universal").exists():
        import argparse
        import contextlib
        import io

        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        tmp = path / "universal" / f".tmp-{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        args = argparse.Namespace(
            input_folder=str(path / name / "ds"), output_folder=str(tmp / "ds"), num_extract_workers=1,
            num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True,
        )
        with contextlib.redirect_stdout(io.StringIO()):
            ds_to_universal(args)
        (tmp / "latest_universal").write_text("ds")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    dist.barrier()
    return out


def load_checkpoint(engines: dict[str, Any], path: Path, verify: bool = True) -> tuple[TrainState, dict]:
    """Restore engines, this rank's RNG (when the world size matches) and the loop state."""
    path = Path(path)
    manifest = verify_checkpoint(path) if verify else json.loads((path / MANIFEST).read_text())
    elastic = manifest.get("world_size") != dist.world_size()
    for name, engine in engines.items():
        src = universal_checkpoint(path, name) if elastic else path / name
        # A checkpoint from another world size loads through DeepSpeed's universal format, which
        # re-partitions the fp32 weights and Adam moments for the new number of ranks.
        if elastic:
            engine._config.load_universal_checkpoint = True
        try:
            load_path, _ = engine.load_checkpoint(str(src), tag="ds", load_module_strict=False)
        finally:
            if elastic:
                engine._config.load_universal_checkpoint = False
        if load_path is None:
            raise CheckpointError(f"checkpoint {path}: engine '{name}' could not be loaded")
    rng_file = path / "rng" / f"rank-{dist.rank()}.pt"
    if manifest.get("world_size") == dist.world_size() and rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    blob = torch.load(path / "state.pt", weights_only=False)
    return TrainState(**blob["state"]), blob["client"]


class StopSignal:
    """Turn SIGTERM/SIGUSR1 (Slurm's preemption and time-limit warnings) into a flag.

    The loop checks ``requested()`` (all ranks agree) at each step boundary, checkpoints and exits 75.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1)):
        self.flag = False
        self.signum: int | None = None
        for s in signals:
            signal.signal(s, self._handler)

    def _handler(self, signum, frame) -> None:
        self.flag = True
        self.signum = signum

    def requested(self) -> bool:
        return dist.any_rank(self.flag)
