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

from stackllama_ds import runtime
from stackllama_ds.checkpoint import StopSignal, save_checkpoint
from stackllama_ds.config import RunConfig, resolve_grad_accum
from stackllama_ds.data.packing import eval_batches, packed_batches, padded_batches
from stackllama_ds.data.prepare import load_prepared, sft_texts
from stackllama_ds.engines import dist
from stackllama_ds.engines.build import build_train_engine
from stackllama_ds.heartbeat import Heartbeat
from stackllama_ds.metrics import MetricsLogger
from stackllama_ds.models.load import load_causal_lm, load_tokenizer


@torch.no_grad()
def evaluate(engine, batches: list[dict[str, torch.Tensor]]) -> tuple[float, float]:
    """Token-weighted held-out loss over all ranks, and its perplexity."""
    engine.eval()
    tot = torch.zeros(2, dtype=torch.float64)
    for b in batches:
        b = {k: v.to(engine.device) for k, v in b.items()}
        out = engine(**b)
        n = (b["labels"][:, 1:] != -100).sum().item()
        tot += torch.tensor([out.loss.float().item() * n, n], dtype=torch.float64)
    engine.train()
    tot = dist.all_reduce_sum(tot)
    loss = (tot[0] / tot[1].clamp(min=1)).item()
    return loss, math.exp(min(loss, 50.0))


def train(cfg: RunConfig) -> None:
    sc = cfg.sft
    stage_dir = cfg.stage_dir("sft")
    # First: a SIGUSR1/SIGTERM during the (slow) setup would otherwise kill the rank outright.
    stop = StopSignal()
    runtime.setup(cfg)
    rank, world = dist.rank(), dist.world_size()
    base = runtime.base_model_path(cfg)
    tok = load_tokenizer(base)

    # Data: SFT texts are the distinct (question, response_j) of the sft split; eval on rm_eval's.
    data = load_prepared(runtime.data_dir(cfg))
    texts, held_out = sft_texts(data["sft"]), sft_texts(data["rm_eval"])
    gas = resolve_grad_accum(sc.engine, sc.global_batch_size, world)
    mb = sc.engine.micro_batch_size
    per_step = mb * gas * world  # sequences per optimizer step, all ranks

    model = load_causal_lm(base, cfg.model, dtype="fp32", lora=sc.lora)
    engine = build_train_engine(model, sc.engine, sc.optim, total_steps=sc.max_steps, grad_accum=gas)
    runtime.seed_ranks(cfg)
    state, _ = runtime.resume({"model": engine}, stage_dir / "checkpoints")
    log = MetricsLogger(stage_dir, "sft", cfg.logging, sc.max_steps, state.step, cfg.output_root, cfg.model_dump())
    if rank == 0:
        log.text(f"sft: {len(texts)} texts, world {world}, micro {mb} x accum {gas}, seq {sc.seq_length}")
    make = packed_batches if sc.packing else padded_batches
    batches = make(texts, tok, sc.seq_length, mb, rank, world, cfg.seed, start=state.samples)
    evals = eval_batches(held_out, tok, sc.seq_length, mb, rank, world, sc.eval_batches)
    if not evals and rank == 0:
        log.text("sft: the rm_eval split holds no texts: no held-out loss will be logged")
    ckpt_root = stage_dir / "checkpoints"
    hb = Heartbeat(stage_dir, rank, world, cfg.launch.hang_timeout_s)

    def checkpoint() -> None:
        client = {
            "kind": "causal_lm",
            "base": str(base),
            "model": cfg.model.model_dump(),
            "lora": sc.lora.model_dump(),
            "dtype": sc.engine.dtype,
        }
        hb.beat("checkpoint save", state.step)
        save_checkpoint({"model": engine}, ckpt_root, state, cfg.checkpoint.keep_last, client)

    t_start = time.time() - state.elapsed_s
    while state.step < sc.max_steps:
        # step 1. gas micro batches -> forward -> backward; engine.step() applies at the boundary
        t0 = time.time()
        hb.beat("training", state.step + 1)
        lr = engine.get_lr()[0]  # the rate this step trains with
        loss_sum = torch.zeros(2, dtype=torch.float64)  # (sum of micro losses, trained tokens)
        for _ in range(gas):
            b = {k: v.to(engine.device) for k, v in next(batches).items()}
            out = engine(**b)
            loss = runtime.fault_value("loss", state.step + 1, out.loss)
            engine.backward(loss)
            engine.step()
            loss_sum += torch.tensor([loss.float().item(), (b["labels"][:, 1:] != -100).sum().item()])
        state.step += 1
        state.samples += per_step

        # step 2. statistics over all ranks
        tot = dist.all_reduce_sum(loss_sum)
        loss = tot[0].item() / (gas * world)
        tokens = int(tot[1].item())
        state.tokens += tokens
        runtime.check_finite(state.step, loss=loss)
        dt = time.time() - t0
        gn = engine.get_global_grad_norm()
        row = {
            "step": state.step,
            "loss": loss,
            "lr": lr,
            "grad_norm": float(gn) if gn is not None else None,
            "tokens": state.tokens,
            "tokens_per_s": tokens / dt,
            "elapsed_s": time.time() - t_start,
        }

        # step 3. held-out loss and perplexity
        if evals and (state.step % sc.eval_every == 0 or state.step == sc.max_steps):
            hb.beat("evaluation", state.step)
            row["eval_loss"], row["eval_ppl"] = evaluate(engine, evals)
        state.elapsed_s = time.time() - t_start
        log.log(row)

        # step 4. checkpoint every save_every, at the end, and on a stop signal
        runtime.step_hook()
        stopping = stop.requested()
        if state.step % sc.save_every == 0 or state.step == sc.max_steps or stopping:
            checkpoint()
        if stopping:
            log.close()
            raise runtime.StopForResume(f"sft checkpointed at step {state.step}")

    # step 5. export the final checkpoint as a HF folder (full weights; LoRA merged, adapter kept)
    log.close()
    runtime.export_and_finish(ckpt_root, runtime.sft_model_path(cfg), stage_dir, state.step)
