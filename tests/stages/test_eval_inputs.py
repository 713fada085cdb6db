"""``stackllama-ds eval`` inputs and summaries without launching ranks: held-out texts, RM pairs, sections.

    python -m pytest tests/stages/test_eval_inputs.py -q
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from stackllama_ds.config_loader import load_config
from stackllama_ds.data.eval_inputs import load_lm_texts, load_rm_pairs
from stackllama_ds.data.prepare import load_prepared
from stackllama_ds.data.template import format_prompt, format_qa
from stackllama_ds.evaluation import stats as evalstats
from stackllama_ds.evaluation.summary import summarize, summarize_lm, summarize_rm
from stackllama_ds.models.load import load_tokenizer
from tests.conftest import write_config


@pytest.fixture(scope="module")
def inputs(prepared_root, tmp_path_factory):
    """(config factory, tokenizer, prepared DatasetDict) on the prepared beer data."""
    tmp = tmp_path_factory.mktemp("evalinputs")

    def cfg(**sections):
        path = write_config(tmp / f"cfg{len(list(tmp.iterdir()))}.yaml", prepared_root, **sections)
        return load_config(path, check_files=False)

    return cfg, load_tokenizer(prepared_root / "tiny"), load_prepared(prepared_root / "data")


def test_lm_texts_count_answer_tokens_only(inputs):
    make_cfg, tok, data = inputs
    cfg = make_cfg(sft={"seq_length": 128}, eval={"n_lm_texts": 12})
    texts, counts = load_lm_texts(cfg.root() / "data", tok, cfg.sft.seq_length, cfg.eval.n_lm_texts)
    assert counts["n_texts"] == len(texts) == 12 and counts["tokens"] == "answer" and counts["max_length"] == 128
    assert counts["n_tokens"] == sum(sum(t) for _, t in texts)
    # the first texts come from rl_eval, one per question, in row order
    first = {}
    for row in data["rl_eval"]:
        first.setdefault((row["site"], row["qid"]), (row["question"], row["response_j"]))
    kept = iter(first.values())
    for ids, target in texts[:4]:
        assert len(ids) == len(target) <= 128 and target[0] == 0
        q, a = next(kept)
        while len(tok(format_prompt(q))["input_ids"]) >= 128:  # skipped: the question fills the window
            q, a = next(kept)
        full = tok(format_qa(q, a))["input_ids"] + [tok.eos_token_id]
        assert ids == full[:128]
        # the targets are one run at the end: the answer tokens (and EOS, when it fits)
        k = target.index(1)
        assert all(target[k:]) and not any(target[:k])
        answer = tok.decode(ids[k:], skip_special_tokens=True)
        assert a.startswith(answer.strip()[:50]) and answer.strip()
        assert "Answer:" in tok.decode(ids[:k])
        assert (ids[-1] == tok.eos_token_id) == (len(full) <= 128)
    # a narrower window skips more questions and never keeps a text without an answer token
    short, c2 = load_lm_texts(cfg.root() / "data", tok, 64, 64)
    assert c2["n_too_long"] >= counts["n_too_long"] and all(sum(t) >= 1 for _, t in short)


@pytest.mark.parametrize("overlength", ["truncate", "filter"])
def test_rm_pairs_follow_the_rm_length_policy(inputs, overlength):
    from stackllama_ds.data.fit import fit_pairs

    make_cfg, tok, data = inputs
    cfg = make_cfg(rm={"max_length": 200, "overlength": overlength}, eval={"n_rm_pairs": 20})
    pairs, counts = load_rm_pairs(cfg.root() / "data", tok, cfg.rm.max_length, cfg.rm.overlength,
                                   cfg.eval.n_rm_pairs)
    assert counts["n_pairs"] == len(pairs) <= 20 and counts["n_available"] == len(data["rm_eval"])
    t = counts["truncation"]
    assert t["total"] == sum(t[k] for k in ("whole", "question_cut", "answer_cut", "dropped"))
    assert t["total"] - t["dropped"] == len(pairs)
    assert all(len(p.chosen) <= 200 and len(p.rejected) <= 200 for p in pairs)
    # the first pairs of the split, as the RM stage fits them (one rule, one place)
    rows = list(data["rm_eval"].select(range(t["total"])))
    same = fit_pairs(rows, tok, 200, overlength)
    assert [(p.chosen.tolist(), p.rejected.tolist(), p.len_chosen, p.len_rejected, p.group) for p in pairs] == \
        [(p.chosen.tolist(), p.rejected.tolist(), p.len_chosen, p.len_rejected, p.group) for p in same.pairs]
    if overlength == "truncate":
        assert len(pairs) == 20 and t["whole"] < t["total"]  # beer answers are long: some are cut
    else:
        assert t["dropped"] >= 1 and t["question_cut"] == t["answer_cut"] == 0


def test_summaries_on_synthetic_rows():
    # RM rows: chosen beats rejected in pairs 0, 2; a tie in pair 1; lengths make pair 1 adversarial,
    # pair 2 of equal length; pairs 0 and 1 answer one question, pair 2 another
    rm = [{"index": 0, "group": "beer/7", "chosen": 1.0, "rejected": 0.0, "len_chosen": 10, "len_rejected": 5},
          {"index": 1, "group": "beer/7", "chosen": 0.5, "rejected": 0.5, "len_chosen": 3, "len_rejected": 8},
          {"index": 2, "group": "beer/9", "chosen": 2.0, "rejected": 1.0, "len_chosen": 4, "len_rejected": 4}]
    s = summarize_rm(rm, 100, 0)
    assert (s["resample"], s["n_questions"]) == ("question", 2)
    assert s["accuracy"]["mean"] == (2 + 0.5) / 3 and s["accuracy"]["ties"] == 1
    assert s["length_baseline"]["mean"] == (1 + 0 + 0.5) / 3 and s["length_baseline"]["ties"] == 1
    assert (s["adversarial"]["mean"], s["adversarial"]["n"]) == (0.5, 1)
    assert s["margin_mean"] == pytest.approx(2 / 3)
    # intervals over questions, by hand: question beer/7 holds outcomes 1 + 0.5 over 2 pairs, beer/9
    # 1 over 1; a resample draws 2 questions and averages over their pairs
    gidx = np.random.default_rng(0).integers(0, 2, size=(100, 2))
    total, n = np.array([1.5, 1.0]), np.array([2.0, 1.0])
    means = total[gidx].sum(1) / n[gidx].sum(1)  # each in {3/4, 2.5/3, 1}
    lo, hi = np.percentile(means, [2.5, 97.5])
    assert (s["accuracy"]["lo"], s["accuracy"]["hi"]) == pytest.approx((lo, hi), rel=1e-12)
    assert s["accuracy"]["lo"] >= 0.75  # a resample of pairs could draw the tie three times (0.5)
    # the one adversarial pair's question is drawn in every resample: no spread
    assert (s["adversarial"]["lo"], s["adversarial"]["hi"]) == (0.5, 0.5)
    assert summarize_rm(rm[2:], 100, 0)["adversarial"] == {"mean": None, "lo": None, "hi": None, "n": 0}
    # rows without a question are resampled one by one, and say so
    plain = summarize_rm([{k: v for k, v in r.items() if k != "group"} for r in rm], 100, 0)
    assert (plain["resample"], plain["n_questions"]) == ("pair", None)
    assert (plain["accuracy"]["lo"], plain["accuracy"]["hi"]) == \
        evalstats.win_rate_ci([1.0, 0.5, 2.0], [0.0, 0.5, 1.0], 100, 0)[1:]

    # LM rows: per-text summed NLL over `tokens` answer tokens; token-weighted mean
    lm = [{"index": 0, "tokens": 2, "nll": {"base": 8.0, "sft": 4.0}},
          {"index": 1, "tokens": 6, "nll": {"base": 12.0, "sft": 12.0}}]
    s = summarize_lm(lm, ["base", "sft"], 100, 0)
    assert s["models"]["base"]["loss"]["mean"] == 20 / 8 and s["models"]["sft"]["loss"]["mean"] == 16 / 8
    assert s["models"]["sft"]["ppl"]["mean"] == pytest.approx(math.exp(2.0))
    assert s["diffs"]["sft_vs_base"]["mean"] == -4 / 8
    lo, hi = s["models"]["base"]["loss"]["lo"], s["models"]["base"]["loss"]["hi"]
    assert s["models"]["base"]["ppl"]["lo"] == pytest.approx(math.exp(lo)) and 2.0 <= lo <= hi <= 4.0

    # prompt records: lengths and rewards per model; ppo wins where lengths match (prompts 0, 1)
    lens = {"sft": [10, 10, 10, 4], "ppo": [9, 11, 20, 4]}
    rew = {"sft": [0.0, 0.0, 0.0, 1.0], "ppo": [1.0, 1.0, -1.0, 1.0]}
    recs = [{"index": i, "kl": {"ppo": 0.1 * i},
             "responses": {m: {"text": "x", "reward": rew[m][i], "length": lens[m][i], "eos": True}
                           for m in ("sft", "ppo")}} for i in range(4)]
    models, wins, kl = summarize(recs, ["sft", "ppo"], 100, 0)
    w = wins["ppo_vs_sft"]
    assert (w["mean"], w["wins"], w["ties"], w["losses"]) == ((2 + 0.5) / 4, 2, 1, 1)
    # matched: |9-10| <= 2, |11-10| <= 2.2, |20-10| > 4, |4-4| = 0 -> prompts 0, 1, 3: win, win, tie
    assert (w["length_matched"]["mean"], w["length_matched"]["n"]) == ((2 + 0.5) / 3, 3)
    rho = models["ppo"]["length_reward_spearman"]
    assert rho["mean"] == pytest.approx(evalstats.spearman(lens["ppo"], rew["ppo"]))
    # by hand: rx = [2, 3, 4, 1], ry = [3, 3, 1, 3]; dx = [-.5, .5, 1.5, -1.5], dy = [.5, .5, -1.5, .5]
    assert rho["mean"] == pytest.approx(-3 / np.sqrt(5 * 3))  # sum dx dy = -3, sum dx^2 = 5, sum dy^2 = 3
    assert kl["ppo_vs_sft"]["mean"] == pytest.approx(0.15)
