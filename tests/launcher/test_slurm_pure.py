"""Pure launch functions: hostlists, GPU counts, ports, hostfiles, commands, outcomes (fast, no Slurm)."""

from __future__ import annotations

import shutil

import pytest

from stackllama_ds.launcher import slurm
from stackllama_ds.launcher.slurm import SlurmEnvError, SlurmJob
from stackllama_ds.run.signals import EXIT_RESUME


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("gpu[01-03]", ["gpu01", "gpu02", "gpu03"]),
        ("a1,b[2-4,7]", ["a1", "b2", "b3", "b4", "b7"]),
        ("n[1-2]", ["n1", "n2"]),
        ("node-[001-003,010]", ["node-001", "node-002", "node-003", "node-010"]),
        ("x", ["x"]),
        ("n[8-11]", ["n8", "n9", "n10", "n11"]),
        ("gpu[09-10]", ["gpu09", "gpu10"]),
        ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
        ("a,b,c[1,3]", ["a", "b", "c1", "c3"]),
        ("ib-[1-2].cluster", ["ib-1.cluster", "ib-2.cluster"]),
    ],
)
def test_expand_hostlist(nodelist, hosts):
    assert slurm.expand_hostlist(nodelist) == hosts


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="no scontrol on this machine")
@pytest.mark.parametrize("nodelist", ["gpu[01-03]", "a1,b[2-4,7]", "node-[001-003,010]", "r[1-2]n[1-2]",
                                      "n[8-11]", "a,b,c[1,3]"])
def test_hostnames_are_slurms_own_and_the_fallback_agrees(nodelist, monkeypatch):
    assert slurm.hostnames(nodelist) == slurm.expand_hostlist(nodelist)
    monkeypatch.setattr(slurm.shutil, "which", lambda name: None)  # a machine without scontrol
    assert slurm.hostnames(nodelist) == slurm.expand_hostlist(nodelist)


@pytest.mark.parametrize("bad", ["", "n[1-2", "n1-2]", "n[a-b]", "n[3-1]"])
def test_expand_hostlist_rejects(bad):
    with pytest.raises(SlurmEnvError):
        slurm.expand_hostlist(bad)


@pytest.mark.parametrize(
    "env, n",
    [
        ({}, 8),
        ({"GPUS_PER_NODE": "2"}, 2),
        ({"GPUS_PER_NODE": "2", "SLURM_GPUS_ON_NODE": "8"}, 2),
        ({"SLURM_GPUS_ON_NODE": "4"}, 4),
        ({"SLURM_GPUS_PER_NODE": "gpu:8"}, 8),
        ({"SLURM_GPUS_PER_NODE": "a100:4"}, 4),
        ({"SLURM_GPUS_PER_NODE": "gpu:a100:4(IDX:0-3)"}, 4),
        ({"SLURM_GPUS_PER_NODE": "a100:2,v100:2"}, 4),
        ({"SLURM_GPUS_ON_NODE": "", "SLURM_GPUS_PER_NODE": "gpu"}, 8),
    ],
)
def test_gpus_per_node(env, n):
    assert slurm.gpus_per_node(env) == n


@pytest.mark.parametrize("bad", ["0", "two", "-1"])
def test_gpus_per_node_rejects(bad):
    with pytest.raises(SlurmEnvError, match="GPUS_PER_NODE"):
        slurm.gpus_per_node({"GPUS_PER_NODE": bad})


