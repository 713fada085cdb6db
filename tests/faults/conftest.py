"""Fixtures of the fault suite: one SFT run root interrupted by every fault in turn, and its reference.

The chain shares launches (each costs a process-group start): run 1 is killed mid-step, run 2
dies mid-save, run 3 hits a full disk, run 4 finds an altered checkpoint, run 5 hangs, run 6 sees
a NaN loss, run 7 finishes; each resumes from the last complete checkpoint (step 4). The fixture
only launches and records; the tests in test_sft_faults.py assert on what it recorded.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import fresh_root, write_config
from tests.faults import _harness as h

# fp32 so that resumed losses can be compared exactly with the uninterrupted run.
CHAIN_SFT = {"max_steps": 12, "save_every": 4, "eval_every": 6, "eval_batches": 2, "seq_length": 128,
             "engine": {"dtype": "fp32"}}
HANG_TIMEOUT = 10.0


@pytest.fixture(scope="session", autouse=True)
def _print_fault_table():
    yield
    if h.REPORT:
        print("\n\nFault suite report\n" + h.report_table(), flush=True)


@dataclass
class Chain:
    root: Path
    cfg: Path
    ref_rows: list[dict] = field(default_factory=list)
    runs: dict[str, h.Run] = field(default_factory=dict)
    info: dict[str, object] = field(default_factory=dict)

    @property
    def ckpts(self) -> Path:
        return self.root / "sft" / "checkpoints"


def _try_tmpfs(path: Path, size_bytes: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes // 1024}k", "tmpfs", str(path)],
                       capture_output=True, text=True)
    return r.returncode == 0


def _flip_byte(f: Path, at: int = 200) -> bytes:
    data = f.read_bytes()
    b = bytearray(data)
    b[min(at, len(b) - 1)] ^= 0x01
    f.write_bytes(bytes(b))
    return data


@pytest.fixture(scope="session")
def sft_chain(prepared_root, tmp_path_factory) -> Chain:
    ref_root = fresh_root(prepared_root, tmp_path_factory.mktemp("fault_ref"))
    ref_cfg = write_config(ref_root / "cfg.yaml", ref_root, sft=CHAIN_SFT)
    t_ref = time.time()
    ref = h.start("sft", ref_cfg)  # the uninterrupted run goes alongside run 1

    root = fresh_root(prepared_root, tmp_path_factory.mktemp("fault_chain"))
    c = Chain(root, write_config(root / "cfg.yaml", root, sft=CHAIN_SFT))
    sft = root / "sft"

    # 1. SIGKILL of rank 1 in the middle of step 6 (steps slowed to >= 0.5 s so the kill lands in one).
    p = h.start("sft", c.cfg, STACKLLAMA_TEST_STEP_SLEEP="0.5")
    h.wait_for_step(sft, 5, p)
    pid = h.rank_pid(p.pid, 1)
    c.info["kill_last_logged"] = h.rows_of(sft)[-1]["step"]
    t_kill = time.time()
    os.kill(pid, signal.SIGKILL)
    c.runs["kill"] = h.finish(p, t_kill, timeout=60)
    c.info["kill_ckpts"] = h.ckpt_names(c.ckpts)

    # 2. Rank 0 SIGKILLs itself between files of the step-8 save.
    n_resumes = len(h.resumes_of(sft))
    c.runs["between_files"] = h.run("sft", c.cfg, STACKLLAMA_FAULT="ckpt_between_files")
    c.info["between_files_resumes"] = h.resumes_of(sft)[n_resumes:]
    half = c.ckpts / ".tmp-step-8" / "state.pt"
    c.info["between_files_kill_t"] = half.stat().st_mtime if half.exists() else None
    c.info["between_files_ckpts"] = h.ckpt_names(c.ckpts)

    # 3. Disk full during the step-8 save: a real size-limited tmpfs holding a copy of step-4 when
    # mount is allowed (root in this container), else ENOSPC injected on rank 1's write.
    step4 = c.ckpts / "step-4"
    size = sum(f.stat().st_size for f in step4.rglob("*") if f.is_file())
    full = tmp_path_factory.mktemp("fault_full")
    if _try_tmpfs(full, int(size * 1.5) + (1 << 20)):
        try:
            fresh_root(prepared_root, full)
            shutil.copytree(step4, full / "sft" / "checkpoints" / "step-4")
            fcfg = write_config(full / "cfg.yaml", full, sft=CHAIN_SFT)
            c.runs["enospc"] = h.run("sft", fcfg)
            c.info["enospc_mode"] = f"real tmpfs of {int(size * 1.5) // 2**20 + 1} MiB"
            c.info["enospc_last_row_t"] = (full / "sft" / "metrics.jsonl").stat().st_mtime
            c.info["enospc_ckpts"] = h.ckpt_names(full / "sft" / "checkpoints")
            c.info["enospc_verify"] = _verify(full / "sft" / "checkpoints" / "step-4")
        finally:
            subprocess.run(["umount", str(full)], capture_output=True)
    else:
        c.runs["enospc"] = h.run("sft", c.cfg, STACKLLAMA_FAULT="enospc_save:1")
        c.info["enospc_mode"] = "injected (STACKLLAMA_FAULT=enospc_save:1; tmpfs mount not permitted)"
        c.info["enospc_last_row_t"] = (sft / "metrics.jsonl").stat().st_mtime
        c.info["enospc_ckpts"] = h.ckpt_names(c.ckpts)
        c.info["enospc_verify"] = _verify(step4)

    # 4. A byte of step-4's model states flipped after saving: the resume refuses it, naming the file.
    victim = step4 / "model" / "ds" / "mp_rank_00_model_states.pt"
    original = _flip_byte(victim)
    try:
        c.runs["altered"] = h.run("sft", c.cfg)
    finally:
        victim.write_bytes(original)
    c.info["altered_victim"] = str(victim.relative_to(step4))
    c.info["altered_ckpts"] = h.ckpt_names(c.ckpts)

    # 5. Rank 1 parked in phase 'training' of step 5: the rank-0 watchdog names it and exits 86.
    c.runs["hang"] = h.run("sft", c.cfg, "--set", f"launch.hang_timeout_s={HANG_TIMEOUT:g}",
                           STACKLLAMA_FAULT="sleep:training:1")
    c.info["hang_beat_t"] = _beat_time(sft, 1)
    c.info["hang_ckpts"] = h.ckpt_names(c.ckpts)

    # 6. NaN loss at step 6 (after step 5 trained): stop naming the step, no checkpoint of it.
    c.runs["nan"] = h.run("sft", c.cfg, STACKLLAMA_FAULT="nan_loss@6")
    c.info["nan_last_row_t"] = (sft / "metrics.jsonl").stat().st_mtime
    c.info["nan_rows"] = [r["step"] for r in h.rows_of(sft)]
    c.info["nan_ckpts"] = h.ckpt_names(c.ckpts)

    # 7. The last run resumes from step 4 and finishes; compared with the reference.
    n_resumes = len(h.resumes_of(sft))
    c.runs["final"] = h.run("sft", c.cfg)
    c.info["final_resumes"] = h.resumes_of(sft)[n_resumes:]
    c.runs["reference"] = h.finish(ref, t_ref, timeout=600)
    c.ref_rows = h.rows_of(ref_root / "sft")
    return c


def _verify(path: Path) -> str:
    from stackllama_ds.run.checkpoint import CheckpointError, verify_checkpoint

    try:
        verify_checkpoint(path)
        return "ok"
    except (CheckpointError, OSError, ValueError) as e:
        return str(e)


def _beat_time(stage_dir: Path, rank: int) -> float | None:
    import json

    try:
        return json.loads((stage_dir / "heartbeat" / f"rank-{rank}.json").read_text())["time"]
    except (OSError, ValueError, KeyError):
        return None
