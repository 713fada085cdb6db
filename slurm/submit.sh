#!/bin/bash
# slurm/submit.sh [sbatch options ...] CONFIG
# Submit SFT, RM and PPO as three jobs chained with --dependency=afterok (each starts only when the
# previous one finished with exit 0; a requeued stage keeps its dependants waiting).
# The sbatch options apply to all three, e.g. for CPU-only nodes:
#   GPUS_PER_NODE=2 slurm/submit.sh --nodes=2 --gres=none configs/tiny.yaml
# Prints the three job ids, one per line.
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: slurm/submit.sh [sbatch options ...] CONFIG" >&2
    exit 2
fi
CONFIG=${!#}
OPTS=("${@:1:$#-1}")
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export STACKLLAMA_HOME=${STACKLLAMA_HOME:-$(dirname "$HERE")}
dep=()
for stage in sft rm ppo; do
    id=$(sbatch --parsable "${OPTS[@]}" "${dep[@]}" "$HERE/$stage.sbatch" "$CONFIG")
    id=${id%%;*}
    echo "$id"
    dep=(--dependency="afterok:$id" --kill-on-invalid-dep=yes)
done
