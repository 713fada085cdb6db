"""Precision from the hardware: ``dtype: auto`` resolves here.

bf16 only where it runs natively: a CUDA GPU with bf16, or a CPU with bf16 matrix units
(avx512_bf16 or AMX). Elsewhere fp32: on an AVX2-only CPU a bf16 matmul is emulated and runs
tens of times slower than fp32. Also the rest a rank asks of its machine: a dtype name's torch dtype,
its CUDA device, a free port, handing the heap's free pages back.
"""

from __future__ import annotations

import ctypes
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The ``flags`` of the first CPU in /proc/cpuinfo (empty where there is none)."""
    if cpuinfo is None:
        p = Path("/proc/cpuinfo")
        cpuinfo = p.read_text(errors="replace") if p.exists() else ""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_has_native_bf16(flags: set[str] | None = None) -> bool:
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in CPU_BF16_FLAGS)


def gpu_driver_present() -> bool:
    """An NVIDIA (or ROCm) driver on this machine; without one torch cannot see a GPU."""
    return Path("/proc/driver/nvidia").exists() or Path("/dev/nvidiactl").exists() or Path("/dev/kfd").exists()


def cuda_bf16() -> bool | None:
    """True/False for the first visible CUDA GPU; None without one (or with DS_ACCELERATOR=cpu)."""
    if os.environ.get("DS_ACCELERATOR", "") == "cpu" or not gpu_driver_present():
        return None  # no torch import (seconds) where no GPU driver exists: `validate`, `prepare`
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return bool(torch.cuda.is_bf16_supported())


def has_cuda() -> bool:
    """A CUDA GPU this process may use (not with DS_ACCELERATOR=cpu); no torch import without a driver."""
    if os.environ.get("DS_ACCELERATOR", "") == "cpu" or not gpu_driver_present():
        return False
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def cuda_device_index(local_rank: int, device_count: int) -> int:
    """This rank's CUDA device among those it sees: ``local_rank % device_count``.

    LOCAL_RANK itself when every rank sees the node's GPUs (torchrun, the deepspeed launcher); 0 when
    Slurm gives each task its own GPU (``--gpus-per-task=1``, ``--gpu-bind``: CUDA_VISIBLE_DEVICES
    lists one device, while LOCAL_RANK still counts to 7).
    """
    if device_count < 1:
        raise ValueError(f"no visible CUDA device for local rank {local_rank}")
    return local_rank % device_count


def auto_dtype() -> str:
    """``bf16`` on a bf16 GPU or a CPU with native bf16 units, else ``fp32``."""
    gpu = cuda_bf16()
    if gpu is not None:
        return "bf16" if gpu else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def torch_dtypes() -> dict[str, torch.dtype]:
    """The config's dtype names -> torch dtypes (torch imported here: config.py imports this module)."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def torch_dtype(name: str) -> torch.dtype:
    """``bf16``/``fp16``/``fp32`` -> the torch dtype."""
    return torch_dtypes()[name]


def release_free_heap() -> None:
    """Hand the heap's free pages back to the kernel (glibc ``malloc_trim``).

    The launcher keeps freed blocks in the heap for speed (launcher/spawn.py MALLOC_ENV); without
    this, the transient full-size copies made while loading and partitioning a model would stay
    resident for the whole run, and a phase that follows training would allocate on top of the
    training's high-water mark.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def free_port() -> int:
    """A TCP port free on this host now (for MASTER_PORT of a single-node group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