def test_master_port_deterministic_and_below_the_ephemeral_range():
    assert slurm.master_port(1) == 20001
    assert slurm.master_port("12000") == 20000
    assert slurm.master_port(123456) == 20000 + 123456 % 12000 == 23456
    # Linux hands out 32768-60999 to outgoing connections: a port there may already be taken
    assert {slurm.master_port(j) for j in range(0, 100000)} == set(range(20000, 32000))
    # a requeued run (SLURM_RESTART_COUNT) rendezvous on another port than the run before it
    assert len({slurm.master_port(123456, r) for r in range(12)}) == 12
    assert all(20000 <= slurm.master_port(123456, r) < 32000 for r in range(100))
    env = {"SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "n1", "SLURM_RESTART_COUNT": "2"}
    assert slurm.job_from_env(env).master_port == slurm.master_port(123456, 2) != slurm.master_port(123456)


def test_rank_sh_derives_the_same_port(tmp_path):
    """launch/rank.sh's own fallback (no MASTER_PORT from the batch process) agrees with master_port."""
    import os
    import subprocess

    from tests.conftest import REPO

    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho $MASTER_PORT\n")
    fake.chmod(0o755)
    env = {"PATH": os.environ["PATH"], "PYTHON": str(fake), "SLURM_JOB_ID": "15000", "SLURM_PROCID": "0",
           "SLURM_NTASKS": "1", "MASTER_ADDR": "n1"}
    r = subprocess.run(["bash", str(REPO / "launch" / "rank.sh"), "sft", "cfg.yaml"], env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) == slurm.master_port(15000) == 23000
    r = subprocess.run(["bash", str(REPO / "launch" / "rank.sh"), "sft", "cfg.yaml"],
                       env={**env, "SLURM_RESTART_COUNT": "3"}, capture_output=True, text=True, timeout=30)
    assert int(r.stdout) == slurm.master_port(15000, 3) != 23000


@pytest.mark.parametrize(
    "env, cpus",
    [
        ({}, None),
        ({"SLURM_JOB_CPUS_PER_NODE": "128(x3)"}, 128),
        ({"SLURM_JOB_CPUS_PER_NODE": "72(x2),36"}, 36),
        ({"SLURM_JOB_CPUS_PER_NODE": "64,96"}, 64),
        ({"SLURM_CPUS_ON_NODE": "48"}, 48),
        ({"SLURM_JOB_CPUS_PER_NODE": "32(x2)", "SLURM_CPUS_ON_NODE": "48"}, 32),
    ],
)
def test_cpus_per_node(env, cpus):
    assert slurm.cpus_per_node(env) == cpus


def test_deepspeed_env_text_carries_what_the_ranks_need():
    env = {
        "MALLOC_MMAP_THRESHOLD_": "33554432",
        "OMP_NUM_THREADS": "1",
        "HF_HOME": "/shared/hf",
        "STACKLLAMA_CACHE": "/shared/cache",
        "PATH": "/shared/venv/bin:/usr/bin",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
        "NCCL_SOCKET_IFNAME": "ib0",  # DeepSpeed exports NCCL_* itself
        "HOME": "/home/u",
        "SLURM_JOB_ID": "7",
        "HF_TOKEN_PATH": "/home/u/my token",  # a space: DeepSpeed quotes it
        "STACKLLAMA_BAD": 'say "hi"',  # would not survive the remote shell's double quotes
        "HF_X": "$HOME/x",
        "PATHOLOGICAL\nKEY": "1",
    }
    text = slurm.deepspeed_env_text(env)
    assert text == (
        "HF_HOME=/shared/hf\n"
        "HF_TOKEN_PATH=/home/u/my token\n"
        "MALLOC_MMAP_THRESHOLD_=33554432\n"
        "OMP_NUM_THREADS=1\n"
        "PATH=/shared/venv/bin:/usr/bin\n"
        "STACKLLAMA_CACHE=/shared/cache\n"
        "TORCH_NCCL_ASYNC_ERROR_HANDLING=1\n"
    )
    # read back as DeepSpeed's runner reads .deepspeed_env: each line split at its first "="
    assert dict(line.split("=", maxsplit=1) for line in text.splitlines()) == {
        k: env[k] for k in ("HF_HOME", "HF_TOKEN_PATH", "MALLOC_MMAP_THRESHOLD_", "OMP_NUM_THREADS", "PATH",
                            "STACKLLAMA_CACHE", "TORCH_NCCL_ASYNC_ERROR_HANDLING")}


def test_hostfile_text():
    assert slurm.hostfile_text(["gpu01", "gpu02"], 8) == "gpu01 slots=8\ngpu02 slots=8\n"


ENV = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[01-03]", "SLURM_NNODES": "3", "SLURM_NODEID": "1"}


def test_job_from_env():
    job = slurm.job_from_env(ENV)
    assert job.hosts == ("gpu01", "gpu02", "gpu03")
    assert (job.nnodes, job.node_id, job.gpus_per_node, job.world_size) == (3, 1, 8, 24)
    assert (job.master_addr, job.master_port, job.restart_count) == ("gpu01", 24242, 0)
    assert [job.host_of_rank(r) for r in (0, 7, 8, 23, 24)] == ["gpu01", "gpu01", "gpu02", "gpu03", "?"]
    user = slurm.job_from_env({**ENV, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "SLURM_RESTART_COUNT": "2"})
    assert (user.master_addr, user.master_port, user.restart_count) == ("10.0.0.1", 29500, 2)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"SLURM_JOB_ID": None}, "SLURM_JOB_ID"),
        ({"SLURM_JOB_NODELIST": None}, "SLURM_JOB_NODELIST"),
        ({"SLURM_NNODES": "2"}, "SLURM_NNODES"),
        ({"SLURM_NODEID": "3"}, "SLURM_NODEID"),
        ({"SLURM_JOB_ID": "abc"}, "SLURM_JOB_ID"),
    ],
)
def test_job_from_env_names_the_bad_variable(change, field):
    env = {k: v for k, v in {**ENV, **change}.items() if v is not None}
    with pytest.raises(SlurmEnvError, match=field):
        slurm.job_from_env(env)


