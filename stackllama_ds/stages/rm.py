"""Reward model: pairwise ranking loss on (chosen, rejected) answers (StackLLaMA step 2).

    stackllama-ds rm configs/tiny.yaml                       # spawns launch.nproc_per_node ranks
    torchrun --nproc_per_node 2 -m stackllama_ds.cli rm configs/tiny.yaml

One loop: micro batches of pairs ``[chosen..., rejected...]`` -> ONE engine forward (``rm.packed``:
one padding-free row, each question once, data/packed_pairs.py) -> scores ``r_j, r_k`` ->
``-logsigmoid(r_j - r_k - margin)`` -> engine.backward -> engine.step; held-out
accuracy every N steps and at the end, checkpoint every M steps and on SIGTERM/SIGUSR1 (then exit
75); export a HF sequence-classification folder and ``rm/accuracy.json`` at the end.
With ``rm.length_head`` (ODIN, https://arxiv.org/abs/2402.07319) the score has two heads, quality
and length: the ranking loss is taken on their sum, plus ``rl.odin_penalty``; PPO reads quality only.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from stackllama_ds import rl
from stackllama_ds.config import RMConfig, RunConfig, resolve_grad_accum
from stackllama_ds.data.eval_inputs import load_rm_pairs
from stackllama_ds.data.fit import FitPair, FitPairs, fit_pairs, fit_summary
from stackllama_ds.data.packed_pairs import PackedRow, pack_pairs
from stackllama_ds.data.pair_batches import eval_pair_batches, pair_batches
from stackllama_ds.data.prepare import load_prepared
from stackllama_ds.engines import dist
from stackllama_ds.engines.build import build_train_engine
from stackllama_ds.engines.load import trainable_dtype, zero3_init
from stackllama_ds.evaluation.summary import head_figures, summarize_rm
from stackllama_ds.fsutil import write_atomic
from stackllama_ds.models.forward import is_partitioned
from stackllama_ds.models.load import load_reward_model, load_tokenizer, score_weight
from stackllama_ds.models.packed import packed_head_scores
from stackllama_ds.models.scoring import right_padded_scores
from stackllama_ds.run import testhooks
from stackllama_ds.run.entry import check_finite
from stackllama_ds.run.errors import TrainingError
from stackllama_ds.run.heartbeat import each
from stackllama_ds.run.layout import RunLayout
from stackllama_ds.run.stage import StageRun, checkpoint_meta

ACCURACY = "accuracy.json"
EVAL_PAIRS = "eval_pairs.jsonl"  # the final held-out evaluation, pair by pair (eval writes rm_pairs.jsonl alike)
JUDGE_SPLIT = "sft"  # the judge's pairs: disjoint from rm_train and from every held-out split


class PairStats(NamedTuple):
    """Per-pair figures of a batch, detached; all (B,) float32."""

    losses: torch.Tensor  # -logsigmoid(r_j - r_k - margin)
    correct: torch.Tensor  # 1.0 where r_j > r_k, 0.5 on a tie (as eval's win rates count it)
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
    return losses.mean(), PairStats(losses.detach(), (d > 0).float() + 0.5 * (d == 0).float(), d)


Batch = dict[str, torch.Tensor] | PackedRow  # padded rows (collate_pairs) or one packed row (pack_pairs)


def answer_lengths(batch: Batch) -> torch.Tensor:
    """(2B,) answer tokens of ``[chosen..., rejected...]``."""
    return batch.answer_lengths if isinstance(batch, PackedRow) else batch["answer_lengths"]


def head_scores(engine, batch: Batch) -> torch.Tensor:
    """Every head's score (2B, K) of the micro batch's ``[chosen..., rejected...]`` answers: from one
    forward over the packed row, or over the (2B, T) padded batch; K = 1, or 2 with a length head
    (column 0 quality, 1 length)."""
    if isinstance(batch, PackedRow):  # (1, L): each question once, no padding, the same scores
        return packed_head_scores(engine, batch, engine.device)  # (2B, K)
    # Right padding under a causal mask: no real token can see a pad, so the padding mask is
    # redundant; without it SDPA takes its fused causal kernel instead of the masked math path
    # on CPU (same scores, see tests/stages/test_rm.py). HF reads the score at the last non-pad id.
    # Rows run in up to two length groups, each cut to its own longest: fewer padded tokens
    # on StackLLaMA-like pairs (ZeRO-3: always two, so every rank runs the same forwards).
    # use_cache=False: else every layer copies its keys and values into a cache nobody reads.
    return right_padded_scores(lambda x: engine(input_ids=x, use_cache=False).logits,
                               batch["input_ids"].to(engine.device), batch["attention_mask"].sum(1),
                               groups=2 if is_partitioned(engine) else None)  # (2B, K)


def scores(engine, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_j, r_k), each (B,): the reward the ranking loss is taken on, the sum of the heads (ODIN's
    r_Q + r_L; a one-head model's own score)."""
    r = head_scores(engine, batch).sum(-1)  # (2B,)
    half = r.shape[0] // 2
    return r[:half], r[half:]


