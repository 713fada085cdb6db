"""Train several engines in one 2-rank process group on the same model and batches; losses as JSON.

    torchrun --nproc_per_node 2 tests/stages/_zero_compare.py --root RUN_ROOT --out losses.json

Used by test_sft.py. Each case builds its engine from the same tiny model (load_causal_lm +
build_train_engine, as the SFT stage does), trains ``--steps`` steps on the same packed batches
(rank r gets the same batches in every case) and records the rank-mean loss of each step. The
4-bit cases run an eval-mode no-grad forward after each step, as the SFT loop's evaluation does:
that forward is what used to corrupt 4-bit weights under ZeRO-3 on CPU. ``after`` is the loss of
the first batch once more after training (shows that the steps changed the model). With
``--ckpt DIR`` the unquantised engines are saved to ``DIR/<case>`` (DeepSpeed checkpoints, tag "ds").
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
from stackllama_ds.models.load import load_causal_lm, load_tokenizer

# name -> (zero stage, quantization, lora, dtype)
CASES = {
    "z0": (0, "none", False, "fp32"),
    "z2": (2, "none", False, "fp32"),
    "z3": (3, "none", False, "fp32"),
    "q8_z2": (2, "8bit", True, "fp32"),
    "q8_z3": (3, "8bit", True, "fp32"),
    "q4_z2": (2, "4bit", True, "fp32"),
    "q4_z3": (3, "4bit", True, "fp32"),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--ckpt", default=None, help="save the unquantised engines here after training")
    args = ap.parse_args()
    dist.init("gloo", 120)
    torch.set_num_threads(1)
    rank, world = dist.rank(), dist.world_size()
    base = Path(args.root) / "tiny"
    tok = load_tokenizer(base)
    texts = sft_texts(load_prepared(Path(args.root) / "data")["sft"])
    it = packed_batches(texts, tok, 64, 2, rank, world, seed=0)
    batches = [next(it) for _ in range(args.steps)]
    out: dict[str, dict] = {}
    for name in args.cases.split(","):
        stage, quant, lora, dtype = CASES[name]
        torch.manual_seed(0)
        model = load_causal_lm(
            base, ModelConfig(quantization=quant), dtype=dtype, lora=LoraConfig(enabled=lora, dropout=0.0)
        )
        eng = EngineConfig(
            zero_stage=stage, dtype=dtype, micro_batch_size=2, stage3_param_persistence_threshold=0
        )
        optim = OptimConfig(lr=2e-3, warmup_steps=0, scheduler="constant")
        engine = build_train_engine(model, eng, optim, total_steps=args.steps, grad_accum=1)
        # ZeRO-3 must really partition: outside a forward every parameter is an empty placeholder.
        partitioned = all(p.numel() == 0 for p in engine.module.parameters())
        losses = []
        for b in batches:
            res = engine(**b)
            engine.backward(res.loss)
            engine.step()
            losses.append(dist.all_reduce_sum(res.loss.detach().float().reshape(1)).item() / world)
            if quant == "4bit":
                engine.eval()
                with torch.no_grad():
                    engine(**b)
                engine.train()
        # The first batch again, after training: lower than its first loss when the steps trained.
        engine.eval()
        with torch.no_grad():
            after = engine(**batches[0]).loss.detach().float().reshape(1)
        if args.ckpt and quant == "none":
            engine.save_checkpoint(str(Path(args.ckpt) / name), tag="ds")  # collective
        out[name] = {
            "losses": losses,
            "after": dist.all_reduce_sum(after).item() / world,
            "partitioned": partitioned,
        }
        del engine, model
        gc.collect()
    if rank == 0:
        Path(args.out).write_text(json.dumps(out, indent=1))
    dist.barrier()
    dist.destroy()


if __name__ == "__main__":
    main()
