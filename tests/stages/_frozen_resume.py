"""Save with checkpoint.py, keep training, then resume a fresh engine from the save: same losses.

    torchrun --nproc_per_node 2 tests/stages/_frozen_resume.py --root RUN_ROOT --out result.json

Used by test_frozen_checkpoint.py. Each case builds an engine as the stages do (load_causal_lm,
ActorWithValueHead, build_train_engine) from RUN_ROOT/tiny, trains 2 steps, saves through
``save_checkpoint`` (frozen parameters left out), trains 2 more steps (the reference), then builds
the engine again from a different seed (other adapter/head initialisation), resumes with
``load_checkpoint`` and trains the same 2 steps. Rank 0 reports per case: both loss lists, the
frozen parameter names, the module keys DeepSpeed saved and the checkpoint's size in bytes.
"""

from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path

import torch

from stackllama_ds.config import EngineConfig, LoraConfig, ModelConfig, OptimConfig
from stackllama_ds.data.packing import packed_batches
from stackllama_ds.data.prepare import load_prepared, sft_texts
from stackllama_ds.engines import dist
from stackllama_ds.engines.build import build_train_engine
from stackllama_ds.models.load import ActorWithValueHead, load_causal_lm, load_tokenizer
from stackllama_ds.run.checkpoint import TrainState, frozen_names, load_checkpoint, save_checkpoint

# name -> (zero stage, quantization, lora, wrap in ActorWithValueHead, value head frozen)
CASES = {
    "full_z2": (2, "none", False, False, False),
    "lora_z0": (0, "none", True, False, False),
    "actor_lora_z3": (3, "none", True, True, False),  # PPO's actor with LoRA
    "q8_lora_z2": (2, "8bit", True, False, False),
    # PPO with a separate critic: the actor's value head is frozen and unused (the critic's values
    # replace it); it is not saved, and a rebuild from another seed makes another one.
    "actor_frozen_head_z2": (2, "none", False, True, True),
}


def _build(base: Path, case: tuple, seed: int):
    stage, quant, lora, actor, frozen_head = case
    torch.manual_seed(seed)
    model = load_causal_lm(base, ModelConfig(quantization=quant), dtype="fp32",
                           lora=LoraConfig(enabled=lora, r=4, alpha=8, dropout=0.1))
    if actor:
        model = ActorWithValueHead(model)
        if frozen_head:
            model.v_head.requires_grad_(False)
    # The actor cases also recompute activations (gradient checkpointing through the wrapper).
    eng = EngineConfig(zero_stage=stage, dtype="fp32", micro_batch_size=2, stage3_param_persistence_threshold=0,
                       gradient_checkpointing=actor)
    optim = OptimConfig(lr=5e-3, warmup_steps=0, scheduler="constant")
    return build_train_engine(model, eng, optim, total_steps=8, grad_accum=1)


def _step(engine, b: dict) -> float:
    if isinstance(engine.module, ActorWithValueHead):
        logits, values = engine(b["input_ids"], b["attention_mask"])
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), b["labels"][:, 1:].flatten())
        if engine.module.v_head.weight.requires_grad:
            loss = loss + 0.1 * values.square().mean()
    else:
        loss = engine(**b).loss
    engine.backward(loss)
    engine.step()
    return dist.all_reduce_sum(loss.detach().float().reshape(1)).item() / dist.world_size()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--cases", default=",".join(CASES))
    args = ap.parse_args()
    dist.init("gloo", 120)
    torch.set_num_threads(1)
    rank, world = dist.rank(), dist.world_size()
    root = Path(args.root)
    base = root / "tiny"
    tok = load_tokenizer(base)
    it = packed_batches(sft_texts(load_prepared(root / "data")["sft"]), tok, 64, 2, rank, world, seed=0)
    batches = [next(it) for _ in range(4)]
    out: dict[str, dict] = {}
    for name in args.cases.split(","):
        ckpt_root = Path(args.out).parent / "ckpt" / name
        engine = _build(base, CASES[name], seed=0)
        first = [_step(engine, b) for b in batches[:2]]
        ckpt = save_checkpoint({"model": engine}, ckpt_root, TrainState(step=2), keep_last=1)
        reference = [_step(engine, b) for b in batches[2:]]
        frozen = frozen_names(engine)
        del engine
        gc.collect()

        engine = _build(base, CASES[name], seed=123)
        load_checkpoint({"model": engine}, ckpt)
        resumed = [_step(engine, b) for b in batches[2:]]
        del engine
        gc.collect()
        if rank == 0:
            states = sorted((ckpt / "model" / "ds").glob("*model_states.pt"))
            module = torch.load(states[0], map_location="cpu", weights_only=False)["module"]
            out[name] = {
                "first": first, "reference": reference, "resumed": resumed, "frozen": frozen,
                "saved_keys": sorted(module), "bytes": sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file()),
                "ckpt": str(ckpt),
            }
    if rank == 0:
        Path(args.out).write_text(json.dumps(out, indent=1))
    dist.barrier()
    dist.destroy()


if __name__ == "__main__":
    main()
