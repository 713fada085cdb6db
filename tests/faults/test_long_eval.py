"""Long evaluations beat per batch: a loop that runs for longer than ``launch.hang_timeout_s`` while
each batch is shorter ends normally; a batch that stalls for longer is still reported (exit 86).

    python -m pytest tests/faults/test_long_eval.py -s

STACKLLAMA_TEST_BATCH_SLEEP=<phase>:<seconds>[,...] sleeps after each batch of a loop in that phase
(testhooks.py); ``heartbeat.each`` / ``heartbeat.progress`` are the per-batch beats.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from stackllama_ds.run import heartbeat
from stackllama_ds.run.signals import EXIT_HANG
from tests.conftest import FAST_RM, FAST_SFT, REPO, cli_env, fresh_root, write_config
from tests.faults import _harness as h

HANG_TIMEOUT_S = 5.0
BATCH_S = 1.5  # each evaluation batch: well under the hang timeout, the whole pass well over it
STALL_S = 120.0  # one batch far over the hang timeout: a stuck forward
# One evaluation, in the loop at step 2 (the last), over rm_eval in micro batches of 4 pairs per rank.
RM = {**FAST_RM, "max_steps": 2, "eval_every": 2, "save_every": 2, "engine": {"micro_batch_size": 4}}
EVAL = {"n_prompts": 8, "max_new_tokens": 8, "batch_size": 8, "bootstrap_samples": 100}
SETS = ("--set", f"launch.hang_timeout_s={HANG_TIMEOUT_S:g}")


# -- one process: rate-limited progress beats ------------------------------------------------------


@pytest.fixture
def hb(tmp_path, monkeypatch):
    monkeypatch.setattr(heartbeat, "_CURRENT", None)
    monkeypatch.delenv("STACKLLAMA_TEST_BATCH_SLEEP", raising=False)
    hb = heartbeat.Heartbeat(tmp_path, rank=0, world=1, hang_timeout_s=2.0, poll_s=3600)  # no watchdog firing
    yield hb
    hb.close()


def _writes(hb: heartbeat.Heartbeat, monkeypatch) -> list[tuple]:
    """Every heartbeat file write of ``hb`` (still made), as (phase, step, progress)."""
    calls: list[tuple] = []
    write = hb._write

    def spy(phase: str, step: int, progress: dict | None = None) -> None:
        calls.append((phase, step, progress))
        write(phase, step, progress)

    monkeypatch.setattr(hb, "_write", spy)
    return calls


def test_progress_writes_at_most_once_per_beat_interval_with_the_counts(hb, monkeypatch):
    writes = _writes(hb, monkeypatch)
    hb.beat("evaluation", 7)
    for i in range(1, 2001):  # a fast loop: no file per batch
        heartbeat.progress(i, 2000)
    assert writes == [("evaluation", 7, None)]
    time.sleep(hb.beat_every_s + 0.05)
    heartbeat.progress(2001, 3000)
    heartbeat.progress(2002, 3000)
    assert writes[1:] == [("evaluation", 7, {"done": 2001, "total": 3000})]
    rec = hb.read()[0]
    assert (rec["phase"], rec["step"], rec["progress"]) == ("evaluation", 7, {"done": 2001, "total": 3000})
    hb.beat("checkpoint save", 7)  # entering a phase writes at once, without counts
    assert writes[-1] == ("checkpoint save", 7, None) and "progress" not in hb.read()[0]


def test_each_enters_its_phase_and_reports_every_item(hb, monkeypatch):
    done: list[tuple] = []
    monkeypatch.setattr(hb, "progress", lambda d, t=None: done.append((d, t)))
    hb.beat("training", 3)
    assert list(heartbeat.each(["a", "b", "c"], "eval sft: sampling")) == ["a", "b", "c"]
    assert hb.read()[0]["phase"] == "eval sft: sampling" and hb.read()[0]["step"] == 3  # the current step
    assert done == [(1, 3), (2, 3), (3, 3)]
    assert list(heartbeat.each(iter([5, 6]), "final evaluation", 9)) == [5, 6]
    assert hb.read()[0]["step"] == 9 and done[3:] == [(1, None), (2, None)]  # an iterator: no total


def test_batch_sleep_hook_slows_each_batch_of_the_named_phase_only(hb, monkeypatch):
    monkeypatch.setenv("STACKLLAMA_TEST_BATCH_SLEEP", "evaluation:0.3")
    t0 = time.monotonic()
    list(heartbeat.each(range(3), "final evaluation", 1))
    assert time.monotonic() - t0 < 0.25
    list(heartbeat.each(range(3), "evaluation", 1))
    assert time.monotonic() - t0 >= 0.9


# -- the watchdog in a child process (it ends its process): long loop vs stuck batch ---------------

WATCHED = textwrap.dedent("""
    import sys, time
    from stackllama_ds.run import heartbeat
    stall_at = int(sys.argv[2])
    hb = heartbeat.Heartbeat(sys.argv[1], rank=0, world=1, hang_timeout_s={timeout}, poll_s=0.2)
    hb.beat("evaluation", 3)
    for i in heartbeat.each(range(1, 13)):
        time.sleep({stall} if i == stall_at else {batch})
