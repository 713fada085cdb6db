"""PPO options on 2 CPU ranks, each judged by its effect on ppo/metrics.jsonl and the saved files.

    python -m pytest tests/stages/test_ppo_options.py -q

early_stopping (fewer optimizer steps), ratio_threshold (a skipped minibatch leaves the actor as it
was), reward_normalize (running mean and std of the scores) and kl_penalty: full (the exact KL, >= 0
on every token, in the per-token rewards). Every run is fp32 with a constant learning rate and a fixed
KL coefficient, so two runs that differ in one option agree on everything that option leaves alone.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stackllama_ds.run.metrics import read_metrics
from tests.conftest import FAST_RM, FAST_SFT, fresh_root, run_cli, write_config

pytestmark = pytest.mark.slow

# Every optimizer field the tests rely on is set here, not taken from the defaults.
OPTIM = {"lr": 1e-3, "weight_decay": 0.0, "warmup_steps": 0, "scheduler": "constant"}
PPO = {
    "steps": 2, "batch_size": 4, "mini_batch_size": 2, "gradient_accumulation_steps": 1, "ppo_epochs": 2,
    "response_min_length": 8, "response_max_length": 12, "save_every": 100, "early_stopping": False,
    "adaptive_kl": False, "init_kl_coef": 0.2, "optim": OPTIM,
    "actor": {"dtype": "fp32"}, "reference": {"dtype": "fp32"}, "reward": {"dtype": "fp32"},
}  # fmt: skip
UPDATES = PPO["steps"] * PPO["ppo_epochs"] * PPO["batch_size"] // PPO["mini_batch_size"]  # without early stop
WORLD = 2  # tiny.yaml's launch.nproc_per_node
# Score 0 for every response and gamma = lam = 1: the return of token t is -kl_coef * sum_{l >= t} KL_l.
NO_SCORE = {"rule_reward": {"token_id": 0, "scale": 0.0}, "gamma": 1.0, "lam": 1.0}


def _run(src: Path, dest: Path, **ppo) -> tuple[Path, list[dict]]:
    """A 2-rank PPO run from ``src``'s trained stages; returns (the ppo stage folder, its metrics rows)."""
    root = fresh_root(src, dest, stages=tuple(s for s in ("sft", "rm") if (src / s).exists()))
    cfg = {**PPO, **ppo}
    r = run_cli("ppo", write_config(root / "cfg.yaml", root, sft=FAST_SFT, rm=FAST_RM, ppo=cfg))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_metrics(root / "ppo" / "metrics.jsonl")
    assert [row["step"] for row in rows] == list(range(1, cfg["steps"] + 1))
    return root / "ppo", rows


def optimizer_steps(stage: Path, step: int) -> int:
    """The actor engine's optimizer step counter saved in checkpoint ``step-<step>`` (DeepSpeed's own)."""
    (states,) = (stage / "checkpoints" / f"step-{step}" / "actor").rglob("mp_rank_00_model_states.pt")
    return torch.load(states, map_location="cpu", weights_only=False)["global_steps"]


@pytest.fixture(scope="module")
def baseline(sft_root, tmp_path_factory) -> tuple[Path, list[dict]]:
    """kl_penalty: kl, no early stopping, score 0: the other rule-reward runs differ from it in one option."""
    return _run(sft_root, tmp_path_factory.mktemp("ppo-baseline") / "r", **NO_SCORE)


def test_early_stopping_takes_fewer_updates(sft_root, baseline, tmp_path):
    """target_kl 1e-9: once an update has moved the policy, the next check (KL > 1.5e-9) ends the epochs."""
    stage, rows = _run(sft_root, tmp_path / "early", early_stopping=True, target_kl=1e-9, **NO_SCORE)
    base_stage, base_rows = baseline
    assert optimizer_steps(base_stage, PPO["steps"]) == UPDATES  # every minibatch of every epoch
    assert not any(row["early_stop"] for row in base_rows)
    assert any(row["early_stop"] for row in rows), rows
    assert PPO["steps"] <= optimizer_steps(stage, PPO["steps"]) < UPDATES


