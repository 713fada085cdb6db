"""Evaluation: base vs SFT vs PPO on held-out data, scored by the reward model, with length controls.

    stackllama-ds eval configs/tiny.yaml
    torchrun --nproc_per_node 2 -m stackllama_ds.cli eval configs/tiny.yaml

Models: ``<root>/sft/model`` and ``<root>/ppo/model``, whichever exist (at least one), and the
pretrained base (``RunLayout.base_model``) whenever its folder exists. Three questions:
  1. Did SFT learn? Loss (nats/token) and perplexity of every model on the same tokens: the answer
     tokens of held-out (question, preferred answer) texts (``rl_eval`` then ``rm_eval``, one text
     per question, ``eval.n_lm_texts`` of them, cut to ``sft.seq_length`` tokens).
  2. Did the reward model learn more than length? Accuracy on ``eval.n_rm_pairs`` held-out
     ``rm_eval`` pairs (``rm.max_length`` / ``rm.overlength`` as in the RM stage), beside the
     length-only baseline and the accuracy on the pairs whose preferred answer is the shorter one.
  3. Did PPO improve on SFT beyond length? Win rates on ``eval.n_prompts`` distinct ``rl_eval``
     questions (prompts over ``ppo.max_prompt_length`` tokens left out), also on the prompts whose
     two responses have similar lengths, the rank correlation of reward with length, KL(ppo || sft).
Each model samples one response per prompt (plain sampling, ``eval.max_new_tokens`` tokens, cut at
the first EOS); the reward model scores every response. Everything but sampling is forward passes.

Determinism: prompts, texts and pairs form batches of ``eval.batch_size`` in order; batch j runs on
rank j % world, sampling after ``torch.manual_seed(seed * 1_000_003 + j)``, the same seed for every
model (common random numbers), so nothing depends on the number of ranks. Ranks gather their
records with ``dist.all_gather_object``; rank 0 sorts them and bootstraps with
``numpy.random.default_rng(seed)``. Models are plain HF models (no DeepSpeed engine), fp32 on CPU,
``ppo.actor.dtype`` / ``ppo.reward.dtype`` on GPU, loaded one at a time.

Outputs in ``<root>/eval/``: ``report.md`` (tables, the plots, four prompts answered side by side),
the training-curve PNGs of ``stackllama_ds.evaluation.report``, ``eval.json``, whose keys are in full in
``evaluation.summary.EVAL_JSON_KEYS`` (and in README.md), and the records every figure is computed from:
``rm_pairs.jsonl`` (per-pair scores, lengths as scored, question), ``lm_texts.jsonl`` (per-text
NLL) and ``responses.jsonl`` (prompt and response token ids). Intervals resample prompts, texts
and, for the preference pairs, questions (several pairs share one question).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch

from stackllama_ds import rl
from stackllama_ds.config import RunConfig
from stackllama_ds.data.eval_inputs import load_lm_texts, load_rm_pairs
from stackllama_ds.data.prompts import load_prompts
from stackllama_ds.engines import dist
from stackllama_ds.engines.generate import sample
from stackllama_ds.evaluation.report import redraw, render_markdown
from stackllama_ds.evaluation.summary import (
    KL_PAIRS,
    LENGTH_MATCH_TOL,
    MODEL_ORDER,
    summarize,
    summarize_lm,
    summarize_rm,
    win_rates,
)
from stackllama_ds.fsutil import write_atomic
from stackllama_ds.models.forward import fp32_compute, response_logprobs
from stackllama_ds.models.load import load_causal_lm, load_reward_model, load_tokenizer
from stackllama_ds.models.padding import cut_at_eos, pad
from stackllama_ds.models.scoring import pair_head_scores, reward_scores
from stackllama_ds.run.heartbeat import each, phase
from stackllama_ds.run.layout import RunLayout
from stackllama_ds.run.rank0 import on_main_rank
from stackllama_ds.run.stage import StageRun


# ----------------------------------------------------------------------------------- inputs
def candidate_models(cfg: RunConfig) -> dict[str, Path]:
    """{name: HF folder} in MODEL_ORDER: sft and ppo when exported (one at least), base when it exists."""
    found = {n: cfg.stage_dir(n) / "model" for n in ("sft", "ppo")}
    found = {n: p for n, p in found.items() if (p / "config.json").exists()}
    if not found:
        raise FileNotFoundError(f"no model to evaluate: neither {RunLayout(cfg).sft_model} nor "
                                f"{cfg.stage_dir('ppo') / 'model'} exists (run sft first)")
    base = RunLayout(cfg).base_model()
    if (base / "config.json").exists():
        found["base"] = base
    return {n: found[n] for n in MODEL_ORDER if n in found}


# --------------------------------------------------------------------------------- forwards
@torch.no_grad()
def response_logprob(lm, q_ids, q_mask, resp, r_mask) -> torch.Tensor:
    """(B,) sum over response tokens (up to the first EOS) of log p(y_t | prompt, y_<t) under ``lm``."""
    ids, mask = torch.cat([q_ids, resp], 1), torch.cat([q_mask, r_mask], 1)
    with fp32_compute():  # a bf16 model (GPU): the KL's two forwards in fp32 arithmetic, as PPO's rollout
        lp, _ = response_logprobs(lm, ids, mask, q_ids.shape[1])  # (B, T)
    return (lp * r_mask).sum(1).float().cpu()


@torch.no_grad()
def text_nll(lm, texts: list[tuple[list[int], list[int]]], pad_id: int) -> list[float]:
    """Summed NLL (nats) of each text's target tokens under ``lm``: one right-padded forward."""
    ids, mask = (dist.place(t) for t in pad([i for i, _ in texts], pad_id, "right"))  # (B, T)
    target, _ = pad([t for _, t in texts], 0, "right")
    logits = lm(input_ids=ids, attention_mask=mask, use_cache=False).logits  # (B, T, V)
    lp = rl.logprobs_from_logits(logits[:, :-1], ids[:, 1:]).double().cpu()  # (B, T-1): token t+1 | <= t
    return (-(lp * target[:, 1:]).sum(1)).tolist()


