"""SFT under faults, 2 CPU ranks: one run root killed, crashed, starved of disk, tampered with, hung
and poisoned in turn (the ``sft_chain`` fixture); every rerun resumes from the last complete
checkpoint and the final losses equal an uninterrupted run's.

    python -m pytest tests/faults/test_sft_faults.py -s     # -s prints the timings table

Already covered elsewhere (not repeated): single-process checkpoint unit tests and a ZeRO-3
SIGUSR1/SIGKILL/mid-save chain (tests/stages/test_checkpoint.py), 2->1 rank resume
(tests/stages/test_elastic.py). This file adds the exit-time bounds, disk full, the altered
checkpoint through ``stackllama-ds sft``, hang localisation and NaN on multi-rank runs.
"""

from __future__ import annotations

import json

import pytest

from tests.faults import _harness as h
from tests.faults.conftest import CHAIN_SFT, HANG_TIMEOUT

pytestmark = pytest.mark.slow

KILL_EXIT_BOUND_S = 20.0  # launcher exit after a rank dies: poll 0.2 s + SIGTERM grace 5 s, no collective timeout
HANG_EXIT_BOUND_S = HANG_TIMEOUT + 12.0  # watchdog poll 1 s + launcher grace 5 s for the parked rank + slack
LOSS_TOL = 1e-5  # fp32, same world size and batches


def test_sigkill_of_a_rank_mid_step_ends_the_job_fast_naming_it(sft_chain):
    r = sft_chain.runs["kill"]
    exit_s = r.wall_s
    last = sft_chain.info["kill_last_logged"]
    h.record("SIGKILL rank 1 mid-step (SFT)", f"launcher exit {r.rc}, stderr names rank 1 / SIGKILL",
             exit_s, f"steps 5..{last + 1} (since step-4 checkpoint)")
    assert r.rc not in (0, 75), r.err[-3000:]
    assert "rank 1" in r.err and "SIGKILL" in r.err, r.err[-3000:]
    h.no_traceback(r.err)  # the survivor reports the lost peer in one line
    assert exit_s < KILL_EXIT_BOUND_S, f"launcher took {exit_s:.1f} s to exit after the kill"
    assert sft_chain.info["kill_ckpts"] == {"step-4"}


def test_kill_between_checkpoint_files_keeps_previous(sft_chain):
    r = sft_chain.runs["between_files"]
    t_kill = sft_chain.info["between_files_kill_t"]
    assert t_kill is not None, "the half-written save did not get as far as state.pt"
    h.record("rank 0 SIGKILL between checkpoint files (step 8)", f"exit {r.rc}; .tmp-step-8 left, step-4 kept",
             r.t_end - t_kill, "steps 5..8")
    assert r.rc not in (0, 75) and "rank 0" in r.err and "SIGKILL" in r.err, r.err[-3000:]
    h.no_traceback(r.err)
    assert [(x["checkpoint"], x["step"]) for x in sft_chain.info["between_files_resumes"]] == [
        (str(sft_chain.ckpts / "step-4"), 4)]
    assert r.t_end - t_kill < KILL_EXIT_BOUND_S
    assert sft_chain.info["between_files_ckpts"] == {"step-4", ".tmp-step-8"}


def test_disk_full_while_saving(sft_chain):
    r = sft_chain.runs["enospc"]
    exit_s = r.t_end - sft_chain.info["enospc_last_row_t"]
    h.record(f"disk full during save of step 8 ({sft_chain.info['enospc_mode']})",
             f"exit {r.rc}: 'checkpoint of step 8 failed (... No space left on device ...)'", exit_s, "steps 5..8")
    assert r.rc == 1, r.err[-3000:]
    h.no_traceback(r.err)
    assert "checkpoint of step 8 failed" in r.err and "No space left on device" in r.err, r.err[-3000:]
    assert "previous checkpoint kept:" in r.err and "step-4" in r.err
    assert sft_chain.info["enospc_verify"] == "ok"
    assert not any(n.startswith(".tmp-") for n in sft_chain.info["enospc_ckpts"]), sft_chain.info["enospc_ckpts"]
    assert "step-4" in sft_chain.info["enospc_ckpts"] and "step-8" not in sft_chain.info["enospc_ckpts"]


