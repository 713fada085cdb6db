"""Slurm allocation -> launch plan, as pure functions (no scontrol, no torch, no file system).

    python -m stackllama_ds.launcher.multinode plan      # prints what these compute, in a job

Inputs are an environment mapping (``os.environ`` in a job, a dict in tests); outputs are hosts,
ports, hostfile text, per-rank variables and launcher command lines. ``multinode.py`` runs them.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from stackllama_ds.run.signals import EXIT_RESUME

DEFAULT_GPUS_PER_NODE = 8  # the StackLLaMA layout: 3 nodes x 8 A100
LAUNCHERS = ("torchrun", "srun", "deepspeed")


class SlurmEnvError(ValueError):
    """The environment does not describe a usable allocation (names the variable)."""


# ----------------------------------------------------------------------------- hostlists
def _split_top(s: str) -> list[str]:
    """Split on commas that are not inside brackets: ``a1,b[2-4,7]`` -> ``["a1", "b[2-4,7]"]``."""
    out, depth, cur = [], 0, []
    for ch in s:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise SlurmEnvError(f"unbalanced ']' in hostlist {s!r}")
        if ch == "," and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise SlurmEnvError(f"unbalanced '[' in hostlist {s!r}")
    out.append("".join(cur))
    return [p for p in (x.strip() for x in out) if p]


def _expand_range(body: str, whole: str) -> list[str]:
    """``01-03,10`` -> ``["01", "02", "03", "10"]`` (zero padding kept, as Slurm does)."""
    out = []
    for part in body.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
        if not m:
            raise SlurmEnvError(f"bad range {part!r} in hostlist {whole!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise SlurmEnvError(f"descending range {part!r} in hostlist {whole!r}")
        width = len(lo) if lo.startswith("0") and len(lo) > 1 else 0
        out += [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    return out


def hostnames(nodelist: str) -> list[str]:
    """The hosts of a Slurm nodelist, in order: ``scontrol show hostnames`` (Slurm's own parser, on
    every Slurm node); ``expand_hostlist`` only where scontrol is absent (a login-less test box)."""
    scontrol = shutil.which("scontrol")
    if scontrol:
        r = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True, timeout=60)
        if r.returncode != 0 or not r.stdout.split():
            raise SlurmEnvError(f"scontrol show hostnames {nodelist!r} failed: {(r.stderr or r.stdout).strip()}")
        return r.stdout.split()
    return expand_hostlist(nodelist)


def expand_hostlist(nodelist: str) -> list[str]:
    """Expand Slurm hostlist syntax in order, like ``scontrol show hostnames`` (the fallback of
    ``hostnames`` where scontrol is absent).

    ``gpu[01-03]`` -> gpu01 gpu02 gpu03; ``a1,b[2-4,7]`` -> a1 b2 b3 b4 b7;
    ``node-[001-003,010]`` -> node-001 .. node-003 node-010; ``x`` -> x; several bracket groups
    (``r[1-2]n[1-2]``) expand as a product, leftmost slowest.
    """
    hosts: list[str] = []
    for item in _split_top(nodelist.strip()):
        parts = re.split(r"(\[[^\]]*\])", item)
        names = [""]
        for p in parts:
            if p.startswith("["):
                names = [n + x for n in names for x in _expand_range(p[1:-1], nodelist)]
            elif p:
                names = [n + p for n in names]
        hosts += names
    if not hosts:
        raise SlurmEnvError(f"empty hostlist {nodelist!r}")
    return hosts


# ----------------------------------------------------------------------------- counts and ports
def parse_gpu_count(value: str) -> int | None:
    """GPUs from SLURM_GPUS_ON_NODE / SLURM_GPUS_PER_NODE forms: ``8``, ``gpu:8``, ``a100:4``,
    ``gpu:a100:4(IDX:0-3)``; several types (``a100:2,v100:2``) are summed. None if unreadable."""
    total, seen = 0, False
    for part in _split_top(value):
        part = re.sub(r"\(.*\)$", "", part.strip())
        m = re.search(r"(?:^|:)(\d+)$", part)
        if m:
            total += int(m.group(1))
            seen = True
    return total if seen else None


def gpus_per_node(env: Mapping[str, str]) -> int:
    """Ranks per node: GPUS_PER_NODE, else Slurm's SLURM_GPUS_ON_NODE / SLURM_GPUS_PER_NODE, else 8."""
    if env.get("GPUS_PER_NODE", "").strip():
        v = env["GPUS_PER_NODE"].strip()
        if not v.isdigit() or int(v) < 1:
            raise SlurmEnvError(f"GPUS_PER_NODE={v!r}: expected a positive integer")
        return int(v)
    for key in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        n = parse_gpu_count(env.get(key, ""))
        if n:
            return n
    return DEFAULT_GPUS_PER_NODE