@torch.no_grad()
def pair_scores(reward, pairs, pad_id: int) -> tuple[list[list[float]], list[list[float]]]:
    """(r_chosen, r_rejected) raw reward-model scores of pairs, chosen and rejected in one batch:
    every head's, (B, K) as lists; column 0 is the quality head, the reward everything else reads.
    One packed row: each question once, no padding (``models.scoring.pair_head_scores``)."""
    r = pair_head_scores(reward, pairs, pad_id, dist.device())  # (2B, K)
    return r[: len(pairs)].tolist(), r[len(pairs) :].tolist()


def _rel(p: Path, root: Path) -> str:
    """``p`` relative to the run root when it lies under it (as written, symlinks not followed)."""
    p, root = Path(os.path.abspath(p)), Path(os.path.abspath(root))
    return str(p.relative_to(root)) if p.is_relative_to(root) else str(p)


def _batches(n: int, size: int, rank: int, world: int) -> list[tuple[int, list[int]]]:
    """This rank's (batch index j, item indices): batch j of ``size`` items in order goes to rank j % world."""
    return [(j, list(range(s, min(s + size, n)))) for j, s in enumerate(range(0, n, size)) if j % world == rank]


# -------------------------------------------------------------------------------------- run
class Inputs(NamedTuple):
    """What every model is evaluated on, and this rank's share of it (``_batches``)."""

    tok: Any
    questions: list[str]
    prompt_ids: list[list[int]]
    texts: list[tuple[list[int], list[int]]]  # held-out (ids, answer-token mask)
    pairs: list  # data.fit.FitPair
    counts: dict  # the prompts' counts (data.prompts.load_prompts)
    lm_counts: dict
    rm_counts: dict
    mine: list[tuple[int, list[int]]]  # prompt batches
    mine_lm: list[tuple[int, list[int]]]
    mine_rm: list[tuple[int, list[int]]]


