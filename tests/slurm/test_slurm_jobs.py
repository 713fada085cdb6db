"""The sbatch scripts on a real 2-node Slurm cluster (../shared/slurm): launch, preemption, bad config.

    pytest -m slurm tests/slurm

Every job runs the tiny SFT with 1 rank per Slurm node (GPUS_PER_NODE=1, --gres=none: this cluster
has no GPUs) through the default launch path: srun -> torchrun per node -> ranks.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from stackllama_ds.launcher.multinode import read_statuses, read_stop_signals  # noqa: E402
from stackllama_ds.run.layout import RESUMES  # noqa: E402
from stackllama_ds.run.metrics import read_metrics  # noqa: E402
from tests.conftest import fresh_root, write_config  # noqa: E402

SLURM_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "slurm"

pytestmark = [pytest.mark.slow, pytest.mark.slurm]


@pytest.fixture(scope="session")
def slurm_cluster():
    """Start (or find running) the local cluster; skip without it, fail under CI."""
    start = SLURM_DIR / "start.sh"
    reason = None
    if not start.exists():
        reason = f"no local Slurm cluster script at {start}"
    elif os.geteuid() != 0 or shutil.which("apt-get") is None:
        reason = "the local Slurm cluster needs root and Debian (apt-get)"
    else:
        r = subprocess.run([str(start)], capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            reason = f"{start} failed ({r.returncode}): {(r.stdout + r.stderr)[-2000:]}"
        elif shutil.which("sbatch") is None:
            reason = "sbatch not on PATH after start.sh"
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set and the Slurm cluster is unavailable: {reason}")
        pytest.skip(reason)
    return SLURM_DIR


def job_env(**extra: str) -> dict[str, str]:
    """The submitter's environment that sbatch exports to the job: the venv first, CPU, 1 rank/node."""
    env = dict(os.environ)
    venv_bin = REPO / ".venv" / "bin"
    bin_dir = venv_bin if venv_bin.exists() else Path(sys.executable).parent
    env["PATH"] = f"{bin_dir}:{env.get('PATH', '')}"
    env.update(
        PYTHON=str(bin_dir / "python"),
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        GPUS_PER_NODE="1",
        STACKLLAMA_HOME=str(REPO),
        WANDB_MODE="offline",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "STACKLLAMA_LAUNCHER"):
        env.pop(k, None)
    env.update(extra)
    return env


# The CPU-only override of the scripts' 3 x 8 GPU defaults (documented in docs/cluster.md).
CPU_OVERRIDE = ["--nodes=2", "--gres=none", "--time=30"]


def sbatch(script: str, config: Path, out: Path, *args: str, wait: bool = True, env=None, sets=()):
    cmd = ["sbatch", *CPU_OVERRIDE, f"--output={out}", *args]
    cmd += ["--wait"] if wait else ["--parsable"]
    cmd += [str(REPO / "slurm" / script), str(config)]
    for s in sets:
        cmd += ["--set", s]
    return cmd, env or job_env()


def run_job(script, config, out, *args, timeout=240, sets=()):
    cmd, env = sbatch(script, config, out, *args, sets=sets)
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return r.returncode, (out.read_text() if out.exists() else "") + r.stderr


def steps(stage_dir: Path) -> list[int]:
    p = stage_dir / "metrics.jsonl"
    if not p.exists():
        return []
    return [json.loads(line)["step"] for line in p.read_text().splitlines() if line.strip()]


def job_id_of(out: Path, proc: subprocess.Popen, timeout: float = 60) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if out.exists():
            m = re.search(r"\[launch\] job (\d+)", out.read_text())
            if m:
                return int(m.group(1))
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.5)
    raise AssertionError(f"no job id in {out}")


def wait_for(pred, timeout: float, what: str, proc: subprocess.Popen | None = None, poll: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"job ended while waiting for {what}: {proc.communicate()}")
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


def job_state(job_id: int) -> str:
    r = subprocess.run(["scontrol", "show", "job", str(job_id)], capture_output=True, text=True)
    m = re.search(r"JobState=(\S+)", r.stdout)
    return m.group(1) if m else ""


