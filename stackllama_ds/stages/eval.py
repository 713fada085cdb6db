"""Evaluation: SFT vs PPO (or base) on held-out prompts, scored by the reward model.

    stackllama-ds eval configs/tiny.yaml
    torchrun --nproc_per_node 2 -m stackllama_ds.cli eval configs/tiny.yaml

Models: ``<root>/sft/model`` and ``<root>/ppo/model``, whichever exist; when only one does, the
base model (``<root>/tiny`` or ``model.name_or_path``) joins as ``base`` so there is a pair to
compare. Prompts: the first ``eval.n_prompts`` distinct questions of the ``rl_eval`` split (never
trained on), leaving out those longer than ``ppo.max_prompt_length`` tokens; fewer when the split
has fewer, and the report says so. Each model samples one response per prompt (plain sampling,
``eval.max_new_tokens`` tokens, cut at the first EOS); the reward model scores every response.

Determinism: prompts form batches of ``eval.batch_size`` in prompt order; batch j runs on rank
j % world after ``torch.manual_seed(seed * 1_000_003 + j)``, the same seed for every model (common
random numbers), so the sampled tokens do not depend on the number of ranks. Ranks gather their
records with ``dist.all_gather_object``; rank 0 sorts them by prompt index and bootstraps with
``numpy.random.default_rng(seed)``. Models are plain HF models (no DeepSpeed engine), fp32 on CPU,
``ppo.actor.dtype`` / ``ppo.reward.dtype`` on GPU, loaded one at a time.

Outputs in ``<root>/eval/``: ``report.md`` (tables, the plots, four prompts answered side by side),
the training-curve PNGs of ``stackllama_ds.report`` (``stackllama-ds report <root>`` redraws them
at any time) and ``eval.json``, whose keys are (in full in ``EVAL_JSON_KEYS`` below):
    split, n_requested, n_available, n_too_long, n_prompts, max_prompt_length, max_new_tokens,
    seed, alpha, bootstrap_samples, reward_model
    models.<base|sft|ppo>: path, reward{mean,lo,hi}, reward_std, length_mean, eos_share,
        degenerate_share, empty_share
    win_rates.<A>_vs_<B>: a, b, mean, lo, hi, wins, ties, losses      (ties count half)
    kl.ppo_vs_sft: policy, ref, mean, lo, hi                          (empty without PPO)
    samples[i]: index, question, responses.<name>{text, reward, length, eos, degenerate}, kl.<policy>
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from stackllama_ds import evalstats, rl, runtime
from stackllama_ds.config import RunConfig
from stackllama_ds.data.prepare import load_prepared
from stackllama_ds.data.template import format_prompt
from stackllama_ds.engines import dist
from stackllama_ds.engines.generate import sample
from stackllama_ds.models.load import load_causal_lm, load_reward_model, load_tokenizer
from stackllama_ds.models.rollout import cut_at_eos, left_pad, response_logprobs, reward_scores
from stackllama_ds.report import redraw, render_markdown

EVAL_JSON_KEYS = """\
`eval/eval.json` (every figure of `stackllama-ds eval`; intervals are percentile bootstrap
intervals over prompts, `bootstrap_samples` resamples from `numpy.random.default_rng(seed)`):
- `split` ("rl_eval"), `n_requested` (eval.n_prompts), `n_available` (distinct questions in the
  split), `n_too_long` (left out: prompt longer than `max_prompt_length` tokens), `n_prompts` (used),
  `max_prompt_length`, `max_new_tokens`, `seed`, `alpha` (0.05: 95% intervals), `bootstrap_samples`,
  `reward_model` (path, relative to the run root when inside it).
- `models.<name>` for name in base/sft/ppo: `path`; `reward` {`mean`, `lo`, `hi`} (raw reward-model
  score); `reward_std`; `length_mean` (response tokens up to and including the first EOS);
  `eos_share` (responses that emitted EOS within max_new_tokens); `degenerate_share`
  (`rl.is_degenerate` on the decoded text); `empty_share` (empty decoded text).
