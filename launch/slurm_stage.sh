#!/bin/bash
# The body of slurm/{sft,rm,ppo,pipeline}.sbatch, run by the batch shell of an allocation:
#   launch/slurm_stage.sh sft|rm|ppo|eval|pipeline CONFIG [--set a.b=v ...]
# 1. read the allocation (nodes, GPUs per node, master address/port), 2. validate the config for
# that world size (a bad config fails the job here, before any rank starts), then check that torch
# can use the GPUs nvidia-smi lists (launch/gpu_torch_check.sh) and the memory plan, 3. exec the batch
# process, which runs one srun step per stage, forwards the USR1 warning to the ranks and requeues
# the job when they stopped after a checkpoint (exit 75). See docs/cluster.md.
set -euo pipefail
STAGE=${1:?usage: launch/slurm_stage.sh STAGE CONFIG [--set a.b=v ...]}
CONFIG=${2:?usage: launch/slurm_stage.sh STAGE CONFIG [--set a.b=v ...]}
shift 2
PY=${PYTHON:-python}
export PYTHONUNBUFFERED=1

eval "$("$PY" -m stackllama_ds.launcher.multinode env)"   # NNODES GPUS_PER_NODE WORLD MASTER_* ...
echo "[launch] job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0}: ${STAGE} ${CONFIG} on ${SLURM_JOB_NODELIST}" \
     "(${NNODES} nodes x ${GPUS_PER_NODE} ranks = ${WORLD}), batch shell on ${SLURMD_NODENAME:-$(hostname)}"

if ! "$PY" -m stackllama_ds.cli validate "$CONFIG" --world-size "$WORLD" "$@"; then
    echo "[launch] invalid config ${CONFIG} (errors above): job failed before any rank started" >&2
    exit 2
fi

# GPUs that torch cannot use (a CPU or too-new CUDA build) fail here in one line, not in NCCL later.
"$(dirname "$0")/gpu_torch_check.sh" || exit 2

# Memory plan before any rank starts: a GPU launch that cannot fit is refused (STACKLLAMA_FORCE=1 overrides).
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    GPU_MEM=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1 | awk '{printf "%.1f", $1/1024}')
    if ! "$PY" -m stackllama_ds.cli plan "$CONFIG" --gpus-per-node "$GPUS_PER_NODE" --gpu-mem "$GPU_MEM" "$@"; then
        if [ "${STACKLLAMA_FORCE:-0}" != 1 ]; then
            echo "[launch] the memory plan says this does not fit in ${GPU_MEM} GB per GPU; fix the config or set STACKLLAMA_FORCE=1" >&2
            exit 3
        fi
        echo "[launch] STACKLLAMA_FORCE=1: launching although the plan does not fit" >&2
    fi
fi

# A USR1 that arrives while Python starts is dropped, not fatal; the job process installs handlers.
trap '' USR1
exec "$PY" -m stackllama_ds.launcher.multinode job "$STAGE" "$CONFIG" "$@"
