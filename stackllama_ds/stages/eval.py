"""Evaluation: base vs SFT vs PPO on held-out data, scored by the reward model, with length controls.

    stackllama-ds eval configs/tiny.yaml
    torchrun --nproc_per_node 2 -m stackllama_ds.cli eval configs/tiny.yaml

Models: ``<root>/sft/model`` and ``<root>/ppo/model``, whichever exist (at least one), and the
pretrained base (``runtime.base_model_path``) whenever its folder exists. Three questions:
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
the training-curve PNGs of ``stackllama_ds.report`` and ``eval.json``, whose keys are in full in
``EVAL_JSON_KEYS`` below (and in README.md).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from stackllama_ds import evalstats, rl, runtime
from stackllama_ds.config import RunConfig
from stackllama_ds.data.prepare import load_prepared
from stackllama_ds.data.template import format_prompt, format_qa
from stackllama_ds.engines import dist
from stackllama_ds.engines.generate import sample
from stackllama_ds.models.load import load_causal_lm, load_reward_model, load_tokenizer
from stackllama_ds.models.rollout import (
    cut_at_eos,
    left_pad,
    response_logprobs,
    reward_scores,
    right_padded_scores,
)
from stackllama_ds.report import redraw, render_markdown

EVAL_JSON_KEYS = """\
`eval/eval.json` (every figure of `stackllama-ds eval`). Intervals are 95% percentile bootstrap
intervals (`bootstrap_samples` resamples from `numpy.random.default_rng(seed)`) over the unit named
in each section: prompts, texts or pairs. A figure on an empty subset is null.
- `split` ("rl_eval"), `n_requested` (eval.n_prompts), `n_available` (distinct questions in the
  split), `n_too_long` (left out: prompt longer than `max_prompt_length` tokens), `n_prompts` (used),
  `max_prompt_length`, `max_new_tokens`, `seed`, `alpha` (0.05: 95% intervals), `bootstrap_samples`,
  `reward_model` (path, relative to the run root when inside it), `length_match_tol` (0.2).
- `models.<name>` for name in base/sft/ppo (base whenever its folder exists): `path`; `reward`
  {`mean`, `lo`, `hi`} (raw reward-model score); `reward_std`; `length_mean` (response tokens up to
  and including the first EOS); `eos_share` (responses that emitted EOS within max_new_tokens);
  `degenerate_share` (`rl.is_degenerate` on the decoded text); `empty_share` (empty decoded text);
  `length_reward_spearman` {`mean`, `lo`, `hi`}: Spearman correlation (average ranks for ties) of
  the response's reward with its length in tokens, over prompts (null when either is constant).
- `win_rates.<A>_vs_<B>`: `a`, `b`, `mean` = (wins + ties / 2) / n_prompts, the share of prompts where
  A's response scores higher than B's with a tie counted as half a win; `lo`, `hi` (paired
  bootstrap); `wins`, `ties`, `losses` (counts for A); `length_matched` {`mean`, `lo`, `hi`, `n`}:
  the same win rate on the `n` prompts where the two responses' lengths la, lb (tokens, as
  `length`) satisfy |la - lb| <= 0.2 * max(la, lb). One entry per pair, later model first (order
  base, sft, ppo).
- `kl.<policy>_vs_<ref>` (ppo_vs_sft when both exist, else empty): `policy`, `ref`, `mean`, `lo`,
  `hi`: Monte-Carlo KL(policy || ref) = mean over the policy's samples of
  sum_t [log p_policy(y_t) - log p_ref(y_t)], response tokens up to the first EOS.
