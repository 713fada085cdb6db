"""Elastic resume: a checkpoint written on 2 ranks resumes on 1 rank with the data position kept."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from stackllama_ds.run.metrics import read_metrics
from tests.conftest import REPO, assert_resumed_at, cli_env, fresh_root, run_cli, write_config

# Same global batch (8 packed sequences) on 2 ranks x 4 and on 1 rank x 4 x 2 accumulation steps.
SFT = {"max_steps": 6, "save_every": 1, "eval_every": 100, "seq_length": 64, "global_batch_size": 8,
       "engine": {"dtype": "fp32", "micro_batch_size": 4, "zero_stage": 2}}


@pytest.mark.slow
def test_two_rank_checkpoint_resumes_on_one_rank(prepared_root, tmp_path):
    full_root = fresh_root(prepared_root, tmp_path / "full")
    full_cfg = write_config(full_root / "cfg.yaml", full_root, sft=SFT)
    r = run_cli("sft", full_cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    full = read_metrics(full_root / "sft" / "metrics.jsonl")

    root = fresh_root(prepared_root, tmp_path / "elastic")
    cfg = write_config(root / "cfg.yaml", root, sft=SFT)
    proc = subprocess.Popen([sys.executable, "-m", "stackllama_ds.cli", "sft", str(cfg)], cwd=REPO,
                            env=cli_env(STACKLLAMA_TEST_STEP_SLEEP="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    t0 = time.time()
    while len(read_metrics(root / "sft" / "metrics.jsonl")) < 2 and time.time() - t0 < 240:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGUSR1)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 75, out[-3000:]
    before = read_metrics(root / "sft" / "metrics.jsonl")
    k = len(before)
    assert 2 <= k < 6

    r = run_cli("sft", cfg, "--set", "launch.nproc_per_node=1")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_metrics(root / "sft" / "metrics.jsonl")
    assert [x["step"] for x in rows] == [1, 2, 3, 4, 5, 6]
    assert_resumed_at(before, rows, k)
    # Weights, Adam moments, schedule and data position carried over: the 1-rank steps after the
    # resume reproduce the 2-rank run (fp32; only reduction order differs).
    for a, b in zip(full[k:], rows[k:]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (a["step"], a["loss"], b["loss"])
    assert (root / "sft" / "model" / "config.json").exists()
