"""Nothing is compiled at job start: torch's fused AdamW on CPU and GPU, no DeepSpeed op JIT-built.

DeepSpeed's FusedAdam (GPU) and DeepSpeedCPUAdam (ZeRO-Offload) are JIT builds that need nvcc or a
compiler on every node; its shared-memory comm op was built by the first rank of every fresh CPU
node (400 s of a 434 s first tiny run on 2 Xeon cores; 41 s without it). These tests need no GPU: the GPU config is checked as data
and through the installed DeepSpeed's own optimizer selection.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from stackllama_ds.config import EngineConfig, OptimConfig
from stackllama_ds.engines.ds_config import ds_config

ENGINES = [
    EngineConfig(zero_stage=0, dtype="bf16"),
    EngineConfig(zero_stage=2, dtype="bf16"),
    EngineConfig(zero_stage=3, dtype="fp16"),
    EngineConfig(zero_stage=3, dtype="bf16", offload_optimizer=True, offload_params=True),
]


@pytest.mark.parametrize("on_cuda", [True, False])
@pytest.mark.parametrize("eng", ENGINES, ids=lambda e: f"z{e.zero_stage}-{e.dtype}-offload{e.offload_optimizer}")
def test_optimizer_is_torch_fused_adamw_everywhere(eng, on_cuda):
    cfg = ds_config(eng, world_size=8, grad_accum=2, optim=OptimConfig(), on_cuda=on_cuda)
    params = cfg["optimizer"]["params"]
    assert cfg["optimizer"]["type"] == "AdamW"
    assert params["torch_adam"] is True and params["fused"] is True
    # ZeRO-Offload keeps torch's AdamW on the offloaded states instead of DeepSpeedCPUAdam (a JIT build).
    assert cfg.get("zero_force_ds_cpu_optimizer", True) is (not eng.offload_optimizer)


@pytest.mark.parametrize("offload", [False, True])
def test_installed_deepspeed_builds_torch_fused_adamw_from_the_gpu_config(offload):
    """DeepSpeed's own selection (engine._configure_basic_optimizer) on the GPU config: torch.optim.AdamW
    with fused=True, not FusedAdam/DeepSpeedCPUAdam. A stub engine: no process group, no GPU."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.engine import DeepSpeedEngine

    eng = EngineConfig(zero_stage=3, dtype="bf16", offload_optimizer=offload)
    dsc = DeepSpeedConfig(ds_config(eng, world_size=1, optim=OptimConfig(), on_cuda=True))

    class Stub:
        def optimizer_name(self):
            return dsc.optimizer_name

        def optimizer_params(self):
            return dsc.optimizer_params

        def zero_use_cpu_optimizer(self):
            return offload

        get_optimizer_configuration = DeepSpeedEngine.get_optimizer_configuration

    opt = DeepSpeedEngine._configure_basic_optimizer(Stub(), torch.nn.Linear(4, 4).parameters())
    assert type(opt) is torch.optim.AdamW and opt.defaults["fused"] is True


def test_process_group_init_compiles_nothing(tmp_path: Path):
    """A CPU rank's init_distributed builds no op: the extensions folder stays empty, DeepSpeed's
    backend has no shm op (plain torch.distributed), and init takes seconds, not minutes."""
    ext = tmp_path / "torch_extensions"
    code = textwrap.dedent(
        """
        import time
        t0 = time.time()
        from stackllama_ds.engines import dist
        dist.init("gloo", 60)
        import deepspeed.comm.comm as c
        print("shm_op", c.cdb.shm_comm_op, "init_s", round(time.time() - t0, 1))
        dist.destroy()
        """
    )
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(ext)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "shm_op None" in r.stdout, r.stdout + r.stderr[-3000:]
    assert not ext.exists() or not any(ext.iterdir()), sorted(p.name for p in ext.rglob("*"))
    assert float(r.stdout.split("init_s")[1]) < 60
