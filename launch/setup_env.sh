#!/usr/bin/env bash
# Create or reuse .venv and install stackllama-ds into it, torch first.
#   bash launch/setup_env.sh
# Without CUDA it pins torch==2.13.0 (the CPU wheel); otherwise pip would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.stackllama-ds-installed
want=$(cat pyproject.toml launch/constraints.txt | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
cons=$(mktemp)
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  grep -v '^torch==' launch/constraints.txt >"$cons"
  .venv/bin/pip install -q torch
else
  cp launch/constraints.txt "$cons"
  .venv/bin/pip install -q torch==2.13.0
fi
.venv/bin/pip install -q -c "$cons" -e '.[dev]'
rm -f "$cons"
echo "$want" >"$stamp"
