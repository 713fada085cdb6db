"""Checkpoints without frozen parameters: small LoRA checkpoints, exact resume, the base folder hashed.

    python -m pytest tests/stages/test_frozen_checkpoint.py -q

Frozen parameters (a LoRA or quantised base) are left out of checkpoints and come from the base
folder, as when the engine was built; the manifest records the sha256 of that folder's weight
files, and resume and export refuse a base that changed. Unit tests use a stand-in engine in one
process; the slow ones run 2-rank engines (tests/stages/_frozen_resume.py) and the SFT CLI.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from stackllama_ds.run import checkpoint as ck
from stackllama_ds.run.checkpoint import CheckpointError, TrainState, load_checkpoint, save_checkpoint
from stackllama_ds.run.metrics import read_metrics
from tests.conftest import REPO, assert_resumed_at, cli_env, fresh_root, run_cli, write_config


# ------------------------------------------------------------------------- unit: one process
class _Model(nn.Module):
    """A frozen 'base' weight and a trained one; ``config.name_or_path`` as from_pretrained sets it."""

    def __init__(self, base: Path):
        super().__init__()
        self.base = nn.Linear(4, 4)
        self.base.requires_grad_(False)
        self.adapter = nn.Linear(4, 1)
        self.config = type("Cfg", (), {"name_or_path": str(base)})()


class FrozenEngine:
    """checkpoint.py's view of a DeepSpeedEngine, with DeepSpeed's exclude/strict-load semantics."""

    def __init__(self, base: Path):
        self.module = _Model(base)
        self.excluded = None

    def save_checkpoint(self, save_dir, tag, save_latest=False, exclude_frozen_parameters=False):
        self.excluded = exclude_frozen_parameters
        sd = self.module.state_dict()
        if exclude_frozen_parameters:
            sd = {k: v for k, v in sd.items() if not k.startswith("base.")}
        (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
        torch.save({"module": sd}, Path(save_dir) / tag / "mp_rank_00_model_states.pt")

    def load_checkpoint(self, load_dir, tag, load_module_strict=True, custom_load_fn=None):
        f = Path(load_dir) / tag / "mp_rank_00_model_states.pt"
        custom_load_fn(src=torch.load(f)["module"], dst=self.module)
        return str(f), {}


def _base(folder: Path, value: float = 1.0) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.full((4,), value)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text("{}")
    return folder


def test_base_hash_is_of_content_and_cached(tmp_path, monkeypatch):
    base = _base(tmp_path / "base")
    calls = []
    real = ck.sha256_file
    monkeypatch.setattr(ck, "sha256_file", lambda p: calls.append(p) or real(p))
    first = ck.hash_base(base)
    assert set(first) == {"model.safetensors"}  # weight files only
    assert ck.hash_base(base) == first and len(calls) == 1  # once per process while unchanged
    _base(base, value=2.0)  # same size, other bytes
    assert ck.hash_base(base) != first and len(calls) == 2


def test_frozen_params_left_out_and_changed_base_refused(tmp_path):
    base = _base(tmp_path / "base")
    eng = FrozenEngine(base)
    ckpt = save_checkpoint({"model": eng}, tmp_path / "ckpts", TrainState(step=2), 2, {"kind": "x"})
    m = json.loads((ckpt / "manifest.json").read_text())
    saved = m["excluded_frozen"]["model"]
    assert eng.excluded and saved["params"] == ["base.weight", "base.bias"]
    assert saved["base"]["path"] == str(base.resolve()) and saved["base"]["sha256"] == ck.base_sha256(ck.hash_base(base))

    load_checkpoint({"model": FrozenEngine(base)}, ckpt)  # the same base: resumes
    copy = shutil.copytree(base, tmp_path / "copy")
    load_checkpoint({"model": FrozenEngine(copy)}, ckpt)  # another path, same weights: resumes

    _base(base, value=3.0)
    now = ck.base_sha256(ck.hash_base(base))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint({"model": FrozenEngine(base)}, ckpt)
    msg = str(e.value)
    assert saved["base"]["sha256"] in msg and now in msg and "differing files: model.safetensors" in msg


def test_module_load_is_strict_except_excluded_frozen():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    sd = model.state_dict()
    load = ck._strict_module_load("model", {"0.weight", "0.bias"})
    load({k: v for k, v in sd.items() if not k.startswith("0.")}, model)  # the excluded ones may miss
    load({**{k: v for k, v in sd.items() if k != "0.weight"}, "0.weight_format": 0}, model)  # bnb's extra state
    with pytest.raises(CheckpointError, match=r"1 missing \['1.bias'\]"):
        load({k: v for k, v in sd.items() if k != "1.bias"}, model)
    with pytest.raises(CheckpointError, match=r"1 unexpected \['2.weight'\]"):
        load({**sd, "2.weight": torch.zeros(1)}, model)
    with pytest.raises(CheckpointError, match="0.weight"):
        ck._strict_module_load("model", set())({k: v for k, v in sd.items() if k != "0.weight"}, model)


def test_tied_frozen_weight_is_left_out_under_every_name():
    """DeepSpeed drops a frozen tensor under its first name only: a tied lm_head stayed (SmolLM2)."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    class Engine:
        def __init__(self):
            self.module = nn.Module()
            self.module.emb, self.module.head = nn.Embedding(8, 4), nn.Linear(4, 8, bias=False)
            self.module.head.weight = self.module.emb.weight
            self.module.emb.requires_grad_(False)
            self.module.adapter = nn.Linear(4, 4)

        def random_ltd_enabled(self):
            return False

        def module_state_dict(self, **kw):
            return DeepSpeedEngine.module_state_dict(self, **kw)

    eng = Engine()
    names = ck.frozen_names(eng)
    assert names == ["emb.weight", "head.weight"]
    assert "head.weight" in eng.module_state_dict(exclude_frozen_parameters=True)
    with ck._without_frozen(eng, names):
        assert set(eng.module_state_dict(exclude_frozen_parameters=True)) == {"adapter.weight", "adapter.bias"}
    assert "head.weight" in eng.module_state_dict(exclude_frozen_parameters=True)  # this save only


