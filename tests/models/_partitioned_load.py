"""Run by test_partitioned_load.py under torchrun (2 ranks): load a model under zero3_init and compare."""

from __future__ import annotations

import json
import os
import sys

import torch

from stackllama_ds.config import EngineConfig, ModelConfig
from stackllama_ds.engines import dist
from stackllama_ds.engines.build import build_eval_engine
from stackllama_ds.models.load import load_causal_lm, zero3_init


def main(model_dir: str, out: str) -> None:
    dist.init("gloo")
    eng = EngineConfig(zero_stage=3, dtype="fp32", stage3_param_persistence_threshold=0)
    m = ModelConfig()
    with zero3_init(eng, m):
        lm = load_causal_lm(model_dir, m, dtype="fp32", trainable=False)
    params = list(lm.parameters())
    held = sum(p.ds_tensor.numel() for p in params if hasattr(p, "ds_tensor"))
    total = sum(p.ds_numel for p in params if hasattr(p, "ds_numel"))
    res = {"all_partitioned": all(hasattr(p, "ds_id") and p.numel() == 0 for p in params),
           "held": held, "total": total}
    engine = build_eval_engine(lm, eng)
    plain = load_causal_lm(model_dir, m, dtype="fp32", trainable=False)
    ids = torch.arange(3, 19).view(2, 8)
    with torch.no_grad():
        res["max_logit_diff"] = float((engine(input_ids=ids).logits - plain(input_ids=ids).logits).abs().max())
    with open(os.path.join(out, f"rank{dist.rank()}.json"), "w") as f:
        json.dump(res, f)
    dist.destroy()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