def rm_loss(engine, batch: Batch, rc: RMConfig) -> tuple[torch.Tensor, PairStats, dict[str, float]]:
    """One micro batch's loss: the ranking loss on the summed heads, plus ODIN's terms with a length head.

    Returns (loss with grad, per-pair stats, ODIN's terms as floats: ``loss_rank``, ``corr_length``,
    ``corr_quality``, ``ortho``; empty without a length head).
    """
    r = head_scores(engine, batch)  # (2B, K)
    half = r.shape[0] // 2
    total = r.sum(-1)  # (2B,) r_Q + r_L
    loss, st = pairwise_loss(total[:half], total[half:], rc.margin)
    if not rc.length_head:
        return loss, st, {}
    # rho over the micro batch's 2B answers, chosen and rejected alike
    penalty, o = rl.odin_penalty(r[:, 0], r[:, 1], answer_lengths(batch), score_weight(engine.module),
                                 rc.length_corr_weight, rc.quality_corr_weight, rc.ortho_weight)
    terms = {"loss_rank": loss.item(), "corr_length": o.corr_length.item(), "corr_quality": o.corr_quality.item(),
             "ortho": o.ortho.item()}
    return loss + penalty, st, terms


def flat_head_figures(rows: list[tuple[list[float], list[float], float, float]]) -> dict[str, float | int | None]:
    """``summary.head_figures`` of (chosen heads, rejected heads, chosen length, rejected length)
    rows as flat keys: ``<head>_accuracy``, ``<head>_adversarial_accuracy``, ``<head>_length_spearman``
    for quality (and length, sum with a length head), and ``n_adversarial`` once."""
    figs = head_figures(*([r[c] for r in rows] for c in range(4)))
    out = {f"{h}_{k}": v for h, f in figs.items() for k, v in f.items() if k != "n_adversarial"}
    return out | ({"n_adversarial": figs["quality"]["n_adversarial"]} if figs else {})