- `lm`: language-model loss on held-out answers, the same tokens for every model. Texts: one
  `format_qa(question, preferred answer)` per distinct question of `rl_eval`, then of `rm_eval`
  (no stage trains on either), followed by EOS and cut to `max_length` (= sft.seq_length) tokens;
  the loss counts the answer tokens only (tokens whose text ends inside the answer, and the EOS),
  each predicted from the question and the answer before it. `splits`, `tokens` ("answer"),
  `max_length`, `n_requested` (eval.n_lm_texts), `n_too_long` (texts skipped because the question
  fills the window), `n_texts`, `n_tokens` (answer tokens counted);
  `models.<name>.loss` {`mean`, `lo`, `hi`}: token-weighted mean NLL in nats/token, sum of NLL /
  sum of tokens, with the bootstrap over texts resampling whole texts (each resample's figure also
  token-weighted); `models.<name>.ppl` = exp of loss (and of its bounds);
  `diffs.<A>_vs_<B>`: `a`, `b`, `mean`, `lo`, `hi`: loss(A) - loss(B) on the same tokens, paired
  bootstrap over texts (negative: A predicts the held-out answers better).
- `rm`: the reward model on held-out preference pairs. `split` ("rm_eval"), `n_requested`
  (eval.n_rm_pairs), `n_available` (pairs in the split), `max_length`, `overlength` (rm.max_length
  and rm.overlength, applied as in the RM stage), `n_over_length` (pairs read that were cut or
  dropped), `n_pairs` (used: the first ones of the split), `length_unit` ("tokens": answer text
  tokenized without special tokens, before any cut); `accuracy` {`mean`, `lo`, `hi`, `ties`}: share of
  pairs with r(chosen) > r(rejected), a tie counting half; `length_baseline` {`mean`, `lo`, `hi`}:
  share where the preferred answer is the longer one, a tie counting half (the accuracy of a
  length-only reward); `adversarial` {`mean`, `lo`, `hi`, `n`}: accuracy on the `n` pairs whose
  preferred answer is strictly shorter (a length-only reward scores 0 there); `margin_mean` (mean of
  r(chosen) - r(rejected)). Intervals over pairs (pairs of one question are resampled separately).
