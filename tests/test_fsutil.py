"""Outputs built in a temporary folder and renamed into place follow the umask like every other file:
prepared data, the tiny model, exported models (mkdtemp makes 0700 folders, safetensors 0600 files).
Atomic writes (a file, a published folder) leave no temporary behind and a failure keeps the old target.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from stackllama_ds import fsutil
from stackllama_ds.fsutil import FolderTaken, atomic_file, follow_umask, publish_folder, umask, write_atomic


@contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def umask_022():
    with _umask(0o022):
        yield


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


# ----------------------------------------------------------------------------- atomic writes
@pytest.fixture
def umask_027():
    with _umask(0o027):
        yield


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_write_atomic_text_and_bytes(tmp_path, umask_027):
    write_atomic(tmp_path / "a.txt", "héllo\n")
    write_atomic(tmp_path / "b.bin", b"\x00\xff")
    write_atomic(tmp_path / "a.txt", "again\n")  # replaces
    assert (tmp_path / "a.txt").read_text() == "again\n" and (tmp_path / "b.bin").read_bytes() == b"\x00\xff"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin"]  # no temporary left
    assert _mode(tmp_path / "a.txt") == _mode(tmp_path / "b.bin") == 0o640


def test_atomic_file_names_its_temporary_and_a_failure_keeps_the_old_file(tmp_path):
    target = tmp_path / "rank-0"
    write_atomic(target, "old\n")
    with pytest.raises(RuntimeError), atomic_file(target, tmp_name=".rank-0.tmp") as tmp:
        assert tmp == tmp_path / ".rank-0.tmp"
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["rank-0"]


def test_publish_folder_builds_beside_then_renames_with_umask_modes(tmp_path, umask_027):
    out = tmp_path / "sub" / "model"  # the parent is made
    with publish_folder(out) as tmp:
        assert tmp.parent == out.parent and tmp.name.startswith(".model.tmp-") and not out.exists()
        assert _mode(tmp) == 0o700  # mkdtemp's
        (tmp / "inner").mkdir()
        (tmp / "inner" / "w.bin").write_bytes(b"w")
        os.chmod(tmp / "inner" / "w.bin", 0o600)  # as safetensors writes
    assert (out / "inner" / "w.bin").read_bytes() == b"w"
    assert [p.name for p in out.parent.iterdir()] == ["model"]
    assert _modes(out) == ({0o750}, {0o640})


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-aside"])
def test_publish_folder_replaces_the_old_folder(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(fsutil, "_exchange", lambda a, b: False)
    out = tmp_path / "data"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with publish_folder(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # neither the temporary nor the old one is left


def test_publish_folder_failure_leaves_the_old_folder(tmp_path):
    out = tmp_path / "tiny"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(RuntimeError), publish_folder(out) as tmp:
        (tmp / "config.json").write_text('{"half": true}')
        raise RuntimeError("killed mid-save")
    assert (out / "config.json").read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]


def test_publish_folder_refuses_a_file_target(tmp_path):
    out = tmp_path / "model"
    out.write_text("not a folder")
    with pytest.raises(NotADirectoryError), publish_folder(out) as tmp:
        (tmp / "a").write_text("a")
    assert out.read_text() == "not a folder"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_publish_folder_without_replace_keeps_the_first(tmp_path):
    out = tmp_path / "tokens"
    with publish_folder(out, replace=False) as tmp:
        (tmp / "ids.bin").write_text("first")
    with pytest.raises(FolderTaken), publish_folder(out, replace=False) as tmp:
        (tmp / "ids.bin").write_text("second")
    assert (out / "ids.bin").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["tokens"]
