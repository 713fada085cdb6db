"""Multi-node launch inside a Slurm allocation: the batch process, the per-node and per-rank entries.

    sbatch slurm/sft.sbatch configs/tiny.yaml                        # what users run
    python -m stackllama_ds.launcher.multinode plan                   # in a job: what would launch
    python -m stackllama_ds.launcher.multinode job sft CONFIG         # batch shell: one srun step
    python -m stackllama_ds.launcher.multinode job pipeline CONFIG    # batch shell: every stage
    python -m stackllama_ds.launcher.multinode node sft CONFIG        # an srun task: torchrun/deepspeed
    python -m stackllama_ds.launcher.multinode rank sft CONFIG        # a rank: the stage itself
    python -m stackllama_ds.launcher.multinode hostfile PATH          # DeepSpeed hostfile of the job
    python -m stackllama_ds.launcher.multinode deepspeed-env PATH     # the ranks' variables, for pdsh

Layers: ``job`` (the batch shell, node 0) starts one ``srun`` step with a task per node (``node``,
which runs torchrun or ``deepspeed --no_ssh``) or a task per rank (``launch/rank.sh``); every
rank runs ``rank``, which runs ``stackllama_ds.cli <stage>`` in-process.

Exit code 75 (checkpointed on SIGUSR1/SIGTERM, resume me) does not survive torchrun, which
reports any non-zero worker as a generic failure, nor ``srun --kill-on-bad-exit``, which kills the
other ranks as soon as one exits non-zero. So each rank writes its real exit code to
``<stage_dir>/.launch/job-<id>/rank-<R>`` (shared filesystem) and, there, exits 0 for 75; ``job``
then combines the files (``slurm.resolve_outcome``): 0 done, 75 requeue, else failure naming
rank and host. On 75 after a USR1 warning, ``job`` requeues the job (``scontrol requeue``); after
a SIGTERM from Slurm (preemption, scancel) it does not: preemption requeues by itself, and a
cancelled job stays cancelled.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from stackllama_ds.launcher import slurm, spawn
from stackllama_ds.launcher.slurm import Outcome
from stackllama_ds.proc import EXIT_RESUME

STATUS_ENV = "STACKLLAMA_STATUS_DIR"


def log(msg: str) -> None:
    print(f"[launch {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _entry(sub: str, stage: str, config: str, sets: Sequence[str]) -> list[str]:
    """``python -m stackllama_ds.launcher.multinode SUB STAGE CONFIG --set ...``."""
    return [sys.executable, "-m", "stackllama_ds.launcher.multinode", sub, *_stage_argv(stage, config, sets)]


def _stage_argv(stage: str, config: str, sets: Sequence[str]) -> list[str]:
    argv = [stage, config]
    for s in sets:
        argv += ["--set", s]
    return argv


def status_dir(stage: str, config: str, sets: Sequence[str], job_id: int | str) -> Path:
    """Where the ranks of one job report their exit codes: under the stage folder (shared FS)."""
    from stackllama_ds.config_loader import load_config

    cfg = load_config(config, list(sets), check_files=False)
    return cfg.stage_dir(stage) / ".launch" / f"job-{job_id}"


# ----------------------------------------------------------------------------- rank status files
def write_status(directory: Path, rank: int, code: int, host: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".rank-{rank}.tmp"
    tmp.write_text(f"{code} {host}\n")
    os.replace(tmp, directory / f"rank-{rank}")


def read_statuses(directory: Path) -> dict[int, tuple[int, str]]:
    out: dict[int, tuple[int, str]] = {}
    if not directory.is_dir():
        return out
    for p in directory.glob("rank-*"):
        try:
            code, host = p.read_text().split(maxsplit=1)
            out[int(p.name.split("-")[1])] = (int(code), host.strip())
        except (OSError, ValueError):
            continue
    return out


# ----------------------------------------------------------------------------- rank
def cmd_rank(stage: str, config: str, sets: Sequence[str]) -> int:
    """Run the stage on this rank; report the exit code; hide 75 from the launcher (see module doc)."""
    os.environ.update(slurm.rank_env_from_slurm(os.environ) if "SLURM_JOB_ID" in os.environ else {})
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        print("multinode rank: RANK/WORLD_SIZE not set (run under torchrun, deepspeed or srun)", file=sys.stderr)
        return 2
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    host = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    print(f"[rank {rank}/{world}] host={host} local_rank={local} pid={os.getpid()} stage={stage}", flush=True)
    from stackllama_ds.cli import main as cli_main

    try:
        code = cli_main(_stage_argv(stage, config, sets))
    except SystemExit as e:  # argparse errors
        code = e.code if isinstance(e.code, int) else 2
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    d = os.environ.get(STATUS_ENV)
    if d:
        write_status(Path(d), rank, code, host)
    print(f"[rank {rank}/{world}] host={host} {stage} exited {code} at {time.strftime('%H:%M:%S')}", flush=True)
    return 0 if d and code == EXIT_RESUME else code


def _exit_now(code: int) -> None:
    """Leave without the interpreter's teardown, which takes ~5-10 s after torch.distributed/DeepSpeed
    (measured here, in C++ destructors) and would eat the 10 s between Slurm's SIGTERM and SIGKILL.
    The stage has returned: checkpoints are renamed and fsynced, metrics closed, process group gone."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ----------------------------------------------------------------------------- node
