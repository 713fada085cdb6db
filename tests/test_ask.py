"""``stackllama-ds ask``: where it finds a run's models, and the command on the tiny run.

    python -m pytest tests/test_ask.py -q
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from stackllama_ds.ask import find_models
from tests.conftest import FAST_RM, FAST_SFT, fresh_root, run_cli, write_config


def _model(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    (p / "config.json").write_text("{}")
    return p


def test_find_models_search_order(tmp_path):
    root = tmp_path / "run"
    _model(root / "sft" / "model")
    _model(root / "rm" / "model")
    _model(root / "tiny")
    run = find_models(root, ["base", "sft", "ppo"])
    assert run.paths == {"base": root / "tiny", "sft": root / "sft" / "model"}  # base: RUN_ROOT/tiny last
    assert run.missing == {"ppo": root / "ppo" / "model"} and run.reward == root / "rm" / "model"
    # eval.json records the base path: relative to the root, or absolute
    elsewhere = _model(tmp_path / "pretrained")
    (root / "eval").mkdir()
    (root / "eval" / "eval.json").write_text(json.dumps({"models": {"base": {"path": str(elsewhere)}}}))
    assert find_models(root, ["base"]).paths == {"base": elsewhere}
    # --config: RunLayout.base_model of that config, with output_root = RUN_ROOT
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "somewhere-else")
    assert find_models(root, ["base", "sft"], str(cfg)).paths["base"] == root / "tiny"
    with pytest.raises(ValueError, match="unknown model"):
        find_models(root, ["sft", "dpo"])
    with pytest.raises(FileNotFoundError, match="no model to ask"):
        find_models(root, ["ppo"])
    with pytest.raises(FileNotFoundError, match="run root not found"):
        find_models(tmp_path / "nothing", ["sft"])


@pytest.mark.slow
def test_ask_on_tiny_run(rm_root, tmp_path):
    root = fresh_root(rm_root, tmp_path / "askrun", stages=("sft", "rm"))
    out = tmp_path / "answers.json"
    r = run_cli("ask", root, "Which beer goes with spicy food?", "--samples", "2", "--seed", "3",
                "--max-new-tokens", "12", "--json", out, "--width", "120", timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "ppo skipped" in r.stdout and "Question: Which beer goes with spicy food?" in r.stdout
    rows = json.loads(out.read_text())
    assert [(a["model"], a["sample"]) for a in rows] == [("base", 0), ("base", 1), ("sft", 0), ("sft", 1)]
    for a in rows:
        assert math.isfinite(a["reward"]) and 1 <= a["length"] <= 12
        assert a["eos"] or a["length"] == 12
    assert sum(line.startswith("│ base") or line.startswith("│ sft") for line in r.stdout.splitlines()) == 4
    # same seed, same answers; a model asked for by name that the run lacks: exit 2, named
    r2 = run_cli("ask", root, "Which beer goes with spicy food?", "--samples", "2", "--seed", "3",
                 "--max-new-tokens", "12", "--json", tmp_path / "again.json", "--models", "sft,base", timeout=300)
    assert r2.returncode == 0, r2.stderr[-4000:]
    assert json.loads((tmp_path / "again.json").read_text()) == rows
    cfg = write_config(tmp_path / "cfg.yaml", root, sft=FAST_SFT, rm=FAST_RM)
    r3 = run_cli("ask", root, "Stout or porter?", "--models", "sft,ppo", "--config", cfg, timeout=300)
    assert r3.returncode == 2 and "ppo model not found" in r3.stderr
