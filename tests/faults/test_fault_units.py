"""One-process checks of the fault machinery the multi-rank tests rely on (fast, no ranks).

    python -m pytest tests/faults/test_fault_units.py -q
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stackllama_ds.run.checkpoint import (
    CheckpointError,
    TrainState,
    latest_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from stackllama_ds.run.heartbeat import pick_stuck


class Engine:
    """The DeepSpeedEngine.save_checkpoint checkpoint.py calls; ``fail`` raises inside it."""

    def __init__(self, fail: BaseException | None = None):
        self.fail = fail

    def save_checkpoint(self, save_dir, tag, save_latest=False, exclude_frozen_parameters=False):
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        torch.save({"w": torch.ones(3)}, d / "mp_rank_00_model_states.pt")
        if self.fail is not None:
            raise self.fail


def test_injected_enospc_keeps_previous_and_leaves_no_tmp(tmp_path, monkeypatch):
    prev = save_checkpoint({"model": Engine()}, tmp_path, TrainState(step=2), 2)
    monkeypatch.setenv("STACKLLAMA_FAULT", "enospc_save")
    with pytest.raises(CheckpointError, match=r"step 4 failed \(rank 0: No space left on device.*kept: .*step-2"):
        save_checkpoint({"model": Engine()}, tmp_path, TrainState(step=4), 2)
    assert latest_checkpoint(tmp_path) == prev and verify_checkpoint(prev)["step"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["step-2"]


def test_torch_save_runtime_error_is_a_checkpoint_error(tmp_path):
    # A full disk reaches us from torch.save as RuntimeError ("unexpected pos ..."), not OSError.
    save_checkpoint({"model": Engine()}, tmp_path, TrainState(step=2), 2)
    bad = Engine(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 128 vs 0"))
    with pytest.raises(CheckpointError, match="checkpoint of step 4 failed.*unexpected pos"):
        save_checkpoint({"model": bad}, tmp_path, TrainState(step=4), 2)
    assert [p.name for p in tmp_path.iterdir()] == ["step-2"]


def _beat(rank: int, t: float, step: int = 5, phase: str = "reward forward") -> dict:
    return {"rank": rank, "phase": phase, "step": step, "time": t, "host": "h"}


def test_watchdog_blames_the_rank_not_waiting_in_a_collective():
    # Rank 0 entered the phase first, then blocked in a collective waiting for rank 1: the oldest
    # heartbeat alone would blame rank 0.
    beats = [_beat(0, 100.0), _beat(1, 100.5)]
    where = {0: {"in_collective": True, "where": "x"}, 1: {"in_collective": False, "where": "y"}}
    assert pick_stuck(beats, where)["rank"] == 1
    assert pick_stuck(beats, {})["rank"] == 0  # without samples: the oldest heartbeat
    behind = [_beat(0, 100.0, step=6), _beat(1, 90.0, step=5)]
    assert pick_stuck(behind, {0: {"in_collective": True}})["rank"] == 1
    everyone_waits = {0: {"in_collective": True}, 1: {"in_collective": True}}
    assert pick_stuck(beats, everyone_waits)["rank"] == 0


def test_launcher_names_the_killed_rank_when_all_ranks_are_gone_by_the_next_poll(tmp_path, monkeypatch, capsys):
    # Rank 0 is SIGKILLed, rank 1 then fails on the closed connection, both within one poll:
    # the launcher must still name rank 0 (the cause) and exit with a positive code.
    from stackllama_ds.launcher import spawn

    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\nif [ "$RANK" = 0 ]; then sleep 0.2; kill -9 $$; else sleep 0.5; exit 1; fi\n')
    fake.chmod(0o755)
    monkeypatch.setattr(spawn.sys, "executable", str(fake))
    rc = spawn.spawn(["sft", "cfg.yaml"], 2, poll_s=1.5, grace_s=1.0)
    err = capsys.readouterr().err
    assert rc == 1 and "rank 0" in err and "killed by SIGKILL" in err, (rc, err)