# ---------------------------------------------------------------- 2 ranks: engines, then the CLI
LOSS_TOL = 1e-5  # fp32, same world size and batches


@pytest.mark.slow
def test_engines_resume_exactly_without_frozen_params(prepared_root, tmp_path):
    """Full fine-tuning, LoRA under ZeRO-0, an actor (LoRA + value head) under partitioned ZeRO-3,
    LoRA on an 8-bit base, an actor with a frozen value head: saved, trained on, resumed."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).with_name("_frozen_resume.py")), "--root", str(prepared_root),
           "--out", str(tmp_path / "result.json")]  # fmt: skip
    r = subprocess.run(cmd, cwd=REPO, env=cli_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads((tmp_path / "result.json").read_text())
    for name, c in res.items():
        assert len(c["resumed"]) == 2
        for a, b in zip(c["reference"], c["resumed"]):
            assert abs(a - b) <= LOSS_TOL, (name, c["reference"], c["resumed"])
        assert not set(c["frozen"]) & set(c["saved_keys"]), name
        m = json.loads((Path(c["ckpt"]) / "manifest.json").read_text())
        assert bool(c["frozen"]) == ("model" in m["excluded_frozen"]), name
    assert not res["full_z2"]["frozen"]
    for name in ("lora_z0", "actor_lora_z3", "q8_lora_z2"):
        assert all("lora_" in k or "v_head" in k for k in res[name]["saved_keys"] if k.endswith("weight")), name
        # Adapters and their Adam moments only: a few % of the full fine-tuning checkpoint.
        assert res[name]["bytes"] < 0.1 * res["full_z2"]["bytes"], (name, res[name]["bytes"], res["full_z2"]["bytes"])


# Same global batch (8 packed sequences) on 2 ranks x 4 and on 1 rank x 4 x 2 accumulation steps;
# no dropout, since a resume on another number of ranks does not restore the ranks' RNG.
LORA_SFT = {"max_steps": 4, "save_every": 2, "eval_every": 100, "seq_length": 64, "global_batch_size": 8,
            "engine": {"dtype": "fp32", "micro_batch_size": 4, "zero_stage": 2},
            "optim": {"lr": 3e-3, "warmup_steps": 0, "scheduler": "constant"},
            "lora": {"enabled": True, "r": 4, "alpha": 16, "dropout": 0.0}}


def _losses(root: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(root / "sft" / "metrics.jsonl")}


@pytest.mark.slow
def test_lora_sft_small_checkpoint_resume_export_and_changed_base(prepared_root, tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from stackllama_ds.engines.consolidate import consolidated_state_dict
    from stackllama_ds.run.export import export_checkpoint

    ref = fresh_root(prepared_root, tmp_path / "ref")
    (ref / "tiny").unlink()  # its own copy of the base, altered below
    shutil.copytree(prepared_root / "tiny", ref / "tiny")
    r = run_cli("sft", write_config(ref / "cfg.yaml", ref, sft=LORA_SFT))
    assert r.returncode == 0, r.stderr[-4000:]
    ckpts = ref / "sft" / "checkpoints"
    weights = (ref / "tiny" / "model.safetensors").stat().st_size
    model_bytes = sum(p.stat().st_size for p in (ckpts / "step-4" / "model").rglob("*") if p.is_file())
    assert model_bytes < 0.3 * weights, (model_bytes, weights)  # a full checkpoint holds the weights and more

    # The exported folder: the base plus scale * B @ A on the LoRA targets, every other weight the base's.
    base = AutoModelForCausalLM.from_pretrained(ref / "tiny").state_dict()
    merged = AutoModelForCausalLM.from_pretrained(ref / "sft" / "model").state_dict()
    trained = consolidated_state_dict(ckpts / "step-4" / "model")
    assert trained and all("lora_" in k for k in trained)
    scale = LORA_SFT["lora"]["alpha"] / LORA_SFT["lora"]["r"]
    for k, v in merged.items():
        name = k.removesuffix(".weight")
        a = trained.get(f"base_model.model.{name}.lora_A.default.weight")
        if a is None:
            assert torch.equal(v, base[k]), k
        else:
            b = trained[f"base_model.model.{name}.lora_B.default.weight"]
            assert b.abs().max() > 0
            torch.testing.assert_close(v, base[k] + b @ a * scale)

    # A run root to resume from step 2 (on one rank), its base changed first.
    root = Path(shutil.copytree(ref, tmp_path / "resume", symlinks=True))
    for p in (root / "sft" / "checkpoints" / "step-4", root / "sft" / "model"):
        shutil.rmtree(p)
    (root / "sft" / "DONE").unlink()
    before = read_metrics(root / "sft" / "metrics.jsonl")  # the reference run's 4 steps
    cfg = write_config(root / "cfg.yaml", root, sft=LORA_SFT)
    good = load_file(str(ref / "tiny" / "model.safetensors"))
    for d in (root, ref):
        save_file({k: v + 1e-3 if k.endswith("embed_tokens.weight") else v for k, v in good.items()},
                  str(d / "tiny" / "model.safetensors"), metadata={"format": "pt"})
    saved = json.loads((ckpts / "step-2" / "manifest.json").read_text())["excluded_frozen"]["model"]["base"]["sha256"]
    now = ck.base_sha256(ck.hash_base(root / "tiny"))
    r = run_cli("sft", cfg, "--set", "launch.nproc_per_node=1")
    assert r.returncode not in (0, 75), r.stderr[-3000:]
    assert saved in r.stderr and now in r.stderr and "differing files: model.safetensors" in r.stderr, r.stderr[-3000:]
    with pytest.raises(CheckpointError, match=now):  # an export onto the changed base is refused too
        export_checkpoint(ckpts / "step-4", tmp_path / "exp")
    assert not (tmp_path / "exp").exists()

    shutil.copyfile(prepared_root / "tiny" / "model.safetensors", root / "tiny" / "model.safetensors")
    r = run_cli("sft", cfg, "--set", "launch.nproc_per_node=1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert_resumed_at(before, read_metrics(root / "sft" / "metrics.jsonl"), 2)
    want, got = _losses(ref), _losses(root)
    assert sorted(got) == [1, 2, 3, 4]
    for s in (3, 4):  # weights, Adam moments, data position carried over (reduction order differs)
        assert got[s] == pytest.approx(want[s], rel=1e-4), (s, want[s], got[s])
