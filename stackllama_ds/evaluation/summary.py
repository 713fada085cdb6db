"""The figures of ``eval/eval.json`` from per-prompt, per-text and per-pair records (rank 0).

Every interval is a percentile bootstrap from ``stackllama_ds.evaluation.stats``; the keys are listed in
full in ``EVAL_JSON_KEYS`` (and in README.md).
"""

from __future__ import annotations

import math

import numpy as np

from stackllama_ds import rl
from stackllama_ds.evaluation import stats as evalstats
from stackllama_ds.models.load import HEAD_LABELS

MODEL_ORDER = ("base", "sft", "ppo")  # display order; win rates are later-vs-earlier
KL_PAIRS = {"ppo": "sft"}  # policy -> reference for the KL figure
LENGTH_MATCH_TOL = 0.2

EVAL_JSON_KEYS = """\
`eval/eval.json` (every figure of `stackllama-ds eval`). Intervals are 95% percentile bootstrap
intervals (`bootstrap_samples` resamples from `numpy.random.default_rng(seed)`) over the unit named
in each section: prompts and held-out texts (one per question already), questions for the
preference pairs (a question holds up to data.max_pairs_per_question pairs: each resample draws
questions and takes all their pairs). A figure on an empty subset is null. Every figure can be
recomputed from the records written beside it: `rm_pairs.jsonl`, `lm_texts.jsonl`,
`responses.jsonl` (below).
- `split` ("rl_eval"), `n_requested` (eval.n_prompts), `n_available` (distinct questions in the
  split), `n_question_cut` (question shortened, its start kept, to fit `max_prompt_length` tokens),
  `n_too_long` (left out: no fit even with the question cut), `n_prompts` (used),
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
- `rm`: the reward model on held-out preference pairs, the ones the RM stage's held-out figures use
  (`data.eval_inputs.load_rm_pairs`). `split` ("rm_eval"), `n_requested` (eval.n_rm_pairs; null:
  the whole split), `n_available` (pairs in the split), `max_length`, `overlength` (rm.max_length
  and rm.overlength, applied by `data.fit` as in the RM stage), `truncation` {`total` (pairs read),
  `whole`, `question_cut`, `answer_cut` (how each kept pair was fitted), `dropped` (left out: with
  overlength truncate, the two texts were identical after the cut; with filter, a text was over
  max_length tokens, or the two were identical)}, `n_pairs` (used: total - dropped, the first
  ones of the split), `length_unit` ("answer tokens as scored": the answer's tokens in the text
  the reward model scores, after any cut), `dtype` (the reward model's dtype in these forwards:
  fp32 on CPU, ppo.reward.dtype on GPU), `resample` ("question"), `n_questions` (distinct
  questions, site/qid, among the pairs); `accuracy` {`mean`, `lo`, `hi`, `ties`}: share of
  pairs with r(chosen) > r(rejected), a tie counting half; `length_baseline` {`mean`, `lo`, `hi`,
  `ties`}: share where the preferred answer is the longer one (lengths as scored), a tie counting
  half (the accuracy of a length-only reward); `ties` pairs have answers of equal length, in
  neither the longer-preferred nor the shorter-preferred subset; `adversarial` {`mean`, `lo`,
  `hi`, `n`}: accuracy on the `n` pairs whose preferred answer is strictly shorter (a length-only
  reward scores 0 there; n_pairs = longer-preferred + `ties` + `n`); `margin_mean` (mean of
  r(chosen) - r(rejected)); `heads.<head>` {`accuracy`, `adversarial_accuracy`, `n_adversarial`,
  `length_spearman`} (point figures, no interval; Spearman of the head's score with answer length
  over both answers of every pair) for `quality` (column 0, the reward everything above uses) and,
  for a reward model trained with rm.length_head (ODIN), `length` and `sum` (quality + length).
  Intervals over questions (cluster bootstrap: each resample draws `n_questions` questions with
  replacement and takes every pair of each; a mean is over the pairs drawn); the adversarial
  interval draws among the questions holding an adversarial pair.
- `judge` (only when `<root>/judge/model` exists, i.e. judge.enabled): `model` (its path) and
  `win_rates`, keyed and shaped as `win_rates` above but judged by the independent judge's score.
- `samples`: one per prompt in prompt order: `index`, `question`, `responses.<name>` {`text`,
  `reward`, `length`, `eos`, `degenerate`, `judge` (with a judge)}, `kl.<policy>` (that prompt's summed
  log-ratio).

Records beside `eval.json` (JSON lines, written atomically before it, floats as Python's repr: the
same numbers the figures were computed from):
- `rm_pairs.jsonl`: one line per pair of `rm`, in order: `index`, `group` (the question,
  "site/qid": the resampling unit), `case` (whole, question_cut or answer_cut), `chosen`, `rejected`
  (the reward, column 0, in `rm.dtype`), `len_chosen`, `len_rejected` (answer tokens as scored),
  `chosen_heads`, `rejected_heads` (every head's score).
- `lm_texts.jsonl`: one line per held-out text of `lm`: `index`, `tokens` (answer tokens counted),
  `nll.<name>` (summed NLL in nats of those tokens under each model).
- `responses.jsonl`: one line per prompt of `samples`: `index`, `prompt_ids` (the prompt's tokens,
  no padding), `token_ids.<name>` (the response's tokens up to and including the first EOS:
  `length` of them; decoded without special tokens they are `text`).
"""


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
    wins = win_rates(records, names, n_boot, seed)
    kl = {}
    for pol, ref in KL_PAIRS.items():
        if pol in names and ref in names:
            mean, lo, hi = evalstats.bootstrap_mean_ci([r["kl"][pol] for r in records], n_boot, seed)
            kl[f"{pol}_vs_{ref}"] = {"policy": pol, "ref": ref, "mean": mean, "lo": lo, "hi": hi}
    return models, wins, kl


