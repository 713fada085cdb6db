#!/bin/bash
# Fail fast where this node's GPUs are visible but the installed torch cannot use them:
#   launch/gpu_torch_check.sh      (launch/slurm_stage.sh runs it before any rank starts)
# Exit 0 when nvidia-smi is absent or lists no GPU, or when torch.cuda.is_available(); else one line
# naming the installed torch and what to set, exit 2. Without it the ranks find no CUDA, fall back
# to CPU settings and NCCL fails much later with an obscure error.
set -uo pipefail
PY=${PYTHON:-python}
command -v nvidia-smi >/dev/null 2>&1 || exit 0
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ')
[ "${gpus:-0}" -gt 0 ] || exit 0
info=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()), torch.__version__, torch.version.cuda or "none")' 2>/dev/null)
read -r ok version cuda <<<"$info"
[ "$ok" = 1 ] && exit 0
if [ "$ok" = 0 ]; then
    if [ "$cuda" = none ]; then why="a CPU-only build"; else why="built for CUDA ${cuda}, which this node's driver does not run"; fi
    echo "[launch] nvidia-smi lists ${gpus} GPU(s) but torch.cuda.is_available() is False: torch ${version} is ${why};" \
         "reinstall it with STACKLLAMA_TORCH_CUDA=cuXYZ bash launch/setup_env.sh (a CUDA version the driver" \
         "supports, nvidia-smi shows it; default cu126) and resubmit" >&2
else
    echo "[launch] nvidia-smi lists ${gpus} GPU(s) but ${PY} cannot import torch: run bash launch/setup_env.sh" >&2
fi
exit 2