def load_inputs(cfg: RunConfig, models: dict[str, Path], rank: int, world: int) -> Inputs:
    e = cfg.eval
    with phase("eval inputs", 0):  # tokenizer load, every rl_eval question tokenized: library calls
        tok = load_tokenizer(models.get("sft", next(iter(models.values()))))
        data = RunLayout(cfg).data
        questions, prompt_ids, counts = load_prompts(data, tok, "rl_eval", cfg.ppo.max_prompt_length,
                                                     limit=e.n_prompts)
        texts, lm_counts = load_lm_texts(data, tok, cfg.sft.seq_length, e.n_lm_texts)
        pairs, rm_counts = load_rm_pairs(data, tok, cfg.rm.max_length, cfg.rm.overlength, e.n_rm_pairs)
    N = len(questions)
    if rank == 0:
        short = f" (only {N} of {e.n_prompts} requested available)" if N < e.n_prompts else ""
        print(f"eval: {N} rl_eval prompts{short}, {len(texts)} held-out texts, {len(pairs)} rm_eval pairs, "
              f"models {', '.join(models)}, {e.max_new_tokens} new tokens, {world} rank(s)", flush=True)
    return Inputs(tok, questions, prompt_ids, texts, pairs, counts, lm_counts, rm_counts,
                  _batches(N, e.batch_size, rank, world), _batches(len(texts), e.batch_size, rank, world),
                  _batches(len(pairs), e.batch_size, rank, world))


def generate(cfg: RunConfig, models: dict[str, Path], inp: Inputs, dtype: str) -> tuple[dict, dict, dict]:
    """Step 1: every model samples its responses, one model at a time; a KL policy goes before its
    reference so the reference scores the policy's samples while it is loaded; every model's loss on
    the held-out texts. Returns (responses, log-probs, LM rows), each this rank's batches only."""
    e, pad_id = cfg.eval, inp.tok.pad_token_id
    order = sorted(models, key=lambda n: (n not in KL_PAIRS, MODEL_ORDER.index(n)))
    prompts = {j: tuple(dist.place(t) for t in pad([inp.prompt_ids[i] for i in b], pad_id, "left"))
               for j, b in inp.mine}
    resp: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    logp: dict[tuple[str, str], dict[int, torch.Tensor]] = {}  # (scorer, sampler) -> batch -> (B,)
    lm_rows = {i: {"index": i, "tokens": sum(inp.texts[i][1]), "nll": {}} for _, b in inp.mine_lm for i in b}
    for name in order:
        with phase(f"eval {name}: load", 0):  # one library call: beats from a thread
            lm = dist.place(load_causal_lm(models[name], cfg.model, dtype=dtype, trainable=False).eval())
        resp[name] = {}
        for j, _ in each(inp.mine, f"eval {name}: sampling"):  # each loop beats per batch
            q_ids, q_mask = prompts[j]
            torch.manual_seed(cfg.seed * 1_000_003 + j)  # per batch, not per rank: world-size independent
            r = sample(lm, q_ids, q_mask, e.max_new_tokens)  # (B, max_new_tokens)
            resp[name][j] = (r, cut_at_eos(r, inp.tok.eos_token_id))
        for pol, ref in KL_PAIRS.items():  # the policy on its own samples, then the reference on them
            if name in (pol, ref) and pol in resp and ref in models:
                logp[(name, pol)] = {j: response_logprob(lm, *prompts[j], *resp[pol][j])
                                     for j, _ in each(inp.mine, f"eval {name}: log-probs of {pol}")}
        for _, b in each(inp.mine_lm, f"eval {name}: LM loss"):
            for i, v in zip(b, text_nll(lm, [inp.texts[i] for i in b], pad_id)):
                lm_rows[i]["nll"][name] = v
        del lm
    return resp, logp, lm_rows


