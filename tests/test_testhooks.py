"""The test hooks fire only where their variable names them, and production code holds no fault logic.

    python -m pytest tests/test_testhooks.py -q
"""

from __future__ import annotations

import ast
import errno
import math
import os
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from stackllama_ds.engines import dist
from stackllama_ds.run import testhooks

PKG = Path(testhooks.__file__).resolve().parent
ENV = (testhooks.FAULT, testhooks.STEP_SLEEP, testhooks.PHASE_SLEEP, testhooks.BATCH_SLEEP)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for k in ENV:
        monkeypatch.delenv(k, raising=False)


@pytest.fixture
def slept(monkeypatch) -> list[float]:
    """Every sleep a hook asks for, without sleeping."""
    calls: list[float] = []
    monkeypatch.setattr(testhooks, "time", SimpleNamespace(sleep=calls.append))
    return calls


def test_fault_value_is_nan_only_at_the_named_value_and_step(monkeypatch):
    x = torch.tensor([1.0, 2.0])
    assert testhooks.fault_value("loss", 3, x) is x  # unset: the very object back
    monkeypatch.setenv(testhooks.FAULT, "nan_loss@3")
    assert torch.isnan(testhooks.fault_value("loss", 3, x)).all()
    assert math.isnan(testhooks.fault_value("loss", 3, 2.5))
    assert testhooks.fault_value("loss", 2, x) is x
    assert testhooks.fault_value("loss", 4, x) is x
    assert testhooks.fault_value("reward", 3, x) is x
    monkeypatch.setenv(testhooks.FAULT, "nan_reward@1")
    assert torch.isnan(testhooks.fault_value("reward", 1, x)).all()
    assert testhooks.fault_value("loss", 1, x) is x


def test_after_step_sleeps_only_when_set(monkeypatch, slept):
    testhooks.after_step()
    monkeypatch.setenv(testhooks.STEP_SLEEP, "")
    testhooks.after_step()
    monkeypatch.setenv(testhooks.STEP_SLEEP, "0")
    testhooks.after_step()
    assert slept == []
    monkeypatch.setenv(testhooks.STEP_SLEEP, "0.25")
    testhooks.after_step()
    assert slept == [0.25]


def test_after_step_really_sleeps(monkeypatch):
    monkeypatch.setenv(testhooks.STEP_SLEEP, "0.2")
    t0 = time.monotonic()
    testhooks.after_step()
    assert time.monotonic() - t0 >= 0.19


def test_on_beat_parks_only_the_named_rank_in_the_named_phase(monkeypatch, slept):
    testhooks.on_beat("training", 1)
    monkeypatch.setenv(testhooks.FAULT, "sleep:training:1")
    testhooks.on_beat("training", 0)
    testhooks.on_beat("export", 1)
    assert slept == []
    testhooks.on_beat("training", 1)
    assert slept == [testhooks.PARK_S] and testhooks.PARK_S >= 3600
    monkeypatch.setenv(testhooks.FAULT, "sleep:waiting for rank 0: export:1")  # a phase name with ':'
    testhooks.on_beat("waiting for rank 0: export", 1)
    assert len(slept) == 2


def test_phase_sleep_sleeps_each_named_phase_its_own_time(monkeypatch, slept):
    testhooks.phase_sleep("export")
    monkeypatch.setenv(testhooks.PHASE_SLEEP, "waiting for rank 0: export:0.6,final evaluation:2,")
    testhooks.phase_sleep("export")
    testhooks.phase_sleep("training")
    assert slept == []
    testhooks.phase_sleep("waiting for rank 0: export")
    testhooks.phase_sleep("final evaluation")
    assert slept == [0.6, 2.0]


def test_batch_sleep_sleeps_only_in_the_named_phases(monkeypatch, slept):
    testhooks.batch_sleep("evaluation")
    monkeypatch.setenv(testhooks.BATCH_SLEEP, "evaluation:0.5,eval sft: sampling:1.5")
    testhooks.batch_sleep("final evaluation")
    testhooks.batch_sleep("eval sft")
    testhooks.phase_sleep("evaluation")  # the phase hook reads its own variable
    assert slept == []
    testhooks.batch_sleep("evaluation")
    testhooks.batch_sleep("eval sft: sampling")
    assert slept == [0.5, 1.5]


@pytest.fixture
def killed(monkeypatch) -> list[tuple[int, int]]:
    """os.kill calls, recorded instead of made (the real one would SIGKILL pytest)."""
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(testhooks.os, "kill", lambda pid, sig: calls.append((pid, sig)))
    return calls


def _on_rank(monkeypatch, r: int) -> None:
    monkeypatch.setattr(dist, "rank", lambda: r)


def test_ckpt_between_files_kills_rank_0_only(monkeypatch, killed):
    testhooks.checkpoint_fault("ckpt_between_files")
    monkeypatch.setenv(testhooks.FAULT, "enospc_save")
    testhooks.checkpoint_fault("ckpt_between_files")
    assert killed == []
    monkeypatch.setenv(testhooks.FAULT, "ckpt_between_files")
    testhooks.checkpoint_fault("enospc_save", Path("x"))  # another point: nothing
    _on_rank(monkeypatch, 1)
    testhooks.checkpoint_fault("ckpt_between_files")
    assert killed == []
    _on_rank(monkeypatch, 0)
    testhooks.checkpoint_fault("ckpt_between_files")
    assert killed == [(os.getpid(), signal.SIGKILL)]


@pytest.mark.parametrize("fault,victim", [("enospc_save", 0), ("enospc_save:0", 0), ("enospc_save:1", 1)])
def test_enospc_save_raises_enospc_on_the_chosen_rank(monkeypatch, killed, fault, victim, tmp_path):
    where = tmp_path / "rng" / "rank-0.pt"
    monkeypatch.setenv(testhooks.FAULT, fault)
    testhooks.checkpoint_fault("ckpt_between_files")
    for r in (0, 1):
        _on_rank(monkeypatch, r)
        if r != victim:
            testhooks.checkpoint_fault("enospc_save", where)
            continue
        with pytest.raises(OSError) as e:
            testhooks.checkpoint_fault("enospc_save", where)
        assert e.value.errno == errno.ENOSPC and e.value.filename == str(where)
    assert killed == []


def test_checkpoint_fault_rejects_an_unknown_point_when_a_fault_is_set(monkeypatch):
    testhooks.checkpoint_fault("ckpt_betwen_files")  # unset: inert, even for a bad point
    monkeypatch.setenv(testhooks.FAULT, "ckpt_between_files")
    with pytest.raises(ValueError, match="unknown point 'ckpt_betwen_files'"):
        testhooks.checkpoint_fault("ckpt_betwen_files")


def test_only_testhooks_reads_the_test_variables():
    prefixes = ("STACKLLAMA_FAULT", "STACKLLAMA_TEST_")
    offenders = [str(p.relative_to(PKG)) for p in PKG.rglob("*.py")
                 if p.name != "testhooks.py" and any(s in p.read_text() for s in prefixes)]
    assert offenders == [], f"fault logic outside testhooks.py: {offenders}"


def test_testhooks_imports_only_the_standard_library():
    tree = ast.parse(Path(testhooks.__file__).read_text())
    top: set[str] = set()  # module level only: dist is imported lazily, when a fault is set
    for node in tree.body:
        if isinstance(node, ast.Import):
            top.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            top.add(node.module.split(".")[0])
    assert top <= set(sys.stdlib_module_names) | {"__future__"}, top