def cmd_node(stage: str, config: str, sets: Sequence[str], env: Mapping[str, str] = os.environ) -> int:
    """One srun task per node: run torchrun (or ``deepspeed --no_ssh``) for this node's ranks."""
    job = slurm.job_from_env(env)
    launcher = slurm.choose_launcher(env)
    entry = _entry("rank", stage, config, sets)
    if launcher == "torchrun":
        cmd = slurm.torchrun_cmd(job, entry)
    elif launcher == "deepspeed":
        hf = Path(env.get("STACKLLAMA_HOSTFILE") or Path(env.get(STATUS_ENV, "/tmp")) / "hostfile")
        if not hf.exists():
            hf.parent.mkdir(parents=True, exist_ok=True)
            hf.write_text(slurm.hostfile_text(job.hosts, job.gpus_per_node))
        cmd = slurm.deepspeed_cmd(job, str(hf), entry, no_ssh=True)
        if env.get("DS_ACCELERATOR") == "cpu":
            # Without --num_gpus the CPU accelerator reports one device per node (shared/NOTES.md).
            cmd.insert(1, f"--num_gpus={job.gpus_per_node}")
    else:
        raise slurm.SlurmEnvError(f"launcher {launcher!r} has no per-node process (use launch/rank.sh)")
    if shutil.which(cmd[0]) is None and (Path(sys.executable).parent / cmd[0]).exists():
        cmd[0] = str(Path(sys.executable).parent / cmd[0])  # the venv's launcher, venv not activated
    # Slurm signals every process of the step; the ranks handle USR1 themselves (checkpoint, exit 75)
    # but torchrun and the deepspeed launcher would die of it (default action), so they ignore it.
    old = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    proc = subprocess.Popen(cmd)
    signal.signal(signal.SIGUSR1, old)
    got: list[int] = []

    def note(signum, frame):  # the launcher and the ranks got the same signal from Slurm
        got.append(signum)

    for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
        signal.signal(s, note)
    rc = proc.wait()
    host = env.get("SLURMD_NODENAME") or socket.gethostname()
    log(f"node {job.node_id} ({host}): {launcher} exited {rc}")
    d = env.get(STATUS_ENV)
    if rc != 0 and d:
        # torchrun exits non-zero after a SIGTERM even when its workers checkpointed: trust the ranks.
        mine = range(job.node_id * job.gpus_per_node, (job.node_id + 1) * job.gpus_per_node)
        st = read_statuses(Path(d))
        if all(r in st and st[r][0] in (0, EXIT_RESUME) for r in mine):
            return 0
    return rc


# ----------------------------------------------------------------------------- job (batch shell)
class _Signals:
    """The batch shell's view of USR1 (time-limit warning: forward, requeue after) and TERM."""

    def __init__(self) -> None:
        self.usr1 = 0
        self.term = 0
        self.forwarded = 0
        for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._on)

    def _on(self, signum, frame) -> None:
        if signum == signal.SIGUSR1:
            self.usr1 += 1
        else:
            self.term += 1

    @property
    def stop(self) -> bool:
        return bool(self.usr1 or self.term)


