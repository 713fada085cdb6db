#!/bin/bash
# For clusters where the batch node can ssh to the others (pdsh or ssh): one deepspeed launcher
# that starts every node's ranks itself, from a hostfile written from the allocation.
#   salloc -N3 --gres=gpu:8 launch/deepspeed_ssh.sh sft CONFIG [--set a.b=v ...]
# Without ssh use the sbatch scripts with STACKLLAMA_LAUNCHER=deepspeed (one `deepspeed --no_ssh
# --node_rank K` per node, started by srun). Exit 75 does not survive this path's launcher
# (see docs/cluster.md): a stop for resume reads as a failure; rerun the same command to resume.
set -euo pipefail
STAGE=${1:?usage: launch/deepspeed_ssh.sh STAGE CONFIG [--set a.b=v ...]}
CONFIG=${2:?usage: launch/deepspeed_ssh.sh STAGE CONFIG [--set a.b=v ...]}
shift 2
PY=${PYTHON:-python}
eval "$("$PY" -m stackllama_ds.launcher.multinode env)"
HOSTFILE=${STACKLLAMA_HOSTFILE:-${TMPDIR:-/tmp}/stackllama-hostfile-${SLURM_JOB_ID}}
"$PY" -m stackllama_ds.launcher.multinode hostfile "$HOSTFILE" >/dev/null
"$PY" -m stackllama_ds.cli validate "$CONFIG" --world-size "$WORLD" "$@"
exec deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    --no_local_rank --module stackllama_ds.cli "$STAGE" "$CONFIG" "$@"