def score_responses(reward, models: dict[str, Path], inp: Inputs, resp: dict, logp: dict) -> tuple[list, list]:
    """Step 2: decode every response and score it with the reward model; the KL draws. Returns
    (records, response token-id rows) of this rank's batches."""
    tok, pad_id, eos = inp.tok, inp.tok.pad_token_id, inp.tok.eos_token_id
    records, resp_rows = [], []
    for j, b in each(inp.mine, "eval reward model: responses"):  # each loop beats per batch
        per = {i: {"index": i, "question": inp.questions[i], "responses": {}, "kl": {}} for i in b}
        ids = {i: {"index": i, "prompt_ids": [int(t) for t in inp.prompt_ids[i]], "token_ids": {}} for i in b}
        for name in models:
            r, m = resp[name][j]
            decoded = tok.batch_decode(r.masked_fill(m == 0, pad_id).cpu(), skip_special_tokens=True)
            scores = reward_scores(reward, tok, [inp.questions[i] for i in b], decoded, dist.device()).tolist()
            has_eos = (r == eos).any(1).tolist()
            for k, i in enumerate(b):
                per[i]["responses"][name] = {"text": decoded[k], "reward": scores[k], "length": int(m[k].sum()),
                                             "eos": bool(has_eos[k]), "degenerate": rl.is_degenerate(decoded[k])}
                ids[i]["token_ids"][name] = r[k, : int(m[k].sum())].tolist()  # up to and including the first EOS
        for pol, ref in KL_PAIRS.items():
            if (pol, pol) in logp and (ref, pol) in logp:
                # sum_t log p_pol(y_t) - log p_ref(y_t) on the policy's own sample: a KL(pol || ref) draw
                diff = (logp[(pol, pol)][j] - logp[(ref, pol)][j]).tolist()
                for k, i in enumerate(b):
                    per[i]["kl"][pol] = diff[k]
        records += per.values()
        resp_rows += ids.values()
    return records, resp_rows


def score_pairs(reward, inp: Inputs) -> list[dict]:
    """Step 2, held-out preference pairs: every head's scores of this rank's pairs."""
    rm_rows = []
    for _, b in each(inp.mine_rm, "eval reward model: pairs"):
        rc, rr = pair_scores(reward, [inp.pairs[i] for i in b], inp.tok.pad_token_id)
        rm_rows += [{"index": i, "group": inp.pairs[i].group, "case": inp.pairs[i].case, "chosen": rc[k][0],
                     "rejected": rr[k][0], "len_chosen": inp.pairs[i].len_chosen,
                     "len_rejected": inp.pairs[i].len_rejected, "chosen_heads": rc[k], "rejected_heads": rr[k]}
                    for k, i in enumerate(b)]
    return rm_rows


def judge_responses(judge, models: dict[str, Path], inp: Inputs, records: list[dict]) -> None:
    """Step 2b: every response scored again by the independent judge, in place (``"judge"``)."""
    by_index = {rec["index"]: rec for rec in records}
    for _, b in each(inp.mine, "eval judge: responses"):
        for name in models:
            texts = [by_index[i]["responses"][name]["text"] for i in b]
            js = reward_scores(judge, inp.tok, [inp.questions[i] for i in b], texts, dist.device()).tolist()
            for k, i in enumerate(b):
                by_index[i]["responses"][name]["judge"] = js[k]