def _forward_usr1(job_id: int) -> None:
    # `sbatch --signal=B:USR1@T` reaches only the batch shell; `scancel --signal=USR1 J` reaches every
    # task of every step (srun forwards to all nodes), which is where the ranks are.
    subprocess.run(["scancel", "--signal=USR1", str(job_id)], check=False)


def run_step(stage: str, config: str, sets: Sequence[str], sig: _Signals, env: Mapping[str, str]) -> Outcome:
    """One srun step of a stage across the allocation; wait for it, forwarding stop signals."""
    job = slurm.job_from_env(env)
    launcher = slurm.choose_launcher(env)
    sdir = status_dir(stage, config, sets, job.job_id)
    shutil.rmtree(sdir, ignore_errors=True)  # a previous run of this job (before a requeue)
    sdir.mkdir(parents=True, exist_ok=True)
    child_env = dict(env)
    child_env.update(
        {
            STATUS_ENV: str(sdir),
            "MASTER_ADDR": job.master_addr,
            "MASTER_PORT": str(job.master_port),
            "GPUS_PER_NODE": str(job.gpus_per_node),
            "PYTHONUNBUFFERED": "1",
        }
    )
    if launcher == "srun":
        here = Path(__file__).resolve().parents[2] / "launch" / "rank.sh"
        rank_sh = env.get("STACKLLAMA_RANK_SH") or str(here)
        entry = [rank_sh, *_stage_argv(stage, config, sets)]
    else:
        entry = _entry("node", stage, config, sets)
    cmd = slurm.srun_cmd(job, launcher, entry)
    log(
        f"job {job.job_id} restart {job.restart_count}: {stage} on {job.nnodes} node(s) "
        f"{','.join(job.hosts)} x {job.gpus_per_node} rank(s) = world {job.world_size}, "
        f"launcher {launcher}, master {job.master_addr}:{job.master_port}"
    )
    log("step: " + shlex.join(cmd))
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=child_env)
    forwarded, last = 0, 0.0
    resend_s = float(env.get("STACKLLAMA_RESIGNAL_S", "30"))
    while True:
        try:
            rc = proc.wait(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            pass
        if sig.usr1 > forwarded:
            forwarded, last = sig.usr1, time.time()
            log("batch shell got SIGUSR1: asking every rank to checkpoint at its next step and exit 75")
            _forward_usr1(job.job_id)
        elif forwarded and time.time() - last > resend_s:
            # A rank still starting up (before its handler exists) ignores USR1: ask again.
            last = time.time()
            _forward_usr1(job.job_id)
    out = slurm.resolve_outcome(read_statuses(sdir), job.world_size, rc, job.host_of_rank)
    log(f"{stage}: srun exited {rc} after {time.time() - t0:.0f}s; {out.message} -> exit {out.code}")
    return out


def finish(code: int, sig: _Signals, job_id: int, what: str) -> int:
    """Requeue on 75 after our own warning signal; leave it to Slurm after its SIGTERM."""
    if code != EXIT_RESUME:
        return code
    if sig.term:
        log(f"{what} checkpointed after SIGTERM from Slurm (preemption, scancel or requeue): not requeueing "
            "here; a preempted job is requeued by Slurm and resumes from the checkpoint")
        return code
    log(f"{what} checkpointed: requeueing job {job_id} (it resumes from the checkpoint)")
    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, signal.SIG_IGN)
    r = subprocess.run(["scontrol", "requeue", str(job_id)], capture_output=True, text=True)
    if r.returncode != 0:
        log(f"scontrol requeue failed ({(r.stderr or r.stdout).strip()}); resubmit the job to resume")
    return code


