"""PPO under faults, 2 CPU ranks: NaN reward, a rank hung in 'reward forward', prompts longer than
the context. The policy is the SFT model the fault chain (conftest.py) finished with; a rule
reward stands in for the reward model, which changes nothing on the paths tested here.

    python -m pytest tests/faults/test_ppo_faults.py -s

Exact PPO resume after SIGUSR1 is covered by tests/stages/test_ppo.py::test_exact_resume_after_signal.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import fresh_root, write_config
from tests.faults import _harness as h
from tests.faults.conftest import CHAIN_SFT, HANG_TIMEOUT

pytestmark = pytest.mark.slow

PPO = {"steps": 4, "save_every": 2, "batch_size": 4, "mini_batch_size": 2, "gradient_accumulation_steps": 1,
       "ppo_epochs": 1, "response_min_length": 8, "response_max_length": 12, "rule_reward": {"token_id": 5}}
HANG_EXIT_BOUND_S = HANG_TIMEOUT + 12.0


@pytest.fixture(scope="module")
def ppo_run(sft_chain, prepared_root, tmp_path_factory) -> tuple[Path, Path]:
    assert sft_chain.runs["final"].rc == 0, "the SFT chain did not finish; no policy to start PPO from"
    root = fresh_root(prepared_root, tmp_path_factory.mktemp("fault_ppo"))
    shutil.copytree(sft_chain.root / "sft" / "model", root / "sft" / "model")
    return root, write_config(root / "cfg.yaml", root, sft=CHAIN_SFT, ppo=PPO)


def test_nan_reward_stops_naming_the_step(ppo_run):
    root, cfg = ppo_run
    r = h.run("ppo", cfg, STACKLLAMA_FAULT="nan_reward@3")
    exit_s = r.t_end - (root / "ppo" / "metrics.jsonl").stat().st_mtime
    h.record("NaN reward injected at step 3 (PPO)", f"exit {r.rc}: 'non-finite reward at step 3'", exit_s,
             "nothing (step 2 was checkpointed)")
    assert r.rc == 1, r.err[-3000:]
    assert "non-finite reward at step 3" in r.err and "last good checkpoint is kept" in r.err, r.err[-3000:]
    assert [x["step"] for x in h.rows_of(root / "ppo")] == [1, 2]
    assert h.ckpt_names(root / "ppo" / "checkpoints") == {"step-2"}


def test_hang_in_reward_forward_is_localised(ppo_run):
    root, cfg = ppo_run  # resumes from step-2 of the test above (or starts fresh when run alone)
    before = h.ckpt_names(root / "ppo" / "checkpoints")
    r = h.run("ppo", cfg, "--set", f"launch.hang_timeout_s={HANG_TIMEOUT:g}",
              STACKLLAMA_FAULT="sleep:reward forward:1")
    report = json.loads((root / "ppo" / "hang_report.json").read_text())
    parked = json.loads((root / "ppo" / "heartbeat" / "rank-1.json").read_text())["time"]
    exit_s = r.t_end - parked
    h.record("rank 1 parked in 'reward forward' (PPO, hang_timeout_s=10)",
             f"exit {r.rc}; rank {report['stuck_rank']} '{report['phase']}' step {report['step']} "
             f"at {report.get('where')}", exit_s, "nothing beyond the running step")
    assert r.rc == 86, r.err[-3000:]
    assert report["stuck_rank"] == 1 and report["phase"] == "reward forward", report
    assert "stuck in phase 'reward forward'" in r.err and "rank 1 on" in r.err, r.err[-3000:]
    assert "stages/ppo.py" in (report.get("where") or ""), report
    assert exit_s < HANG_EXIT_BOUND_S, f"{exit_s:.1f} s from the rank parking to the launcher's exit"
    assert h.ckpt_names(root / "ppo" / "checkpoints") == before


def test_prompts_longer_than_context_are_a_clear_error(ppo_run):
    root, cfg = ppo_run
    r = h.run("ppo", cfg, "--set", "ppo.max_prompt_length=1", timeout=180)
    h.record("every PPO prompt longer than ppo.max_prompt_length", f"exit {r.rc}: 'no rl_train prompt fits ...'",
             r.wall_s, "nothing (refuses to start)")
    assert r.rc == 1, r.err[-3000:]
    h.no_traceback(r.err)
    assert "no rl_train prompt fits ppo.max_prompt_length=1 tokens" in r.err, r.err[-3000:]
