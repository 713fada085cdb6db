"""Long single-rank work at the end of a stage (issue 15): rank 0 exports for longer than both the
collective timeout and the hang timeout while rank 1 waits, and the run still ends 0 with DONE; a
rank 0 that stops beating in the export is still reported (exit 86, naming rank 0). The RM rerun
covers resume (checkpoint verification), the final evaluation (per batch) and the export, each slowed.

    python -m pytest tests/faults/test_long_export.py -s

STACKLLAMA_TEST_PHASE_SLEEP=<phase>:<seconds>[,...] sleeps inside a heartbeat phase, and
STACKLLAMA_TEST_BATCH_SLEEP after each batch of a loop that beats per batch (testhooks.py).
"""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

import pytest

from stackllama_ds.run import heartbeat
from tests.conftest import fresh_root, write_config
from tests.faults import _harness as h

TIMEOUT_S, HANG_TIMEOUT_S = 15, 10.0  # launch.timeout_s has ge=10
SLOW_S = 25.0  # the export's sleep: longer than both
EVAL_BATCH_S = 1.5  # each batch of the final evaluation: its ~10 batches outlast the hang timeout
FAST = {"max_steps": 2, "save_every": 2, "eval_every": 2, "eval_batches": 1, "seq_length": 128}
FAST_RM = {"max_steps": 2, "save_every": 2, "eval_every": 2, "max_length": 128, "overlength": "truncate",
           "engine": {"micro_batch_size": 4}}
SETS = ("--set", f"launch.timeout_s={TIMEOUT_S}", "--set", f"launch.hang_timeout_s={HANG_TIMEOUT_S:g}")


# -- one process: the phase beats from a thread, Silence measures a peer's quiet time ----------------


@pytest.fixture
def hb(tmp_path, monkeypatch):
    monkeypatch.setattr(heartbeat, "_CURRENT", None)
    hb = heartbeat.Heartbeat(tmp_path, rank=0, world=2, hang_timeout_s=2.0, poll_s=3600)  # no watchdog firing
    yield hb
    hb.close()  # or its watchdog wakes in an hour, finds no beat, and ends pytest with exit 86


def _beat(hb: heartbeat.Heartbeat, rank: int = 0) -> dict:
    return hb.read()[rank]


def test_phase_beats_while_the_body_runs(hb):
    assert heartbeat.current() is hb and hb.beat_every_s == 0.5
    with heartbeat.phase("export", 7):
        first = _beat(hb)
        time.sleep(1.3)
        later = _beat(hb)
    assert first["phase"] == later["phase"] == "export" and later["step"] == 7
    assert later["time"] - first["time"] >= 0.9, "no beat from the phase's thread"
    after = _beat(hb)
    time.sleep(0.7)
    assert _beat(hb) == after, "the thread outlived the phase"
    assert not [t for t in threading.enumerate() if t.name == "heartbeat-export"]


def test_phase_test_hook_sleeps_only_in_the_named_phase(hb, monkeypatch):
    monkeypatch.setenv("STACKLLAMA_TEST_PHASE_SLEEP", "waiting for rank 0: export:0.6,final evaluation:0")
    t0 = time.time()
    with heartbeat.phase("export"):
        pass
    assert time.time() - t0 < 0.3
    with heartbeat.phase("waiting for rank 0: export"):
        pass
    assert time.time() - t0 >= 0.6


def test_silence_counts_from_the_last_change_on_this_clock(hb, tmp_path):
    peer = heartbeat.Heartbeat.__new__(heartbeat.Heartbeat)  # rank 1's writer, without its threads
    peer.dir, peer.rank, peer._lock = hb.dir, 1, threading.Lock()
    peer._write("export", 3)
    quiet = heartbeat.Silence(hb, 1)
    assert quiet.check()[0] < 0.1
    time.sleep(0.3)
    silent, beat = quiet.check()
    assert silent >= 0.3 and beat["phase"] == "export"
    peer._write("export", 3)
    assert quiet.check()[0] < 0.1