""")


def _watched(tmp_path: Path, stall_at: int) -> tuple[subprocess.CompletedProcess, float]:
    """Batches of 0.4 s against a 2 s hang timeout; batch ``stall_at`` (0: none) sleeps STALL_S."""
    code = WATCHED.format(timeout=2.0, stall=STALL_S, batch=0.4)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path), str(stall_at)], cwd=REPO, env=cli_env(),
                       capture_output=True, text=True, timeout=120)
    return r, time.monotonic() - t0


def test_a_loop_longer_than_the_hang_timeout_ends_normally(tmp_path):
    r, wall = _watched(tmp_path, stall_at=0)  # 12 batches of 0.4 s against a 2 s timeout
    assert r.returncode == 0, r.stderr[-2000:]
    assert wall >= 12 * 0.4 and not (tmp_path / "hang_report.json").exists()


def test_a_batch_stuck_past_the_hang_timeout_is_reported_with_its_progress(tmp_path):
    r, wall = _watched(tmp_path, stall_at=5)
    assert r.returncode == EXIT_HANG, r.stderr[-2000:]
    assert wall < 4 * 0.4 + 2.0 + 10  # the timeout after the stall began, not the 60 s sleep
    report = json.loads((tmp_path / "hang_report.json").read_text())
    assert (report["phase"], report["step"], report["stuck_rank"]) == ("evaluation", 3, 0)
    # Rate-limited to one write per 0.5 s: the last one counted batch 2, 3 or 4 of the 4 before the stall.
    assert report["progress"]["total"] == 12 and 2 <= report["progress"]["done"] <= 4, report


# -- two ranks on the tiny model: the RM's held-out evaluation and eval's pair scoring --------------


def _read(p: Path) -> dict | None:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


@pytest.fixture(scope="module")
def rm_runs(sft_root, tmp_path_factory) -> dict[str, object]:
    """RM whose step-2 evaluation takes BATCH_S per batch; RM whose first evaluation batch stalls."""
    out: dict[str, object] = {}
    for name, sleep in (("slow", BATCH_S), ("stall", STALL_S)):
        root = fresh_root(sft_root, tmp_path_factory.mktemp(f"long_eval_{name}"), stages=("sft",))
        cfg = write_config(root / "cfg.yaml", root, sft=FAST_SFT, rm=RM)
        out[name] = h.run("rm", cfg, *SETS, timeout=300, STACKLLAMA_TEST_BATCH_SLEEP=f"evaluation:{sleep:g}")
        out[f"{name}_root"] = root
        out[f"{name}_report"] = _read(root / "rm" / "hang_report.json")
    return out


@pytest.mark.slow
def test_rm_evaluation_longer_than_the_hang_timeout_finishes(rm_runs):
    r, root = rm_runs["slow"], rm_runs["slow_root"]
    acc = _read(root / "rm" / "accuracy.json")
    assert r.rc == 0, r.err[-3000:]
    h.no_traceback(r.err)
    assert acc is not None and acc["step"] == 2 and acc["n_pairs"] == acc["eval_pairs"] > 0
    assert (root / "rm" / "DONE").exists() and rm_runs["slow_report"] is None
    # rank 0's share of rm_eval in micro batches (eval_pair_batches): each slept BATCH_S
    n_batches = math.ceil(math.ceil(acc["eval_pairs"] / 2) / RM["engine"]["micro_batch_size"])
    assert n_batches * BATCH_S > 2 * HANG_TIMEOUT_S, "the evaluation must outlast the hang timeout"
    h.record(f"RM evaluation: {n_batches} batches x {BATCH_S:g} s (hang_timeout_s={HANG_TIMEOUT_S:g})",
             f"exit {r.rc}, DONE", r.wall_s, "nothing")
    assert r.wall_s > n_batches * BATCH_S


@pytest.mark.slow
def test_rm_evaluation_batch_stuck_past_the_hang_timeout_is_reported(rm_runs):
    r, root, report = rm_runs["stall"], rm_runs["stall_root"], rm_runs["stall_report"]
    assert r.rc == EXIT_HANG, r.err[-3000:]
    assert report is not None and report["phase"] == "evaluation" and report["step"] == 2, report
    assert not (root / "rm" / "DONE").exists() and not (root / "rm" / "accuracy.json").exists()
    h.record(f"RM evaluation batch stalls {STALL_S:g} s (hang_timeout_s={HANG_TIMEOUT_S:g})",
             f"exit {r.rc}, rank {report['stuck_rank']} named", r.wall_s, "step 2 (no checkpoint yet)")
    assert r.wall_s < STALL_S


@pytest.mark.slow
def test_eval_pair_scoring_longer_than_the_hang_timeout_finishes(rm_root, tmp_path_factory):
    root = fresh_root(rm_root, tmp_path_factory.mktemp("long_eval_eval"), stages=("sft", "rm"))
    cfg = write_config(root / "cfg.yaml", root, sft=FAST_SFT, rm=FAST_RM, eval=EVAL)
    r = h.run("eval", cfg, *SETS, timeout=300, STACKLLAMA_TEST_BATCH_SLEEP=f"eval reward model: pairs:{BATCH_S:g}")
    assert r.rc == 0, r.err[-3000:]
    assert (root / "eval" / "DONE").exists() and not (root / "eval" / "hang_report.json").exists()
    res = json.loads((root / "eval" / "eval.json").read_text())
    n_batches = math.ceil(math.ceil(res["rm"]["n_pairs"] / EVAL["batch_size"]) / 2)  # rank 0's batches j % 2 == 0
    assert n_batches * BATCH_S > HANG_TIMEOUT_S, "the pair scoring must outlast the hang timeout"
    h.record(f"eval pair scoring: {n_batches} batches x {BATCH_S:g} s (hang_timeout_s={HANG_TIMEOUT_S:g})",
             f"exit {r.rc}, DONE", r.wall_s, "nothing")
    assert r.wall_s > n_batches * BATCH_S
