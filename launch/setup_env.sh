#!/usr/bin/env bash
# Create or reuse .venv and install stackllama-ds into it, torch first.
#   bash launch/setup_env.sh                                # build: cu126 where nvidia-smi lists GPUs, else cpu
#   STACKLLAMA_TORCH_CUDA=cu124 bash launch/setup_env.sh    # the torch build your GPU driver supports
#   bash launch/setup_env.sh --check                        # reuse .venv? exit 0 yes, 1 it would install
# torch is pinned to launch/constraints.txt's version (2.13.0). STACKLLAMA_TORCH_CUDA=cuXYZ (or cpu)
# installs torch==2.13.0+cuXYZ from https://download.pytorch.org/whl/cuXYZ; on a GPU host it defaults
# to cu126 (CUDA 12.6: driver >= 525). Unset on a host without GPUs, it installs torch==2.13.0 from
# the default index (the CPU wheel on this project's machines). The marker
# .venv/.stackllama-ds-installed records the hash of pyproject.toml + constraints.txt and the torch
# installed ("<hash> torch=2.13.0+cpu build=cpu"): a venv holding another build than the one asked
# (unset: a CPU build on a GPU host) gets torch reinstalled, never silently reused. Unset on a host
# without GPUs, any recorded build is kept: a login node does not turn a GPU venv into a CPU one.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.stackllama-ds-installed
TORCH=$(sed -n 's/^torch==\([0-9.]*\).*/\1/p' launch/constraints.txt)
hash=$(cat pyproject.toml launch/constraints.txt | sha256sum | cut -c1-16)

gpu_host=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then gpu_host=1; fi
build=${STACKLLAMA_TORCH_CUDA:-}
if [ -n "$build" ] && ! [[ $build =~ ^(cpu|cu[0-9]+)$ ]]; then
  echo "setup_env: STACKLLAMA_TORCH_CUDA=$build: expected cpu or cuXYZ, a build at download.pytorch.org/whl (e.g. cu126)" >&2
  exit 2
fi

# accepts BUILD: whether a venv holding torch build BUILD serves what is asked.
accepts() {
  if [ -n "$build" ]; then [ "$1" = "$build" ]
  elif [ "$gpu_host" = 1 ]; then [[ $1 == cu* ]]
  else [ -n "$1" ]; fi
}

# "<version> <build>" of the torch in .venv: "2.13.0+cu126 cu126", "2.13.0+cpu cpu"
probe() { .venv/bin/python -c 'import torch; c = torch.version.cuda; print(torch.__version__, "cpu" if c is None else "cu" + c.replace(".", ""))'; }

have_hash="" have_torch="" have_build=""
if [ -f "$stamp" ]; then read -r have_hash have_torch have_build <"$stamp" || true; fi
have_torch=${have_torch#torch=} have_build=${have_build#build=}
if [ -f "$stamp" ] && [ -z "$have_build" ] && [ -x .venv/bin/python ]; then
  # A marker from before builds were recorded: ask the venv's torch.
  got=$(probe 2>/dev/null) || got=""
  have_torch=${got% *} have_build=${got#* }
fi
reason=""
if [ ! -x .venv/bin/python ] || [ ! -f "$stamp" ]; then reason="no installed .venv"
elif [ -z "$have_build" ]; then reason="no torch in .venv"
elif ! accepts "$have_build"; then
  reason=".venv holds torch $have_torch, not the build asked (STACKLLAMA_TORCH_CUDA=${build:-unset}"
  if [ "$gpu_host" = 1 ]; then reason+=", GPUs seen)"; else reason+=")"; fi
elif [ "$have_hash" != "$hash" ]; then reason="pyproject.toml or launch/constraints.txt changed"
fi
if [ -n "$build" ]; then want=$build
elif [[ $have_build == cu* ]] && accepts "$have_build"; then want=$have_build  # a cu124 venv stays cu124
elif [ "$gpu_host" = 1 ]; then want=cu126
else want=""; fi  # torch==$TORCH from the default index

if [ "${1:-}" = --check ]; then
  if [ -z "$reason" ]; then echo "reuse .venv: torch $have_torch"; exit 0; fi
  echo "install torch ${TORCH}${want:++$want}: $reason"
  exit 1
fi
if [ -z "$reason" ]; then
  line="$hash torch=$have_torch build=$have_build"
  [ "$(cat "$stamp")" = "$line" ] || echo "$line" >"$stamp"
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
[ -f "$stamp" ] && echo "setup_env: installing torch ${TORCH}${want:++$want} into .venv: $reason" >&2
if [ -n "$want" ]; then
  .venv/bin/pip install -q --index-url "https://download.pytorch.org/whl/$want" "torch==$TORCH+$want"
else
  .venv/bin/pip install -q "torch==$TORCH"
fi
.venv/bin/pip install -q -c launch/constraints.txt -e '.[dev]'
got=$(probe)
got_build=${got#* }
if [ -n "$want" ] && [ "$got_build" != "$want" ]; then
  echo "setup_env: asked for torch build $want, .venv has torch ${got% *} (build $got_build)" >&2
  exit 1
fi
echo "$hash torch=${got% *} build=$got_build" >"$stamp"
