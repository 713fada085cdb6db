"""PPO stage end to end on 2 CPU ranks: learning, ZeRO-3 generation, critic, LoRA, exact resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from stackllama_ds.data.prompts import prompt_batch
from stackllama_ds.models.padding import cut_at_eos
from stackllama_ds.run.metrics import read_metrics
from stackllama_ds.stages.ppo_steps import rule_scores
from tests.conftest import FAST_RM, FAST_SFT, REPO, cli_env, fresh_root, run_cli, write_config

PPO_FAST = {
    "steps": 2,
    "batch_size": 4,
    "mini_batch_size": 2,
    "gradient_accumulation_steps": 1,
    "ppo_epochs": 2,
    "response_min_length": 8,
    "response_max_length": 12,
    "save_every": 100,
}


# ------------------------------------------------------------------------------- unit pieces
def test_cut_at_eos_masks_after_first_eos():
    resp = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 3, 3, 3]])
    assert cut_at_eos(resp, eos=2).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_rule_scores_share_of_token():
    resp = torch.tensor([[9, 9, 1, 0], [1, 1, 1, 1]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert torch.allclose(rule_scores(resp, mask, 9, 3.0), torch.tensor([2.0, 0.0]))


def test_prompt_batches_partition_ranks_and_cycle():
    n, b, w = 10, 3, 2
    r0, r1 = (prompt_batch(n, 0, b, r, w, seed=1) for r in range(w))
    assert len(set(r0) | set(r1)) == 6  # ranks get distinct prompts within a rollout
    epoch = [prompt_batch(n, g, 1, 0, 1, seed=1)[0] for g in range(n)]
    assert sorted(epoch) == list(range(n))  # each prompt once per pass
    assert r0 + r1 == epoch[:6]  # rank r takes the next slice of the global order


# --------------------------------------------------------------------------- end to end
def _ppo_root(rm_root: Path, tmp: Path, name: str, **ppo) -> tuple[Path, Path]:
    root = fresh_root(rm_root, tmp / name, stages=("sft", "rm"))
    cfg = write_config(root / "cfg.yaml", root, sft=FAST_SFT, rm=FAST_RM, ppo={**PPO_FAST, **ppo})
    return root, cfg


@pytest.mark.slow
def test_ppo_learns_rule_reward(sft_root, tmp_path):
    """Reward = 10 x share of '.' tokens: mean reward rises by a fixed margin, KL stays bounded."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(sft_root / "sft" / "model")
    dot = tok(".", add_special_tokens=False)["input_ids"][0]
    root = fresh_root(sft_root, tmp_path / "learn", stages=("sft",))
    ppo = {**PPO_FAST, "steps": 24, "batch_size": 8, "mini_batch_size": 4, "response_min_length": 16,
           "response_max_length": 24, "init_kl_coef": 0.05, "rule_reward": {"token_id": dot, "scale": 10.0},
           "optim": {"lr": 1e-3}}
    cfg = write_config(root / "cfg.yaml", root, sft=FAST_SFT, ppo=ppo)
    r = run_cli("ppo", cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_metrics(root / "ppo" / "metrics.jsonl")
    rewards = [row["reward_mean"] for row in rows]
    print("PPO learning curve (reward_mean per step):", [round(x, 3) for x in rewards])
    print("KL per step:", [round(row["kl"], 3) for row in rows])
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert [row["step"] for row in rows] == list(range(1, 25))
    assert last - first >= 0.5, (first, last)
    assert max(row["kl"] for row in rows) < 10.0
    for k in ("reward_std", "score_mean", "kl_coef", "entropy", "policy_loss", "value_loss", "clipfrac", "approx_kl",
              "returns_mean", "advantages_mean", "response_len", "tokens_per_s", "degenerate_frac", "t_generate",
              "t_score", "t_logprobs", "t_train"):
        assert k in rows[-1], k
    assert (root / "ppo" / "model" / "config.json").exists() and (root / "ppo" / "DONE").exists()


@pytest.mark.slow
def test_zero3_actor_gather_once_matches_partitioned_generation(rm_root, tmp_path):
    """ZeRO-3 actor (really partitioned) + ZeRO-0 frozen engines + separate critic, 2 steps.

    Generating from the gathered copy and from the partitioned actor samples the same tokens
    (fp32, same RNG), so the first step's scores agree; the critic run also finishes.
    """
    z3 = {"zero_stage": 3, "stage3_param_persistence_threshold": 0, "dtype": "fp32"}
    fp32 = {"dtype": "fp32", "zero_stage": 0}
    a_root, a_cfg = _ppo_root(rm_root, tmp_path, "gather", actor=z3, reference=fp32, reward=fp32,
                              separate_critic=True, critic=z3)
    b_root, b_cfg = _ppo_root(rm_root, tmp_path, "nogather", actor=z3, reference=fp32, reward=fp32,
                              gather_generation=False)
    for cfg in (a_cfg, b_cfg):
        r = run_cli("ppo", cfg)
        assert r.returncode == 0, r.stderr[-3000:]
    a = read_metrics(a_root / "ppo" / "metrics.jsonl")
    b = read_metrics(b_root / "ppo" / "metrics.jsonl")
    assert [x["step"] for x in a] == [1, 2] and [x["step"] for x in b] == [1, 2]
    assert a[0]["score_mean"] == pytest.approx(b[0]["score_mean"], abs=1e-5)
    assert a[0]["response_len"] == b[0]["response_len"]
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(a_root / "ppo" / "model")
    base = AutoModelForCausalLM.from_pretrained(rm_root / "sft" / "model")
    for (n, p), (_, q) in zip(m.named_parameters(), base.named_parameters()):
        assert p.shape == q.shape, n  # full weights exported, not ZeRO-3 shards


@pytest.mark.slow
def test_lora_mode_reference_is_disabled_adapter(rm_root, tmp_path):
    optim = {"lr": 1e-3, "weight_decay": 0.0, "warmup_steps": 0, "scheduler": "constant"}
    root, cfg = _ppo_root(rm_root, tmp_path, "lora", lora={"enabled": True, "r": 4, "alpha": 8},
                          actor={"dtype": "fp32"}, reward={"dtype": "fp32"}, optim=optim)
    r = run_cli("ppo", cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_metrics(root / "ppo" / "metrics.jsonl")
    # Before the first update the adapter is the identity (B = 0): policy == reference exactly.
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    # After it the policy has left the reference: the reference is the base without the trained
    # adapter, not the adapted policy itself.
    assert abs(rows[1]["kl"]) > 1e-5, rows[1]["kl"]
    assert (root / "ppo" / "model" / "adapter" / "adapter_config.json").exists()
    assert (root / "ppo" / "model" / "value_head.safetensors").exists()


def _wait_rows(path: Path, n: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if len(read_metrics(path)) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early with {proc.returncode}")
        time.sleep(0.2)
    raise AssertionError("timed out waiting for metrics")


@pytest.mark.slow
def test_exact_resume_after_signal(rm_root, tmp_path):
    """Interrupt at step 2 by SIGUSR1 (exit 75), rerun: steps 3..5 equal the uninterrupted run's."""
    ppo = {"steps": 5, "save_every": 1, "actor": {"dtype": "fp32"}, "reference": {"dtype": "fp32"},
           "reward": {"dtype": "fp32"}}
    full_root, full_cfg = _ppo_root(rm_root, tmp_path, "full", **ppo)
    r = run_cli("ppo", full_cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    full = read_metrics(full_root / "ppo" / "metrics.jsonl")

    cut_root, cut_cfg = _ppo_root(rm_root, tmp_path, "cut", **ppo)
    env = cli_env(STACKLLAMA_TEST_STEP_SLEEP="1")
    proc = subprocess.Popen([sys.executable, "-m", "stackllama_ds.cli", "ppo", str(cut_cfg)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_rows(cut_root / "ppo" / "metrics.jsonl", 2, proc)
    os.kill(proc.pid, signal.SIGUSR1)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 75, out[-3000:]
    stopped_at = len(read_metrics(cut_root / "ppo" / "metrics.jsonl"))
    assert 2 <= stopped_at < 5
    r = run_cli("ppo", cut_cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = read_metrics(cut_root / "ppo" / "metrics.jsonl")
    assert [x["step"] for x in resumed] == [1, 2, 3, 4, 5]
    for a, b in zip(full, resumed):
        for k in ("reward_mean", "kl", "kl_coef", "policy_loss", "value_loss", "response_len"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (a["step"], k)
    state = json.loads((cut_root / "ppo" / "checkpoints" / "step-5" / "manifest.json").read_text())
    assert state["complete"] and "actor" in state["engines"]
