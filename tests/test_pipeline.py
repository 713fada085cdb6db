"""The whole job: `stackllama-ds pipeline` on the tiny default (2 ranks), killed during PPO and rerun."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stackllama_ds.run.checkpoint import latest_checkpoint
from stackllama_ds.run.metrics import read_metrics
from tests.conftest import (
    BEER,
    REPO,
    TINY_YAML,
    assert_eval_figures_match_samples,
    assert_resumed_at,
    cli_env,
)

# The tiny default with shorter stages; PPO checkpoints often so the kill lands between checkpoints.
SETS = ["sft.max_steps=20", "sft.save_every=10", "sft.eval_every=10", "rm.max_steps=20", "rm.save_every=10",
        "rm.eval_every=10", "ppo.steps=10", "ppo.save_every=2", "eval.n_prompts=8", "eval.max_new_tokens=16",
        "eval.bootstrap_samples=200", "logging.progress=false"]


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _cmd(root: Path) -> list[str]:
    args = [sys.executable, "-m", "stackllama_ds.cli", "pipeline", str(TINY_YAML),
            "--set", f"output_root={root}", "--set", f"data.posts={BEER}"]
    for s in SETS:
        args += ["--set", s]
    return args


@pytest.fixture(scope="module")
def killed_and_rerun(tmp_path_factory) -> tuple[Path, list[dict], int, dict, dict]:
    """Run the pipeline, SIGKILL the launcher once PPO has logged 3 steps, rerun to completion.

    Returns (root, PPO's metrics rows at the kill, the step of its last checkpoint then, digests of
    the sft/ and rm/ folders at the kill, the same after the rerun).
    """
    root = tmp_path_factory.mktemp("pipeline") / "run"
    proc = subprocess.Popen(_cmd(root), cwd=REPO, env=cli_env(STACKLLAMA_TEST_STEP_SLEEP="0.3"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    t0 = time.time()
    while len(read_metrics(root / "ppo" / "metrics.jsonl")) < 3:
        assert proc.poll() is None, f"pipeline ended early ({proc.returncode}): {proc.stdout.read()[-3000:]}"
        assert time.time() - t0 < 600, "pipeline did not reach PPO step 3 in time"
        time.sleep(0.2)
    before = {s: _digest(root / s) for s in ("sft", "rm")}
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    # The ranks die with their launcher (PR_SET_PDEATHSIG): nothing keeps writing to the run.
    time.sleep(2)
    killed_rows = read_metrics(root / "ppo" / "metrics.jsonl")
    time.sleep(2)
    assert read_metrics(root / "ppo" / "metrics.jsonl") == killed_rows
    assert not (root / "ppo" / "DONE").exists()
    last = latest_checkpoint(root / "ppo" / "checkpoints")
    saved_step = int(last.name.split("-")[1]) if last is not None else 0
    rerun = subprocess.run(_cmd(root), cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    after = {s: _digest(root / s) for s in ("sft", "rm")}
    return root, killed_rows, saved_step, before, after


@pytest.mark.slow
def test_rerun_skips_done_stages_and_resumes_ppo(killed_and_rerun):
    root, killed_rows, saved_step, before, after = killed_and_rerun
    # SFT and RM were not rerun: every file of theirs (metrics with wall-clock times, checkpoints,
    # exported model) is byte-identical
    assert before == after
    rows = read_metrics(root / "ppo" / "metrics.jsonl")
    assert saved_step >= 2  # save_every=2 and 3 steps logged at the kill
    assert_resumed_at(killed_rows, rows, saved_step)
    assert [r["step"] for r in rows] == list(range(1, 11))  # every PPO step exactly once
    for stage in ("sft", "rm", "ppo", "eval"):
        assert (root / stage / "DONE").exists(), stage


@pytest.mark.slow
def test_every_stage_has_a_loadable_model_and_eval_figures(killed_and_rerun):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    root = killed_and_rerun[0]
    for stage in ("sft", "ppo"):
        m = AutoModelForCausalLM.from_pretrained(root / stage / "model")
        assert m.config.num_hidden_layers == 2
    rm = AutoModelForSequenceClassification.from_pretrained(root / "rm" / "model")
    assert rm.config.num_labels == 1
    ev = json.loads((root / "eval" / "eval.json").read_text())
    assert set(ev["models"]) == {"base", "sft", "ppo"} and set(ev["kl"]) == {"ppo_vs_sft"}
    assert set(ev["win_rates"]) == {"sft_vs_base", "ppo_vs_base", "ppo_vs_sft"}
    assert_eval_figures_match_samples(ev)
    pngs = sorted((root / "eval").glob("*.png"))
    assert {p.name for p in pngs} == {"sft_loss.png", "rm_training.png", "rm_accuracy.png", "ppo.png"}
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 1000
    assert "| ppo vs sft |" in (root / "eval" / "report.md").read_text()
