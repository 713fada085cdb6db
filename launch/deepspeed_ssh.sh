#!/bin/bash
# For clusters where the batch node can ssh to the others: one deepspeed launcher that starts every
# node's ranks itself through pdsh, from a hostfile written from the allocation.
#   salloc -N3 --gres=gpu:8 launch/deepspeed_ssh.sh sft CONFIG [--set a.b=v ...]
# Needs pdsh on this node and passwordless ssh to the others. pdsh carries only a few variable
# prefixes (NCCL_, PYTHON*, UCX_, ...): the ranks' own (MALLOC_*, OMP_NUM_THREADS, HF_*, STACKLLAMA_*,
# PATH, ...) go in a .deepspeed_env file written here and named by DS_ENV_FILE.
# Without ssh use the sbatch scripts with STACKLLAMA_LAUNCHER=deepspeed (one `deepspeed --no_ssh
# --node_rank K` per node, started by srun). Exit 75 does not survive this path's launcher
# (see docs/cluster.md): a stop for resume reads as a failure; rerun the same command to resume.
set -euo pipefail
STAGE=${1:?usage: launch/deepspeed_ssh.sh STAGE CONFIG [--set a.b=v ...]}
CONFIG=${2:?usage: launch/deepspeed_ssh.sh STAGE CONFIG [--set a.b=v ...]}
shift 2
PY=${PYTHON:-python}
eval "$("$PY" -m stackllama_ds.launcher.multinode env)"
if [ "$NNODES" -gt 1 ] && ! command -v pdsh >/dev/null 2>&1; then
    echo "launch/deepspeed_ssh.sh: deepspeed --hostfile reaches the other nodes through pdsh," \
         "which is not installed here; install it, or use the sbatch scripts with" \
         "STACKLLAMA_LAUNCHER=deepspeed (no ssh)" >&2
    exit 2
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # as every other launch path sets for the ranks
HOSTFILE=${STACKLLAMA_HOSTFILE:-${TMPDIR:-/tmp}/stackllama-hostfile-${SLURM_JOB_ID}}
"$PY" -m stackllama_ds.launcher.multinode hostfile "$HOSTFILE" >/dev/null
"$PY" -m stackllama_ds.launcher.multinode deepspeed-env "$HOSTFILE.deepspeed_env" >/dev/null
"$PY" -m stackllama_ds.cli validate "$CONFIG" --world-size "$WORLD" "$@"
DS_ENV_FILE="$HOSTFILE.deepspeed_env" exec deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" \
    --master_port "$MASTER_PORT" --no_local_rank --module stackllama_ds.cli "$STAGE" "$CONFIG" "$@"
