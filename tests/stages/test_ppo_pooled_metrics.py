"""PPO's metrics.jsonl pools every rank: token-weighted where a figure is a per-token mean (issue 17, 4).

A real 2-rank run dumps each rank's rollout tensors and minibatch updates (testhooks.dump); the
logged figures must equal the values pooled by hand over both ranks, which differ from the plain
mean of the two ranks' means whenever the ranks' response lengths differ. The tiny SFT model
rarely ends an answer within a few tokens, so the test's copy makes EOS as likely as its most
likely token: responses then end at different lengths (checked).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stackllama_ds.data.template import format_prompt
from stackllama_ds.run.metrics import read_metrics
from stackllama_ds.stages.ppo_steps import TOKEN_STATS
from tests.conftest import FAST_RM, FAST_SFT, cli_env, fresh_root, run_cli, write_config

PPO = {"steps": 2, "batch_size": 4, "mini_batch_size": 2, "gradient_accumulation_steps": 1, "ppo_epochs": 2,
       "response_min_length": 6, "response_max_length": 24, "save_every": 100, "early_stopping": False}


def make_eos_likely(model_dir: Path) -> None:
    """Give EOS the output row of the token the model ranks first after a prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        top = int(model(**tok(format_prompt("How is beer brewed?"), return_tensors="pt")).logits[0, -1].argmax())
        head = model.get_output_embeddings().weight
        head[tok.eos_token_id] = head[top]
    model.save_pretrained(model_dir)


@pytest.mark.slow
def test_ppo_metrics_pool_over_ranks(rm_root, tmp_path):
    root = fresh_root(rm_root, tmp_path / "pooled", stages=("sft", "rm"))
    make_eos_likely(root / "sft" / "model")
    cfg = write_config(root / "cfg.yaml", root, sft=FAST_SFT, rm=FAST_RM, ppo=PPO)
    dump = tmp_path / "dump"
    r = run_cli("ppo", cfg, env=cli_env(STACKLLAMA_TEST_DUMP=str(dump)))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {row["step"]: row for row in read_metrics(root / "ppo" / "metrics.jsonl")}
    unequal = False
    for step in (1, 2):
        ranks = [torch.load(dump / f"ppo-{step}-rank{k}.pt") for k in range(2)]
        row = rows[step]
        tokens = [d["mask"].sum().item() for d in ranks]
        unequal |= tokens[0] != tokens[1]
        for key, name in (("entropy", "entropy"), ("returns", "returns_mean"), ("advantages", "advantages_mean")):
            pooled = sum((d[key] * d["mask"]).sum().item() for d in ranks) / sum(tokens)
            assert row[name] == pytest.approx(pooled, rel=1e-5, abs=1e-6), name
        updates = [u for d in ranks for u in d["updates"]]
        assert len(updates) == 2 * PPO["ppo_epochs"] * PPO["batch_size"] // PPO["mini_batch_size"]
        n_tok = sum(u["tokens"] for u in updates)
        for k in TOKEN_STATS:  # each update's per-token mean, weighted by its response tokens
            assert row[k] == pytest.approx(sum(u[k] * u["tokens"] for u in updates) / n_tok, rel=1e-5, abs=1e-7), k
        assert row["skipped"] == pytest.approx(sum(u["skipped"] for u in updates) / len(updates))
        assert row["response_len"] == pytest.approx(sum(tokens) / (2 * PPO["batch_size"]))
    assert unequal, "the ranks' responses had equal token counts at every step: the test proves nothing"