def run(cfg: RunConfig) -> None:
    stage = StageRun(cfg, "eval", checkpoints=False)
    stage.start_heartbeat()  # the loops below beat per batch
    on_gpu = dist.device().type == "cuda"
    models = candidate_models(cfg)
    rm_path = RunLayout(cfg).rm_model
    if not (rm_path / "config.json").exists():
        raise FileNotFoundError(f"reward model not found: {rm_path} (run rm first)")
    inp = load_inputs(cfg, models, stage.rank, stage.world)
    pad_id = inp.tok.pad_token_id

    # step 1. generate, one model at a time, and every model's loss on the held-out texts
    resp, logp, lm_rows = generate(cfg, models, inp, cfg.ppo.actor.dtype if on_gpu else "fp32")

    # step 2. decode and score every response, and the held-out pairs, with the reward model
    with phase("eval reward model: load", 0):  # one library call: beats from a thread
        rm_dtype = cfg.ppo.reward.dtype if on_gpu else "fp32"
        reward = dist.place(load_reward_model(rm_path, cfg.model, pad_token_id=pad_id, dtype=rm_dtype).eval())
    records, resp_rows = score_responses(reward, models, inp, resp, logp)
    rm_rows = score_pairs(reward, inp)
    del reward

    # step 2b. the independent judge (judge.enabled): a reward model trained on pairs disjoint from the RM's
    judge_path = cfg.stage_dir("judge") / "model"
    if (judge_path / "config.json").exists():
        with phase("eval judge: load", 0):
            judge = dist.place(load_reward_model(judge_path, cfg.model, pad_token_id=pad_id, dtype=rm_dtype).eval())
        judge_responses(judge, models, inp, records)
        del judge

    # step 3. gather on every rank, then rank 0 computes the figures and writes the report
    parts = dist.all_gather_object((records, list(lm_rows.values()), rm_rows, resp_rows))
    records, lm_all, rm_all, resp_all = (sorted((r for p in parts for r in p[k]), key=lambda r: r["index"])
                                         for k in range(4))
    inputs = {"split": "rl_eval", **inp.counts, "lm": inp.lm_counts, "rm": {**inp.rm_counts, "dtype": rm_dtype}}
    # Bootstrap intervals and plots: minutes on a large eval, so not in a barrier bounded by the collective timeout.
    on_main_rank("eval report", lambda: write_report(cfg, models, rm_path, inputs, records, lm_all, rm_all,
                                                     resp_all))
    stage.done(f"{len(inp.questions)} prompts, models {','.join(models)}")


def write_report(cfg: RunConfig, models: dict[str, Path], rm_path: Path, inputs: dict, records: list[dict],
                 lm_rows: list[dict], rm_rows: list[dict], resp_rows: list[dict]) -> None:
    """``eval.json``, ``report.md`` and the plots from every rank's records (rank 0); the records
    themselves first (``rm_pairs.jsonl``, ``lm_texts.jsonl``, ``responses.jsonl``), so that every
    figure can be recomputed from the run's own files."""
    e, root, out_dir = cfg.eval, cfg.root(), cfg.stage_dir("eval")
    names, n_boot = list(models), e.bootstrap_samples
    m_stats, wins, kl = summarize(records, names, n_boot, cfg.seed)
    for n in names:
        m_stats[n] = {"path": _rel(models[n], root), **m_stats[n]}
    lm_counts, rm_counts = inputs.pop("lm"), inputs.pop("rm")
    res = {**inputs, "max_prompt_length": cfg.ppo.max_prompt_length,
           "max_new_tokens": e.max_new_tokens, "seed": cfg.seed, "alpha": 0.05,
           "bootstrap_samples": n_boot, "reward_model": _rel(rm_path, root),
           "length_match_tol": LENGTH_MATCH_TOL, "models": m_stats, "win_rates": wins, "kl": kl,
           "lm": {**lm_counts, **summarize_lm(lm_rows, names, n_boot, cfg.seed)},
           "rm": {**rm_counts, **summarize_rm(rm_rows, n_boot, cfg.seed)}, "samples": records}
    if records and "judge" in records[0]["responses"][names[0]]:
        res["judge"] = {"model": _rel(cfg.stage_dir("judge") / "model", root),
                        "win_rates": win_rates(records, names, n_boot, cfg.seed, key="judge")}
    out_dir.mkdir(parents=True, exist_ok=True)
    for fname, rows in (("rm_pairs.jsonl", rm_rows), ("lm_texts.jsonl", lm_rows), ("responses.jsonl", resp_rows)):
        write_atomic(out_dir / fname, "".join(json.dumps(r, allow_nan=False) + "\n" for r in rows))
    write_atomic(out_dir / "eval.json", json.dumps(res, indent=1, allow_nan=False) + "\n")
    plots = redraw(root, out_dir, log=lambda s: print(s, flush=True))
    write_atomic(out_dir / "report.md", render_markdown(res, [p.name for p in plots]))
    print(render_markdown(res, [], n_samples=0).split("## Samples")[0].rstrip(), flush=True)
    print(f"eval: results in {out_dir}/ (report.md, eval.json, {len(plots)} plot(s))", flush=True)