def master_port(job_id: int | str, restart: int = 0) -> int:
    """A port every node derives alike from the job id and Slurm's restart count:
    20000 + (jobid + 997 x restart) % 12000 (in 20000..31999), below Linux's ephemeral range (32768+),
    where an outgoing connection may already hold the port. A requeued run takes another port than
    the run before it: its rendezvous never meets what is left of the previous one on the same host
    (a torchrun rendezvous hung for 5 min on the reused port after a preemption, once in CI)."""
    return 20000 + (int(job_id) + 997 * int(restart)) % 12000


def cpus_per_node(env: Mapping[str, str]) -> int | None:
    """CPUs the job has on its smallest node: SLURM_JOB_CPUS_PER_NODE (``72(x2),36``), else
    SLURM_CPUS_ON_NODE; None when neither says."""
    counts: list[int] = []
    for part in env.get("SLURM_JOB_CPUS_PER_NODE", "").split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if m:
            counts += [int(m.group(1))] * int(m.group(2) or 1)
    if counts:
        return min(counts)
    v = env.get("SLURM_CPUS_ON_NODE", "").strip()
    return int(v) if v.isdigit() else None


def hostfile_text(hosts: Sequence[str], slots: int) -> str:
    """DeepSpeed hostfile: one ``host slots=N`` line per node."""
    return "".join(f"{h} slots={slots}\n" for h in hosts)


# What the ranks need on the other nodes. `deepspeed --hostfile` runs them through pdsh/ssh, which
# carries only the launcher's own prefixes (NCCL, PYTHON, UCX, MV2, MLFLOW) and .deepspeed_env.
DEEPSPEED_ENV_PREFIXES = ("MALLOC_", "OMP_NUM_THREADS", "HF_", "STACKLLAMA_", "TORCH_NCCL_", "GLOO_",
                          "DS_ACCELERATOR", "PATH", "LD_LIBRARY_PATH")


def deepspeed_env_text(env: Mapping[str, str]) -> str:
    """``.deepspeed_env``: one ``KEY=VALUE`` line per variable the ranks need (DEEPSPEED_ENV_PREFIXES).

    DeepSpeed's runner splits each line at its first ``=`` (a blank line is an error) and puts
    ``export KEY=VALUE;`` in the remote command, double-quoted where the value has shell characters:
    values with a newline, ``"``, ``$``, a backquote or a backslash would not arrive intact, so they
    are left out.
    """
    lines = []
    for k in sorted(env):
        v = env[k]
        if (k.startswith(DEEPSPEED_ENV_PREFIXES) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k)
                and not re.search(r'[\n\r"$`\\]', v)):
            lines.append(f"{k}={v}\n")
    return "".join(lines)


