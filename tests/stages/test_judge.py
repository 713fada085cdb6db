"""The independent judge (judge.enabled): a second reward model on pairs disjoint from the RM's."""

from __future__ import annotations

import json

import pytest

from tests.conftest import FAST_RM, FAST_SFT, TINY_YAML, fresh_root, run_cli, write_config


def test_judge_pairs_are_disjoint_from_the_reward_models(prepared_root):
    from stackllama_ds.config_loader import load_config
    from stackllama_ds.data.prepare import load_prepared
    from stackllama_ds.stages.rm import JUDGE_SPLIT, judge_config

    data = load_prepared(prepared_root / "data")
    questions = {s: {(r["site"], r["qid"]) for r in data[s].select_columns(["site", "qid"])} for s in data}
    judge = questions[JUDGE_SPLIT]
    assert judge  # the judge has pairs to learn from
    for other in ("rm_train", "rm_eval", "rl_train", "rl_eval"):
        assert not judge & questions[other], other  # no question of the RM's pairs or of any held-out split

    cfg = load_config(TINY_YAML, [f"output_root={prepared_root}", "rm.init_from=somewhere",
                                  "judge.max_steps=7"], check_files=False)
    j = judge_config(cfg)
    assert j.rm.init_from == str(prepared_root / "tiny")  # the base model, not the SFT model or rm.init_from
    assert (j.rm.length_head, j.rm.max_steps, j.rm.max_length, j.rm.optim) == (False, 7, cfg.rm.max_length, cfg.rm.optim)
    assert cfg.rm.init_from == "somewhere"  # the run's own config is left as it was


@pytest.mark.slow
def test_judge_stage_trains_on_the_judge_split(sft_root, tmp_path):
    from stackllama_ds.data.fit import fit_pairs
    from stackllama_ds.data.prepare import load_prepared
    from stackllama_ds.models.load import load_tokenizer
    from stackllama_ds.run.metrics import read_metrics

    root = fresh_root(sft_root, tmp_path / "judge", stages=("sft",))
    cfg = write_config(root / "cfg.yaml", root, sft=FAST_SFT, rm=FAST_RM, judge={"enabled": True, "max_steps": 4})
    r = run_cli("judge", cfg)
    assert r.returncode == 0, r.stderr[-4000:]
    assert (root / "judge" / "DONE").exists() and not (root / "rm").exists()
    rows = read_metrics(root / "judge" / "metrics.jsonl")
    assert [x["step"] for x in rows] == [1, 2, 3, 4]
    tok = load_tokenizer(root / "tiny", padding_side="right")
    sft_pairs = fit_pairs(load_prepared(root / "data")["sft"], tok, FAST_RM["max_length"], FAST_RM["overlength"])
    assert rows[0]["train_pairs"] == len(sft_pairs.pairs)
    conf = json.loads((root / "judge" / "model" / "config.json").read_text())
    assert len(conf["id2label"]) == 1  # a plain reward model: no length head
    acc = json.loads((root / "judge" / "accuracy.json").read_text())
    assert acc["n_pairs"] >= 1 and 0.0 <= acc["accuracy"] <= 1.0
