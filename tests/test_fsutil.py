"""Outputs built in a temporary folder and renamed into place follow the umask like every other file:
prepared data, the tiny model, exported models (mkdtemp makes 0700 folders, safetensors 0600 files).
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path

import pytest

from stackllama_ds.fsutil import follow_umask, umask


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _modes(root: Path) -> tuple[set[int], set[int]]:
    """(folder modes, file modes) of root and everything under it."""
    dirs, files = {stat.S_IMODE(root.stat().st_mode)}, set()
    for p in root.rglob("*"):
        (dirs if p.is_dir() else files).add(stat.S_IMODE(p.stat().st_mode))
    return dirs, files


def test_umask_reads_without_changing():
    old = os.umask(0o027)
    try:
        assert umask() == 0o027 and umask() == 0o027
    finally:
        os.umask(old)


@pytest.mark.parametrize("mask,dmode,fmode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640), (0o002, 0o775, 0o664)])
def test_follow_umask_on_a_mkdtemp_tree(tmp_path, mask, dmode, fmode):
    import torch
    from safetensors.torch import save_file

    old = os.umask(mask)
    try:
        tmp = Path(tempfile.mkdtemp(dir=tmp_path))
        (tmp / "sub").mkdir()
        save_file({"w": torch.zeros(2)}, str(tmp / "sub" / "w.safetensors"))
        (tmp / "a.json").write_text("{}")
        (tmp / "link").symlink_to(tmp_path)  # left alone, not followed
        before = stat.S_IMODE(tmp_path.stat().st_mode)
        follow_umask(tmp)
    finally:
        os.umask(old)
    (tmp / "link").unlink()
    assert _modes(tmp) == ({dmode}, {fmode})
    assert stat.S_IMODE(tmp_path.stat().st_mode) == before


TEXTS = ["Question: Which hops for an IPA?\n\nAnswer: Cascade and Citra, late in the boil."] * 8
PAIRS = [{"qid": q, "question": f"Question {q} about beer?", "date": "2017-01-01", "metadata": [],
          "response_j": f"A good answer {q}.", "response_k": f"A worse answer {q}."} for q in range(40)]


def test_prepared_data_tiny_model_and_export_follow_umask(tmp_path, umask_022, monkeypatch):
    """prepare, make-tiny and export_hf (the LoRA actor: adapter/, merged weights, value head) under umask 022."""
    import torch

    from stackllama_ds.config import LoraConfig, ModelConfig, TinyModelConfig
    from stackllama_ds.data.prepare import prepare
    from stackllama_ds.models import tiny
    from stackllama_ds.models.hf_folder import export_hf, value_head_path
    from stackllama_ds.models.load import load_causal_lm

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    prepare(pairs, tmp_path / "data", log=lambda *a, **k: None)
    assert _modes(tmp_path / "data") == ({0o755}, {0o644})

    monkeypatch.setattr(tiny, "_texts_from_prepared", lambda _: iter(TEXTS))
    small = TinyModelConfig(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    base = tiny.make_tiny(tmp_path / "data", tmp_path / "tiny", cfg=small)
    assert _modes(base) == ({0o755}, {0o644})

    lora = LoraConfig(enabled=True, r=2, alpha=4)
    policy = load_causal_lm(base, ModelConfig(), dtype="fp32", lora=lora)
    sd = {f"policy.{k}": v for k, v in policy.state_dict().items()}
    sd |= {"v_head.weight": torch.zeros(1, small.hidden_size), "v_head.bias": torch.zeros(1)}
    out = export_hf("actor", sd, base, tmp_path / "ppo" / "model", ModelConfig(), lora, "fp32")
    assert (out / "adapter").is_dir() and value_head_path(out).exists() and (out / "model.safetensors").exists()
    assert _modes(out) == ({0o755}, {0o644})
