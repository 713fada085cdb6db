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

from stackllama_ds import runtime
from stackllama_ds.checkpoint import StopSignal, save_checkpoint
from stackllama_ds.config import RunConfig, resolve_grad_accum, resolve_path
from stackllama_ds.data.pairs_batch import eval_pair_batches, pair_batches, tokenize_pairs
from stackllama_ds.data.prepare import load_prepared
from stackllama_ds.engines import dist
from stackllama_ds.engines.build import build_train_engine
from stackllama_ds.heartbeat import Heartbeat, phase
from stackllama_ds.metrics import MetricsLogger
from stackllama_ds.models.load import load_reward_model, load_tokenizer
from stackllama_ds.models.rollout import is_partitioned, right_padded_scores

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
    r = right_padded_scores(lambda x: engine(input_ids=x).logits.squeeze(-1), batch["input_ids"].to(engine.device),
                            batch["attention_mask"].sum(1), groups=2 if is_partitioned(engine) else None)  # (2B,)
    half = r.shape[0] // 2
    return r[:half], r[half:]


@torch.no_grad()
def evaluate(engine, batches, margin: float) -> dict[str, float]:
    """Held-out accuracy, mean margin and loss over all ranks (weight-0 rows are shard padding)."""
    engine.eval()
    tot = torch.zeros(4, dtype=torch.float64)  # (pairs, correct, margin sum, loss sum)
    for batch, w in batches:
        _, st = pairwise_loss(*scores(engine, batch), margin)
        w = w.to(torch.float64)
        tot += torch.stack([w.sum(), (w * st.correct.cpu()).sum(), (w * st.margins.cpu()).sum(),
                            (w * st.losses.cpu()).sum()])
    engine.train()
    tot = dist.all_reduce_sum(tot)
    n = max(tot[0].item(), 1.0)
    return {"n_pairs": int(tot[0].item()), "accuracy": tot[1].item() / n, "margin": tot[2].item() / n,
            "loss": tot[3].item() / n}


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
    stage_dir = cfg.stage_dir("rm")
    init = init_path(cfg)
    stop = StopSignal()  # first: a signal during the slow setup must not kill the rank outright
    runtime.setup(cfg)
    rank, world = dist.rank(), dist.world_size()
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
    counts = {
        "overlength": rc.overlength,
        "max_length": rc.max_length,
        "train_pairs": len(tr.pairs),
        f"train_{over}": tr.overlength,
        "eval_pairs": len(ev.pairs),
        f"eval_{over}": ev.overlength,
    }
    gas = resolve_grad_accum(rc.engine, rc.global_batch_size, world)
    mb = rc.engine.micro_batch_size
    per_step = mb * gas * world  # pairs per optimizer step, all ranks
    max_steps = rc.max_steps or max(1, int(rc.epochs * len(tr.pairs) / per_step))

    # setup() seeded every rank alike: the fresh score head (and LoRA) start identical everywhere.
    model = load_reward_model(init, cfg.model, pad_token_id=tok.pad_token_id, dtype="fp32", lora=rc.lora)
    engine = build_train_engine(model, rc.engine, rc.optim, total_steps=max_steps, grad_accum=gas)
    runtime.seed_ranks(cfg)
    ckpt_root = stage_dir / "checkpoints"
    state, _ = runtime.resume({"model": engine}, ckpt_root)
    log = MetricsLogger(stage_dir, "rm", cfg.logging, max_steps, state.step, cfg.output_root, cfg.model_dump(),
                        bar_keys=("loss", "accuracy", "pairs_per_s"))
    if rank == 0:
        log.text(
            f"rm: init {init}; {len(tr.pairs)} train pairs ({tr.overlength} of {tr.total} over max_length "
            f"{rc.max_length}, {over}), {len(ev.pairs)} eval pairs ({ev.overlength} of {ev.total} {over}); "
            f"world {world}, micro {mb} pairs x accum {gas}, {max_steps} steps"
        )
    batches = pair_batches(tr.pairs, tok.pad_token_id, mb, rank, world, cfg.seed, start=state.samples)
    evals = eval_pair_batches(ev.pairs, tok.pad_token_id, mb, rank, world)
    hb = Heartbeat(stage_dir, rank, world, cfg.launch.hang_timeout_s)

    def checkpoint() -> None:
        client = {
            "kind": "reward",
            "base": str(init),
            "model": cfg.model.model_dump(),
            "lora": rc.lora.model_dump(),
            "dtype": rc.engine.dtype,
        }
        hb.beat("checkpoint save", state.step)
        save_checkpoint({"model": engine}, ckpt_root, state, cfg.checkpoint.keep_last, client)

    last_eval: dict | None = None
    first_row = True
    t_start = time.time() - state.elapsed_s
    while state.step < max_steps:
        # step 1. gas micro batches -> one forward each over [chosen..., rejected...] -> backward
        t0 = time.time()
        hb.beat("training", state.step + 1)
        lr = engine.get_lr()[0]  # the rate this step trains with
        sums = torch.zeros(2, dtype=torch.float64)  # (sum of micro losses, correct pairs)
        for _ in range(gas):
            loss, st = pairwise_loss(*scores(engine, next(batches)), rc.margin)
            loss = runtime.fault_value("loss", state.step + 1, loss)
            engine.backward(loss)
            engine.step()
            sums += torch.tensor([loss.item(), st.correct.sum().item()], dtype=torch.float64)
        state.step += 1
        state.samples += per_step

        # step 2. statistics over all ranks (every micro batch holds mb pairs: plain means are exact)
        tot = dist.all_reduce_sum(sums)
        loss_v = tot[0].item() / (gas * world)
        runtime.check_finite(state.step, loss=loss_v)
        dt = time.time() - t0
        gn = engine.get_global_grad_norm()
        row = {
            "step": state.step,
            "loss": loss_v,
            "accuracy": tot[1].item() / per_step,
            "lr": lr,
            "grad_norm": float(gn) if gn is not None else None,
            "pairs": state.samples,
            "pairs_per_s": per_step / dt,
            "elapsed_s": time.time() - t_start,
        }
        if first_row:
            row.update(counts)
            first_row = False

        # step 3. held-out accuracy, margin and loss (every rank runs the same number of forwards)
        if evals and (state.step % rc.eval_every == 0 or state.step == max_steps):
            hb.beat("evaluation", state.step)
            last_eval = {**evaluate(engine, evals, rc.margin), "step": state.step}
            row.update({f"eval_{k}": last_eval[k] for k in ("accuracy", "margin", "loss")})
        state.elapsed_s = time.time() - t_start
        log.log(row)

        # step 4. checkpoint every save_every, at the end, and on a stop signal
        runtime.step_hook()
        stopping = stop.requested()
        if state.step % rc.save_every == 0 or state.step == max_steps or stopping:
            checkpoint()
        if stopping:
            log.close()
            raise runtime.StopForResume(f"rm checkpointed at step {state.step}")
    log.close()

    # step 5. final held-out figures (again if a resume found the loop already finished)
    if evals and (last_eval is None or last_eval["step"] != state.step):
        with phase("final evaluation", state.step):  # every rank; one pass over rm_eval can outlast hang_timeout_s
            last_eval = {**evaluate(engine, evals, rc.margin), "step": state.step}
    if last_eval is None:
        last_eval = {"n_pairs": 0, "accuracy": None, "margin": None, "loss": None, "step": state.step}
        log.text("rm: rm_eval has no pairs; accuracy.json holds no held-out figures")
    if rank == 0:
        log.text(f"rm: held-out accuracy {last_eval['accuracy']}, margin {last_eval['margin']} "
                 f"on {last_eval['n_pairs']} pairs")

    # step 6. export the final checkpoint (LoRA merged, the trained score head kept), then DONE
    if rank == 0:
        write_json(stage_dir / ACCURACY, {**last_eval, **counts})
    runtime.export_and_finish(ckpt_root, runtime.rm_model_path(cfg), stage_dir, state.step)
