"""The memory planner: StackLLaMA's arithmetic, monotonicity, and the CLI."""

from __future__ import annotations

import pytest

from stackllama_ds import plan
from stackllama_ds.config import EngineConfig, LoraConfig, RunConfig
from stackllama_ds.plan import LLAMA_7B, Workload, engine_estimate

GB = 1e9


def est(zero=0, dtype="bf16", world=1, lora=None, quant="none", ckpt=False, mb=1, seq=1024, **kw):
    eng = EngineConfig(zero_stage=zero, dtype=dtype, micro_batch_size=mb, gradient_checkpointing=ckpt, **kw)
    return engine_estimate("m", LLAMA_7B, eng, world, Workload(mb, seq), lora=lora, quant=quant)


def test_llama7b_parameter_count():
    assert LLAMA_7B.n_params() == pytest.approx(6.74e9, rel=0.01)


def test_stackllama_full_finetune_needs_70gb_before_activations():
    # StackLLaMA: bf16 weights 2 B/param + Adam 8 B/param = ~70 GB for 7B, before activations.
    e = est()
    moments = 8 * e.trainable
    assert (e.weights + moments) / GB == pytest.approx(70, rel=0.05)
    # Our accounting adds the bf16 gradients, fp32 gradients and the fp32 master copy on top.
    assert e.weights + e.grads + e.optimizer > 70 * GB
    assert e.optimizer == 12 * e.trainable


def test_stackllama_lora_8bit_is_about_1_2_to_1_4_gb_per_billion():
    lora = LoraConfig(enabled=True, r=16, target_modules=["q_proj", "v_proj"])
    e = est(lora=lora, quant="8bit")
    per_b = (e.persistent + plan.FIXED_OVERHEAD["gpu"]) / (LLAMA_7B.n_params() / 1e9) / GB
    assert 1.1 <= per_b <= 1.45
    assert e.trainable == 32 * 2 * 16 * (4096 + 4096)  # layers x (q, v) x r x (in + out)


@pytest.mark.parametrize("world", [2, 8])
def test_zero_stages_shrink_per_gpu_memory(world):
    t0, t1, t2, t3 = (est(zero=z, world=world).persistent for z in (0, 1, 2, 3))
    assert t3 < t2 < t1 < t0


def test_lora_and_8bit_and_checkpointing_shrink():
    lora = LoraConfig(enabled=True)
    assert est(lora=lora).total < est().total
    assert est(lora=lora, quant="8bit").total < est(lora=lora).total
    assert est(lora=lora, quant="4bit").total < est(lora=lora, quant="8bit").total
    assert est(ckpt=True, mb=4).activations < est(mb=4).activations
    assert est(mb=2).activations < est(mb=4).activations


def test_offload_moves_state_to_host():
    a = est(zero=3, world=8)
    b = est(zero=3, world=8, offload_optimizer=True, offload_params=True)
    assert b.persistent < a.persistent and b.host > 0


def test_kv_cache_formula():
    shape = LLAMA_7B
    eng = EngineConfig(zero_stage=2, dtype="bf16")
    e = engine_estimate("actor", shape, eng, 1, Workload(2, 640, gen_batch=8))
    kv = 8 * 640 * 32 * 2 * 32 * 128 * 2
    assert kv <= e.kv_cache < kv * 1.05


def _cfg(**over) -> RunConfig:
    cfg = RunConfig()
    for k, v in over.items():
        obj = cfg
        *path, last = k.split(".")
        for p in path:
            obj = getattr(obj, p)
        setattr(obj, last, v)
    return cfg


def test_ppo_lora_mode_has_no_reference_engine():
    cfg = _cfg()
    names = [e.name for e in plan.plan_ppo(cfg, plan.model_shape(cfg), 2, 80 * 2**30).engines]
    assert "reference" in names
    cfg.ppo.lora.enabled = True
    names = [e.name for e in plan.plan_ppo(cfg, plan.model_shape(cfg), 2, 80 * 2**30).engines]
    assert "reference" not in names and "actor" in names


def test_fits_and_main_exit_codes(capsys):
    cfg = _cfg()  # the tiny default model
    ok, msg = plan.fits(cfg, 2, 8.0, device="cpu")
    assert ok and "fits with" in msg
    assert plan.main(cfg, 2, 8.0, device="cpu") == 0
    out = capsys.readouterr().out
    assert "SFT" in out and "PPO" in out and "stage peak" in out
    assert plan.main(cfg, 2, 0.5, device="cpu") == 3
    assert "does not fit" in capsys.readouterr().out


def test_suggestions_name_concrete_changes(tmp_path):
    cfg = RunConfig()
    cfg.model.name_or_path = str(tmp_path)
    (tmp_path / "config.json").write_text(
        '{"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,'
        ' "num_attention_heads": 32}'
    )
    cfg.sft.engine = EngineConfig(zero_stage=2, dtype="bf16", micro_batch_size=4)
    ok, msg = plan.fits(cfg, 1, 40.0, device="gpu")
    assert not ok
    sft_line = next(x for x in msg.splitlines() if x.startswith("sft"))
    assert "does not fit" in sft_line and "try" in sft_line
    assert any(k in sft_line for k in ("zero_stage: 3", "lora", "gradient_checkpointing"))


def test_suggestions_never_pair_a_quantized_base_with_zero3(tmp_path):
    """Validation rejects 8-/4-bit bases under ZeRO-3, so the planner does not suggest them."""
    from stackllama_ds.config import quantized_zero3_engines

    for quant, zero in (("8bit", 2), ("none", 3)):
        cfg = RunConfig()
        cfg.model.quantization = quant
        cfg.sft.lora.enabled = True
        cfg.sft.engine = EngineConfig(zero_stage=zero, dtype="bf16", micro_batch_size=4)
        variants = plan._variants(cfg, "sft")
        assert variants and all(not quantized_zero3_engines(c) for _, c in variants), quant


