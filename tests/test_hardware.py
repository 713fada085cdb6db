"""dtype: auto picks bf16 only where the hardware runs it natively."""

from __future__ import annotations

import pytest

from stackllama_ds import hardware
from stackllama_ds.config import EngineConfig, load_config

AVX2_ONLY = "processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma\n"
AVX512_BF16 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"
AMX = "processor\t: 0\nflags\t\t: fpu avx2 amx_tile amx_bf16 amx_int8\n"


@pytest.mark.parametrize(("cpuinfo", "native"), [(AVX2_ONLY, False), (AVX512_BF16, True), (AMX, True), ("", False)])
def test_cpu_native_bf16_from_flags(cpuinfo, native):
    assert hardware.cpu_has_native_bf16(hardware.cpu_flags(cpuinfo)) is native


@pytest.mark.parametrize(("cpuinfo", "want"), [(AVX2_ONLY, "fp32"), (AVX512_BF16, "bf16"), (AMX, "bf16")])
def test_auto_resolves_per_cpu(monkeypatch, cpuinfo, want):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # no GPU: the CPU decides
    real = hardware.cpu_flags
    monkeypatch.setattr(hardware, "cpu_flags", lambda _=None: real(cpuinfo))
    assert hardware.auto_dtype() == want
    assert EngineConfig(dtype="auto").dtype == want
    assert EngineConfig().dtype == want  # auto is the default
    assert EngineConfig(dtype="fp16").dtype == "fp16"  # an explicit choice is kept


def test_gpu_decides_when_present(monkeypatch):
    monkeypatch.setattr(hardware, "cuda_bf16", lambda: False)
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda flags=None: True)
    assert hardware.auto_dtype() == "fp32"  # a GPU without bf16: fp32, whatever the CPU has
    monkeypatch.setattr(hardware, "cuda_bf16", lambda: True)
    assert hardware.auto_dtype() == "bf16"


def test_shipped_configs_are_auto(monkeypatch):
    from tests.conftest import REPO

    monkeypatch.setattr(hardware, "auto_dtype", lambda: "fp32")
    for name in ("tiny.yaml", "smollm2.yaml"):
        cfg = load_config(REPO / "configs" / name, check_files=False)
        engines = [cfg.sft.engine, cfg.rm.engine, cfg.ppo.actor, cfg.ppo.critic, cfg.ppo.reference, cfg.ppo.reward]
        assert {e.dtype for e in engines} == {"fp32"}, name