- `win_rates.<A>_vs_<B>`: `a`, `b`, `mean` = (wins + ties / 2) / n_prompts, the share of prompts where
  A's response scores higher than B's with a tie counted as half a win; `lo`, `hi` (paired
  bootstrap); `wins`, `ties`, `losses` (counts for A). One entry per pair, later model first
  (order base, sft, ppo).
- `kl.<policy>_vs_<ref>` (ppo_vs_sft when both exist, else empty): `policy`, `ref`, `mean`, `lo`,
  `hi`: Monte-Carlo KL(policy || ref) = mean over the policy's samples of
  sum_t [log p_policy(y_t) - log p_ref(y_t)], response tokens up to the first EOS.
- `samples`: one per prompt in prompt order: `index`, `question`, `responses.<name>` {`text`,
  `reward`, `length`, `eos`, `degenerate`}, `kl.<policy>` (that prompt's summed log-ratio).
"""

MODEL_ORDER = ("base", "sft", "ppo")  # display order; win rates are later-vs-earlier
KL_PAIRS = {"ppo": "sft"}  # policy -> reference for the KL figure


# ----------------------------------------------------------------------------------- inputs
def candidate_models(cfg: RunConfig) -> dict[str, Path]:
    """{name: HF folder} in MODEL_ORDER: sft and ppo when exported, plus base when only one is."""
    found = {n: cfg.stage_dir(n) / "model" for n in ("sft", "ppo")}
    found = {n: p for n, p in found.items() if (p / "config.json").exists()}
    if not found:
        raise FileNotFoundError(f"no model to evaluate: neither {runtime.sft_model_path(cfg)} nor "
                                f"{cfg.stage_dir('ppo') / 'model'} exists (run sft first)")
    base = runtime.base_model_path(cfg)
    if len(found) == 1 and (base / "config.json").exists():
        found["base"] = base
    return {n: found[n] for n in MODEL_ORDER if n in found}


def load_eval_prompts(cfg: RunConfig, tok) -> tuple[list[str], list[list[int]], dict]:
    """The first eval.n_prompts distinct rl_eval questions that fit, their prompt ids, and counts."""
    split = load_prepared(runtime.data_dir(cfg))["rl_eval"]
    seen, questions = set(), []
    for row in split.select_columns(["site", "qid", "question"]):
        if (row["site"], row["qid"]) not in seen:
            seen.add((row["site"], row["qid"]))
            questions.append(row["question"])
    ids = tok([format_prompt(q) for q in questions], add_special_tokens=True)["input_ids"]
    fits = [i for i, x in enumerate(ids) if len(x) <= cfg.ppo.max_prompt_length]
    keep = fits[: cfg.eval.n_prompts]
    if not keep:
        raise runtime.TrainingError(f"no rl_eval prompt to evaluate: {len(questions)} questions, "
                                    f"{len(ids) - len(fits)} longer than ppo.max_prompt_length")
    counts = {"n_requested": cfg.eval.n_prompts, "n_available": len(questions),
              "n_too_long": len(ids) - len(fits), "n_prompts": len(keep)}
    return [questions[i] for i in keep], [ids[i] for i in keep], counts


# --------------------------------------------------------------------------------- forwards
@torch.no_grad()
def response_logprob(lm, q_ids, q_mask, resp, r_mask) -> torch.Tensor:
    """(B,) sum over response tokens (up to the first EOS) of log p(y_t | prompt, y_<t) under ``lm``."""
    ids, mask = torch.cat([q_ids, resp], 1), torch.cat([q_mask, r_mask], 1)
    lp, _ = response_logprobs(lm, ids, mask, q_ids.shape[1])  # (B, T)
    return (lp * r_mask).sum(1).float().cpu()


def _place(model, cfg: RunConfig, dev):
    model.eval()
    return model if cfg.model.quantization != "none" else model.to(dev)  # bnb models are placed on load


# ------------------------------------------------------------------------------------- stats
def summarize(records: list[dict], names: list[str], n_boot: int, seed: int) -> tuple[dict, dict, dict]:
    """(models, win_rates, kl) sections of eval.json from the per-prompt records, in prompt order."""
    models = {}
    for n in names:
        rs = [r["responses"][n] for r in records]
        reward = np.array([x["reward"] for x in rs])
        mean, lo, hi = evalstats.bootstrap_mean_ci(reward, n_boot, seed)
        models[n] = {
            "reward": {"mean": mean, "lo": lo, "hi": hi}, "reward_std": float(reward.std()),
            "length_mean": float(np.mean([x["length"] for x in rs])),
            "eos_share": float(np.mean([x["eos"] for x in rs])),
            "degenerate_share": rl.degenerate_fraction([x["text"] for x in rs]),
            "empty_share": float(np.mean([x["text"] == "" for x in rs])),
        }
    wins = {}
    for j, a in enumerate(names):
        for b in names[:j]:
            sa = [r["responses"][a]["reward"] for r in records]
            sb = [r["responses"][b]["reward"] for r in records]
            rate, lo, hi = evalstats.win_rate_ci(sa, sb, n_boot, seed)
            o = evalstats.win_outcomes(sa, sb)
            wins[f"{a}_vs_{b}"] = {"a": a, "b": b, "mean": rate, "lo": lo, "hi": hi, "wins": int((o == 1).sum()),
                                   "ties": int((o == 0.5).sum()), "losses": int((o == 0).sum())}
    kl = {}
    for pol, ref in KL_PAIRS.items():
        if pol in names and ref in names:
            mean, lo, hi = evalstats.bootstrap_mean_ci([r["kl"][pol] for r in records], n_boot, seed)
            kl[f"{pol}_vs_{ref}"] = {"policy": pol, "ref": ref, "mean": mean, "lo": lo, "hi": hi}
    return models, wins, kl


def _rel(p: Path, root: Path) -> str:
    """``p`` relative to the run root when it lies under it (as written, symlinks not followed)."""
    p, root = Path(os.path.abspath(p)), Path(os.path.abspath(root))
    return str(p.relative_to(root)) if p.is_relative_to(root) else str(p)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# -------------------------------------------------------------------------------------- run
def run(cfg: RunConfig) -> None:
    e = cfg.eval
    root, out_dir = cfg.root(), cfg.stage_dir("eval")
    runtime.setup(cfg)
    rank, world, dev = dist.rank(), dist.world_size(), dist.device()
    on_gpu = dev.type == "cuda"
    models = candidate_models(cfg)
    rm_path = runtime.rm_model_path(cfg)
    if not (rm_path / "config.json").exists():
        raise FileNotFoundError(f"reward model not found: {rm_path} (run rm first)")
    tok = load_tokenizer(models.get("sft", next(iter(models.values()))))
    questions, prompt_ids, counts = load_eval_prompts(cfg, tok)
    N, eos, pad = len(questions), tok.eos_token_id, tok.pad_token_id
    batches = [list(range(s, min(s + e.batch_size, N))) for s in range(0, N, e.batch_size)]
    mine = [(j, b) for j, b in enumerate(batches) if j % world == rank]
    if rank == 0:
        short = f" (only {N} of {e.n_prompts} requested available)" if N < e.n_prompts else ""
        print(f"eval: {N} rl_eval prompts{short}, models {', '.join(models)}, {e.max_new_tokens} new tokens, "
              f"{len(batches)} batches over {world} rank(s)", flush=True)

    # step 1. generate: one model at a time; a KL policy goes before its reference so the
    # reference can score the policy's samples while it is loaded.
    order = sorted(models, key=lambda n: (n not in KL_PAIRS, MODEL_ORDER.index(n)))
    prompts = {j: left_pad([prompt_ids[i] for i in b], pad) for j, b in mine}
    resp: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    logp: dict[tuple[str, str], dict[int, torch.Tensor]] = {}  # (scorer, sampler) -> batch -> (B,)
    for name in order:
        dtype = cfg.ppo.actor.dtype if on_gpu else "fp32"
        lm = _place(load_causal_lm(models[name], cfg.model, dtype=dtype, trainable=False), cfg, dev)
        resp[name] = {}
        for j, _ in mine:
            q_ids, q_mask = (t.to(dev) for t in prompts[j])
            torch.manual_seed(cfg.seed * 1_000_003 + j)  # per batch, not per rank: world-size independent
            r = sample(lm, q_ids, q_mask, e.max_new_tokens, pad)  # (B, max_new_tokens)
            resp[name][j] = (r, cut_at_eos(r, eos))
        for pol, ref in KL_PAIRS.items():  # the policy on its own samples, then the reference on them
            if name in (pol, ref) and pol in resp and ref in models:
                logp[(name, pol)] = {j: response_logprob(lm, *(t.to(dev) for t in prompts[j]), *resp[pol][j])
                                     for j, _ in mine}
        del lm

    # step 2. decode and score every response with the reward model
    rm_dtype = cfg.ppo.reward.dtype if on_gpu else "fp32"
    reward = _place(load_reward_model(rm_path, cfg.model, pad_token_id=pad, dtype=rm_dtype), cfg, dev)
    records = []
    for j, b in mine:
        per = {i: {"index": i, "question": questions[i], "responses": {}, "kl": {}} for i in b}
        for name in models:
            r, m = resp[name][j]
            texts = tok.batch_decode(r.masked_fill(m == 0, pad).cpu(), skip_special_tokens=True)
            scores = reward_scores(reward, tok, [questions[i] for i in b], texts, dev).tolist()
            has_eos = (r == eos).any(1).tolist()
            for k, i in enumerate(b):
                per[i]["responses"][name] = {"text": texts[k], "reward": scores[k], "length": int(m[k].sum()),
                                             "eos": bool(has_eos[k]), "degenerate": rl.is_degenerate(texts[k])}
        for pol, ref in KL_PAIRS.items():
            if (pol, pol) in logp and (ref, pol) in logp:
                # sum_t log p_pol(y_t) - log p_ref(y_t) on the policy's own sample: a KL(pol || ref) draw
                diff = (logp[(pol, pol)][j] - logp[(ref, pol)][j]).tolist()
                for k, i in enumerate(b):
                    per[i]["kl"][pol] = diff[k]
        records += per.values()
    del reward

    # step 3. gather on every rank, then rank 0 computes the figures and writes the report
    records = sorted((r for part in dist.all_gather_object(records) for r in part), key=lambda r: r["index"])
    if rank == 0:
        names = list(models)
        m_stats, wins, kl = summarize(records, names, e.bootstrap_samples, cfg.seed)
        for n in names:
            m_stats[n] = {"path": _rel(models[n], root), **m_stats[n]}
        res = {"split": "rl_eval", **counts, "max_prompt_length": cfg.ppo.max_prompt_length,
               "max_new_tokens": e.max_new_tokens, "seed": cfg.seed, "alpha": 0.05,
               "bootstrap_samples": e.bootstrap_samples, "reward_model": _rel(rm_path, root),
               "models": m_stats, "win_rates": wins, "kl": kl, "samples": records}
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(out_dir / "eval.json", json.dumps(res, indent=1) + "\n")
        plots = redraw(root, out_dir, log=lambda s: print(s, flush=True))
        _write_atomic(out_dir / "report.md", render_markdown(res, [p.name for p in plots]))
        print(render_markdown(res, [], n_samples=0).split("## Samples")[0].rstrip(), flush=True)
        print(f"eval: results in {out_dir}/ (report.md, eval.json, {len(plots)} plot(s))", flush=True)
    dist.barrier()
    runtime.mark_done(out_dir, f"{N} prompts, models {','.join(models)}")
