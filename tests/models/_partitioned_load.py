"""Run by test_partitioned_load.py under torchrun (2 ranks): load models under zero3_init, compare
with whole loads of the same folders, and record which loader ran."""

from __future__ import annotations

import json
import os
import sys

import deepspeed
import torch

from stackllama_ds.config import EngineConfig, LoraConfig, ModelConfig, OptimConfig
from stackllama_ds.engines import dist, zero3_load
from stackllama_ds.engines.build import build_eval_engine, build_train_engine
from stackllama_ds.engines.load import zero3_init
from stackllama_ds.models.load import ActorWithValueHead, load_causal_lm, load_reward_model

FILLED: list[list[str] | None] = []  # fill_partitions' answers, in call order
_fill = zero3_load.fill_partitions
zero3_load.fill_partitions = lambda model, index: FILLED.append(_fill(model, index)) or FILLED[-1]


def variants(model_dir: str, out: str) -> dict[str, str]:
    """Rank 0 saves: the tiny model in bf16 as 3+ shards; a tied-embedding Llama (SmolLM2's layout)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    dirs = {"sharded_bf16": os.path.join(out, "sharded_bf16"), "tied": os.path.join(out, "tied")}
    if dist.rank() == 0:
        lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
        lm.save_pretrained(dirs["sharded_bf16"], max_shard_size="200KB")
        gen = os.path.join(dirs["sharded_bf16"], "generation_config.json")  # one the config does not imply
        with open(gen) as f:
            g = json.load(f)
        with open(gen, "w") as f:
            json.dump({**g, "eos_token_id": 7, "_from_model_config": False}, f)
        torch.manual_seed(1)
        cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
        LlamaForCausalLM(cfg).save_pretrained(dirs["tied"])
    dist.barrier()
    return dirs


def plain_lm(model_dir: str, m: ModelConfig):
    return load_causal_lm(model_dir, m, dtype="fp32", trainable=False)


def logit_diff(engine, plain, vocab: int) -> float:
    ids = torch.arange(3, 19).view(2, 8) % vocab
    with torch.no_grad():
        a, b = engine(input_ids=ids).logits, plain(input_ids=ids).logits
    return float((a.float() - b.float()).abs().max())


def main(model_dir: str, out: str) -> None:
    dist.init("gloo")
    eng = EngineConfig(zero_stage=3, dtype="fp32", stage3_param_persistence_threshold=0)
    m = ModelConfig()
    dirs = variants(model_dir, out)
    with zero3_init(eng, m):
        lm = load_causal_lm(model_dir, m, dtype="fp32", trainable=False)
    params = list(lm.parameters())
    held = sum(p.ds_tensor.numel() for p in params if hasattr(p, "ds_tensor"))
    total = sum(p.ds_numel for p in params if hasattr(p, "ds_numel"))
    res = {"all_partitioned": all(hasattr(p, "ds_id") and p.numel() == 0 for p in params),
           "held": held, "total": total}
    plain = load_causal_lm(model_dir, m, dtype="fp32", trainable=False)
    res["max_logit_diff"] = logit_diff(build_eval_engine(lm, eng), plain, plain.config.vocab_size)
    for name, d in dirs.items():  # bf16 shards read into fp32 partitions; one tensor for two names
        with zero3_init(eng, m):
            lm = load_causal_lm(d, m, dtype="fp32", trainable=False)
        plain = load_causal_lm(d, m, dtype="fp32", trainable=False)
        res[f"{name}_eos"] = [lm.generation_config.eos_token_id, plain.generation_config.eos_token_id]
        res[f"{name}_logit_diff"] = logit_diff(build_eval_engine(lm, eng), plain, plain.config.vocab_size)
    # a reward model from a causal-LM folder: the body read, the score head (absent) initialised
    with zero3_init(eng, m):
        rm = load_reward_model(model_dir, m, pad_token_id=0, dtype="fp32")
    rm_engine = build_eval_engine(rm, eng)
    ids = torch.arange(3, 11).view(1, 8)
    with torch.no_grad():
        scored = rm_engine(input_ids=ids, output_hidden_states=True)
        body = plain_lm(model_dir, m)(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        res["rm_body_diff"] = float((scored.hidden_states[-1] - body).abs().max())
    res["rm_score_shape"] = list(scored.logits.shape)
    with deepspeed.zero.GatheredParameters([rm.score.weight]):
        res["rm_score_std"] = float(rm.score.weight.std())
        res["rm_score_sum"] = float(rm.score.weight.sum())  # the same on every rank
    # bf16 actor at ZeRO-3 with LoRA and a value head: parts added after zero3_init are cast to the
    # engine's dtype (deepspeed.initialize casts nothing on a ZeRO-3 model), so a forward runs
    eng16 = EngineConfig(zero_stage=3, dtype="bf16", stage3_param_persistence_threshold=0)
    with zero3_init(eng16, m):
        actor = ActorWithValueHead(load_causal_lm(model_dir, m, dtype="bf16",
                                                  lora=LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0)))
    engine = build_train_engine(actor, eng16, OptimConfig(), total_steps=1, grad_accum=1)
    ids = torch.arange(3, 19).view(2, 8)
    logits, values = engine(ids, torch.ones_like(ids))
    res["bf16_actor"] = [str(logits.dtype), list(values.shape)]
    res["filled"] = FILLED
    with open(os.path.join(out, f"rank{dist.rank()}.json"), "w") as f:
        json.dump(res, f)
    dist.destroy()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
