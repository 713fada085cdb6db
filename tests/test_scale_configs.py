"""The StackLLaMA 7B configs (3 nodes x 8 GPUs, and 1 node) validate, carry the blog's recipe and fit
24 (or 8) A100-80GB in the memory plan; ``plan`` without flags plans for the config and this machine.

No weights anywhere: a LLaMA-7B ``config.json`` alone is a model folder for validate and plan.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from stackllama_ds import plan
from stackllama_ds.config_loader import load_config
from tests.conftest import REPO, TINY_YAML, cli_env, run_cli

CONFIGS = [("stackllama.yaml", 3, 24), ("stackllama-1node.yaml", 1, 8)]
LLAMA_7B = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 32000, "hidden_size": 4096,
    "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
    "max_position_embeddings": 2048, "tie_word_embeddings": False,
}


@pytest.fixture
def llama7b(tmp_path: Path) -> Path:
    d = tmp_path / "llama-7b"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(LLAMA_7B))
    return d


@pytest.mark.parametrize("name,nnodes,world", CONFIGS)
def test_validates_with_a_model_folder_and_names_the_placeholder(name, nnodes, world, llama7b):
    cfg = REPO / "configs" / name
    r = run_cli("validate", cfg, "--world-size", world, "--set", f"model.name_or_path={llama7b}", timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"world size {world}" in r.stdout
    r = run_cli("validate", cfg, "--world-size", world, timeout=120)
    assert r.returncode == 2
    assert "model.name_or_path" in r.stderr and "/path/to/llama-7b" in r.stderr


@pytest.mark.parametrize("name,nnodes,world", CONFIGS)
def test_plan_fits_a100_80gb(name, nnodes, world, llama7b):
    env = cli_env(STACKLLAMA_PLAN_DEVICE="gpu")  # GPU accounting on a CPU test box too
    r = run_cli("plan", REPO / "configs" / name, "--gpus-per-node", "8", "--gpu-mem", "80",
                "--set", f"model.name_or_path={llama7b}", env=env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"world size {world} ({nnodes} node(s) x 8)" in r.stdout
    assert "does not fit" not in r.stdout and r.stdout.count("fits with") == 3
    cfg = load_config(REPO / "configs" / name, [f"model.name_or_path={llama7b}"])
    peaks = {sp.stage: sp.total / plan.GiB for sp in plan.plan_all(cfg, 8, 80.0, "gpu")}
    # The 8-bit base is ~7 GB, in PPO twice (actor and 8-bit reward model); nothing near 80.
    assert all(5 < gb < 60 for gb in peaks.values()), peaks


def test_recipe_is_the_blogs():
    cfg = load_config(REPO / "configs" / "stackllama.yaml", check_files=False)
    assert (cfg.launch.nnodes, cfg.launch.nproc_per_node, cfg.model.quantization) == (3, 8, "8bit")
    engines = [cfg.sft.engine, cfg.rm.engine, cfg.ppo.actor, cfg.ppo.critic, cfg.ppo.reference, cfg.ppo.reward]
    assert {e.dtype for e in engines} == {"bf16"}
    for lora in (cfg.sft.lora, cfg.ppo.lora):
        assert (lora.enabled, lora.r, lora.alpha, lora.dropout) == (True, 16, 32, 0.05)
    assert (cfg.rm.lora.enabled, cfg.rm.lora.r, cfg.rm.lora.alpha, cfg.rm.lora.dropout) == (True, 8, 32, 0.1)
    assert (cfg.sft.seq_length, cfg.sft.packing, cfg.rm.max_length) == (1024, True, 512)
    p = cfg.ppo
    assert (p.batch_size, p.mini_batch_size, p.gradient_accumulation_steps, p.ppo_epochs) == (8, 1, 8, 4)
    assert (p.optim.lr, p.response_min_length, p.response_max_length) == (1.4e-5, 32, 127)
    assert (p.adaptive_kl, p.init_kl_coef, p.target, p.horizon) == (True, 0.2, 6.0, 10000)
    assert (p.early_stopping, p.target_kl, p.reward_baseline) == (True, 0.1, 0.0)
    assert p.steps == 20000 // p.batch_size  # TRL's steps counted samples per process
    # PPOTrainer's optimizer: Adam (betas 0.9, 0.999) at a constant lr, no weight decay, no clipping.
    assert (p.optim.betas, p.optim.weight_decay, p.optim.scheduler, p.optim.warmup_steps) == ((0.9, 0.999), 0.0,
                                                                                            "constant", 0)
    assert p.actor.gradient_clipping is None and cfg.sft.engine.gradient_clipping == 1.0
    one = load_config(REPO / "configs" / "stackllama-1node.yaml", check_files=False)
    assert (one.launch.nnodes, one.launch.nproc_per_node) == (1, 8)
    a, b = cfg.model_dump(), one.model_dump()
    a.pop("launch"), b.pop("launch")
    assert a == b  # the same recipe; only the launch shape differs


# ------------------------------------------------------------------------- plan without flags
def _ram_gb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def test_plan_target_defaults_to_config_shape_and_this_machine(monkeypatch):
    monkeypatch.delenv("STACKLLAMA_PLAN_DEVICE", raising=False)
    cfg = load_config(TINY_YAML, check_files=False)
    t = plan.resolve_target(cfg, device="cpu")
    assert (t.gpus_per_node, t.device) == (cfg.launch.nproc_per_node, "cpu") == (2, "cpu")
    assert t.gpu_mem == pytest.approx(_ram_gb() / 2)
    # A GPU machine: device 0's memory, still the config's ranks per node.
    monkeypatch.setattr(plan, "cuda_mem_gb", lambda: (79.6, "NVIDIA A100-SXM4-80GB"))
    t = plan.resolve_target(cfg, device="gpu")
    assert (t.gpus_per_node, t.gpu_mem, t.device) == (2, 79.6, "gpu")
    # An NVIDIA driver without a CUDA torch runs on CPU, so it plans against RAM ...
    monkeypatch.setattr(plan, "cuda_mem_gb", lambda: None)
    t = plan.resolve_target(cfg, device="gpu")
    assert t.device == "cpu" and t.gpu_mem == pytest.approx(_ram_gb() / 2)
    # ... unless GPU accounting was forced: then there is nothing to measure.
    monkeypatch.setenv("STACKLLAMA_PLAN_DEVICE", "gpu")
    with pytest.raises(ValueError, match="--gpu-mem"):
        plan.resolve_target(cfg)
    # Explicit flags win, as before.
    t = plan.resolve_target(cfg, 8, 80.0)
    assert (t.gpus_per_node, t.gpu_mem, t.device) == (8, 80.0, "gpu")


def test_plan_cli_without_flags(tmp_path):
    env = cli_env(STACKLLAMA_PLAN_DEVICE="cpu")
    r = run_cli("plan", TINY_YAML, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "world size 2 (1 node(s) x 2)" in r.stdout
    assert f"{_ram_gb() / 2:.4g} GB per rank (this machine's RAM" in r.stdout
    assert "(launch.nproc_per_node)" in r.stdout