# ----------------------------------------------------------------------------- the allocation
@dataclass(frozen=True)
class SlurmJob:
    """What a launch needs to know about the allocation, read from the job's environment."""

    job_id: int
    hosts: tuple[str, ...]  # expanded SLURM_JOB_NODELIST, in node-id order
    node_id: int  # SLURM_NODEID of this process (0 in the batch shell)
    gpus_per_node: int
    master_addr: str
    master_port: int
    restart_count: int = 0
    cpus_per_node: int | None = None  # the smallest node's CPUs in the job; None: unknown

    @property
    def nnodes(self) -> int:
        return len(self.hosts)

    @property
    def world_size(self) -> int:
        return self.nnodes * self.gpus_per_node

    def host_of_rank(self, rank: int) -> str:
        """Node of a global rank when ranks follow node order (static rendezvous, srun block layout)."""
        return self.hosts[rank // self.gpus_per_node] if 0 <= rank < self.world_size else "?"


def _int(env: Mapping[str, str], key: str, default: int | None = None) -> int:
    v = env.get(key)
    if v is None or v == "":
        if default is None:
            raise SlurmEnvError(f"{key} is not set: run inside a Slurm allocation (sbatch/salloc)")
        return default
    try:
        return int(v)
    except ValueError:
        raise SlurmEnvError(f"{key}={v!r}: expected an integer") from None


def job_from_env(env: Mapping[str, str]) -> SlurmJob:
    """Read SLURM_JOB_ID, SLURM_JOB_NODELIST, SLURM_NNODES, SLURM_NODEID and the GPU count.

    MASTER_ADDR / MASTER_PORT already in the environment win (a user's choice), else the first host
    and ``master_port(job id)``.
    """
    job_id = _int(env, "SLURM_JOB_ID")
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise SlurmEnvError("SLURM_JOB_NODELIST is not set: run inside a Slurm allocation (sbatch/salloc)")
    hosts = tuple(hostnames(nodelist))
    nnodes = _int(env, "SLURM_NNODES", len(hosts))
    if nnodes != len(hosts):
        raise SlurmEnvError(f"SLURM_NNODES={nnodes} but SLURM_JOB_NODELIST={nodelist!r} names {len(hosts)} hosts")
    node_id = _int(env, "SLURM_NODEID", 0)
    if not 0 <= node_id < nnodes:
        raise SlurmEnvError(f"SLURM_NODEID={node_id} is outside 0..{nnodes - 1}")
    return SlurmJob(
        job_id=job_id,
        hosts=hosts,
        node_id=node_id,
        gpus_per_node=gpus_per_node(env),
        master_addr=env.get("MASTER_ADDR") or hosts[0],
        master_port=_int(env, "MASTER_PORT", master_port(job_id, _int(env, "SLURM_RESTART_COUNT", 0))),
        restart_count=_int(env, "SLURM_RESTART_COUNT", 0),
        cpus_per_node=cpus_per_node(env),
    )


def choose_launcher(env: Mapping[str, str]) -> str:
    """STACKLLAMA_LAUNCHER if set (torchrun | srun | deepspeed), else torchrun (one task per node)."""
    name = env.get("STACKLLAMA_LAUNCHER", "").strip() or "torchrun"
    if name not in LAUNCHERS:
        raise SlurmEnvError(f"STACKLLAMA_LAUNCHER={name!r}: expected one of {', '.join(LAUNCHERS)}")
    return name


def rank_env_from_slurm(env: Mapping[str, str]) -> dict[str, str]:
    """srun-direct (one task per rank): SLURM_PROCID/NTASKS/LOCALID -> RANK/WORLD_SIZE/LOCAL_RANK.

    Variables a launcher already set (torchrun, deepspeed) are kept; MASTER_* from the job.
    """
    out: dict[str, str] = {}
    pairs = (
        ("RANK", "SLURM_PROCID"),
        ("WORLD_SIZE", "SLURM_NTASKS"),
        ("LOCAL_RANK", "SLURM_LOCALID"),
        ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"),
    )
    for ours, theirs in pairs:
        if ours not in env and env.get(theirs, "").isdigit():
            out[ours] = env[theirs]
    if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
        job = job_from_env(env)
        out.setdefault("MASTER_ADDR", env.get("MASTER_ADDR", job.master_addr))
        out.setdefault("MASTER_PORT", env.get("MASTER_PORT", str(job.master_port)))
    return out


# ----------------------------------------------------------------------------- command lines
def torchrun_cmd(job: SlurmJob, entry: Sequence[str], shutdown_timeout_s: int = 1800) -> list[str]:
    """One torchrun per node; static rendezvous so global ranks follow node order (rank 0 on host 0).

    ``--shutdown-timeout``: after a SIGTERM torchrun passes it to its workers and SIGKILLs them this
    many seconds later (its default, 30 s, is shorter than a 7B PPO step plus a checkpoint)."""
    return [
        "torchrun",
        f"--nnodes={job.nnodes}",
        f"--nproc-per-node={job.gpus_per_node}",
        f"--node-rank={job.node_id}",
        f"--master-addr={job.master_addr}",
        f"--master-port={job.master_port}",
        "--max-restarts=0",
        f"--shutdown-timeout={shutdown_timeout_s}",
        "--no-python",
        *entry,
    ]


def deepspeed_cmd(job: SlurmJob, hostfile: str, entry: Sequence[str], no_ssh: bool) -> list[str]:
    """``deepspeed --hostfile``: over ssh/pdsh from one node, or ``--no_ssh --node_rank K`` per node."""
    cmd = ["deepspeed", f"--hostfile={hostfile}", f"--master_addr={job.master_addr}",
           f"--master_port={job.master_port}"]
    if no_ssh:
        cmd += ["--no_ssh", f"--node_rank={job.node_id}"]
    # The entry is a shell script that takes no --local_rank (LOCAL_RANK is in the environment).
    return [*cmd, "--no_python", "--no_local_rank", *entry]


def srun_cmd(job: SlurmJob, launcher: str, entry: Sequence[str], extra: Sequence[str] = ()) -> list[str]:
    """The one job step: a task per node (torchrun, deepspeed --no_ssh) or a task per rank (srun).

    Without ``--cpus-per-task`` a task counts as one CPU, and sites with task affinity bind it to that
    one: torchrun and all its ranks on one core. So each task asks for its share of the node's CPUs
    (all of them for a task per node), and ``--cpu-bind=none`` leaves the ranks unpinned.
    """
    per_node = job.gpus_per_node if launcher == "srun" else 1
    cpus = []
    if job.cpus_per_node and job.cpus_per_node >= per_node:
        cpus.append(f"--cpus-per-task={job.cpus_per_node // per_node}")
    return [
        "srun",
        "--kill-on-bad-exit=1",  # a rank or node that dies ends the step everywhere, at once
        "--wait=60",  # ... and so does a task that exits while its peers hang
        f"--nodes={job.nnodes}",
        f"--ntasks={job.nnodes * per_node}",
        f"--ntasks-per-node={per_node}",
        "--distribution=block",  # ranks 0..k-1 on the first node (host_of_rank relies on it)
        *cpus,
        "--cpu-bind=none",
        *extra,
        *entry,
    ]


# ----------------------------------------------------------------------------- the outcome
@dataclass(frozen=True)
class Outcome:
    code: int  # 0 done, 75 requeue me, else failure (1 when no better code is known)
    message: str


def resolve_outcome(
    statuses: Mapping[int, tuple[int, str]], world_size: int, step_rc: int, host_of_rank=None
) -> Outcome:
    """Combine the per-rank status files with the srun step's exit code.

    ``statuses`` maps rank -> (the stage's exit code, host) as written by each rank. The ranks are
    the authority: launchers rewrite a worker's exit 75 (torchrun reports any non-zero worker as a
    generic failure, and a launcher that gets SIGTERM exits non-zero even when its workers
    checkpointed), so 75 survives only through these files. All ranks 0 -> 0; all 0 or 75 with at
    least one 75 -> 75; a rank that failed or never reported -> failure, naming rank and host.
    """
    where = host_of_rank or (lambda r: "?")
    failed = sorted((r, c, h) for r, (c, h) in statuses.items() if c not in (0, EXIT_RESUME))
    missing = [r for r in range(world_size) if r not in statuses]
    parts = []
    if missing:  # listed first: a killed rank or lost node is the usual root cause of peers' errors
        shown = ", ".join(f"rank {r} on {where(r)}" for r in missing[:8])
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        parts.append(f"no exit status from {shown}{more} (killed, or its node died)")
    if failed:
        r, c, h = failed[0]
        more = f" (+{len(failed) - 1} more failed)" if len(failed) > 1 else ""
        parts.append(f"rank {r} on {h} exited with code {c}{more}")
    if parts:
        if failed and 0 < failed[0][1] < 256:
            code = failed[0][1]
        else:
            code = step_rc if step_rc not in (0, EXIT_RESUME) and 0 < step_rc < 256 else 1
        return Outcome(code, "; ".join(parts) + f"; step exit {step_rc}")
    codes = {c for c, _ in statuses.values()}
    if codes == {0}:
        return Outcome(0, f"all {world_size} ranks finished")
    return Outcome(EXIT_RESUME, f"all {world_size} ranks stopped after a checkpoint: requeue to resume")
