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
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from stackllama_ds.fsutil import write_atomic
from stackllama_ds.launcher import slurm, spawn
from stackllama_ds.launcher.slurm import Outcome
from stackllama_ds.run.signals import EXIT_RESUME

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


def status_dir(stage: str, config: str, sets: Sequence[str], job_id: int | str, restart: int = 0) -> Path:
    """Where the ranks of one run of a job report: under the stage folder (shared FS), one folder per
    Slurm restart, so a requeued run never reads (or deletes) what the run before it reported."""
    from stackllama_ds.config_loader import load_config

    cfg = load_config(config, list(sets), check_files=False)
    return cfg.stage_dir(stage) / ".launch" / f"job-{job_id}" / f"restart-{restart}"


# ----------------------------------------------------------------------------- rank status files
def write_status(directory: Path, rank: int, code: int, host: str, stop_signal: str = "-") -> None:
    """``rank-R``: the stage's exit code, the host, and the stop signal this rank itself received."""
    directory.mkdir(parents=True, exist_ok=True)
    # a hidden temporary name: readers list ``rank-*``
    write_atomic(directory / f"rank-{rank}", f"{code} {host} {stop_signal}\n", tmp_name=f".rank-{rank}.tmp")


def _read_fields(directory: Path, prefix: str, ranks: Iterable[int] | None, wait_s: float) -> dict[int, list[str]]:
    """Open ``<prefix>-R`` by name for each expected rank, retrying for up to ``wait_s``: a listing of a
    shared folder right after a step can miss files for seconds (NFS attribute caches); an open by
    name goes to the server. Without ``ranks``, fall back to a listing (info only)."""
    if ranks is None:
        ranks = sorted(int(p.name.split("-")[1]) for p in directory.glob(f"{prefix}-*")
                       if p.name.split("-")[1].isdigit()) if directory.is_dir() else []
    todo, out = list(ranks), {}
    deadline = time.monotonic() + wait_s
    while True:
        for r in list(todo):
            try:
                fields = (directory / f"{prefix}-{r}").read_text().split()
            except OSError:
                continue
            if len(fields) >= 2:
                out[r] = fields
                todo.remove(r)
        if not todo or time.monotonic() >= deadline:
            return out
        time.sleep(0.5)


def read_statuses(directory: Path, ranks: Iterable[int] | None = None, wait_s: float = 0.0) -> dict[int, tuple[int, str]]:
    """rank -> (exit code, host) from the ranks' status files (see ``_read_fields`` for the retry)."""
    out: dict[int, tuple[int, str]] = {}
    for r, f in _read_fields(directory, "rank", ranks, wait_s).items():
        try:
            out[r] = (int(f[0]), f[1])
        except ValueError:
            continue
    return out


def read_stop_signals(directory: Path, ranks: Iterable[int] | None = None) -> dict[int, str]:
    """rank -> the stop signal the rank's own process received (``SIGUSR1``, ``SIGTERM``) or ``-``."""
    return {r: (f[2] if len(f) > 2 else "-") for r, f in _read_fields(directory, "rank", ranks, 0.0).items()}


