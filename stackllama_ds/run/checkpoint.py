"""Atomic, verified checkpoints and resume; stop signals (SIGTERM/SIGUSR1 -> exit 75).

Layout: ``<stage>/checkpoints/step-N/`` holding one DeepSpeed folder per engine, ``rng/rank-R.pt``
per rank, ``state.pt`` (the loop's resumable counters) and ``manifest.json`` written last, with
the sha256 of every file. Every rank writes into ``.tmp-step-N/``; only when all ranks report
success does rank 0 write the manifest and rename the folder, so a killed save never looks
complete. A folder without a valid manifest is ignored and cleaned up.

Frozen parameters are not saved: they are what the engine's build gives them, as on the first run.
Mostly that is the HF folder the model was loaded from (a LoRA or quantised base); the manifest names
that folder and the sha256 of its weight files, and resume and export refuse a base that changed.
Frozen heads made fresh at build (PPO's actor value head, unused beside a separate critic; the
original score head peft keeps beside its trained copy) come from the run's seed.
Hashing (of checkpoint files and base weights) is split between the ranks, which assumes they all
see the same files: a shared filesystem, which resuming needs anyway.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stackllama_ds.engines import dist
from stackllama_ds.fsutil import replace_folder, sha256_by_name, sha256_file
from stackllama_ds.run import testhooks
from stackllama_ds.run.rank0 import on_main_rank

MANIFEST = "manifest.json"


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


@functools.lru_cache(maxsize=256)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def _file_sha256(path: Path) -> str:
    """sha256 of a file, hashed once per process while its size and mtime stay the same."""
    st = path.stat()
    return _sha256_cached(str(path), st.st_size, st.st_mtime_ns)


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


def verify_checkpoint(path: Path, part: int = 0, parts: int = 1) -> dict:
    """Check every file (or every ``parts``-th from ``part``) against the manifest's sha256.

    Raises CheckpointError naming the file; returns the manifest. Not collective.
    """
    path = Path(path)
    m = json.loads((path / MANIFEST).read_text())
    for i, (rel, digest) in enumerate(sorted(m["files"].items())):
        if i % parts != part:
            continue
        f = path / rel
        if not f.exists():
            raise CheckpointError(f"checkpoint {path}: file missing: {rel}")
        if sha256_file(f) != digest:
            raise CheckpointError(f"checkpoint {path}: checksum mismatch in {rel} (altered after saving)")
    return m


# ------------------------------------------------------------------ frozen parameters and their base
# Weight files of an HF folder (model*.safetensors, pytorch_model*.bin, our value_head.safetensors).
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def base_folder(engine: Any) -> Path | None:
    """The HF folder an engine's model was loaded from (``from_pretrained`` records it in the config;
    peft and the value-head wrappers forward ``config`` to the model they wrap)."""
    cfg = getattr(getattr(engine, "module", None), "config", None)
    p = getattr(cfg, "name_or_path", "") or ""
    return Path(p).resolve() if p and Path(p).is_dir() else None


def frozen_names(engine: Any) -> list[str]:
    """Names (as in the engine's module state dict) of the parameters that do not train, every name
    of a tied one (``lm_head.weight`` beside ``embed_tokens.weight``) included."""
    module = getattr(engine, "module", None)
    if module is None:
        return []
    return [n for n, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad]


@contextlib.contextmanager
def _without_frozen(engine: Any, names: list[str]) -> Iterator[None]:
    """Make DeepSpeed's ``exclude_frozen_parameters`` drop every name of a frozen parameter.

    DeepSpeed 0.19 drops a frozen tensor under its first name only, so a tied copy stays: with LoRA on
    SmolLM2-135M (tied embeddings) the checkpoint kept ``lm_head.weight``, most of its size.
    """
    if not hasattr(engine, "module_state_dict"):  # not a DeepSpeedEngine (tests)
        yield
        return
    original = engine.module_state_dict

    def module_state_dict(*args, **kwargs):
        sd = original(*args, **kwargs)
        if kwargs.get("exclude_frozen_parameters"):
            for n in names:
                sd.pop(n, None)
        return sd

    engine.module_state_dict = module_state_dict  # this instance only, for this save
    try:
        yield
    finally:
        del engine.module_state_dict


def weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def base_sha256(files: dict[str, str]) -> str:
    """One digest of a folder's weight files: sha256 of the sorted ``name:sha256`` lines."""
    return hashlib.sha256("".join(f"{n}:{d}\n" for n, d in sorted(files.items())).encode()).hexdigest()


def hash_base(folder: Path, part: int = 0, parts: int = 1) -> dict[str, str]:
    """{file name: sha256} of the folder's weight files (every ``parts``-th from ``part``). Not collective."""
    return {p.name: _file_sha256(p) for i, p in enumerate(weight_files(folder)) if i % parts == part}


def _try_hash_base(folder: Path | None, part: int = 0, parts: int = 1) -> tuple[dict[str, str], str]:
    """hash_base, or ({}, why not)."""
    if folder is None:
        return {}, "no base folder (the model was not loaded from a local folder)"
    try:
        return hash_base(folder, part, parts), ""
    except OSError as e:
        return {}, f"rank {dist.rank()}: {e.strerror or e} reading {getattr(e, 'filename', None) or folder}"


def _hash_base_on_ranks(folder: Path | None) -> tuple[dict[str, str], str]:
    """hash_base with the files split between the ranks: (files, first error or ""). Collective."""
    files, errs = {}, []
    for m, e in dist.all_gather_object(_try_hash_base(folder, dist.rank(), dist.world_size())):
        files.update(m)
        errs.append(e)
    return files, next((e for e in errs if e), "")


def base_mismatch(ckpt: Path, name: str, saved: dict, folder: Path | None, files: dict[str, str], err: str) -> str:
    """"" when ``files`` (the weight hashes of ``folder`` now) are the base ``saved`` in the manifest; else why not."""
    now = base_sha256(files) if not err else "unreadable"
    if not err and now == saved["sha256"]:
        return ""
    changed = sorted(n for n in set(files) | set(saved["files"]) if files.get(n) != saved["files"].get(n))
    return (
        f"checkpoint {ckpt}: engine '{name}' was saved without its frozen parameters, which come from its "
        f"base folder; it was saved against {saved['path']} (weights sha256 {saved['sha256']}), but the "
        f"base now is {folder} with weights sha256 {now} ({err or 'differing files: ' + ', '.join(changed)})"
    )


def check_base(ckpt: Path, name: str, saved: dict, folder: Path | None) -> str:
    """base_mismatch on one process (export): hashes every weight file of ``folder``."""
    return base_mismatch(ckpt, name, saved, folder, *_try_hash_base(folder))


def _strict_module_load(name: str, excluded: set[str]) -> Callable[..., None]:
    """DeepSpeed's module load made strict, except for the frozen parameters left out on purpose
    (the engine already holds them: loaded from the base folder when it was built) and the extra
    state quantised layers keep beside such a weight (bitsandbytes' ``weight_format``, ``SCB``,
    ``weight.absmax``, ...), which is meaningless without it."""
    owners = {e.rpartition(".")[0] for e in excluded}

    def extra_of_excluded(k: str) -> bool:
        return k.rpartition(".")[0] in owners or any(k.startswith(e + ".") for e in excluded)

    def load(src: dict, dst: torch.nn.Module) -> None:
        missing, unexpected = dst.load_state_dict(src, strict=False)
        missing = [k for k in missing if k not in excluded]
        unexpected = [k for k in unexpected if not (excluded and extra_of_excluded(k))]
        if missing or unexpected:
            raise CheckpointError(
                f"engine '{name}': the checkpoint's module does not match the model: {len(missing)} missing "
                f"{missing[:4]}, {len(unexpected)} unexpected {unexpected[:4]}"
            )

    return load


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


def _frozen_exclusions(engines: dict[str, Any]) -> dict[str, dict]:
    """Per engine name, the frozen parameters a checkpoint leaves out and the base folder they load from.

    Frozen parameters are left out when the base folder they came from can be hashed (once per
    process while its files stay unchanged); otherwise they are saved like the rest. Collective."""
    excluded: dict[str, dict] = {}
    for name, engine in engines.items():
        frozen = frozen_names(engine)
        if frozen:
            folder = base_folder(engine)
            files, err = _hash_base_on_ranks(folder)
            if files and not err:
                base = {"path": str(folder), "sha256": base_sha256(files), "files": files}
                excluded[name] = {"base": base, "params": frozen}
    return excluded


def _write_files(engines: dict[str, Any], excluded: dict[str, dict], tmp: Path, state: TrainState,
                 client: dict | None) -> str:
    """Write every engine's DeepSpeed folder, this rank's RNG and (rank 0) ``state.pt`` into ``tmp``.

    Returns this rank's first write error ("" when none). Collective."""
    error = ""
    # Every rank calls every engine's save (each is a collective), even after a failed write.
    for name, engine in engines.items():
        try:
            with _without_frozen(engine, excluded[name]["params"] if name in excluded else []):
                engine.save_checkpoint(
                    str(tmp / name), tag="ds", save_latest=False, exclude_frozen_parameters=name in excluded
                )
        except (OSError, RuntimeError) as e:
            error = error or _write_error(e, tmp)
            dist.barrier()  # the other ranks wait in the barrier that ends DeepSpeed's save_checkpoint
    try:
        if not error:
            (tmp / "rng").mkdir(exist_ok=True)
            torch.save(rng_state(), tmp / "rng" / f"rank-{dist.rank()}.pt")
            if dist.is_main():
                torch.save({"state": asdict(state), "client": client or {}}, tmp / "state.pt")
            testhooks.checkpoint_fault("ckpt_between_files")
            testhooks.checkpoint_fault("enospc_save", tmp / "rng" / f"rank-{dist.rank()}.pt")
    except (OSError, RuntimeError) as e:
        error = _write_error(e, tmp)
    return error


def _digests_on_ranks(tmp: Path) -> dict[str, str]:
    """sha256 of every file under ``tmp`` by relative path, the hashing shared among ranks. Collective.

    One file list for all ranks: the union of what each rank sees (a rank always sees its own writes,
    while a shared-FS listing can miss another node's new files for seconds). Each rank hashes its
    share of that list, opening files by name."""
    seen = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    files = sorted(set().union(*dist.all_gather_object(seen)))
    ws, me = dist.world_size(), dist.rank()
    mine = {rel: sha256_by_name(tmp / rel) for i, rel in enumerate(files) if i % ws == me}
    digests: dict[str, str] = {}
    for part in dist.all_gather_object(mine):
        digests.update(part)
    return digests


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
    excluded = _frozen_exclusions(engines)
    error = _write_files(engines, excluded, tmp, state, client)
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
    digests = _digests_on_ranks(tmp)
    # Rank 0 alone: the manifest last (it marks the folder complete), then the rename into place.
    if dist.is_main():
        try:
            manifest = {
                "complete": True,
                "step": state.step,
                "world_size": dist.world_size(),
                "engines": sorted(engines),
                "time": time.time(),
                "files": digests,
                "excluded_frozen": excluded,
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
    """Convert (once, on rank 0) an engine's folder to DeepSpeed's universal checkpoint. Collective.

    Minutes at 7B: the other ranks wait beyond the collective timeout, beating their heartbeat
    (``rank0.on_main_rank``), rather than in a barrier.
    """
    out = path / "universal" / name
    on_main_rank(f"universal checkpoint {name}", lambda: _to_universal(path, name, out))
    return out


def _to_universal(path: Path, name: str, out: Path) -> None:
    if (out / "latest_universal").exists():
        return
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
    # A fixed temporary name (not publish_folder's random one): a killed conversion's leftover is
    # removed by the next try above.
    replace_folder(tmp, out)


def verify_for_resume(path: Path, engines: dict[str, Any]) -> dict:
    """verify_checkpoint with the files split between the ranks, then the base of every engine saved
    without its frozen parameters. Every rank raises the same CheckpointError. Collective."""
    path = Path(path)
    manifest, error = {}, ""
    try:
        manifest = verify_checkpoint(path, dist.rank(), dist.world_size())
    except (CheckpointError, OSError, ValueError, KeyError) as e:
        error = str(e) if isinstance(e, CheckpointError) else f"checkpoint {path}: unreadable manifest ({e})"
    errors = [e for e in dist.all_gather_object(error) if e]
    if errors:
        raise CheckpointError(errors[0])
    for name, engine in engines.items():  # the same manifest and engines on every rank
        saved = manifest.get("excluded_frozen", {}).get(name)
        if saved:
            folder = base_folder(engine)
            files, err = _hash_base_on_ranks(folder)
            problem = base_mismatch(path, name, saved["base"], folder, files, err)
            if problem:
                raise CheckpointError(f"{problem}. Restore that base, or move {path.parent} aside to start afresh")
    return manifest


def load_checkpoint(engines: dict[str, Any], path: Path, verify: bool = True) -> tuple[TrainState, dict]:
    """Restore engines, this rank's RNG (when the world size matches) and the loop state. Collective."""
    path = Path(path)
    manifest = verify_for_resume(path, engines) if verify else json.loads((path / MANIFEST).read_text())
    elastic = manifest.get("world_size") != dist.world_size()
    for name, engine in engines.items():
        src = universal_checkpoint(path, name) if elastic else path / name
        excluded = set(manifest.get("excluded_frozen", {}).get(name, {}).get("params", []))
        # A checkpoint from another world size loads through DeepSpeed's universal format, which
        # re-partitions the fp32 weights and Adam moments for the new number of ranks (of the
        # trained parameters only: frozen ones stay as the engine was built).
        if elastic:
            engine._config.load_universal_checkpoint = True
        try:
            load_path, _ = engine.load_checkpoint(
                str(src), tag="ds", load_module_strict=True, custom_load_fn=_strict_module_load(name, excluded)
            )
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
