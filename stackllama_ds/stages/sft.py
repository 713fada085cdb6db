"""Supervised fine-tuning: causal-LM loss on packed Stack Exchange answers (StackLLaMA step 1).

    stackllama-ds sft configs/tiny.yaml                      # spawns launch.nproc_per_node ranks
    torchrun --nproc_per_node 2 -m stackllama_ds.cli sft configs/tiny.yaml

One loop: packed micro batches -> engine forward -> engine.backward -> engine.step; eval every N
steps, checkpoint every M steps and on SIGTERM/SIGUSR1 (then exit 75); export a HF folder at the end.
"""

from __future__ import annotations

import math
import time

import torch

from stackllama_ds.config import RunConfig, resolve_grad_accum
from stackllama_ds.data.packing import eval_batches, packed_batches, padded_batches
from stackllama_ds.data.prepare import check_prepared
from stackllama_ds.data.tokens import sft_tokens
from stackllama_ds.engines import dist
from stackllama_ds.engines.build import build_train_engine
from stackllama_ds.engines.load import trainable_dtype, zero3_init
from stackllama_ds.models.load import load_causal_lm, load_tokenizer
from stackllama_ds.run import testhooks
from stackllama_ds.run.entry import check_finite
from stackllama_ds.run.heartbeat import each
from stackllama_ds.run.layout import RunLayout
from stackllama_ds.run.rank0 import on_main_rank
from stackllama_ds.run.stage import StageRun, checkpoint_meta


@torch.no_grad()
def evaluate(engine, batches: list[dict[str, torch.Tensor]]) -> tuple[float, float]:
    """Token-weighted held-out loss over all ranks, and its perplexity."""
    engine.eval()
    sums = {"loss": 0.0, "tokens": 0.0}  # token-weighted loss sum, tokens
    for b in each(batches):  # beats per batch: sft.eval_batches can be many
        b = {k: v.to(engine.device) for k, v in b.items()}
        n = (b["labels"][:, 1:] != -100).sum().item()
        sums["loss"] += engine(**b, use_cache=False).loss.float().item() * n
        sums["tokens"] += n
    engine.train()
    tot = dist.reduce_sums(sums)
    loss = tot["loss"] / max(tot["tokens"], 1.0)
    return loss, math.exp(min(loss, 50.0))


def train(cfg: RunConfig) -> None:
    sc = cfg.sft
    run = StageRun(cfg, "sft")
    base = RunLayout(cfg).base_model()
    tok = load_tokenizer(base)

    # Data: SFT texts are the distinct (question, response_j) of the sft split; eval on rm_eval's.
    data = check_prepared(RunLayout(cfg).data)  # fail here, before the model loads
    gas = resolve_grad_accum(sc.engine, sc.global_batch_size, run.world)
    mb = sc.engine.micro_batch_size
    per_step = mb * gas * run.world  # sequences per optimizer step, all ranks

    with zero3_init(sc.engine, cfg.model):  # ZeRO-3: each rank only ever holds its partition
        model = load_causal_lm(base, cfg.model, dtype=trainable_dtype(sc.engine), lora=sc.lora)
    engine = build_train_engine(model, sc.engine, sc.optim, total_steps=sc.max_steps, grad_accum=gas)
    state = run.resume({"model": engine}, checkpoint_meta("causal_lm", base, cfg, sc.lora, sc.engine.dtype))
    log = run.logger(sc.max_steps, log_every=sc.log_every)
    # Tokenized once per (split, tokenizer) by rank 0 into <data>/tokens/ while the others wait (beating),
    # then memory-mapped by every rank: a start or resume re-tokenizes nothing.
    splits = ("sft", "rm_eval")
    on_main_rank("tokenize", lambda: [sft_tokens(data, s, tok, log=run.text) for s in splits])
    texts, held_out = (sft_tokens(data, s, tok, build=False) for s in splits)
    run.text(f"sft: {len(texts)} texts, world {run.world}, micro {mb} x accum {gas}, seq {sc.seq_length}")
    make = packed_batches if sc.packing else padded_batches
    batches = make(texts, tok, sc.seq_length, mb, run.rank, run.world, cfg.seed, start=state.samples)
    evals = eval_batches(held_out, tok, sc.seq_length, mb, run.rank, run.world, sc.eval_batches)
    if not evals:
        run.text("sft: the rm_eval split holds no texts: no held-out loss will be logged")

    t_start = time.time() - state.elapsed_s
    while state.step < sc.max_steps:
        # step 1. gas micro batches -> forward -> backward; engine.step() applies at the boundary
        t0 = time.time()
        run.beat("training")
        lr = engine.get_lr()[0]  # the rate this step trains with
        sums = {"loss": 0.0, "tokens": 0.0}  # sum of micro-batch losses, trained tokens
        for _ in range(gas):
            b = {k: v.to(engine.device) for k, v in next(batches).items()}
            loss = testhooks.fault_value("loss", state.step + 1, engine(**b, use_cache=False).loss)
            engine.backward(loss)
            engine.step()
            sums["loss"] += loss.float().item()
            sums["tokens"] += (b["labels"][:, 1:] != -100).sum().item()
        state.step += 1
        state.samples += per_step

        # step 2. statistics over all ranks
        tot = dist.reduce_sums(sums)
        loss = tot["loss"] / (gas * run.world)
        state.tokens += int(tot["tokens"])
        check_finite(state.step, loss=loss)
        gn = engine.get_global_grad_norm()
        row = {"step": state.step, "loss": loss, "lr": lr, "grad_norm": float(gn) if gn is not None else None,
               "tokens": state.tokens, "tokens_per_s": tot["tokens"] / (time.time() - t0),
               "elapsed_s": time.time() - t_start}

        # step 3. held-out loss and perplexity
        if evals and (state.step % sc.eval_every == 0 or state.step == sc.max_steps):
            run.beat("evaluation", state.step)
            row["eval_loss"], row["eval_ppl"] = evaluate(engine, evals)
        state.elapsed_s = time.time() - t_start
        log.log(row)

        # step 4. checkpoint every save_every, at the end, and on a stop signal (then exit 75)
        run.end_step(save=state.step % sc.save_every == 0 or state.step == sc.max_steps)

    # step 5. export the final checkpoint as a HF folder (full weights; LoRA merged, adapter kept)
    del model, engine  # the export reads the checkpoint: free the engine's memory for it
    run.finish(RunLayout(cfg).sft_model)
