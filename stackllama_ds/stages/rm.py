"""Reward model: pairwise ranking loss on (chosen, rejected) answers (StackLLaMA step 2).

    stackllama-ds rm configs/tiny.yaml                       # spawns launch.nproc_per_node ranks
    torchrun --nproc_per_node 2 -m stackllama_ds.cli rm configs/tiny.yaml

One loop: micro batches of pairs ``[chosen..., rejected...]`` -> ONE engine forward -> scores
``r_j, r_k`` -> ``-logsigmoid(r_j - r_k - margin)`` -> engine.backward -> engine.step; held-out
accuracy every N steps and at the end, checkpoint every M steps and on SIGTERM/SIGUSR1 (then exit
75); export a HF sequence-classification folder and ``rm/accuracy.json`` at the end.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from stackllama_ds import runtime, testhooks
from stackllama_ds.config import RunConfig, resolve_grad_accum, resolve_path
from stackllama_ds.data.pairs_batch import eval_pair_batches, pair_batches, tokenize_pairs
from stackllama_ds.data.prepare import load_prepared
from stackllama_ds.engines import dist
from stackllama_ds.engines.build import build_train_engine
from stackllama_ds.heartbeat import phase
from stackllama_ds.lifecycle import StageRun, checkpoint_meta
from stackllama_ds.models.forward import is_partitioned
from stackllama_ds.models.load import load_reward_model, load_tokenizer, trainable_dtype, zero3_init
from stackllama_ds.models.scoring import right_padded_scores

ACCURACY = "accuracy.json"


class PairStats(NamedTuple):
    """Per-pair figures of a batch, detached; all (B,) float32."""

    losses: torch.Tensor  # -logsigmoid(r_j - r_k - margin)
    correct: torch.Tensor  # 1.0 where r_j > r_k
    margins: torch.Tensor  # r_j - r_k


def pairwise_loss(
    r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: float = 0.0
) -> tuple[torch.Tensor, PairStats]:
    """Bradley-Terry ranking loss of a reward model, averaged over pairs.

        loss = mean_i -log sigmoid(r_j[i] - r_k[i] - margin)

    r_chosen, r_rejected: (B,) scores of the preferred and the other answer. ``margin`` > 0 asks
    the preferred score to win by at least that much (Llama 2's margin loss; 0 is InstructGPT's).
    Returns the scalar loss (differentiable) and detached per-pair stats.
    See InstructGPT, https://arxiv.org/abs/2203.02155 (eq. 1).
    """
    diff = r_chosen.float() - r_rejected.float()  # (B,)
    losses = -F.logsigmoid(diff - margin)  # -log sigmoid(r_j - r_k - margin)
    d = diff.detach()
    return losses.mean(), PairStats(losses.detach(), (d > 0).float(), d)


def scores(engine, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_j, r_k), each (B,), from one forward over the (2B, T) batch ``[chosen..., rejected...]``."""
    # Right padding under a causal mask: no real token can see a pad, so the padding mask is
    # redundant; without it SDPA takes its fused causal kernel instead of the masked math path
    # on CPU (same scores, see tests/stages/test_rm.py). HF reads the score at the last non-pad id.
    # Rows run in up to two length groups, each cut to its own longest: ~20% fewer padded tokens
    # on StackLLaMA-like pairs (ZeRO-3: always two, so every rank runs the same forwards).
    # use_cache=False: else every layer copies its keys and values into a cache nobody reads.
    r = right_padded_scores(lambda x: engine(input_ids=x, use_cache=False).logits.squeeze(-1),
                            batch["input_ids"].to(engine.device), batch["attention_mask"].sum(1),
                            groups=2 if is_partitioned(engine) else None)  # (2B,)
    half = r.shape[0] // 2
    return r[:half], r[half:]


@torch.no_grad()
def evaluate(engine, batches, margin: float) -> dict[str, float]:
    """Held-out accuracy, mean margin and loss over all ranks (weight-0 rows are shard padding)."""
    engine.eval()
    sums = {"pairs": 0.0, "correct": 0.0, "margin": 0.0, "loss": 0.0}  # weighted sums
    for batch, w in batches:
        _, st = pairwise_loss(*scores(engine, batch), margin)
        w = w.to(torch.float64)
        sums["pairs"] += w.sum().item()
        for k, v in (("correct", st.correct), ("margin", st.margins), ("loss", st.losses)):
            sums[k] += (w * v.cpu().double()).sum().item()
    engine.train()
    tot = dist.reduce_sums(sums)
    n = max(tot["pairs"], 1.0)
    return {"n_pairs": int(tot["pairs"]), "accuracy": tot["correct"] / n, "margin": tot["margin"] / n,
            "loss": tot["loss"] / n}