# -- two ranks on the tiny model ------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_runs(prepared_root, tmp_path_factory) -> dict[str, object]:
    """SFT with a slow export; a rerun whose rank 0 parks in the export; RM, then an RM rerun with a
    slow final evaluation and export. Launches only; the tests assert."""
    root = fresh_root(prepared_root, tmp_path_factory.mktemp("long_export"))
    cfg = write_config(root / "cfg.yaml", root, sft=FAST, rm=FAST_RM)
    out: dict[str, object] = {"root": root}
    out["sft"] = h.run("sft", cfg, *SETS, STACKLLAMA_TEST_PHASE_SLEEP=f"export:{SLOW_S:g}")
    out["sft_hang_report"] = _read(root / "sft" / "hang_report.json")
    out["sft_beats"] = [_read(root / "sft" / "heartbeat" / f"rank-{r}.json") for r in (0, 1)]
    out["sft_flags"] = sorted(p.name for p in (root / "sft" / "heartbeat").glob("rank0-done-*"))
    if out["sft"].rc != 0:  # type: ignore[union-attr]
        return out

    # Rank 0 parks in 'export' (resumes at step 2 = max_steps: no training); rank 1 must report it.
    out["parked"] = h.run("sft", cfg, *SETS, STACKLLAMA_FAULT="sleep:export:0")
    out["parked_report"] = _read(root / "sft" / "hang_report.json")

    out["rm"] = h.run("rm", cfg, *SETS)
    if out["rm"].rc == 0:  # type: ignore[union-attr]
        (root / "rm" / "DONE").unlink()
        (root / "rm" / "accuracy.json").unlink()
        n_resumes = len(h.resumes_of(root / "rm"))
        out["rm_rerun"] = h.run("rm", cfg, *SETS, STACKLLAMA_TEST_PHASE_SLEEP=f"export:{SLOW_S:g}",
                                STACKLLAMA_TEST_BATCH_SLEEP=f"final evaluation:{EVAL_BATCH_S:g}")
        out["rm_hang_report"] = _read(root / "rm" / "hang_report.json")
        out["rm_rerun_resumes"] = h.resumes_of(root / "rm")[n_resumes:]
    return out


def _read(p: Path) -> dict | None:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


@pytest.mark.slow
def test_export_longer_than_both_timeouts_ends_done(long_runs):
    r = long_runs["sft"]
    root = long_runs["root"]
    h.record(f"rank 0 exports for {SLOW_S:g} s (timeout_s={TIMEOUT_S}, hang_timeout_s={HANG_TIMEOUT_S:g})",
             f"exit {r.rc}, DONE {(root / 'sft' / 'DONE').exists()}", r.wall_s, "nothing")
    assert r.rc == 0, r.err[-3000:]
    h.no_traceback(r.err)
    assert (root / "sft" / "DONE").exists() and (root / "sft" / "model" / "config.json").exists()
    assert long_runs["sft_hang_report"] is None
    assert r.wall_s > SLOW_S
    beat0, beat1 = long_runs["sft_beats"]
    assert beat0["phase"] == "export" and beat1["phase"] == "waiting for rank 0: export", (beat0, beat1)
    assert long_runs["sft_flags"] == [], "rank 0's done-flag is removed once every rank is through"


@pytest.mark.slow
def test_rank0_silent_in_export_is_still_reported(long_runs):
    if "parked" not in long_runs:
        pytest.skip("the slow-export run failed")
    r, report = long_runs["parked"], long_runs["parked_report"]
    assert r.rc == 86, r.err[-3000:]
    assert report is not None and report["stuck_rank"] == 0 and report["phase"] == "export", report
    exit_s = r.t_end - report["ranks"][0]["time"]  # from rank 0's last beat (entering 'export')
    h.record("rank 0 parked in 'export' (hang_timeout_s=10)", f"exit {r.rc}; rank 1 reports rank 0",
             exit_s, "nothing (training was done)")
    assert "no progress on rank 0" in r.err and "stuck in phase 'export'" in r.err, r.err[-3000:]
    # rank 1's poll 1 s + the launcher's grace 5 s for rank 0 + slack; not the 3600 s the fault parks for
    assert exit_s < HANG_TIMEOUT_S + 15, exit_s


@pytest.mark.slow
def test_rm_rerun_verifies_evaluates_and_exports_beyond_the_timeouts(long_runs):
    if "rm" not in long_runs:
        pytest.skip("the slow-export run failed")
    assert long_runs["rm"].rc == 0, long_runs["rm"].err[-3000:]
    r = long_runs["rm_rerun"]
    root = long_runs["root"]
    acc = json.loads((root / "rm" / "accuracy.json").read_text()) if (root / "rm" / "accuracy.json").exists() else {}
    mb = FAST_RM["engine"]["micro_batch_size"]  # type: ignore[index]
    eval_s = EVAL_BATCH_S * math.ceil(math.ceil(acc.get("eval_pairs", 0) / 2) / mb)  # rank 0's micro batches
    h.record(f"RM rerun: final evaluation {eval_s:g} s in batches of {EVAL_BATCH_S:g} s + export {SLOW_S:g} s",
             f"exit {r.rc}", r.wall_s, "nothing")
    assert r.rc == 0, r.err[-3000:]
    h.no_traceback(r.err)
    assert [(x["checkpoint"], x["step"]) for x in long_runs["rm_rerun_resumes"]] == [
        (str(root / "rm" / "checkpoints" / "step-2"), 2)]
    assert long_runs["rm_hang_report"] is None
    assert (root / "rm" / "DONE").exists() and acc["step"] == 2
    assert eval_s > HANG_TIMEOUT_S, "the final evaluation must outlast the hang timeout"
    assert r.wall_s > eval_s + SLOW_S
