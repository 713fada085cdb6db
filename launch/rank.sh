#!/bin/bash
# One rank under srun-direct launch (a Slurm task per rank, no torchrun):
#   srun --ntasks-per-node=8 launch/rank.sh sft CONFIG [--set a.b=v ...]
# Maps Slurm's task variables to torch.distributed's, then runs the stage on this rank
# (python -m stackllama_ds.launcher.multinode rank -> stackllama_ds.cli <stage>).
set -euo pipefail
export RANK=${RANK:-${SLURM_PROCID:?not in an srun task}}
export WORLD_SIZE=${WORLD_SIZE:-${SLURM_NTASKS:?not in an srun task}}
export LOCAL_RANK=${LOCAL_RANK:-${SLURM_LOCALID:-0}}
export LOCAL_WORLD_SIZE=${LOCAL_WORLD_SIZE:-${SLURM_NTASKS_PER_NODE:-1}}
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
export MASTER_PORT=${MASTER_PORT:-$((20000 + (SLURM_JOB_ID + 997 * ${SLURM_RESTART_COUNT:-0}) % 12000))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# A USR1 (stop warning) that comes before Python installs its handler is dropped, not fatal.
trap '' USR1
exec "${PYTHON:-python}" -m stackllama_ds.launcher.multinode rank "$@"
