"""ZeRO-3 models are built partitioned (issue 15): no rank holds the whole model on the way, the
numbers are the same, and a generation copy lives on the rank's device."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stackllama_ds.engines import generate
from tests.conftest import REPO, cli_env


@pytest.mark.slow
def test_zero3_init_loads_each_rank_its_shard_with_the_same_logits(prepared_root, tmp_path):
    script = Path(__file__).with_name("_partitioned_load.py")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        "29561", str(script), str(prepared_root / "tiny"), str(tmp_path)],
                       cwd=REPO, env=cli_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in range(2)]
    for res in ranks:
        assert res["all_partitioned"]  # after the load, before deepspeed.initialize
        assert res["held"] <= res["total"] / 2 + 1024  # its half (rounded up per tensor), not the whole
        assert res["max_logit_diff"] < 1e-5
        assert res["sharded_bf16_eos"] == [7, 7]  # the folder's generation_config.json, as from_pretrained
        # bf16 shards into fp32 partitions, tied embeddings: the same numbers as a whole load
        assert res["sharded_bf16_logit_diff"] < 1e-5 and res["tied_logit_diff"] < 1e-5
        # each rank read its own partitions (engines.zero3_load) for all four models; the reward model
        # from a causal-LM folder has its body read and its absent score head initialised
        assert res["filled"] == [[], [], [], ["score.weight"], []]
        assert res["bf16_actor"] == ["torch.bfloat16", [2, 8]]
        assert res["rm_body_diff"] < 1e-5 and res["rm_score_shape"] == [1, 1]
        assert 0.01 < res["rm_score_std"] < 0.04  # transformers' init: normal, std initializer_range 0.02
    assert ranks[0]["rm_score_sum"] == ranks[1]["rm_score_sum"]
    assert sum(res["held"] for res in ranks) >= ranks[0]["total"]


def test_generation_copy_goes_to_the_rank_device(monkeypatch):
    monkeypatch.setattr(generate.dist, "device", lambda: torch.device("meta"))
    copy = generate.GenerationCopy(torch.nn.Linear(4, 4))
    assert all(p.device.type == "meta" for p in copy.model.parameters())
    assert not any(p.requires_grad for p in copy.model.parameters())