def cmd_job(stage: str, config: str, sets: Sequence[str], env: Mapping[str, str] = os.environ) -> int:
    sig = _Signals()
    job = slurm.job_from_env(env)
    if stage != "pipeline":
        return finish(run_step(stage, config, sets, sig, env).code, sig, job.job_id, stage)

    # `stackllama-ds pipeline` itself, with each training stage's local spawn replaced by an srun step
    # (prepare and make-tiny run here, once, in the batch shell).
    from stackllama_ds import cli
    from stackllama_ds.launcher import spawn as spawn_mod

    def srun_spawn(argv: list[str], nproc: int, **_) -> int:
        st, cfg_path = argv[0], argv[1]
        stage_sets = [argv[i + 1] for i in range(2, len(argv) - 1) if argv[i] == "--set"]
        if sig.stop:
            log(f"not starting {st}: a stop signal arrived")
            return EXIT_RESUME
        return run_step(st, cfg_path, stage_sets, sig, env).code

    spawn_mod.spawn = srun_spawn  # cli.run_stage imports spawn at call time
    code = cli.main(_stage_argv("pipeline", config, sets))
    return finish(code, sig, job.job_id, "pipeline")


# ----------------------------------------------------------------------------- info commands
def cmd_plan(env: Mapping[str, str] = os.environ) -> int:
    job = slurm.job_from_env(env)
    launcher = slurm.choose_launcher(env)
    print(f"job {job.job_id} hosts {' '.join(job.hosts)} node {job.node_id} gpus/node {job.gpus_per_node} "
          f"world {job.world_size} master {job.master_addr}:{job.master_port} launcher {launcher}")
    print("srun step: " + shlex.join(slurm.srun_cmd(job, launcher, ["<entry>"])))
    return 0


def cmd_env(env: Mapping[str, str] = os.environ) -> int:
    """``eval "$(python -m stackllama_ds.launcher.multinode env)"``: the job's launch variables."""
    job = slurm.job_from_env(env)
    for k, v in (
        ("NNODES", job.nnodes),
        ("GPUS_PER_NODE", job.gpus_per_node),
        ("WORLD", job.world_size),
        ("MASTER_ADDR", job.master_addr),
        ("MASTER_PORT", job.master_port),
        ("STACKLLAMA_LAUNCHER", slurm.choose_launcher(env)),
    ):
        print(f"export {k}={shlex.quote(str(v))}")
    for k, v in spawn.MALLOC_ENV.items():  # inherited by torchrun / srun and so by every rank
        print(f"export {k}=${{{k}:-{v}}}")
    return 0


def cmd_hostfile(path: str, env: Mapping[str, str] = os.environ) -> int:
    job = slurm.job_from_env(env)
    Path(path).write_text(slurm.hostfile_text(job.hosts, job.gpus_per_node))
    print(path)
    return 0


def cmd_deepspeed_env(path: str, env: Mapping[str, str] = os.environ) -> int:
    """Write the variables ``deepspeed --hostfile`` sends to every node: its runner reads the file
    named by ``DS_ENV_FILE`` (default ``.deepspeed_env``, in ``~`` and in the current folder)."""
    Path(path).write_text(slurm.deepspeed_env_text(env))
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stackllama_ds.launcher.multinode", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("job", "node", "rank"):
        p = sub.add_parser(name)
        p.add_argument("stage")
        p.add_argument("config")
        p.add_argument("--set", action="append", default=[])
    sub.add_parser("plan")
    sub.add_parser("env")
    p = sub.add_parser("hostfile")
    p.add_argument("path")
    p = sub.add_parser("deepspeed-env")
    p.add_argument("path")
    a = ap.parse_args(argv)
    fns: dict[str, Callable[[], int]] = {
        "job": lambda: cmd_job(a.stage, a.config, a.set),
        "node": lambda: cmd_node(a.stage, a.config, a.set),
        "rank": lambda: _exit_now(cmd_rank(a.stage, a.config, a.set)),  # type: ignore[func-returns-value]
        "plan": cmd_plan,
        "env": cmd_env,
        "hostfile": lambda: cmd_hostfile(a.path),
        "deepspeed-env": lambda: cmd_deepspeed_env(a.path),
    }
    try:
        return fns[a.cmd]()
    except slurm.SlurmEnvError as e:
        print(f"multinode {a.cmd}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
