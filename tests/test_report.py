"""``stackllama_ds.evaluation.report``: plots redrawn from synthetic metrics.jsonl files, and report.md tables.

    python -m pytest tests/test_report.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stackllama_ds.evaluation.report import redraw, render_markdown

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_rows(path: Path, rows: list[dict], tail: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def _check_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    import matplotlib.image as mpimg

    img = mpimg.imread(path)  # decodes the whole file: a truncated PNG raises
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_redraw_writes_valid_pngs(tmp_path):
    root = tmp_path / "run"
    sft = [{"step": s, "loss": 8.0 - 0.1 * s} | ({"eval_loss": 7.5 - 0.05 * s} if s % 5 == 0 else {}) for s in range(1, 21)]
    _write_rows(root / "sft" / "metrics.jsonl", sft)
    # RM rows: eval_accuracy only on some rows, None before the first evaluation
    rm = [{"step": s, "loss": 0.7, "eval_accuracy": (0.5 + 0.01 * s if s % 4 == 0 else None)} for s in range(1, 13)]
    _write_rows(root / "rm" / "metrics.jsonl", rm)
    # PPO: a running job, the last line cut mid-write, a non-finite value logged as a string
    ppo = [{"step": s, "reward_mean": 0.1 * s, "kl": 0.05 * s, "kl_coef": 0.2 - 0.001 * s} for s in range(1, 9)]
    ppo[3]["kl"] = "nan"
    _write_rows(root / "ppo" / "metrics.jsonl", ppo, tail='{"step": 9, "reward_me')
    messages: list[str] = []
    paths = redraw(root, log=messages.append)
    assert [p.name for p in paths] == ["sft_loss.png", "rm_training.png", "rm_accuracy.png", "ppo.png"]
    assert all(p.parent == root / "eval" for p in paths)
    for p in paths:
        _check_png(p)
    assert messages == []
    assert not list((root / "eval").glob("*.tmp"))
    # redrawing (a running job, later) overwrites in place
    assert redraw(root, log=messages.append) == paths


def test_moving_average_by_hand():
    from stackllama_ds.evaluation.report import moving_average

    # window 3: [1], [1, 2], [1, 2, 3], [2, 3, 7], [3, 7, 5]
    assert moving_average([1.0, 2.0, 3.0, 7.0, 5.0], 3) == [1.0, 1.5, 2.0, 4.0, 5.0]
    assert moving_average([4.0, 0.0], 1) == [4.0, 0.0]


def test_redraw_skips_missing_and_empty(tmp_path):
    root = tmp_path / "run"
    _write_rows(root / "sft" / "metrics.jsonl", [{"step": 1, "loss": 3.0}])
    _write_rows(root / "rm" / "metrics.jsonl", [{"step": 1, "loss": 0.7, "eval_accuracy": None}])  # no eval yet
    messages: list[str] = []
    paths = redraw(root, tmp_path / "plots", log=messages.append)
    assert [p.name for p in paths] == ["sft_loss.png", "rm_training.png"]  # the RM's training loss is there
    _check_png(tmp_path / "plots" / "sft_loss.png")
    assert not (tmp_path / "plots" / "rm_accuracy.png").exists()
    assert any("rm_accuracy.png skipped" in m and "eval_accuracy" in m for m in messages)
    assert any("ppo.png skipped" in m and "not found" in m for m in messages)
    (tmp_path / "empty").mkdir()
    assert redraw(tmp_path / "empty", log=messages.append) == []
    with pytest.raises(FileNotFoundError, match="run root not found"):
        redraw(tmp_path / "nothing")


def test_render_markdown_tables_and_samples():
    models = {n: {"path": f"{n}/model", "reward": {"mean": r, "lo": r - 0.1, "hi": r + 0.1}, "reward_std": 0.2,
                  "length_mean": 12.5, "eos_share": 0.5, "degenerate_share": 0.0, "empty_share": 0.0}
              for n, r in (("sft", 0.1), ("ppo", 0.4))}
    res = {
        "split": "rl_eval", "n_requested": 8, "n_available": 3, "n_too_long": 0, "n_prompts": 3,
        "max_prompt_length": 256, "max_new_tokens": 16, "seed": 0, "alpha": 0.05, "bootstrap_samples": 100,
        "reward_model": "rm/model", "models": models,
        "win_rates": {"ppo_vs_sft": {"a": "ppo", "b": "sft", "mean": 0.625, "lo": 0.25, "hi": 1.0,
                                     "wins": 2, "ties": 1, "losses": 1}},
        "kl": {"ppo_vs_sft": {"policy": "ppo", "ref": "sft", "mean": 1.5, "lo": 1.0, "hi": 2.0}},
        "samples": [{"index": i, "question": f"Q{i} a|b\nline", "kl": {"ppo": 1.0},
                     "responses": {n: {"text": "x | y\nz" if i == 0 else "", "reward": 0.5, "length": 3,
                                       "eos": True, "degenerate": False} for n in models}} for i in range(3)],
    }
    md = render_markdown(res, ["ppo.png"], n_samples=2)
    assert "| sft | `sft/model` | 0.100 [0.000, 0.200] | 12.5 |" in md
    assert "| ppo vs sft | 0.625 [0.250, 1.000] | 2 / 1 / 1 |" in md
    assert "tie counts half" in md
    assert "| ppo | sft | 1.500 [1.000, 2.000] |" in md
    assert "![ppo.png](ppo.png)" in md
    assert "only 3 of the 8 requested prompts" in md
    assert "x \\| y<br>z" in md and "(empty)" in md  # cells keep the table intact
    assert "**Prompt 1.**" in md and "**Prompt 2.**" not in md


@pytest.mark.parametrize("n", [1, 40])
def test_redraw_short_and_long_series(tmp_path, n):
    root = tmp_path / "run"
    _write_rows(root / "ppo" / "metrics.jsonl",
                [{"step": s, "reward_mean": float(s), "kl": 0.0, "kl_coef": 0.2} for s in range(1, n + 1)])
    paths = redraw(root, log=lambda m: None)
    assert [p.name for p in paths] == ["ppo.png"]
    _check_png(paths[0])