def release_when_pending(job_id: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    """Wait until the job is pending again after its requeue.

    The requeue delay (cred_expire + 1 s = 16 s) is not skipped: slurmd remembers the killed job id
    until the credential expires, and a job released early with `StartTime=now` was refused there
    ("Job credential revoked") and ended FAILED in a loaded CI run.
    """
    wait_for(lambda: job_state(job_id) == "PENDING", timeout, f"job {job_id} to be requeued", proc, poll=0.3)


# A run long enough to catch mid-flight: no periodic eval/checkpoint, so only the stop checkpoints.
SLOW_SFT = {"max_steps": 40, "eval_every": 1000, "save_every": 1000, "seq_length": 128}


@pytest.fixture
def sft_job_root(prepared_root, tmp_path):
    root = fresh_root(prepared_root, tmp_path / "run")
    return root, write_config(tmp_path / "cfg.yaml", root, sft=SLOW_SFT)


def test_sft_job_runs_ranks_on_both_nodes(slurm_cluster, prepared_root, tmp_path):
    root = fresh_root(prepared_root, tmp_path / "run")
    cfg = write_config(tmp_path / "cfg.yaml", root, sft={"max_steps": 8, "eval_every": 4, "save_every": 4,
                                                          "seq_length": 128})
    out = tmp_path / "job.out"
    rc, log = run_job("sft.sbatch", cfg, out)
    assert rc == 0, log[-6000:]
    assert re.search(r"\[rank 0/2\] host=n1 ", log) and re.search(r"\[rank 1/2\] host=n2 ", log), log[-4000:]
    assert "all 2 ranks finished -> exit 0" in log
    assert steps(root / "sft") == list(range(1, 9))
    assert (root / "sft" / "DONE").exists() and (root / "sft" / "model" / "config.json").exists()


def _check_stopped_then_resumed(root: Path, job: int, log: str, max_steps: int) -> None:
    """Restart 0: every rank received the stop signal itself and exited 75 after a checkpoint;
    restart 1 (the requeued run): every rank finished, each step ran exactly once."""
    launch = root / "sft" / ".launch" / f"job-{job}"
    first, second = launch / "restart-0", launch / "restart-1"
    assert {r: c for r, (c, _) in read_statuses(first, range(2)).items()} == {0: 75, 1: 75}, log[-6000:]
    assert set(read_stop_signals(first, range(2)).values()) <= {"SIGUSR1", "SIGTERM"}, log[-6000:]
    assert {r: c for r, (c, _) in read_statuses(second, range(2)).items()} == {0: 0, 1: 0}, log[-6000:]
    resumes = read_metrics(root / "sft" / RESUMES)
    assert len(resumes) == 1 and resumes[0]["step"] >= 1, resumes  # the requeued run went on from its stop checkpoint
    assert resumes[0]["checkpoint"] == str(root / "sft" / "checkpoints" / f"step-{resumes[0]['step']}")
    assert steps(root / "sft") == list(range(1, max_steps + 1)), "every step exactly once"
    assert (root / "sft" / "DONE").exists()


def _interrupted_sft_job(cfg: Path, root: Path, tmp_path: Path, interrupt,
                         pending_timeout: float = 60) -> tuple[int, str]:
    """Submit the slow SFT job, interrupt it once training runs, wait through its requeue; return its
    id and log."""
    out = tmp_path / "job.out"
    cmd, env = sbatch("sft.sbatch", cfg, out)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        job = job_id_of(out, proc)
        wait_for(lambda: len(steps(root / "sft")) >= 3, 120, "training to start", proc)
        interrupt(job, env)
        release_when_pending(job, proc, timeout=pending_timeout)
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            subprocess.run(["scancel", str(job)])
            proc.kill()
    log = out.read_text()
    assert proc.returncode == 0, (stdout, stderr, log[-6000:])
    return job, log


def test_usr1_warning_checkpoints_requeues_and_resumes(slurm_cluster, sft_job_root, tmp_path):
    root, cfg = sft_job_root

    def warn(job: int, env: dict) -> None:
        # What `--signal=B:USR1@T` does before the time limit: USR1 to the batch shell only.
        subprocess.run(["scancel", "--batch", "--signal=USR1", str(job)], check=True)

    job, log = _interrupted_sft_job(cfg, root, tmp_path, warn)
    _check_stopped_then_resumed(root, job, log, SLOW_SFT["max_steps"])
    # USR1 reached only the batch shell: the batch process passed it on to every rank (and requeued).
    assert read_stop_signals(root / "sft" / ".launch" / f"job-{job}" / "restart-0", range(2)) == {
        0: "SIGUSR1", 1: "SIGUSR1"}, log[-6000:]


def test_preemption_by_urgent_job_checkpoints_and_resumes(slurm_cluster, sft_job_root, tmp_path):
    root, cfg = sft_job_root

    def preempt(job: int, env: dict) -> None:
        # A job in the higher-priority partition takes both nodes: SIGTERM now, SIGKILL 10 s later.
        subprocess.run(["sbatch", "-p", "urgent", "--exclusive", "-N2", f"--output={tmp_path}/urgent.out",
                        "--wrap", "sleep 1"], check=True, capture_output=True, env=env)

    job, log = _interrupted_sft_job(cfg, root, tmp_path, preempt, pending_timeout=90)
    # Through the torchrun path: the signal reached each rank's own process (checked inside).
    _check_stopped_then_resumed(root, job, log, SLOW_SFT["max_steps"])


def test_bad_config_fails_the_job_before_any_rank(slurm_cluster, prepared_root, tmp_path):
    root = fresh_root(prepared_root, tmp_path / "run")
    cfg = write_config(tmp_path / "cfg.yaml", root, sft={"global_batch_size": 7})
    t0 = time.time()
    rc, log = run_job("sft.sbatch", cfg, tmp_path / "job.out", timeout=120)
    assert rc == 2, log
    assert "sft.global_batch_size" in log and "job failed before any rank started" in log, log
    assert "[rank" not in log and not (root / "sft").exists()
    assert time.time() - t0 < 60


def test_dead_rank_ends_the_job_naming_rank_and_host(slurm_cluster, prepared_root, tmp_path):
    root = fresh_root(prepared_root, tmp_path / "run")
    cfg = write_config(tmp_path / "cfg.yaml", root, sft={"max_steps": 8, "eval_every": 100, "save_every": 3,
                                                          "seq_length": 128})
    out = tmp_path / "job.out"
    # checkpoint.py's fault hook SIGKILLs rank 0 in the middle of its first checkpoint.
    cmd, env = sbatch("sft.sbatch", cfg, out, env=job_env(STACKLLAMA_FAULT="ckpt_between_files"))
    t0 = time.time()
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    log = out.read_text()
    assert r.returncode not in (0, 75), log[-6000:]
    assert "no exit status from rank 0 on n1" in log, log[-6000:]
    assert "requeueing" not in log and not (root / "sft" / "DONE").exists()
    assert time.time() - t0 < 150


HAS_RM = (REPO / "stackllama_ds" / "stages" / "rm.py").exists()
HAS_PPO = (REPO / "stackllama_ds" / "stages" / "ppo.py").exists()


@pytest.mark.skipif(not HAS_RM, reason="stackllama_ds/stages/rm.py does not exist yet")
def test_rm_job(slurm_cluster, sft_root, tmp_path):
    root = fresh_root(sft_root, tmp_path / "run", stages=("sft",))
    cfg = write_config(tmp_path / "cfg.yaml", root, rm={"max_steps": 6, "eval_every": 3, "save_every": 3,
                                                         "max_length": 128})
    rc, log = run_job("rm.sbatch", cfg, tmp_path / "job.out")
    assert rc == 0, log[-6000:]
    assert re.search(r"\[rank 1/2\] host=n2 ", log) and (root / "rm" / "DONE").exists()


@pytest.mark.skipif(not HAS_PPO, reason="stackllama_ds/stages/ppo.py does not exist yet: slurm/ppo.sbatch "
                    "is written but untested")
def test_ppo_job(slurm_cluster, rm_root, tmp_path):
    root = fresh_root(rm_root, tmp_path / "run", stages=("sft", "rm"))
    cfg = write_config(tmp_path / "cfg.yaml", root, ppo={"steps": 2, "save_every": 1})
    rc, log = run_job("ppo.sbatch", cfg, tmp_path / "job.out")
    assert rc == 0, log[-6000:]
    assert re.search(r"\[rank 1/2\] host=n2 ", log) and (root / "ppo" / "DONE").exists()
