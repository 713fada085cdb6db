"""dtype: auto picks bf16 only where the hardware runs it natively."""

from __future__ import annotations

import pytest

from stackllama_ds import hardware
from stackllama_ds.config import EngineConfig
from stackllama_ds.config_loader import load_config

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


@pytest.mark.parametrize(
    ("local_rank", "count", "index"),
    [(0, 8, 0), (5, 8, 5), (5, 1, 0), (7, 1, 0), (3, 2, 1), (0, 1, 0)],
)
def test_cuda_device_index_maps_local_rank_to_a_visible_device(local_rank, count, index):
    """Every rank sees the node's 8 GPUs: LOCAL_RANK; one GPU per Slurm task: 0."""
    assert hardware.cuda_device_index(local_rank, count) == index


def test_cuda_device_index_needs_a_device():
    with pytest.raises(ValueError):
        hardware.cuda_device_index(0, 0)


def _one_gpu_per_task(monkeypatch, local_rank: int):
    """A rank of a job with --gpus-per-task=1: LOCAL_RANK counts to 7, CUDA shows one device."""
    import torch

    from stackllama_ds.engines import dist

    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setattr(dist, "has_cuda", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    chosen: list[int] = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    return dist, chosen


def test_rank_device_with_one_gpu_per_task(monkeypatch):
    import os

    import torch

    dist, chosen = _one_gpu_per_task(monkeypatch, 5)
    assert dist.device() == torch.device("cuda", 0)
    assert dist.bind_cuda_device() == 0 and chosen == [0]
    assert os.environ["LOCAL_RANK"] == "0"  # what DeepSpeed's engine and zero.Init take as the device index


def test_quantized_load_places_on_the_visible_gpu(monkeypatch):
    import torch

    from stackllama_ds.config import ModelConfig
    from stackllama_ds.models.load import _quant_kwargs

    _one_gpu_per_task(monkeypatch, 5)
    kw = _quant_kwargs(ModelConfig(quantization="8bit"), torch.bfloat16)
    assert kw["device_map"] == {"": "cuda:0"}