- `samples`: one per prompt in prompt order: `index`, `question`, `responses.<name>` {`text`,
  `reward`, `length`, `eos`, `degenerate`}, `kl.<policy>` (that prompt's summed log-ratio).
"""

MODEL_ORDER = ("base", "sft", "ppo")  # display order; win rates are later-vs-earlier
KL_PAIRS = {"ppo": "sft"}  # policy -> reference for the KL figure
LM_SPLITS = ("rl_eval", "rm_eval")  # held-out questions: no stage trains on them
LENGTH_MATCH_TOL = 0.2


# ----------------------------------------------------------------------------------- inputs
def candidate_models(cfg: RunConfig) -> dict[str, Path]:
    """{name: HF folder} in MODEL_ORDER: sft and ppo when exported (one at least), base when it exists."""
    found = {n: cfg.stage_dir(n) / "model" for n in ("sft", "ppo")}
    found = {n: p for n, p in found.items() if (p / "config.json").exists()}
    if not found:
        raise FileNotFoundError(f"no model to evaluate: neither {runtime.sft_model_path(cfg)} nor "
                                f"{cfg.stage_dir('ppo') / 'model'} exists (run sft first)")
    base = runtime.base_model_path(cfg)
    if (base / "config.json").exists():
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


def load_lm_texts(cfg: RunConfig, tok) -> tuple[list[tuple[list[int], list[int]]], dict]:
    """Held-out (ids, answer-token mask) texts for the LM loss, and counts (see EVAL_JSON_KEYS `lm`).

    A token is an answer token when its text ends after the prompt ``Question: q\\n\\nAnswer: `` (so
    " Beer", which carries the prompt's last space, is one); the EOS that follows the text is one too.
    """
    data, L, n = load_prepared(runtime.data_dir(cfg)), cfg.sft.seq_length, cfg.eval.n_lm_texts
    seen, texts, too_long = set(), [], 0
    for name in LM_SPLITS:
        for row in data[name].select_columns(["site", "qid", "question", "response_j"]):
            if len(texts) == n:
                break
            if (row["site"], row["qid"]) in seen:
                continue
            seen.add((row["site"], row["qid"]))
            start = len(format_prompt(row["question"]))
            enc = tok(format_qa(row["question"], row["response_j"]), truncation=True, max_length=L,
                      return_offsets_mapping=True)
            ids, target = list(enc["input_ids"]), [int(end > start) for _, end in enc["offset_mapping"]]
            if len(ids) < L:
                ids, target = ids + [tok.eos_token_id], target + [1]
            target[0] = 0  # nothing predicts the first token
            if sum(target) == 0:
                too_long += 1
                continue
            texts.append((ids, target))
    counts = {"splits": list(LM_SPLITS), "tokens": "answer", "max_length": L, "n_requested": n,
              "n_too_long": too_long, "n_texts": len(texts), "n_tokens": sum(sum(t) for _, t in texts)}
    return texts, counts


def load_rm_pairs(cfg: RunConfig, tok) -> tuple[list[tuple[list[int], list[int], int, int]], dict]:
    """The first eval.n_rm_pairs rm_eval pairs (chosen ids, rejected ids, chosen length, rejected
    length) under the RM stage's max_length policy; lengths are answer tokens before any cut."""
    split, rc, n = load_prepared(runtime.data_dir(cfg))["rm_eval"], cfg.rm, cfg.eval.n_rm_pairs
    pairs, over = [], 0
    for b in split.select_columns(["question", "response_j", "response_k"]).iter(batch_size=256):
        if len(pairs) == n:
            break
        chosen = tok([format_qa(q, a) for q, a in zip(b["question"], b["response_j"])])["input_ids"]
        rejected = tok([format_qa(q, a) for q, a in zip(b["question"], b["response_k"])])["input_ids"]
        lc = [len(x) for x in tok(b["response_j"], add_special_tokens=False)["input_ids"]]
        lr = [len(x) for x in tok(b["response_k"], add_special_tokens=False)["input_ids"]]
        for j, k, a, r in zip(chosen, rejected, lc, lr):
            if len(pairs) == n:
                break
            if len(j) > rc.max_length or len(k) > rc.max_length:
                over += 1
                if rc.overlength == "filter":
                    continue
            pairs.append((j[: rc.max_length], k[: rc.max_length], a, r))
    counts = {"split": "rm_eval", "n_requested": n, "n_available": len(split), "max_length": rc.max_length,
              "overlength": rc.overlength, "n_over_length": over, "n_pairs": len(pairs), "length_unit": "tokens"}
    return pairs, counts


# --------------------------------------------------------------------------------- forwards
@torch.no_grad()
def response_logprob(lm, q_ids, q_mask, resp, r_mask) -> torch.Tensor:
    """(B,) sum over response tokens (up to the first EOS) of log p(y_t | prompt, y_<t) under ``lm``."""
    ids, mask = torch.cat([q_ids, resp], 1), torch.cat([q_mask, r_mask], 1)
    lp, _ = response_logprobs(lm, ids, mask, q_ids.shape[1])  # (B, T)
    return (lp * r_mask).sum(1).float().cpu()


def _right_pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, T), mask (B, T)) right-padded to the longest."""
    ids = torch.full((len(seqs), max(len(s) for s in seqs)), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
    return ids, mask


@torch.no_grad()
def text_nll(lm, texts: list[tuple[list[int], list[int]]], pad: int, dev) -> list[float]:
    """Summed NLL (nats) of each text's target tokens under ``lm``: one right-padded forward."""
    ids, mask = (t.to(dev) for t in _right_pad([i for i, _ in texts], pad))  # (B, T)
    target, _ = _right_pad([t for _, t in texts], 0)
    logits = lm(input_ids=ids, attention_mask=mask, use_cache=False).logits  # (B, T, V)
    lp = rl.logprobs_from_logits(logits[:, :-1], ids[:, 1:]).double().cpu()  # (B, T-1): token t+1 | <= t
    return (-(lp * target[:, 1:]).sum(1)).tolist()