def write_pid(directory: Path, rank: int, host: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    write_atomic(directory / f"pid-{rank}", f"{os.getpid()} {host}\n", tmp_name=f".pid-{rank}.tmp")


def read_pids(directory: Path, ranks: Iterable[int]) -> dict[int, int]:
    return {r: int(f[0]) for r, f in _read_fields(directory, "pid", ranks, 0.0).items() if f[0].isdigit()}


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
    d = os.environ.get(STATUS_ENV)
    if d:  # the node process forwards stop signals to this pid (torchrun's workers sit in their own sessions)
        write_pid(Path(d), rank, host)
    from stackllama_ds.cli import main as cli_main

    try:
        code = cli_main(_stage_argv(stage, config, sets))
    except SystemExit as e:  # argparse errors
        code = e.code if isinstance(e.code, int) else 2
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    if d:
        from stackllama_ds.run.signals import StopSignal

        got = StopSignal.received
        write_status(Path(d), rank, code, host, signal.Signals(got).name if got else "-")
    print(f"[rank {rank}/{world}] host={host} {stage} exited {code} at {time.strftime('%H:%M:%S')}", flush=True)
    return 0 if d and code == EXIT_RESUME else code


def _exit_now(code: int) -> None:
    """Leave without the interpreter's teardown, which takes seconds after torch.distributed/DeepSpeed
    (C++ destructors) and would eat the time between Slurm's SIGTERM and SIGKILL.
    The stage has returned: checkpoints are renamed and fsynced, metrics closed, process group gone."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ----------------------------------------------------------------------------- node
def cmd_node(stage: str, config: str, sets: Sequence[str], env: Mapping[str, str] = os.environ) -> int:
    """One srun task per node: run torchrun (or ``deepspeed --no_ssh``) for this node's ranks, and
    forward every stop signal it gets to each of them (see ``_NodeForwarder``)."""
    from stackllama_ds.config_loader import load_config

    job = slurm.job_from_env(env)
    launcher = slurm.choose_launcher(env)
    entry = _entry("rank", stage, config, sets)
    grace = load_config(config, list(sets), check_files=False).launch.stop_timeout_s
    if launcher == "torchrun":
        cmd = slurm.torchrun_cmd(job, entry, shutdown_timeout_s=grace)
    elif launcher == "deepspeed":
        hf = Path(env.get("STACKLLAMA_HOSTFILE") or Path(env.get(STATUS_ENV, "/tmp")) / "hostfile")
        if not hf.exists():
            hf.parent.mkdir(parents=True, exist_ok=True)
            hf.write_text(slurm.hostfile_text(job.hosts, job.gpus_per_node))
        cmd = slurm.deepspeed_cmd(job, str(hf), entry, no_ssh=True)
        if env.get("DS_ACCELERATOR") == "cpu":
            # Without --num_gpus the CPU accelerator reports one device per node (one device per host).
            cmd.insert(1, f"--num_gpus={job.gpus_per_node}")
    else:
        raise slurm.SlurmEnvError(f"launcher {launcher!r} has no per-node process (use launch/rank.sh)")
    if shutil.which(cmd[0]) is None and (Path(sys.executable).parent / cmd[0]).exists():
        cmd[0] = str(Path(sys.executable).parent / cmd[0])  # the venv's launcher, venv not activated
    # The launcher would die of USR1 (default action) and torchrun SIGKILLs its workers 30 s after a
    # TERM unless told otherwise (--shutdown-timeout above): the launcher ignores USR1, and this
    # process sends USR1 to every rank of the node itself.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # inherited through exec by the launcher
    proc = subprocess.Popen(cmd)
    mine = range(job.node_id * job.gpus_per_node, (job.node_id + 1) * job.gpus_per_node)
    d = env.get(STATUS_ENV)
    fwd = _NodeForwarder(Path(d) if d else None, mine)
    while True:
        try:
            rc = proc.wait(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            fwd.forward()
    host = env.get("SLURMD_NODENAME") or socket.gethostname()
    log(f"node {job.node_id} ({host}): {launcher} exited {rc}")
    if rc != 0 and d:
        # torchrun exits non-zero after a SIGTERM even when its workers checkpointed: trust the ranks.
        st = read_statuses(Path(d), mine, wait_s=10.0)
        if all(r in st and st[r][0] in (0, EXIT_RESUME) for r in mine):
            return 0
    return rc


class _NodeForwarder:
    """Send SIGUSR1 to each of this node's ranks once a stop signal (USR1, TERM, INT) reached this
    process. The signal from Slurm does not reach every rank by itself: torchrun starts its workers in
    their own sessions (a process-group based proctrack misses them), and the per-node launcher
    ignores USR1. Ranks register their pids in the status folder as they start; one that registers
    after the signal gets it then. A rank treats a repeated USR1 as the same request."""

    def __init__(self, status: Path | None, ranks: range) -> None:
        self.status, self.ranks = status, ranks
        self.got: list[int] = []
        self.sent: set[int] = set()
        for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            signal.signal(s, lambda signum, frame: self.got.append(signum))

    def forward(self) -> None:
        if not self.got or self.status is None:
            return
        for rank, pid in read_pids(self.status, [r for r in self.ranks if r not in self.sent]).items():
            try:
                os.kill(pid, signal.SIGUSR1)
            except ProcessLookupError:  # already gone (finished or died): nothing to stop
                pass
            self.sent.add(rank)


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
    sdir = status_dir(stage, config, sets, job.job_id, job.restart_count)
    shutil.rmtree(sdir, ignore_errors=True)  # a retry of the same restart
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
    out = slurm.resolve_outcome(read_statuses(sdir, range(job.world_size), wait_s=10.0), job.world_size, rc,
                                job.host_of_rank)
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