def test_choose_launcher():
    assert slurm.choose_launcher({}) == "torchrun"
    assert slurm.choose_launcher({"STACKLLAMA_LAUNCHER": "srun"}) == "srun"
    with pytest.raises(SlurmEnvError, match="STACKLLAMA_LAUNCHER"):
        slurm.choose_launcher({"STACKLLAMA_LAUNCHER": "mpirun"})


def test_rank_env_from_slurm():
    env = {**ENV, "SLURM_PROCID": "9", "SLURM_NTASKS": "24", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "8"}
    out = slurm.rank_env_from_slurm(env)
    assert out == {"RANK": "9", "WORLD_SIZE": "24", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8",
                   "MASTER_ADDR": "gpu01", "MASTER_PORT": "24242"}
    # under torchrun the launcher's variables win
    assert slurm.rank_env_from_slurm({**env, "RANK": "3", "WORLD_SIZE": "2", "LOCAL_RANK": "0",
                                      "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}) == {}


JOB = SlurmJob(job_id=7, hosts=("n1", "n2"), node_id=1, gpus_per_node=4, master_addr="n1", master_port=20007)


def test_torchrun_cmd_static_rendezvous_in_node_order():
    cmd = slurm.torchrun_cmd(JOB, ["python", "-m", "x"])
    assert cmd[0] == "torchrun" and cmd[-3:] == ["python", "-m", "x"]
    for opt in ("--nnodes=2", "--nproc-per-node=4", "--node-rank=1", "--master-addr=n1", "--master-port=20007",
                "--no-python"):
        assert opt in cmd


def test_deepspeed_cmd():
    ssh = slurm.deepspeed_cmd(JOB, "/h", ["e"], no_ssh=False)
    assert ssh[:2] == ["deepspeed", "--hostfile=/h"] and "--no_ssh" not in ssh and ssh[-1] == "e"
    nossh = slurm.deepspeed_cmd(JOB, "/h", ["e"], no_ssh=True)
    assert "--no_ssh" in nossh and "--node_rank=1" in nossh and "--no_local_rank" in nossh


@pytest.mark.parametrize("launcher, per_node", [("torchrun", 1), ("deepspeed", 1), ("srun", 4)])
def test_srun_cmd(launcher, per_node):
    cmd = slurm.srun_cmd(JOB, launcher, ["entry"])
    assert cmd[0] == "srun" and "--kill-on-bad-exit=1" in cmd and cmd[-1] == "entry"
    assert f"--ntasks={2 * per_node}" in cmd and f"--ntasks-per-node={per_node}" in cmd


@pytest.mark.parametrize("launcher, cpus", [("torchrun", "128"), ("deepspeed", "128"), ("srun", "32")])
def test_srun_cmd_gives_each_task_its_share_of_the_cpus(launcher, cpus):
    """A task per node gets all the node's CPUs, a task per rank its share; nothing is pinned."""
    job = slurm.job_from_env({**ENV, "SLURM_JOB_CPUS_PER_NODE": "128(x3)", "GPUS_PER_NODE": "4"})
    cmd = slurm.srun_cmd(job, launcher, ["entry"])
    assert [c for c in cmd if c.startswith("--cpus-per-task")] == [f"--cpus-per-task={cpus}"]
    assert "--cpu-bind=none" in cmd and cmd.index("--cpu-bind=none") < cmd.index("entry")
    # CPU count unknown, or fewer CPUs than tasks: no request, still unpinned
    for cpus_env in ({}, {"SLURM_JOB_CPUS_PER_NODE": "2(x3)"}):
        job = slurm.job_from_env({**ENV, **cpus_env, "GPUS_PER_NODE": "4"})
        cmd = slurm.srun_cmd(job, "srun", ["entry"])
        assert not [c for c in cmd if c.startswith("--cpus-per-task")] and "--cpu-bind=none" in cmd


def test_every_sbatch_script_asks_for_the_nodes_memory():
    from tests.conftest import REPO

    scripts = sorted((REPO / "slurm").glob("*.sbatch"))
    assert len(scripts) == 4
    for p in scripts:
        directives = [line.split()[1] for line in p.read_text().splitlines() if line.startswith("#SBATCH ")]
        assert "--mem=0" in directives, p.name


def _host(r):
    return JOB.host_of_rank(r)


def test_resolve_outcome():
    done = {r: (0, _host(r)) for r in range(8)}
    assert slurm.resolve_outcome(done, 8, 0).code == 0
    # 75 survives a launcher that reported failure (torchrun after SIGTERM)
    stopped = {r: (EXIT_RESUME, _host(r)) for r in range(8)}
    assert slurm.resolve_outcome(stopped, 8, 1).code == EXIT_RESUME
    mixed = {**done, 3: (EXIT_RESUME, "n1")}
    assert slurm.resolve_outcome(mixed, 8, 0).code == EXIT_RESUME
    # a failed rank wins over stopped ones, and is named with its host
    failed = {**stopped, 5: (1, "n2")}
    out = slurm.resolve_outcome(failed, 8, 1, _host)
    assert out.code == 1 and "rank 5 on n2" in out.message
    # a rank that never reported (SIGKILL, node lost) is a failure naming rank and host
    lost = {r: v for r, v in stopped.items() if r != 6}
    out = slurm.resolve_outcome(lost, 8, 137, _host)
    assert out.code == 137 and "no exit status from rank 6 on n2" in out.message
    both = slurm.resolve_outcome({**lost, 7: (1, "n2")}, 8, 1, _host)
    assert both.code == 1 and both.message.index("rank 6 on n2") < both.message.index("rank 7 on n2")
    assert slurm.resolve_outcome({}, 8, 0, _host).code == 1
    assert slurm.resolve_outcome({0: (-9, "n1")}, 1, 0).code == 1


def test_status_files_roundtrip(tmp_path):
    from stackllama_ds.launcher.multinode import read_statuses, write_status

    write_status(tmp_path / "s", 0, 75, "n1")
    write_status(tmp_path / "s", 1, 0, "n2")
    (tmp_path / "s" / "rank-x").write_text("garbage")
    assert read_statuses(tmp_path / "s") == {0: (75, "n1"), 1: (0, "n2")}
    assert read_statuses(tmp_path / "missing") == {}


def test_launcher_module_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, stackllama_ds.launcher.slurm, stackllama_ds.launcher.multinode; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.strip() == "False", r.stderr


def test_status_files_are_opened_by_name_when_the_listing_is_stale(tmp_path, monkeypatch):
    """NFS attribute caches can hide new files from a listing for seconds: the expected files are
    opened by name, and one written late is still read within the wait."""
    import threading
    from pathlib import Path

    from stackllama_ds.launcher.multinode import read_statuses, read_stop_signals, write_status

    d = tmp_path / "s"
    write_status(d, 0, 75, "n1", "SIGTERM")
    monkeypatch.setattr(Path, "glob", lambda self, pattern: iter(()))  # a stale, empty listing
    threading.Timer(1.0, write_status, (d, 1, 75, "n2")).start()
    assert read_statuses(d, range(2), wait_s=10.0) == {0: (75, "n1"), 1: (75, "n2")}
    assert read_stop_signals(d, range(2)) == {0: "SIGTERM", 1: "-"}
    assert read_statuses(d, range(3), wait_s=0.0) == {0: (75, "n1"), 1: (75, "n2")}  # rank 2 silent