@torch.no_grad()
def evaluate(engine, batches, margin: float, pairs: list[FitPair] | None = None) -> dict:
    """Held-out accuracy, mean margin and loss over all ranks (weight-0 rows are shard padding).

    With ``pairs`` (the held-out pairs ``batches`` were made from by ``eval_pair_batches``), ``rows``
    adds every pair's scores in pair order, as `eval` writes them: index, group, case, chosen and
    rejected (quality head), both lengths, and every head's score."""
    engine.eval()
    sums = {"pairs": 0.0, "correct": 0.0, "margin": 0.0, "loss": 0.0}  # weighted sums
    rows = []  # (chosen heads, rejected heads, chosen length, rejected length) of this rank's real pairs
    for batch, w in each(batches):  # beats per batch: a pass over rm_eval can outlast hang_timeout_s
        r = head_scores(engine, batch).float().cpu()  # (2B, K)
        half = r.shape[0] // 2
        _, st = pairwise_loss(r[:half].sum(1), r[half:].sum(1), margin)
        lengths = answer_lengths(batch).tolist()
        rows += [(r[i].tolist(), r[half + i].tolist(), lengths[i], lengths[half + i]) for i in range(half) if w[i] > 0]
        w = w.to(torch.float64)
        sums["pairs"] += w.sum().item()
        for k, v in (("correct", st.correct), ("margin", st.margins), ("loss", st.losses)):
            sums[k] += (w * v.cpu().double()).sum().item()
    engine.train()
    tot = dist.reduce_sums(sums)
    n = max(tot["pairs"], 1.0)
    parts = dist.all_gather_object(rows)  # Spearman needs every answer
    every = [row for part in parts for row in part]
    out = {"n_pairs": int(tot["pairs"]), "accuracy": tot["correct"] / n, "margin": tot["margin"] / n,
           "loss": tot["loss"] / n, **flat_head_figures(every)}
    if pairs is not None:  # rank r scored pairs r, r + world, ... (eval_pair_batches)
        world = len(parts)
        out["rows"] = sorted(({"index": i, "group": pairs[i].group, "case": pairs[i].case, "chosen": c[0],
                               "rejected": k[0], "len_chosen": lc, "len_rejected": lr, "chosen_heads": c,
                               "rejected_heads": k}
                              for rank, part in enumerate(parts)
                              for i, (c, k, lc, lr) in zip(range(rank, len(pairs), world), part)),
                             key=lambda x: x["index"])
    return out


def init_path(cfg: RunConfig) -> Path:
    """``rm.init_from``, else the SFT stage's exported model; fail naming both when neither exists."""
    if cfg.rm.init_from is not None:
        p = RunLayout(cfg).resolve(cfg.rm.init_from)
        if not (p / "config.json").exists():
            raise FileNotFoundError(f"rm.init_from is not a Hugging Face model folder (no config.json): {p}")
        return p
    p = RunLayout(cfg).sft_model
    if not (p / "config.json").exists():
        raise FileNotFoundError(
            f"rm: no model to start from: rm.init_from is unset and the SFT model {p} does not exist "
            "(run `stackllama-ds sft` first, or set rm.init_from to a Hugging Face folder)"
        )
    return p


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def write_json(path: Path, obj: dict) -> None:
    write_atomic(path, json.dumps(obj, indent=2) + "\n")


def judge_config(cfg: RunConfig) -> RunConfig:
    """The judge's run config: rm's settings from the base model, no length head (``config.JudgeConfig``)."""
    rc, j = cfg.rm, cfg.judge
    rm = rc.model_copy(update={"init_from": str(RunLayout(cfg).base_model()), "length_head": False,
                               "epochs": j.epochs or rc.epochs, "max_steps": j.max_steps or rc.max_steps})
    return cfg.model_copy(update={"rm": rm})


def train_judge(cfg: RunConfig) -> None:
    """``stackllama-ds judge``: the independent judge, on the sft split's pairs, into ``<root>/judge/``."""
    train(judge_config(cfg), stage="judge", split=JUDGE_SPLIT)


def load_pairs(cfg: RunConfig, tok, stage: str, split: str) -> tuple[FitPairs, FitPairs, dict]:
    """Pairs of ``split`` to train on and the held-out pairs eval scores too; questions cut to fit.

    Returns (train pairs, held-out pairs, the counts accuracy.json and the first metrics row report);
    raises TrainingError when no training pair fits."""
    rc = cfg.rm
    data = load_prepared(RunLayout(cfg).data)
    tr = fit_pairs(data[split], tok, rc.max_length, rc.overlength)
    ev = load_rm_pairs(RunLayout(cfg).data, tok, cfg.rm.max_length, cfg.rm.overlength, cfg.eval.n_rm_pairs)  # eval.n_rm_pairs of rm_eval: the pairs `eval` scores too
    if not tr.pairs:
        raise TrainingError(
            f"{stage}: no training pairs ({tr.counts['total']} in {split}, {tr.counts['dropped']} dropped at "
            f"max_length {rc.max_length}, overlength={rc.overlength})"
        )
    counts = {"overlength": rc.overlength, "max_length": rc.max_length, "train_pairs": len(tr.pairs),
              "eval_pairs": len(ev.pairs), "truncation": {"train": tr.counts, "eval": ev.counts["truncation"]}}
    return tr, ev, counts


