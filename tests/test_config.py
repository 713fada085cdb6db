"""Configs: defaults are StackLLaMA's, every shipped YAML validates, bad configs fail with named fields."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from stackllama_ds.config import ConfigError, RunConfig, load_config, resolve_grad_accum
from stackllama_ds.engines.ds_config import ds_config
from tests.conftest import REPO, run_cli


def test_defaults_are_stackllama():
    c = RunConfig()
    assert (c.sft.seq_length, c.sft.optim.lr, c.sft.optim.scheduler, c.sft.optim.warmup_steps) == (1024, 1e-5, "cosine", 100)
    assert c.sft.optim.weight_decay == 0.05 and (c.sft.lora.r, c.sft.lora.alpha, c.sft.lora.dropout) == (16, 32, 0.05)
    assert (c.rm.optim.lr, c.rm.epochs, c.rm.max_length, c.rm.engine.micro_batch_size, c.rm.optim.scheduler) == (
        2e-5, 1.0, 512, 4, "linear")
    assert (c.rm.lora.r, c.rm.lora.alpha, c.rm.lora.dropout) == (8, 32, 0.1)
    p = c.ppo
    assert (p.optim.lr, p.batch_size, p.mini_batch_size, p.gradient_accumulation_steps, p.ppo_epochs) == (1.4e-5, 8, 1, 8, 4)
    assert (p.gamma, p.lam, p.cliprange, p.cliprange_value, p.vf_coef) == (1.0, 0.95, 0.2, 0.2, 0.1)
    assert (p.adaptive_kl, p.init_kl_coef, p.target, p.horizon, p.kl_penalty) == (True, 0.2, 6.0, 10000, "kl")
    assert (p.early_stopping, p.target_kl, p.ratio_threshold, p.response_min_length, p.response_max_length) == (
        True, 0.1, 10.0, 32, 127)
    assert (p.reward_baseline, p.max_prompt_length, p.lora.r, p.lora.alpha, p.lora.dropout) == (0.0, 512, 16, 32, 0.05)


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_yaml_validates(path: Path):
    cfg = load_config(path, check_files=False)
    assert isinstance(cfg, RunConfig)


@pytest.mark.parametrize("path", sorted((REPO / "ds_configs").glob("*.json")), ids=lambda p: p.name)
def test_shipped_ds_json_has_no_auto(path: Path):
    text = path.read_text()
    assert '"auto"' not in text
    d = json.loads(text)
    assert d["train_micro_batch_size_per_gpu"] >= 1 and "zero_optimization" in d


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    return p


BAD = [
    # (yaml text, overrides, expected fragments of the one-line error)
    ("sft:\n  seq_lenght: 512\n", [], ["bad.yaml:2", "sft.seq_lenght", "unknown key"]),
    ("sft:\n  seq_length: many\n", [], ["bad.yaml:2", "sft.seq_length", "valid integer"]),
    ("sft:\n  engine:\n    zero_stage: 4\n", [], ["bad.yaml:3", "sft.engine.zero_stage", "less than or equal to 3"]),
    ("ppo:\n  actor:\n    dtype: fp8\n", [], ["bad.yaml:3", "ppo.actor.dtype", "'bf16', 'fp16' or 'fp32'"]),
    ("rm:\n  optim:\n    lr: -1\n", [], ["bad.yaml:3", "rm.optim.lr", "greater than 0"]),
    ("data:\n  posts: /nonexistent/Posts.xml\n", [], ["bad.yaml:2", "data.posts", "file not found"]),
    ("sft:\n  global_batch_size: 6\n  engine:\n    micro_batch_size: 4\n", [],
     ["bad.yaml:2", "sft.global_batch_size", "not divisible by micro_batch_size x world_size"]),
    ("ppo:\n  batch_size: 6\n  mini_batch_size: 4\n  gradient_accumulation_steps: 1\n", [],
     ["bad.yaml:2", "ppo.batch_size", "not divisible"]),
    ("data:\n  splits:\n    sft: 0.9\n", [], ["bad.yaml:2", "data.splits", "sum to 1"]),
    ("model:\n  name_or_path: /nonexistent/llama\n", [], ["bad.yaml:2", "model.name_or_path", "no config.json"]),
    ("sft:\n  engine:\n    offload_params: true\n    zero_stage: 2\n", [], ["sft.engine", "offload_params needs zero_stage 3"]),
    ("ppo:\n  response_min_length: 50\n  response_max_length: 10\n", [], ["ppo", "response_min_length"]),
    ("seed: 1\n", ["ppo.gamma=2"], ["--set ppo.gamma", "ppo.gamma", "less than or equal to 1"]),
    ("seed: 1\n", ["launch.nproc_per_nod=2"], ["--set launch.nproc_per_nod", "unknown key"]),
    ("sft: [1, 2\n", [], ["bad.yaml:2", "invalid YAML"]),
    ("- a\n- b\n", [], ["bad.yaml:1", "top level must be a mapping"]),
    ("model:\n  quantization: 8bit\n", [], ["model.quantization", "only be trained with LoRA enabled"]),
]


@pytest.mark.parametrize("text,overrides,frags", BAD, ids=[b[2][1] for b in BAD])
def test_bad_config_message(tmp_path, text, overrides, frags):
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError) as ei:
        load_config(p, overrides, world_size=2)
    msg = str(ei.value)
    for f in frags:
        assert f in msg, msg
    for line in ei.value.lines:
        assert line.startswith(str(p)) or line.startswith("--set "), line
        assert "Traceback" not in line


def test_validate_cli_exit_codes(tmp_path):
    good = run_cli("validate", REPO / "configs" / "tiny.yaml", "--world-size", "2")
    assert good.returncode == 0, good.stderr
    bad = run_cli("validate", _write(tmp_path, "sft:\n  engine:\n    zero_stage: 7\n"))
    assert bad.returncode == 2
    assert "bad.yaml:3: sft.engine.zero_stage:" in bad.stderr and "Traceback" not in bad.stderr


def test_world_size_changes_batch_arithmetic(tmp_path):
    p = _write(tmp_path, "sft:\n  global_batch_size: 8\n  engine:\n    micro_batch_size: 2\n")
    assert resolve_grad_accum(load_config(p, world_size=2).sft.engine, 8, 2) == 2
    with pytest.raises(ConfigError, match="not divisible"):
        load_config(p, world_size=3)


def test_ds_config_from_engine():
    c = RunConfig()
    e = c.sft.engine.model_copy(update={"zero_stage": 3, "stage3_param_persistence_threshold": 0, "offload_optimizer": True})
    d = ds_config(e, world_size=2, grad_accum=3, optim=c.sft.optim)
    assert d["train_batch_size"] == 4 * 3 * 2
    assert d["zero_optimization"]["stage"] == 3 and d["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    assert d["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    from stackllama_ds.hardware import auto_dtype

    assert c.sft.engine.dtype == auto_dtype()  # the default dtype "auto" is resolved on validation
    assert d["optimizer"]["params"]["lr"] == 1e-5 and d["bf16"]["enabled"] is (auto_dtype() == "bf16")
    assert "optimizer" not in ds_config(e, world_size=2)
    assert '"auto"' not in yaml.safe_dump(d)


@pytest.mark.parametrize("name", ["zero2_bf16", "zero3_bf16", "zero3_offload_bf16", "inference_zero0_bf16"])
def test_presets_match_generator(name):
    from stackllama_ds.engines.ds_config import preset

    assert json.loads((REPO / "ds_configs" / f"{name}.json").read_text()) == preset(name)
