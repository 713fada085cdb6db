"""launch/deepspeed_ssh.sh up to the deepspeed launcher (a stand-in here): the ranks' variables reach
it as DeepSpeed's DS_ENV_FILE, and a missing pdsh stops it before anything starts.

    python -m pytest tests/launcher/test_deepspeed_ssh.py -q
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, TINY_YAML

FAKE_DEEPSPEED = """#!/bin/sh
echo "DS_ENV_FILE=$DS_ENV_FILE"
cat "$DS_ENV_FILE"
echo "ARGS $*"
"""


def _run(tmp_path: Path, with_pdsh: bool) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    tools = {"deepspeed": FAKE_DEEPSPEED} | ({"pdsh": "#!/bin/sh\n"} if with_pdsh else {})
    for name, body in tools.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "PYTHON": sys.executable,
        "PYTHONPATH": str(REPO),
        "HOME": os.environ.get("HOME", str(tmp_path)),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "n[1-2]",
        "SLURM_NNODES": "2",
        "GPUS_PER_NODE": "1",
        "DS_ACCELERATOR": "cpu",
        "STACKLLAMA_HOSTFILE": str(tmp_path / "hostfile"),
        "HF_HOME": "/shared/hf",
    }
    return subprocess.run(["bash", str(REPO / "launch" / "deepspeed_ssh.sh"), "sft", str(TINY_YAML)],
                          env=env, capture_output=True, text=True, timeout=120, cwd=REPO)


def test_ranks_variables_reach_deepspeed_through_ds_env_file(tmp_path):
    r = _run(tmp_path, with_pdsh=True)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    env_file = Path(next(x for x in lines if x.startswith("DS_ENV_FILE=")).removeprefix("DS_ENV_FILE="))
    assert env_file == tmp_path / "hostfile.deepspeed_env"
    sent = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
    assert sent["HF_HOME"] == "/shared/hf" and sent["OMP_NUM_THREADS"] == "1"
    assert sent["MALLOC_TRIM_THRESHOLD_"] == str(4 << 30) and sent["PATH"].startswith(str(tmp_path / "bin"))
    assert "SLURM_JOB_ID" not in sent
    assert (tmp_path / "hostfile").read_text() == "n1 slots=1\nn2 slots=1\n"
    assert lines[-1].startswith(f"ARGS --hostfile {tmp_path / 'hostfile'} ")


def test_without_pdsh_it_stops_before_the_launch(tmp_path):
    r = _run(tmp_path, with_pdsh=False)
    assert r.returncode == 2 and "ARGS" not in r.stdout
    assert not (tmp_path / "hostfile").exists()