def test_ratio_threshold_skipped_minibatches_train_nothing(sft_root, tmp_path):
    """Once every rank skips, the actor is frozen: 4 and 6 epochs on one rollout end bit-identical.

    One minibatch per epoch: epoch 1's ratio is exactly 1 (the rollout's own forward) and it trains.
    Its update is large on purpose (lr 1e-2; Adam's first step moves every weight by lr), so from
    epoch 2 or 3 on each rank's mean ratio stays above 1.000001, the smallest threshold the config
    accepts (it must be > 1). Adam without momentum (beta1 = 0) and without weight decay turns a
    skipped minibatch's zero gradient into no change at all: with both ranks skipping, the weights
    and hence the ratios stay put, so every later epoch is skipped too.
    """
    common = {**NO_SCORE, "steps": 1, "mini_batch_size": PPO["batch_size"], "ratio_threshold": 1.000001,
              "optim": {**OPTIM, "lr": 1e-2, "betas": [0.0, 0.95]}}  # fmt: skip
    short_stage, (short,) = _run(sft_root, tmp_path / "short", ppo_epochs=4, **common)
    long_stage, (long,) = _run(sft_root, tmp_path / "long", ppo_epochs=6, **common)
    # skipped is the share of skipped minibatches (per rank or pooled): both extra epochs are skipped
    assert long["skipped"] * 6 == pytest.approx(short["skipped"] * 4 + 2)
    assert optimizer_steps(long_stage, 1) == 6  # a skipped minibatch still takes its (empty) step
    for name in ("model.safetensors", "value_head.safetensors"):
        a, b = load_file(short_stage / "model" / name), load_file(long_stage / "model" / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_reward_normalize_uses_running_moments(rm_root, tmp_path):
    """Scores are divided by the running std after the running mean is subtracted (reward model scores)."""
    _, (first, second) = _run(rm_root, tmp_path / "norm", reward_normalize=True)
    n = PPO["batch_size"] * WORLD  # scores per step over all ranks
    # Step 1: the running moments are this batch's own: mean 0 and unbiased std 1, i.e. population std
    # sqrt((n-1)/n); score_mean stays the raw reward-model mean.
    assert first["reward_mean"] == pytest.approx(0.0, abs=1e-6)
    assert first["reward_std"] == pytest.approx(math.sqrt((n - 1) / n), rel=1e-5)
    assert first["score_mean"] != pytest.approx(0.0, abs=1e-3)
    # Step 2: the running mean is the mean of both batches, halfway between their means, so the
    # normalised mean is (score_mean_2 - score_mean_1) / (2 * running std): not 0, and of that sign.
    delta = second["score_mean"] - first["score_mean"]
    assert second["reward_mean"] != pytest.approx(0.0, abs=1e-4)
    assert math.copysign(1.0, second["reward_mean"]) == math.copysign(1.0, delta)


def test_kl_penalty_full_is_exact_nonnegative_kl(sft_root, baseline, tmp_path):
    """Same seed as the baseline: the same rollouts, but rewards built from the full KL per token."""
    _, full = _run(sft_root, tmp_path / "full", kl_penalty="full", **NO_SCORE)
    _, kl = baseline
    # Step 1: policy == reference, both penalties are 0, so the runs agree on the update too.
    for k in ("kl", "response_len", "returns_mean", "policy_loss", "value_loss"):
        assert full[0][k] == pytest.approx(kl[0][k], abs=1e-6), k
    # Step 2: the same sampled responses (the logged kl is the sampled-token estimate in both modes) ...
    assert full[1]["response_len"] == kl[1]["response_len"]
    assert full[1]["kl"] == pytest.approx(kl[1]["kl"], rel=1e-4) and abs(full[1]["kl"]) > 1e-6
    # ... but other rewards: with score 0 every return is -kl_coef * a sum of full KLs, each >= 0.
    assert full[1]["returns_mean"] < 0
    assert full[1]["returns_mean"] != pytest.approx(kl[1]["returns_mean"], rel=1e-3, abs=1e-7)