def accumulate(engine, batches: Iterator[Batch], rc: RMConfig, gas: int, step: int) -> dict[str, float]:
    """One optimizer step of ``gas`` micro batches, each one forward, backward and engine step.

    Returns this rank's sums: micro-batch losses (``loss``), correctly ranked pairs (``correct``) and,
    with a length head, ODIN's terms. ``step``: the 1-based step being trained (for test faults)."""
    sums = {"loss": 0.0, "correct": 0.0}
    for _ in range(gas):
        loss, st, terms = rm_loss(engine, next(batches), rc)
        loss = testhooks.fault_value("loss", step, loss)
        engine.backward(loss)
        engine.step()
        sums["loss"] += loss.item()
        sums["correct"] += st.correct.sum().item()
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v
    return sums


def build_engine(cfg: RunConfig, init: Path, tok, max_steps: int, gas: int):
    """The reward model from ``init`` (fresh score head: two with ``rm.length_head``) in its training engine."""
    rc = cfg.rm
    # setup() seeded every rank alike: the fresh score head (and LoRA) start identical everywhere.
    with zero3_init(rc.engine, cfg.model):  # ZeRO-3: each rank only ever holds its partition
        model = load_reward_model(init, cfg.model, pad_token_id=tok.pad_token_id, dtype=trainable_dtype(rc.engine),
                                  lora=rc.lora, num_labels=2 if rc.length_head else 1)
    return build_train_engine(model, rc.engine, rc.optim, total_steps=max_steps, grad_accum=gas)


def row_extras(sums: dict[str, float], tot: dict[str, float], n_micro: int, step: int, counts: dict) -> dict:
    """A step row's figures beside loss and accuracy: ODIN's terms as means over the ``n_micro`` micro
    batches of all ranks, and on step 1 the data counts as flat keys (``train_whole``, ``eval_dropped``...)."""
    out = {k: tot[k] / n_micro for k in sums if k not in ("loss", "correct")}  # ODIN's terms
    if step == 1:
        out.update({k: v for k, v in counts.items() if k != "truncation"})
        out.update({f"{s}_{c}": n for s, d in counts["truncation"].items() for c, n in d.items()})
    return out


def held_out_file(run: StageRun, rows: list[dict] | None, cfg: RunConfig) -> dict:
    """Rank 0 writes the final evaluation's pairs (EVAL_PAIRS); returns accuracy.json's ``held_out``
    summary of them (empty on other ranks and without held-out pairs)."""
    if rows is None or run.rank != 0:
        return {}
    write_jsonl(run.dir / EVAL_PAIRS, rows)
    return {"dtype": cfg.rm.engine.dtype, "pairs_file": EVAL_PAIRS,
            **summarize_rm(rows, cfg.eval.bootstrap_samples, cfg.seed)}