def win_rates(records: list[dict], names: list[str], n_boot: int, seed: int, key: str = "reward") -> dict:
    """``<a>_vs_<b>`` win rates of every later model over every earlier one, judged by ``responses.<m>.<key>``
    ("reward": the reward model's quality score; "judge": the independent judge's), all prompts and
    length-matched."""
    wins = {}
    for j, a in enumerate(names):
        for b in names[:j]:
            sa, sb = ([r["responses"][m][key] for r in records] for m in (a, b))
            la, lb = ([r["responses"][m]["length"] for r in records] for m in (a, b))
            rate, lo, hi = evalstats.win_rate_ci(sa, sb, n_boot, seed)
            o = evalstats.win_outcomes(sa, sb)
            m_rate, m_lo, m_hi, m_n = evalstats.length_matched_win_rate_ci(sa, sb, la, lb, n_boot, seed,
                                                                           tol=LENGTH_MATCH_TOL)
            wins[f"{a}_vs_{b}"] = {"a": a, "b": b, "mean": rate, "lo": lo, "hi": hi, "wins": int((o == 1).sum()),
                                   "ties": int((o == 0.5).sum()), "losses": int((o == 0).sum()),
                                   "length_matched": _fig(m_rate, m_lo, m_hi, n=m_n)}
    return wins


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
    """Figures of the `rm` section from per-pair rows {group, chosen, rejected, len_chosen, len_rejected}.

    Pairs of one question (``group``) are not independent: every interval resamples questions
    (``evalstats`` cluster bootstrap), recorded as ``resample`` "question" with ``n_questions``; rows
    without ``group`` are resampled one by one ("pair")."""
    if not rows:
        return {}
    rc, rr = [r["chosen"] for r in rows], [r["rejected"] for r in rows]
    lc, lr = [r["len_chosen"] for r in rows], [r["len_rejected"] for r in rows]
    g = [r["group"] for r in rows] if "group" in rows[0] else None
    o = evalstats.win_outcomes(rc, rr)
    adv = evalstats.adversarial_accuracy_ci(rc, rr, lc, lr, n_boot, seed, groups=g)
    return {"resample": "pair" if g is None else "question", "n_questions": None if g is None else len(set(g)),
            "accuracy": _fig(*evalstats.win_rate_ci(rc, rr, n_boot, seed, groups=g), ties=int((o == 0.5).sum())),
            "length_baseline": _fig(*evalstats.length_baseline_ci(lc, lr, n_boot, seed, groups=g),
                                    ties=int(np.sum(np.equal(lc, lr)))),  # equal lengths: in no adversarial split
            "adversarial": _fig(*adv[:3], n=adv[3]),
            "margin_mean": float(np.mean(np.subtract(rc, rr))),
            **({"heads": head_figures([r["chosen_heads"] for r in rows], [r["rejected_heads"] for r in rows], lc, lr)}
               if "chosen_heads" in rows[0] else {})}


def head_figures(chosen: list[list[float]], rejected: list[list[float]], len_chosen: list[float],
                 len_rejected: list[float]) -> dict[str, dict]:
    """``evalstats.pair_figures`` of every head of a reward model, NaN as null, from its (n, K) scores:
    ``quality`` (column 0, what PPO reads; a one-head model's only head) and, with ODIN's length
    head, ``length`` and ``sum`` (the reward the ranking loss was taken on)."""
    if not chosen:
        return {}
    rc, rr = np.asarray(chosen, dtype=np.float64), np.asarray(rejected, dtype=np.float64)  # (n, K)
    heads = {name: (rc[:, i], rr[:, i]) for i, name in enumerate(HEAD_LABELS[: rc.shape[1]])}
    if rc.shape[1] > 1:
        heads["sum"] = (rc.sum(1), rr.sum(1))
    return {name: {k: _num(v) if isinstance(v, float) else v
                   for k, v in evalstats.pair_figures(c, r, len_chosen, len_rejected).items()}
            for name, (c, r) in heads.items()}