def init_path(cfg: RunConfig) -> Path:
    """``rm.init_from``, else the SFT stage's exported model; fail naming both when neither exists."""
    if cfg.rm.init_from is not None:
        base = Path(cfg.config_path).parent if cfg.config_path else Path.cwd()
        p = resolve_path(cfg.rm.init_from, base)
        if not (p / "config.json").exists():
            raise FileNotFoundError(f"rm.init_from is not a Hugging Face model folder (no config.json): {p}")
        return p
    p = runtime.sft_model_path(cfg)
    if not (p / "config.json").exists():
        raise FileNotFoundError(
            f"rm: no model to start from: rm.init_from is unset and the SFT model {p} does not exist "
            "(run `stackllama-ds sft` first, or set rm.init_from to a Hugging Face folder)"
        )
    return p


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def train(cfg: RunConfig) -> None:
    rc = cfg.rm
    init = init_path(cfg)
    run = StageRun(cfg, "rm")
    tok = load_tokenizer(init, padding_side="right")

    # Data: pairs of rm_train to train on, rm_eval's held out; max_length policy applied (and counted).
    data = load_prepared(runtime.data_dir(cfg))
    tr = tokenize_pairs(data["rm_train"], tok, rc.max_length, rc.overlength)
    ev = tokenize_pairs(data["rm_eval"], tok, rc.max_length, rc.overlength)
    if not tr.pairs:
        raise runtime.TrainingError(
            f"rm: no training pairs ({tr.total} in rm_train, {tr.overlength} over max_length {rc.max_length}, "
            f"overlength={rc.overlength})"
        )
    over = "filtered" if rc.overlength == "filter" else "truncated"
    counts = {"overlength": rc.overlength, "max_length": rc.max_length, "train_pairs": len(tr.pairs),
              f"train_{over}": tr.overlength, "eval_pairs": len(ev.pairs), f"eval_{over}": ev.overlength}
    gas = resolve_grad_accum(rc.engine, rc.global_batch_size, run.world)
    mb = rc.engine.micro_batch_size
    per_step = mb * gas * run.world  # pairs per optimizer step, all ranks
    max_steps = rc.max_steps or max(1, int(rc.epochs * len(tr.pairs) / per_step))

    # setup() seeded every rank alike: the fresh score head (and LoRA) start identical everywhere.
    with zero3_init(rc.engine, cfg.model):  # ZeRO-3: each rank only ever holds its partition
        model = load_reward_model(init, cfg.model, pad_token_id=tok.pad_token_id, dtype=trainable_dtype(rc.engine),
                                  lora=rc.lora)
    engine = build_train_engine(model, rc.engine, rc.optim, total_steps=max_steps, grad_accum=gas)
    state = run.resume({"model": engine}, checkpoint_meta("reward", init, cfg, rc.lora, rc.engine.dtype))
    log = run.logger(max_steps, bar_keys=("loss", "accuracy", "pairs_per_s"), log_every=rc.log_every)
    run.text(f"rm: init {init}; {len(tr.pairs)} train pairs ({tr.overlength} of {tr.total} over max_length "
             f"{rc.max_length}, {over}), {len(ev.pairs)} eval pairs ({ev.overlength} of {ev.total} {over}); "
             f"world {run.world}, micro {mb} pairs x accum {gas}, {max_steps} steps")
    batches = pair_batches(tr.pairs, tok.pad_token_id, mb, run.rank, run.world, cfg.seed, start=state.samples)
    evals = eval_pair_batches(ev.pairs, tok.pad_token_id, mb, run.rank, run.world)

    last_eval: dict | None = None
    t_start = time.time() - state.elapsed_s
    while state.step < max_steps:
        # step 1. gas micro batches -> one forward each over [chosen..., rejected...] -> backward
        t0 = time.time()
        run.beat("training")
        lr = engine.get_lr()[0]  # the rate this step trains with
        sums = {"loss": 0.0, "correct": 0.0}  # sum of micro-batch losses, correctly ranked pairs
        for _ in range(gas):
            loss, st = pairwise_loss(*scores(engine, next(batches)), rc.margin)
            loss = testhooks.fault_value("loss", state.step + 1, loss)
            engine.backward(loss)
            engine.step()
            sums["loss"] += loss.item()
            sums["correct"] += st.correct.sum().item()
        state.step += 1
        state.samples += per_step

        # step 2. statistics over all ranks (every micro batch holds mb pairs: plain means are exact)
        tot = dist.reduce_sums(sums)
        loss_v = tot["loss"] / (gas * run.world)
        runtime.check_finite(state.step, loss=loss_v)
        gn = engine.get_global_grad_norm()
        row = {"step": state.step, "loss": loss_v, "accuracy": tot["correct"] / per_step, "lr": lr,
               "grad_norm": float(gn) if gn is not None else None, "pairs": state.samples,
               "pairs_per_s": per_step / (time.time() - t0), "elapsed_s": time.time() - t_start}
        if state.step == 1:
            row.update(counts)

        # step 3. held-out accuracy, margin and loss (every rank runs the same number of forwards)
        if evals and (state.step % rc.eval_every == 0 or state.step == max_steps):
            run.beat("evaluation", state.step)
            last_eval = {**evaluate(engine, evals, rc.margin), "step": state.step}
            row.update({f"eval_{k}": last_eval[k] for k in ("accuracy", "margin", "loss")})
        state.elapsed_s = time.time() - t_start
        log.log(row)

        # step 4. checkpoint every save_every, at the end, and on a stop signal (then exit 75)
        run.end_step(save=state.step % rc.save_every == 0 or state.step == max_steps)

    # step 5. final held-out figures (again if a resume found the loop already finished)
    if evals and (last_eval is None or last_eval["step"] != state.step):
        with phase("final evaluation", state.step):  # every rank; one pass over rm_eval can outlast hang_timeout_s
            last_eval = {**evaluate(engine, evals, rc.margin), "step": state.step}
    if last_eval is None:
        last_eval = {"n_pairs": 0, "accuracy": None, "margin": None, "loss": None, "step": state.step}
        run.text("rm: rm_eval has no pairs; accuracy.json holds no held-out figures")
    run.text(f"rm: held-out accuracy {last_eval['accuracy']}, margin {last_eval['margin']} "
             f"on {last_eval['n_pairs']} pairs")

    # step 6. export the final checkpoint (LoRA merged, the trained score head kept), then DONE
    if run.rank == 0:
        write_json(run.dir / ACCURACY, {**last_eval, **counts})
    del model, engine  # the export reads the checkpoint: free the engine's memory for it
    run.finish(runtime.rm_model_path(cfg))