def train(cfg: RunConfig, stage: str = "rm", split: str = "rm_train") -> None:
    rc = cfg.rm
    init = init_path(cfg)
    run = StageRun(cfg, stage)
    tok = load_tokenizer(init, padding_side="right")

    tr, ev, counts = load_pairs(cfg, tok, stage, split)
    gas = resolve_grad_accum(rc.engine, rc.global_batch_size, run.world)
    mb = rc.engine.micro_batch_size
    per_step = mb * gas * run.world  # pairs per optimizer step, all ranks
    max_steps = rc.max_steps or max(1, int(rc.epochs * len(tr.pairs) / per_step))

    engine = build_engine(cfg, init, tok, max_steps, gas)
    state = run.resume({"model": engine}, checkpoint_meta("reward", init, cfg, rc.lora, rc.engine.dtype))
    log = run.logger(max_steps, bar_keys=("loss", "accuracy", "pairs_per_s"), log_every=rc.log_every)
    run.text(f"{stage}: init {init}; {len(tr.pairs)} {split} pairs ({fit_summary(tr.counts)}), {len(ev.pairs)} eval "
             f"pairs ({fit_summary(ev.counts['truncation'])}) at max_length {rc.max_length}, overlength={rc.overlength}; "
             f"world {run.world}, micro {mb} pairs x accum {gas} ({'one packed row' if rc.packed else 'padded rows'}), "
             f"{max_steps} steps")
    collate = pack_pairs if rc.packed else None  # None: right-padded rows
    batches = pair_batches(tr.pairs, tok.pad_token_id, mb, run.rank, run.world, cfg.seed, start=state.samples,
                           collate=collate)
    evals = eval_pair_batches(ev.pairs, tok.pad_token_id, mb, run.rank, run.world, collate=collate)

    last_eval: dict | None = None
    final_rows: list[dict] | None = None
    t_start = time.time() - state.elapsed_s
    while state.step < max_steps:
        # step 1. gas micro batches -> one forward each over [chosen..., rejected...] -> backward
        t0 = time.time()
        run.beat("training")
        lr = engine.get_lr()[0]  # the rate this step trains with
        sums = accumulate(engine, batches, rc, gas, state.step + 1)
        state.step += 1
        state.samples += per_step

        # step 2. statistics over all ranks (every micro batch holds mb pairs: plain means are exact)
        tot = dist.reduce_sums(sums)
        loss_v = tot["loss"] / (gas * run.world)
        check_finite(state.step, loss=loss_v)
        gn = engine.get_global_grad_norm()
        row = {"step": state.step, "loss": loss_v, "accuracy": tot["correct"] / per_step, "lr": lr,
               "grad_norm": float(gn) if gn is not None else None, "pairs": state.samples,
               "pairs_per_s": per_step / (time.time() - t0), "elapsed_s": time.time() - t_start}
        row.update(row_extras(sums, tot, gas * run.world, state.step, counts))

        # step 3. held-out accuracy, margin and loss (every rank runs the same number of forwards)
        if evals and (state.step % rc.eval_every == 0 or state.step == max_steps):
            run.beat("evaluation", state.step)
            final = state.step == max_steps  # the last one keeps every pair's scores
            last_eval = {**evaluate(engine, evals, rc.margin, ev.pairs if final else None), "step": state.step}
            final_rows = last_eval.pop("rows", None)
            row.update({f"eval_{k}": v for k, v in last_eval.items() if k not in ("n_pairs", "step")})
        state.elapsed_s = time.time() - t_start
        log.log(row)

        # step 4. checkpoint every save_every, at the end, and on a stop signal (then exit 75)
        run.end_step(save=state.step % rc.save_every == 0 or state.step == max_steps)

    # step 5. final held-out figures with every pair's scores (again if a resume found the loop finished)
    if evals and final_rows is None:
        run.beat("final evaluation", state.step)
        last_eval = {**evaluate(engine, evals, rc.margin, ev.pairs), "step": state.step}
        final_rows = last_eval.pop("rows")
    held_out = held_out_file(run, final_rows, cfg)
    if last_eval is None:
        last_eval = {"n_pairs": 0, "accuracy": None, "margin": None, "loss": None, "step": state.step}
        run.text(f"{stage}: rm_eval has no pairs; accuracy.json holds no held-out figures")
    run.text(f"{stage}: held-out accuracy {last_eval['accuracy']}, margin {last_eval['margin']} "
             f"on {last_eval['n_pairs']} pairs")

    # step 6. export the final checkpoint (LoRA merged, the trained score head kept), then DONE
    if run.rank == 0:
        write_json(run.dir / ACCURACY, {**last_eval, **counts, "held_out": held_out})
    del engine  # the export reads the checkpoint: free the engine's memory for it
    run.finish(cfg.stage_dir(stage) / "model")
