"""Two "nodes" on this machine without Slurm: torchrun --nnodes 2 and deepspeed --hostfile --no_ssh.

    pytest -m slow tests/launcher/test_multinode.py

Each node is one launcher invocation with one rank; the ranks run the production per-rank entry
(``python -m stackllama_ds.launcher.multinode rank``), which writes its status file.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from stackllama_ds.hardware import free_port  # noqa: E402
from stackllama_ds.launcher import slurm  # noqa: E402
from stackllama_ds.launcher.multinode import read_statuses  # noqa: E402
from tests.conftest import cli_env, fresh_root, write_config  # noqa: E402

pytestmark = pytest.mark.slow
SFT = {"max_steps": 6, "eval_every": 3, "save_every": 3, "seq_length": 128}


def _run_nodes(cmds: list[list[str]], env: dict[str, str], timeout: float = 300) -> list[tuple[int, str]]:
    procs = [subprocess.Popen(c, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in cmds]
    out = []
    try:
        for p in procs:
            text, _ = p.communicate(timeout=timeout)
            out.append((p.returncode, text))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return out


def _check(root: Path, results, status: Path) -> None:
    for rc, text in results:
        assert rc == 0, text[-5000:]
    logs = "".join(t for _, t in results)
    assert "[rank 0/2]" in logs and "[rank 1/2]" in logs
    rows = [json.loads(x) for x in (root / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, SFT["max_steps"] + 1))
    assert (root / "sft" / "DONE").exists()
    assert {r: c for r, (c, _) in read_statuses(status).items()} == {0: 0, 1: 0}


def _entry(cfg: Path) -> list[str]:
    return [sys.executable, "-m", "stackllama_ds.launcher.multinode", "rank", "sft", str(cfg)]


def test_torchrun_two_nodes(prepared_root, tmp_path):
    root = fresh_root(prepared_root, tmp_path / "run")
    cfg = write_config(tmp_path / "cfg.yaml", root, sft=SFT)
    job = slurm.SlurmJob(job_id=0, hosts=("127.0.0.1", "127.0.0.1"), node_id=0, gpus_per_node=1,
                         master_addr="127.0.0.1", master_port=free_port())
    env = cli_env(OMP_NUM_THREADS="1", STACKLLAMA_STATUS_DIR=str(tmp_path / "status"))
    cmds = [slurm.torchrun_cmd(job.__class__(**{**job.__dict__, "node_id": k}), _entry(cfg)) for k in (0, 1)]
    _check(root, _run_nodes(cmds, env), tmp_path / "status")


def test_deepspeed_hostfile_no_ssh_two_nodes(prepared_root, tmp_path):
    root = fresh_root(prepared_root, tmp_path / "run")
    cfg = write_config(tmp_path / "cfg.yaml", root, sft=SFT)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(slurm.hostfile_text(["node0", "node1"], 1))
    job = slurm.SlurmJob(job_id=0, hosts=("node0", "node1"), node_id=0, gpus_per_node=1,
                         master_addr="127.0.0.1", master_port=free_port())
    env = cli_env(OMP_NUM_THREADS="1", STACKLLAMA_STATUS_DIR=str(tmp_path / "status"))
    cmds = [slurm.deepspeed_cmd(job.__class__(**{**job.__dict__, "node_id": k}), str(hostfile), _entry(cfg),
                                no_ssh=True) for k in (0, 1)]
    _check(root, _run_nodes(cmds, env), tmp_path / "status")


def test_node_forwards_a_stop_signal_to_every_rank(prepared_root, tmp_path):
    """USR1 to the per-node process alone (not its process group: torchrun's workers sit in their own
    sessions, where a site's signal may not reach them) stops every rank after a checkpoint."""
    import os
    import signal
    import time

    from stackllama_ds.launcher.multinode import read_stop_signals

    root = fresh_root(prepared_root, tmp_path / "run")
    cfg = write_config(tmp_path / "cfg.yaml", root,
                       sft={"max_steps": 300, "eval_every": 1000, "save_every": 1000, "seq_length": 128})
    status = tmp_path / "status"
    env = cli_env(OMP_NUM_THREADS="1", STACKLLAMA_STATUS_DIR=str(status), SLURM_JOB_ID="7",
                  SLURM_JOB_NODELIST="localhost", SLURM_NNODES="1", SLURM_NODEID="0", GPUS_PER_NODE="2",
                  MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), STACKLLAMA_LAUNCHER="torchrun",
                  STACKLLAMA_TEST_STEP_SLEEP="0.3")
    node = subprocess.Popen([sys.executable, "-m", "stackllama_ds.launcher.multinode", "node", "sft", str(cfg)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    metrics = root / "sft" / "metrics.jsonl"
    try:
        deadline = time.time() + 240
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert node.poll() is None and time.time() < deadline, "training never started"
            time.sleep(0.5)
        os.kill(node.pid, signal.SIGUSR1)
        text, _ = node.communicate(timeout=240)
    finally:
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGKILL)
    assert node.returncode == 0, text[-5000:]
    assert {r: c for r, (c, _) in read_statuses(status, range(2)).items()} == {0: 75, 1: 75}, text[-5000:]
    assert read_stop_signals(status, range(2)) == {0: "SIGUSR1", 1: "SIGUSR1"}
    last = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert last < 300 and (root / "sft" / "checkpoints" / f"step-{last}").is_dir()


def test_torchrun_waits_for_the_configured_stop_timeout():
    """torchrun SIGKILLs its workers ``--shutdown-timeout`` s after a SIGTERM: the flag must be the
    configured ``launch.stop_timeout_s`` and torchrun must accept it."""
    from stackllama_ds.config import LaunchConfig

    job = slurm.SlurmJob(job_id=1, hosts=("a",), node_id=0, gpus_per_node=1, master_addr="a", master_port=1)
    grace = LaunchConfig().stop_timeout_s
    cmd = slurm.torchrun_cmd(job, ["true"], shutdown_timeout_s=grace)
    assert f"--shutdown-timeout={grace}" in cmd and grace > 30
    from torch.distributed.run import get_args_parser

    args = get_args_parser().parse_args(cmd[1:])
    assert args.shutdown_timeout == grace
