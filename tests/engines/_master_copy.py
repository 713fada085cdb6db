"""Run by test_master_copy.py under torchrun (2 ranks): bf16 train engines of a LoRA actor at each ZeRO
setting; records what the optimizer updates and whether sub-ulp updates reach the bf16 weights."""

from __future__ import annotations

import json
import sys

import deepspeed
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from stackllama_ds.config import EngineConfig, LoraConfig, OptimConfig
from stackllama_ds.engines import dist
from stackllama_ds.engines.build import build_train_engine
from stackllama_ds.models.load import ActorWithValueHead, apply_lora

SETTINGS = {
    "zero0": {"zero_stage": 0},
    "zero1": {"zero_stage": 1},
    "zero2": {"zero_stage": 2},
    "zero3": {"zero_stage": 3},
    "zero2_offload": {"zero_stage": 2, "offload_optimizer": True},
    "zero3_offload": {"zero_stage": 3, "offload_optimizer": True, "offload_params": True},
}
STEPS = 8
MASTERS = ("fp32_groups", "single_partition_of_fp32_groups", "fp32_partitioned_groups_flat")
LR = 1e-3  # Adam moves each weight by ~lr a step: below half a bf16 ulp (2^-8) of a weight at 1.0


def probe(overrides: dict) -> dict:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=32)
    lm = apply_lora(LlamaForCausalLM(cfg), LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0), "CAUSAL_LM", False)
    actor = ActorWithValueHead(lm, dropout=0.0)
    torch.nn.init.ones_(actor.v_head.bias)
    eng = EngineConfig(dtype="bf16", micro_batch_size=1, gradient_clipping=0.0, **overrides)
    optim = OptimConfig(lr=LR, weight_decay=0.0, warmup_steps=0, scheduler="constant")
    engine = build_train_engine(actor, eng, optim, total_steps=STEPS, grad_accum=1)
    trainable = [p for p in engine.module.parameters() if p.requires_grad]
    ids = torch.arange(1, 9)[None]
    for _ in range(STEPS):
        _, values = engine(ids, torch.ones_like(ids))
        engine.backward(values.mean())  # d/d bias = 1 every step: Adam steps the bias by -lr each time
        engine.step()
    # The master copy by wrapper: ZeRO-0's bf16 optimizer, ZeRO-1/2's and ZeRO-3's fp32 partitions.
    wrapper = engine.optimizer
    name = next(a for a in MASTERS if hasattr(wrapper, a))
    masters = [t for g in getattr(wrapper, name) for t in (g if isinstance(g, list) else [g])]
    opt = engine.basic_optimizer  # the torch AdamW inside: its moments
    states = [t for st in opt.state.values() for t in st.values() if torch.is_tensor(t) and t.is_floating_point()]
    bias = engine.module.v_head.bias
    with deepspeed.zero.GatheredParameters([bias]):
        bias_now = float(bias.detach().float().reshape(-1)[0])
    return {"forward_dtypes": sorted({str(p.dtype) for p in trainable}),
            "master": name, "master_dtypes": sorted({str(t.dtype) for t in masters}),
            "state_dtypes": sorted({str(t.dtype) for t in states}), "bias": bias_now}


def no_master_control() -> float:
    """The same 8 Adam steps applied to a bf16 weight directly: each rounds back to 1.0."""
    w = torch.nn.Parameter(torch.ones(1, dtype=torch.bfloat16))
    opt = torch.optim.AdamW([w], lr=LR, weight_decay=0.0)
    for _ in range(STEPS):
        w.grad = torch.ones_like(w)
        opt.step()
    return float(w.float())


def main(out: str) -> None:
    dist.init("gloo")
    res = {name: probe(o) for name, o in SETTINGS.items()} | {"no_master": no_master_control()}
    if dist.rank() == 0:
        with open(out, "w") as f:
            json.dump(res, f)
    dist.destroy()


if __name__ == "__main__":
    main(sys.argv[1])
