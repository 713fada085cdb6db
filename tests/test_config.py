"""Configs: defaults are StackLLaMA's, every shipped YAML validates, bad configs fail with named fields."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from stackllama_ds.config import RunConfig, resolve_grad_accum
from stackllama_ds.config_loader import ConfigError, load_config
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
    # TRL's steps=20000 counted samples per process: 2500 PPO iterations of 8 prompts.
    assert p.steps == 2500
    # torch / transformers AdamW betas in every stage; PPOTrainer's optimizer: Adam, constant lr, no decay.
    assert {o.betas for o in (c.sft.optim, c.rm.optim, p.optim, p.critic_optim)} == {(0.9, 0.999)}
    assert (p.optim.weight_decay, p.optim.scheduler, p.optim.warmup_steps) == (0.0, "constant", 0)
    # HF Trainer clips at 1.0 (SFT, RM); PPOTrainer's max_grad_norm is None.
    assert (c.sft.engine.gradient_clipping, c.rm.engine.gradient_clipping) == (1.0, 1.0)
    assert p.actor.gradient_clipping is None and p.critic.gradient_clipping is None


def test_stage_defaults_hold_for_partial_sections(tmp_path):
    """A section that sets one field keeps its stage's defaults for the others (not the base class's)."""
    p = _write(tmp_path, "rm:\n  optim:\n    lr: 1.0e-4\n  lora:\n    enabled: true\n"
                         "ppo:\n  optim:\n    lr: 1.0e-4\n  reference:\n    dtype: fp32\n"
                         "sft:\n  engine:\n    zero_stage: 3\n")
    c = load_config(p, check_files=False)
    assert (c.rm.optim.lr, c.rm.optim.weight_decay, c.rm.optim.scheduler) == (1e-4, 0.001, "linear")
    assert (c.rm.lora.r, c.rm.lora.dropout) == (8, 0.1)
    assert (c.ppo.optim.weight_decay, c.ppo.optim.scheduler, c.ppo.optim.warmup_steps) == (0.0, "constant", 0)
    assert c.ppo.reference.zero_stage == 0 and c.sft.engine.micro_batch_size == 4


def test_ppo_engines_take_ppos_batch_and_clip_nothing():
    c = RunConfig()
    p = c.ppo
    assert (p.actor.micro_batch_size, p.actor.gradient_accumulation_steps) == (p.mini_batch_size, 8)
    d = ds_config(p.actor, world_size=2, grad_accum=p.gradient_accumulation_steps, optim=p.optim)
    assert d["gradient_clipping"] == 0.0  # DeepSpeed's "off"; its default when the key is missing is 1.0
    assert (d["train_micro_batch_size_per_gpu"], d["train_batch_size"]) == (1, 1 * 8 * 2)
    assert d["optimizer"]["params"]["betas"] == [0.9, 0.999]
    assert ds_config(c.sft.engine, world_size=2, optim=c.sft.optim)["gradient_clipping"] == 1.0
    no_clip = c.sft.engine.model_copy(update={"gradient_clipping": 0.0})
    assert ds_config(no_clip, world_size=2, optim=c.sft.optim)["gradient_clipping"] == 0.0


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
    ("model:\n  quantization: 8bit\nsft:\n  lora: {enabled: true}\n  engine:\n    zero_stage: 3\n", [],
     ["bad.yaml:6", "model.quantization: 8bit", "sft.engine.zero_stage", "ZeRO-3 does not partition"]),
    ("model:\n  quantization: 4bit\nppo:\n  lora: {enabled: true}\n", ["ppo.actor.zero_stage=3"],
     ["--set ppo.actor.zero_stage", "model.quantization: 4bit", "ppo.actor.zero_stage"]),
    ("model:\n  tokenizer: /x\n", [], ["bad.yaml:2", "model.tokenizer", "unknown key (removed: every stage"]),
    ("ppo:\n  actor:\n    micro_batch_size: 2\n", [],
     ["bad.yaml:3", "ppo.actor.micro_batch_size", "does not apply to a PPO engine", "ppo.mini_batch_size"]),
    ("ppo:\n  critic:\n    gradient_accumulation_steps: 4\n", [],
     ["bad.yaml:3", "ppo.critic.gradient_accumulation_steps", "ppo.gradient_accumulation_steps"]),
    ("seed: 1\n", ["ppo.reward.micro_batch_size=8"], ["--set ppo.reward.micro_batch_size", "PPO engine"]),
    ("ppo:\n  reference:\n    gradient_checkpointing: true\n", [],
     ["bad.yaml:3", "ppo.reference.gradient_checkpointing", "does not apply to a frozen engine"]),
    ("ppo:\n  reward:\n    offload_optimizer: true\n", [], ["bad.yaml:3", "ppo.reward.offload_optimizer", "no optimizer"]),
    ("sft:\n  engine:\n    gradient_clipping: -1\n", [], ["bad.yaml:3", "sft.engine.gradient_clipping", "greater than"]),
    ("model:\n  attn_implementation: flash_attention_2\n", [], ["rm.packed", "sdpa or eager", "rm.packed: false"]),
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


def test_quantized_base_under_zero3_is_rejected(tmp_path):
    """One error per engine that would hold the 8-bit base whole under ZeRO-3; engines the run does
    not build (the reference of a LoRA actor) and unquantized bases are left alone."""
    text = ("model:\n  quantization: 8bit\nsft:\n  lora: {enabled: true}\n  engine:\n    zero_stage: 3\n"
            "rm:\n  engine:\n    zero_stage: 3\nppo:\n  lora: {enabled: true}\n  reference:\n    zero_stage: 3\n"
            "  reward:\n    zero_stage: 3\n")
    with pytest.raises(ConfigError) as ei:
        load_config(_write(tmp_path, text), world_size=2)
    bad = [line.split(": ")[1] for line in ei.value.lines if "ZeRO-3 does not partition" in line]
    assert bad == ["sft.engine.zero_stage", "rm.engine.zero_stage", "ppo.reward.zero_stage"]
    assert load_config(_write(tmp_path, text), ["model.quantization=none"], world_size=2).sft.engine.zero_stage == 3
    r = run_cli("validate", _write(tmp_path, text), "--world-size", "2")
    assert r.returncode == 2 and "bad.yaml:6: sft.engine.zero_stage:" in r.stderr, r.stderr


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


@pytest.mark.parametrize("value", [{"nested": 1}, 5])
def test_a_union_field_is_one_error_line(tmp_path, value):
    """data.posts is str | list[str]: pydantic reports each member; the user gets one line for the field
    (a hypothesis example of tests/test_config_fuzz.py), and another bad field keeps its own line."""
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump({"data": {"posts": value}, "sft": {"engine": {"dtype": "fp99"}}}))
    with pytest.raises(ConfigError) as ei:
        load_config(f, world_size=2, check_files=False)
    posts = [x for x in ei.value.lines if ": data.posts:" in x]
    assert len(posts) == 1, ei.value.lines
    assert posts[0].startswith(f"{f}:2:")
    assert any(": sft.engine.dtype:" in x for x in ei.value.lines)  # a plain field keeps its own line
    assert len(ei.value.lines) == 2