def test_cli_prints_table_and_exit_code(tmp_path):
    from tests.conftest import TINY_YAML, run_cli

    r = run_cli("plan", TINY_YAML, "--gpus-per-node", "2", "--gpu-mem", "16", timeout=120)
    assert r.returncode == 0, r.stderr
    assert "stage peak" in r.stdout and "fits with" in r.stdout
    r = run_cli("plan", TINY_YAML, "--gpus-per-node", "2", "--gpu-mem", "0.1", timeout=120)
    assert r.returncode == 3 and "does not fit" in r.stdout


def test_cli_device_flag_is_the_env_setting():
    from tests.conftest import TINY_YAML, cli_env, run_cli

    args = ("plan", TINY_YAML, "--gpus-per-node", "2", "--gpu-mem", "16")
    for dev in ("gpu", "cpu"):
        flag = run_cli(*args, "--device", dev, timeout=120)
        env = run_cli(*args, env=cli_env(STACKLLAMA_PLAN_DEVICE=dev), timeout=120)
        assert flag.returncode == env.returncode == 0, flag.stderr + env.stderr
        assert flag.stdout == env.stdout
    assert run_cli(*args, "--device", "gpu", timeout=120).stdout != flag.stdout  # the flag reaches the plan


def test_cli_gpu_plan_without_a_gpu_needs_its_memory():
    import torch

    from tests.conftest import TINY_YAML, run_cli

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU to measure")
    r = run_cli("plan", TINY_YAML, "--device", "gpu", timeout=120)
    assert r.returncode == 2 and "--gpu-mem" in r.stderr


# --------------------------------------------------------------- issue 24: hand-computed 7B figures
# LLaMA-7B: h 4096, L 32, i 11008, V 32000, 32 heads (kv 4096), bf16 (e = 2).
# Decoder Linears per layer: 4h^2 + 3hi = 202,375,168; x 32 = 6,476,005,376 (int8, 1 B each).
# Their output rows per layer: 5h + 2i = 42,496; x 32 = 1,359,872 fp32 scales (SCB) = 5,439,488 B.
# Embedding 131,072,000; norms 32 x 2h + h = 266,240; lm_head 131,072,000; score head h = 4,096.
LIN_7B, ROWS_7B, EMB_7B, NORMS_7B = 6_476_005_376, 1_359_872, 131_072_000, 266_240


def test_8bit_reward_model_weights_are_one_byte_per_linear_weight():
    cfg = _cfg(**{"model.quantization": "8bit"})
    cfg.ppo.lora.enabled = True
    reward = next(e for e in plan.plan_ppo(cfg, LLAMA_7B, 8, 80 * 2**30).engines if e.name == "reward")
    non_linear = EMB_7B + NORMS_7B + 4_096  # embedding, norms, score head: bf16
    assert reward.weights == LIN_7B * 1 + ROWS_7B * 4 + non_linear * 2 == 6_744_129_536  # 6.28 GiB, not 12.3


def test_int8_matmul_inputs_are_kept_under_checkpointing():
    # bitsandbytes keeps each int8 matmul's input outside checkpointing's reach: per layer the four
    # distinct inputs (q/k/v, o, gate/up, down) = e x (3h + i) per token, for every layer.
    lora = LoraConfig(enabled=True)
    q8, bf = est(lora=lora, quant="8bit", ckpt=True), est(lora=lora, quant="none", ckpt=True)
    assert q8.activations - bf.activations == 1024 * 32 * 2 * (3 * 4096 + 11008) == 1_526_726_656
    # Without checkpointing those inputs are among the layer's activations already.
    assert est(lora=lora, quant="8bit").activations == est(lora=lora).activations


def test_lora_activations_under_checkpointing_are_one_layers_worth():
    # Per token: boundaries L x e x h = 262,144; one recomputed layer e(7h + 2kv + 4i) + 8h = 194,560;
    # embeddings/final norm 2eh = 16,384; logits V(e + 12) = 448,000; LoRA on q, v of ONE layer:
    # 2 x ((e + 1) x h + e x r) = 24,640. Sum 945,728 x 1024 tokens.
    e = est(lora=LoraConfig(enabled=True, r=16, target_modules=["q_proj", "v_proj"]), ckpt=True)
    assert e.activations == 1024 * (262_144 + 194_560 + 16_384 + 448_000 + 24_640) == 968_425_472
    # Without checkpointing every layer keeps its adapters' activations: 32 x 24,640 per token.
    full = est(lora=LoraConfig(enabled=True), ckpt=False).activations - est(ckpt=False).activations
    assert full == 1024 * 32 * 24_640


def test_zero3_generation_copy_gathers_the_whole_policy_on_each_rank():
    eng = EngineConfig(zero_stage=3, dtype="bf16", micro_batch_size=1)
    e = engine_estimate("actor", LLAMA_7B, eng, 8, Workload(1, 128, gen_batch=1, gen_copy=True))
    policy_bf16 = (LIN_7B + 2 * EMB_7B + NORMS_7B) * 2  # 6,738,415,616 params x 2 B
    assert e.gen_copy == e.gen_gather == policy_bf16 == 13_476_831_232
    assert e.activations + e.kv_cache < policy_bf16  # the gather is this engine's largest transient
    assert e.transient == policy_bf16 and e.total == e.persistent + policy_bf16