def test_altered_checkpoint_is_refused_naming_the_file(sft_chain):
    r = sft_chain.runs["altered"]
    victim = sft_chain.info["altered_victim"]
    h.record("checkpoint file altered after saving", f"exit {r.rc}: 'checksum mismatch in {victim}'", r.wall_s,
             "nothing (refuses to start)")
    assert r.rc == 1, r.err[-3000:]
    h.no_traceback(r.err)
    assert f"checksum mismatch in {victim}" in r.err, r.err[-3000:]
    # The resume also detected the half-written save of run 2 and removed it before refusing.
    assert sft_chain.info["altered_ckpts"] == {"step-4"}


def test_hang_in_training_is_localised(sft_chain):
    r = sft_chain.runs["hang"]
    report = json.loads((sft_chain.root / "sft" / "hang_report.json").read_text())
    exit_s = r.t_end - sft_chain.info["hang_beat_t"]
    h.record("rank 1 parked in 'training' (SFT, hang_timeout_s=10)",
             f"exit {r.rc}; stderr + hang_report.json: rank {report['stuck_rank']} '{report['phase']}' "
             f"step {report['step']} at {report.get('where')}", exit_s, "steps since step-4 (none trained)")
    assert r.rc == 86, r.err[-3000:]
    assert report["stuck_rank"] == 1 and report["phase"] == "training" and report["step"] == 5, report
    assert "rank 1 on" in r.err and "stuck in phase 'training' at step 5" in r.err, r.err[-3000:]
    assert "stages/sft.py" in (report.get("where") or ""), report
    assert exit_s < HANG_EXIT_BOUND_S, f"{exit_s:.1f} s from the rank parking to the launcher's exit"
    assert sft_chain.info["hang_ckpts"] == {"step-4"}


def test_nan_loss_stops_naming_the_step_without_checkpointing_it(sft_chain):
    r = sft_chain.runs["nan"]
    exit_s = r.t_end - sft_chain.info["nan_last_row_t"]
    h.record("NaN loss injected at step 6 (SFT)", f"exit {r.rc}: 'non-finite value at step 6: loss=nan'",
             exit_s, "step 5 (since step-4 checkpoint)")
    assert r.rc == 1, r.err[-3000:]
    assert "non-finite value at step 6" in r.err and "last good checkpoint is kept" in r.err, r.err[-3000:]
    assert sft_chain.info["nan_rows"] == [1, 2, 3, 4, 5]
    assert sft_chain.info["nan_ckpts"] == {"step-4"}


def test_final_resume_equals_uninterrupted_run(sft_chain):
    r, ref = sft_chain.runs["final"], sft_chain.runs["reference"]
    assert ref.rc == 0, ref.err[-3000:]
    assert r.rc == 0, r.err[-3000:]
    assert [(x["checkpoint"], x["step"]) for x in sft_chain.info["final_resumes"]] == [
        (str(sft_chain.ckpts / "step-4"), 4)]
    rows, ref_rows = h.rows_of(sft_chain.root / "sft"), sft_chain.ref_rows
    n = CHAIN_SFT["max_steps"]
    assert [x["step"] for x in rows] == list(range(1, n + 1)), "every step logged exactly once"
    assert [x["step"] for x in ref_rows] == list(range(1, n + 1))
    worst = 0.0
    for a, b in zip(rows, ref_rows):
        worst = max(worst, abs(a["loss"] - b["loss"]))
        if "eval_loss" in b:
            worst = max(worst, abs(a["eval_loss"] - b["eval_loss"]))
    print(f"\n[fault] resumed vs uninterrupted: max |loss difference| over {n} steps = {worst:.2e}")
    assert worst <= LOSS_TOL
    assert (sft_chain.root / "sft" / "DONE").exists()