@torch.no_grad()
def pair_scores(reward, pairs, pad: int, dev) -> tuple[list[float], list[float]]:
    """(r_chosen, r_rejected) raw reward-model scores of pairs, chosen and rejected in one batch."""
    ids, mask = _right_pad([p[0] for p in pairs] + [p[1] for p in pairs], pad)  # (2B, T)
    # right padding: the score is read at the last real token; no real token sees a pad
    r = right_padded_scores(lambda x: reward(input_ids=x).logits[:, 0].float(), ids.to(dev), mask.sum(1)).cpu()
    return r[: len(pairs)].tolist(), r[len(pairs) :].tolist()


def _place(model, cfg: RunConfig, dev):
    model.eval()
    return model if cfg.model.quantization != "none" else model.to(dev)  # bnb models are placed on load


# ------------------------------------------------------------------------------------- stats
def _num(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None  # JSON has no NaN


def _fig(mean: float, lo: float, hi: float, **extra) -> dict:
    return {"mean": _num(mean), "lo": _num(lo), "hi": _num(hi), **extra}


def summarize(records: list[dict], names: list[str], n_boot: int, seed: int) -> tuple[dict, dict, dict]:
    """(models, win_rates, kl) sections of eval.json from the per-prompt records, in prompt order."""
    models = {}
    for n in names:
        rs = [r["responses"][n] for r in records]
        reward, length = np.array([x["reward"] for x in rs]), np.array([x["length"] for x in rs])
        mean, lo, hi = evalstats.bootstrap_mean_ci(reward, n_boot, seed)
        models[n] = {
            "reward": {"mean": mean, "lo": lo, "hi": hi}, "reward_std": float(reward.std()),
            "length_mean": float(length.mean()),
            "eos_share": float(np.mean([x["eos"] for x in rs])),
            "degenerate_share": rl.degenerate_fraction([x["text"] for x in rs]),
            "empty_share": float(np.mean([x["text"] == "" for x in rs])),
            "length_reward_spearman": _fig(*evalstats.spearman_ci(length, reward, n_boot, seed)),
        }
    wins = {}
    for j, a in enumerate(names):
        for b in names[:j]:
            sa, sb = ([r["responses"][m]["reward"] for r in records] for m in (a, b))
            la, lb = ([r["responses"][m]["length"] for r in records] for m in (a, b))
            rate, lo, hi = evalstats.win_rate_ci(sa, sb, n_boot, seed)
            o = evalstats.win_outcomes(sa, sb)
            m_rate, m_lo, m_hi, m_n = evalstats.length_matched_win_rate_ci(sa, sb, la, lb, n_boot, seed,
                                                                           tol=LENGTH_MATCH_TOL)
            wins[f"{a}_vs_{b}"] = {"a": a, "b": b, "mean": rate, "lo": lo, "hi": hi, "wins": int((o == 1).sum()),
                                   "ties": int((o == 0.5).sum()), "losses": int((o == 0).sum()),
                                   "length_matched": _fig(m_rate, m_lo, m_hi, n=m_n)}
    kl = {}
    for pol, ref in KL_PAIRS.items():
        if pol in names and ref in names:
            mean, lo, hi = evalstats.bootstrap_mean_ci([r["kl"][pol] for r in records], n_boot, seed)
            kl[f"{pol}_vs_{ref}"] = {"policy": pol, "ref": ref, "mean": mean, "lo": lo, "hi": hi}
    return models, wins, kl


def summarize_lm(rows: list[dict], names: list[str], n_boot: int, seed: int) -> dict:
    """``models`` and ``diffs`` of the `lm` section from per-text rows {tokens, nll: {name: float}}."""
    if not rows:
        return {"models": {}, "diffs": {}}
    tokens = np.array([r["tokens"] for r in rows], dtype=np.float64)
    nll = {n: np.array([r["nll"][n] for r in rows]) for n in names}
    models = {}
    for n in names:
        loss = evalstats.bootstrap_ratio_ci(nll[n], tokens, n_boot, seed)  # sum NLL / sum tokens
        models[n] = {"loss": _fig(*loss), "ppl": _fig(*(float(np.exp(x)) for x in loss))}  # inf -> null
    diffs = {}
    for j, a in enumerate(names):
        for b in names[:j]:
            d = evalstats.bootstrap_ratio_ci(nll[a] - nll[b], tokens, n_boot, seed)  # paired: same texts
            diffs[f"{a}_vs_{b}"] = {"a": a, "b": b, **_fig(*d)}
    return {"models": models, "diffs": diffs}


def summarize_rm(rows: list[dict], n_boot: int, seed: int) -> dict:
    """Figures of the `rm` section from per-pair rows {chosen, rejected, len_chosen, len_rejected}."""
    if not rows:
        return {}
    rc, rr = [r["chosen"] for r in rows], [r["rejected"] for r in rows]
    lc, lr = [r["len_chosen"] for r in rows], [r["len_rejected"] for r in rows]
    o = evalstats.win_outcomes(rc, rr)
    adv = evalstats.adversarial_accuracy_ci(rc, rr, lc, lr, n_boot, seed)
    return {"accuracy": _fig(*evalstats.win_rate_ci(rc, rr, n_boot, seed), ties=int((o == 0.5).sum())),
            "length_baseline": _fig(*evalstats.length_baseline_ci(lc, lr, n_boot, seed)),
            "adversarial": _fig(*adv[:3], n=adv[3]),
            "margin_mean": float(np.mean(np.subtract(rc, rr)))}


def _rel(p: Path, root: Path) -> str:
    """``p`` relative to the run root when it lies under it (as written, symlinks not followed)."""
    p, root = Path(os.path.abspath(p)), Path(os.path.abspath(root))
    return str(p.relative_to(root)) if p.is_relative_to(root) else str(p)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _batches(n: int, size: int, rank: int, world: int) -> list[tuple[int, list[int]]]:
    """This rank's (batch index j, item indices): batch j of ``size`` items in order goes to rank j % world."""
    return [(j, list(range(s, min(s + size, n)))) for j, s in enumerate(range(0, n, size)) if j % world == rank]


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
    texts, lm_counts = load_lm_texts(cfg, tok)
    pairs, rm_counts = load_rm_pairs(cfg, tok)
    N, eos, pad = len(questions), tok.eos_token_id, tok.pad_token_id
    mine = _batches(N, e.batch_size, rank, world)
    mine_lm = _batches(len(texts), e.batch_size, rank, world)
    mine_rm = _batches(len(pairs), e.batch_size, rank, world)
    if rank == 0:
        short = f" (only {N} of {e.n_prompts} requested available)" if N < e.n_prompts else ""
        print(f"eval: {N} rl_eval prompts{short}, {len(texts)} held-out texts, {len(pairs)} rm_eval pairs, "
              f"models {', '.join(models)}, {e.max_new_tokens} new tokens, {world} rank(s)", flush=True)

    # step 1. generate, one model at a time; a KL policy goes before its reference so the reference
    # can score the policy's samples while it is loaded; every model's loss on the held-out texts.
    order = sorted(models, key=lambda n: (n not in KL_PAIRS, MODEL_ORDER.index(n)))
    prompts = {j: left_pad([prompt_ids[i] for i in b], pad) for j, b in mine}
    resp: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    logp: dict[tuple[str, str], dict[int, torch.Tensor]] = {}  # (scorer, sampler) -> batch -> (B,)
    lm_rows = {i: {"index": i, "tokens": sum(texts[i][1]), "nll": {}} for _, b in mine_lm for i in b}
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
        for _, b in mine_lm:
            for i, v in zip(b, text_nll(lm, [texts[i] for i in b], pad, dev)):
                lm_rows[i]["nll"][name] = v
        del lm

    # step 2. decode and score every response, and the held-out pairs, with the reward model
    rm_dtype = cfg.ppo.reward.dtype if on_gpu else "fp32"
    reward = _place(load_reward_model(rm_path, cfg.model, pad_token_id=pad, dtype=rm_dtype), cfg, dev)
    records = []
    for j, b in mine:
        per = {i: {"index": i, "question": questions[i], "responses": {}, "kl": {}} for i in b}
        for name in models:
            r, m = resp[name][j]
            decoded = tok.batch_decode(r.masked_fill(m == 0, pad).cpu(), skip_special_tokens=True)
            scores = reward_scores(reward, tok, [questions[i] for i in b], decoded, dev).tolist()
            has_eos = (r == eos).any(1).tolist()
            for k, i in enumerate(b):
                per[i]["responses"][name] = {"text": decoded[k], "reward": scores[k], "length": int(m[k].sum()),
                                             "eos": bool(has_eos[k]), "degenerate": rl.is_degenerate(decoded[k])}
        for pol, ref in KL_PAIRS.items():
            if (pol, pol) in logp and (ref, pol) in logp:
                # sum_t log p_pol(y_t) - log p_ref(y_t) on the policy's own sample: a KL(pol || ref) draw
                diff = (logp[(pol, pol)][j] - logp[(ref, pol)][j]).tolist()
                for k, i in enumerate(b):
                    per[i]["kl"][pol] = diff[k]
        records += per.values()
    rm_rows = []
    for _, b in mine_rm:
        rc, rr = pair_scores(reward, [pairs[i] for i in b], pad, dev)
        rm_rows += [{"index": i, "chosen": rc[k], "rejected": rr[k], "len_chosen": pairs[i][2],
                     "len_rejected": pairs[i][3]} for k, i in enumerate(b)]
    del reward

    # step 3. gather on every rank, then rank 0 computes the figures and writes the report
    parts = dist.all_gather_object((records, list(lm_rows.values()), rm_rows))
    records, lm_all, rm_all = (sorted((r for p in parts for r in p[k]), key=lambda r: r["index"]) for k in range(3))
    if rank == 0:
        names, n_boot = list(models), e.bootstrap_samples
        m_stats, wins, kl = summarize(records, names, n_boot, cfg.seed)
        for n in names:
            m_stats[n] = {"path": _rel(models[n], root), **m_stats[n]}
        res = {"split": "rl_eval", **counts, "max_prompt_length": cfg.ppo.max_prompt_length,
               "max_new_tokens": e.max_new_tokens, "seed": cfg.seed, "alpha": 0.05,
               "bootstrap_samples": n_boot, "reward_model": _rel(rm_path, root),
               "length_match_tol": LENGTH_MATCH_TOL, "models": m_stats, "win_rates": wins, "kl": kl,
               "lm": {**lm_counts, **summarize_lm(lm_all, names, n_boot, cfg.seed)},
               "rm": {**rm_counts, **summarize_rm(rm_all, n_boot, cfg.seed)}, "samples": records}
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(out_dir / "eval.json", json.dumps(res, indent=1, allow_nan=False) + "\n")
        plots = redraw(root, out_dir, log=lambda s: print(s, flush=True))
        _write_atomic(out_dir / "report.md", render_markdown(res, [p.name for p in plots]))
        print(render_markdown(res, [], n_samples=0).split("## Samples")[0].rstrip(), flush=True)
        print(f"eval: results in {out_dir}/ (report.md, eval.json, {len(plots)} plot(s))", flush=True)
    dist.barrier()
    runtime.mark_done(out_dir, f"{N} prompts, models {','.join(models)}")
