"""``stackllama-ds eval`` end to end on the tiny beer run (SFT and RM done, no PPO yet).

    python -m pytest tests/stages/test_eval.py -q -x

Without ``ppo/model`` the stage compares SFT with the base tiny model. A second root whose
``ppo/model`` is a copy of ``sft/model`` checks the pairing: base still joins; with the same seeds
SFT and PPO draw the same responses, so every prompt is a tie (win rate exactly 0.5, also on the
length-matched prompts, which are all of them), the KL is exactly 0 and the held-out losses are
equal; run on one rank, its SFT, LM-loss and RM figures must equal those of the two-rank run.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import (
    FAST_RM,
    FAST_SFT,
    assert_eval_figures_match_records,
    assert_eval_figures_match_samples,
    cli_env,
    fresh_root,
    run_cli,
    write_config,
)

pytestmark = pytest.mark.slow

N_PROMPTS, NEW_TOKENS = 8, 16
EVAL = {"n_prompts": N_PROMPTS, "max_new_tokens": NEW_TOKENS, "batch_size": 4, "bootstrap_samples": 200}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _eval(root: Path, *overrides: str, env: dict[str, str] | None = None) -> dict:
    cfg = write_config(root / "cfg.yaml", root, sft=FAST_SFT, rm=FAST_RM, eval=EVAL)
    args = [a for o in overrides for a in ("--set", o)]
    r = run_cli("eval", cfg, *args, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    assert (root / "eval" / "DONE").exists()
    return json.loads((root / "eval" / "eval.json").read_text())


@pytest.fixture(scope="module")
def first_eval(rm_root, tmp_path_factory) -> tuple[Path, dict]:
    """A copy of rm_root evaluated once on two ranks (the default launch.nproc_per_node)."""
    root = fresh_root(rm_root, tmp_path_factory.mktemp("evalrun"), stages=("sft", "rm"))
    return root, _eval(root)


def test_eval_sft_vs_base_and_rerun_identical(first_eval):
    eval_root, res = first_eval
    assert list(res["models"]) == ["base", "sft"]
    assert res["models"]["base"]["path"] == "tiny" and res["models"]["sft"]["path"] == "sft/model"
    assert res["n_prompts"] == min(N_PROMPTS, res["n_available"] - res["n_too_long"])
    assert_eval_figures_match_samples(res)
    assert list(res["win_rates"]) == ["sft_vs_base"] and res["kl"] == {}

    lm = res["lm"]  # held-out answers: the same tokens for both models
    assert lm["splits"] == ["rl_eval", "rm_eval"] and lm["tokens"] == "answer" and lm["max_length"] == 128
    # every text counts at least its EOS
    assert 1 <= lm["n_texts"] <= lm["n_requested"] and lm["n_tokens"] >= lm["n_texts"]
    for n in ("base", "sft"):
        ppl, loss = lm["models"][n]["ppl"], lm["models"][n]["loss"]
        assert ppl["mean"] == pytest.approx(math.exp(loss["mean"])) and ppl["lo"] == pytest.approx(math.exp(loss["lo"]))
    d = lm["diffs"]["sft_vs_base"]
    assert d["mean"] == pytest.approx(lm["models"]["sft"]["loss"]["mean"] - lm["models"]["base"]["loss"]["mean"])
    assert d["hi"] < 0  # 30 SFT steps on beer answers: the base (random init) predicts them worse

    rm = res["rm"]  # held-out pairs, the RM stage's length policy (FAST_RM: 128 tokens, truncate)
    assert (rm["max_length"], rm["overlength"]) == (FAST_RM["max_length"], FAST_RM["overlength"])
    t = rm["truncation"]  # eval.n_rm_pairs None: every pair of rm_eval read, the dropped ones left out
    assert rm["n_requested"] is None and t["total"] == rm["n_available"]
    assert 1 <= rm["n_pairs"] == t["total"] - t["dropped"] and rm["dtype"] == "fp32"  # CPU
    # the pairs the RM stage scores (data.eval_inputs): questions, cases, answer lengths as scored
    from stackllama_ds.config_loader import load_config
    from stackllama_ds.data.eval_inputs import load_rm_pairs
    from stackllama_ds.models.load import load_tokenizer

    tok = load_tokenizer(eval_root / "sft" / "model")
    c = load_config(eval_root / "cfg.yaml", check_files=False)
    fp = load_rm_pairs(c.root() / "data", tok, c.rm.max_length, c.rm.overlength, c.eval.n_rm_pairs)
    rows = [json.loads(line) for line in (eval_root / "eval" / "rm_pairs.jsonl").read_text().splitlines()]
    assert [(r["group"], r["case"], r["len_chosen"], r["len_rejected"]) for r in rows] == \
        [(p.group, p.case, p.len_chosen, p.len_rejected) for p in fp.pairs]
    assert t == fp.counts["truncation"] and t["whole"] < t["total"]  # beer answers are long: some are cut
    wins = rm["accuracy"]["mean"] * rm["n_pairs"] - 0.5 * rm["accuracy"]["ties"]
    assert wins == pytest.approx(round(wins), abs=1e-9)  # whole pairs won, a tie counting half
    for s in res["samples"]:
        for r in s["responses"].values():
            assert 1 <= r["length"] <= NEW_TOKENS and (r["eos"] or r["length"] == NEW_TOKENS)

    out = eval_root / "eval"
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["rm_accuracy.png", "rm_training.png", "sft_loss.png"]  # no ppo/metrics.jsonl yet: that plot is skipped
    import matplotlib.image as mpimg

    for p in pngs:
        assert (out / p).read_bytes()[:8] == PNG_MAGIC
        assert mpimg.imread(out / p).ndim == 3
    md = (out / "report.md").read_text()
    assert "| model | path | mean reward [CI] |" in md and "| sft vs base |" in md
    assert "## Held-out language-model loss" in md and "| sft - base |" in md
    assert "## Reward model on held-out pairs" in md and "| length baseline: the longer answer is preferred |" in md
    assert "![sft_loss.png](sft_loss.png)" in md and md.count("**Prompt ") == min(4, res["n_prompts"])

    first = (out / "eval.json").read_bytes()
    (out / "DONE").unlink()
    _eval(eval_root)
    assert (out / "eval.json").read_bytes() == first  # same seed -> byte-identical figures and samples


def test_eval_identical_policy_ties_and_zero_kl(first_eval, tmp_path):
    """ppo/model = sft/model: common random numbers give identical responses; KL(ppo||sft) = 0."""
    eval_root, two_ranks = first_eval
    root = fresh_root(eval_root, tmp_path / "same", stages=("sft", "rm"))
    shutil.copytree(root / "sft" / "model", root / "ppo" / "model")
    # a judge that is the reward model itself: its win rates must be the reward model's, score for score
    shutil.copytree(root / "rm" / "model", root / "judge" / "model")
    # The launcher gives each of N ranks cpu_count // N threads; CPU kernels may sum in another order
    # on another thread count (last-bit differences), so the one rank gets a two-rank run's threads.
    threads = str(max(1, (os.cpu_count() or 1) // 2))
    res = _eval(root, "launch.nproc_per_node=1", env=cli_env(OMP_NUM_THREADS=threads))
    assert list(res["models"]) == ["base", "sft", "ppo"]  # base joins even with both trained models
    assert set(res["win_rates"]) == {"sft_vs_base", "ppo_vs_base", "ppo_vs_sft"}
    w = res["win_rates"]["ppo_vs_sft"]
    assert (w["mean"], w["lo"], w["hi"], w["ties"]) == (0.5, 0.5, 0.5, res["n_prompts"])
    assert w["length_matched"] == {"mean": 0.5, "lo": 0.5, "hi": 0.5, "n": res["n_prompts"]}
    assert res["win_rates"]["ppo_vs_base"] | {"a": "sft"} == res["win_rates"]["sft_vs_base"]
    lm = res["lm"]
    assert lm["models"]["ppo"] == lm["models"]["sft"]
    assert (lm["diffs"]["ppo_vs_sft"]["mean"], lm["diffs"]["ppo_vs_sft"]["lo"], lm["diffs"]["ppo_vs_sft"]["hi"]) == (0, 0, 0)
    # one rank here, two in the first test: every batch is placed and seeded by its index
    assert {n: lm["models"][n] for n in ("base", "sft")} == two_ranks["lm"]["models"]
    assert lm["diffs"]["sft_vs_base"] == two_ranks["lm"]["diffs"]["sft_vs_base"]
    assert res["rm"] == two_ranks["rm"]
    kl = res["kl"]["ppo_vs_sft"]
    assert (kl["policy"], kl["ref"]) == ("ppo", "sft")
    assert kl["mean"] == kl["lo"] == kl["hi"] == 0.0
    for s in res["samples"]:
        assert s["responses"]["ppo"] == s["responses"]["sft"] and s["kl"]["ppo"] == 0.0
    # one rank here, two in the first test: batches are seeded by index, not by rank
    assert res["models"]["sft"] | {"path": None} == two_ranks["models"]["sft"] | {"path": None}
    no_judge = [{k: v for k, v in s["responses"]["sft"].items() if k != "judge"} for s in res["samples"]]
    assert no_judge == [s["responses"]["sft"] for s in two_ranks["samples"]]
    assert "judge" not in two_ranks  # no judge folder there
    assert res["judge"]["model"] == "judge/model" and res["judge"]["win_rates"] == res["win_rates"]
    for s in res["samples"]:
        assert all(r["judge"] == r["reward"] for r in s["responses"].values())


def test_eval_figures_recomputed_from_its_records(first_eval):
    """rm_pairs.jsonl, lm_texts.jsonl and responses.jsonl reproduce eval.json: every RM-pair figure and
    its interval over questions, every loss and its interval over texts, each sample's tokens."""
    from stackllama_ds.models.load import load_tokenizer

    eval_root, res = first_eval
    assert_eval_figures_match_records(eval_root / "eval", res, load_tokenizer(eval_root / "sft" / "model"))
    rm = res["rm"]
    assert 1 <= rm["n_questions"] < rm["n_pairs"]  # several pairs per question: resampling them matters
    from stackllama_ds.evaluation.summary import EVAL_JSON_KEYS

    files = ("rm_pairs.jsonl", "lm_texts.jsonl", "responses.jsonl")
    documented = [k for k in (*rm, *rm["truncation"], *files) if f"`{k}`" in EVAL_JSON_KEYS or f"`{k}." in EVAL_JSON_KEYS]
    assert documented == [*rm, *rm["truncation"], *files]
