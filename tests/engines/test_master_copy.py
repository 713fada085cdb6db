"""bf16 train engines keep fp32 master weights and Adam moments at every ZeRO setting the project
builds (0, 1, 2, 3, with optimizer/parameter offload), so updates smaller than a bf16 rounding step
of a weight still add up (a LoRA B starts at 0 and moves by ~lr a step; a value head bias is O(1)).
One 2-rank launch, ~25 s."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, cli_env


def test_bf16_engines_update_fp32_master_weights(tmp_path):
    import subprocess

    from tests.engines._master_copy import LR, SETTINGS, STEPS

    out = tmp_path / "res.json"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        "29573", str(Path(__file__).with_name("_master_copy.py")), str(out)],
                       cwd=REPO, env=cli_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    # 8 steps of -1e-3 from 1.0: the master holds 0.992, whose nearest bf16 is 1 - 2^-7; each step
    # alone (-1e-3) is under half a bf16 step below 1.0 (2^-9), so without a master it stays 1.0.
    moved = 1.0 - 2.0 ** -7
    assert STEPS * LR == pytest.approx(0.008) and res["no_master"] == 1.0
    for name in SETTINGS:
        got = res[name]
        assert got["forward_dtypes"] == ["torch.bfloat16"], name  # what the forward runs on
        assert got["master_dtypes"] == ["torch.float32"] and got["state_dtypes"] == ["torch.float32"], (name, got)
        assert got["bias"] == moved, (name, got)
