"""Every rank gets the glibc heap settings (spawned, torchrun and srun paths); a user's value wins."""

from __future__ import annotations

import os
import subprocess
import sys

from stackllama_ds.launcher import spawn


def test_spawned_rank_env_sets_malloc_and_keeps_user_values():
    env = spawn.rank_env(2, 1, 29500, cuda=False, base={"MALLOC_TOP_PAD_": "123"})
    assert env["MALLOC_MMAP_THRESHOLD_"] == str(32 * 1024 * 1024)
    assert env["MALLOC_TRIM_THRESHOLD_"] == str(4 * 1024**3)
    assert env["MALLOC_TOP_PAD_"] == "123"
    assert env["RANK"] == "1" and env["OMP_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 2))


def test_slurm_env_exports_malloc_defaults_that_a_user_can_override():
    slurm_env = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NNODES": "2", "GPUS_PER_NODE": "8", "PATH": os.environ["PATH"]}
    script = (f'eval "$({sys.executable} -m stackllama_ds.launcher.multinode env)"; '
              'echo "$WORLD $MALLOC_MMAP_THRESHOLD_ $MALLOC_TRIM_THRESHOLD_"')
    out = subprocess.run(["bash", "-c", script], env=slurm_env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["16", str(32 << 20), str(4 << 30)]
    out = subprocess.run(["bash", "-c", script], env={**slurm_env, "MALLOC_TRIM_THRESHOLD_": "99"},
                         capture_output=True, text=True, check=True).stdout
    assert out.split() == ["16", str(32 << 20), "99"]
