#!/usr/bin/env bash
# The whole GPU measurement of issue 7 in one bounded run, from the repo root:
#
#   bash benchmarks/gpu_check.sh [throughput|profile]
#
# The `profile` plan (about 4 minutes) traces the ResNet-50 and ResNet-18 steps and
# tries XLA flags; the default, `throughput`, is what follows.
# Environment, the train step's correctness in bf16 (ResNet-50's loss on the fixed batch
# falls and stays finite over the ~100 timed steps; float32 vs bf16 logits), then
# benchmarks/train_throughput.py and torch_reference.py (through benchmarks/torch_memory.py,
# which adds peak memory) on the same GPU, most important first: ResNet-50 bf16 256 with a
# cold cache, torch.compile on it, ResNet-18 bf16 256 and torch on it, the full training
# loop (benchmarks/loop_throughput.py) on ResNet-50, ResNet-50 again with a warm cache,
# the precision check, then ResNet-50 at batch 512 and in float32. Every part runs under
# `timeout` and the whole under BUDGET_S, so a hang costs that part only. RESULT lines go
# to $OUT/results.jsonl, all output to $OUT/log.txt, and the comparison table is printed
# last (and saved as $OUT/summary.txt).
#
# Wheels in $WHEELS_DIR (default benchmarks/carry) are installed with --no-deps first:
# put ml_collections's there (absent on the GPU machines); the full-loop part needs it,
# the harness does without. $TORCH_REFERENCE overrides where
# torch_reference.py is looked for (see benchmarks/torch_memory.py).
set -uo pipefail
cd "$(dirname "$0")/.."
PLAN=${1:-throughput}

OUT=${OUT:-/tmp/gpu_check_out}
BUDGET_S=${BUDGET_S:-560}
PY=${PYTHON:-python3}
WHEELS_DIR=${WHEELS_DIR:-benchmarks/carry}
mkdir -p "$OUT"
LOG=$OUT/log.txt
RESULTS=$OUT/results.jsonl
: >"$LOG"
: >"$RESULTS"
# A fresh persistent cache, so the first compile is cold and the repeat shows a warm one.
CACHE=$(mktemp -d /tmp/resnet_jax_xla_cache.XXXXXX)
export PYTHONUNBUFFERED=1
START=$SECONDS

part() {  # NAME LIMIT_S COMMAND...: run one part, bounded by its limit and the budget left
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET_S - (SECONDS - START)))
  if ((left < 30)); then
    echo "=== $name: skipped, ${left}s of the ${BUDGET_S}s budget left" | tee -a "$LOG"
    return 0
  fi
  ((limit > left)) && limit=$left
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  local t0=$SECONDS tmp
  tmp=$(mktemp)
  timeout -k 15 "$limit" "$@" 2>&1 | tee -a "$LOG" >"$tmp"
  local rc=${PIPESTATUS[0]}
  grep '^RESULT ' "$tmp" | sed 's/^RESULT //' >>"$RESULTS"
  grep -E '^(RESULT|error|Traceback)' "$tmp" | cut -c1-400
  ((rc == 124 || rc == 137)) && echo "TIMEOUT after ${limit}s"
  echo "--- $name: exit $rc in $((SECONDS - t0))s (total $((SECONDS - START))s)" | tee -a "$LOG"
  rm -f "$tmp"
}

jax_run() {  # LABEL LIMIT_S ARGS...: one train_throughput measurement with the shared cache
  local label=$1 limit=$2
  shift 2
  part "$label" "$limit" "$PY" -m benchmarks.train_throughput --label "$label" \
    --compilation_cache_dir "$CACHE" "$@"
}

echo "=== environment" | tee -a "$LOG"
timeout -k 5 60 bash -c "nvidia-smi; nproc; grep -m1 'model name' /proc/cpuinfo; \
  $PY -c 'import jax, flax, optax; print(jax.__version__, flax.__version__, optax.__version__); \
print(jax.devices())'; $PY -c 'import torch, torchvision; print(torch.__version__, \
torchvision.__version__, torch.cuda.get_device_name())'" 2>&1 | tee -a "$LOG"
shopt -s nullglob
wheels=("$WHEELS_DIR"/*.whl)
if ((${#wheels[@]})); then
  part wheels 60 "$PY" -m pip install -q --no-deps --no-index "${wheels[@]}"
fi

case $PLAN in
throughput)
  jax_run r50_bf16_b256_cold 150 --model resnet50 --batch 256 --dtype bf16
  part torch_r50_b256 200 "$PY" -m benchmarks.torch_memory --model resnet50 --batch 256 \
    --variants bf16_compiled
  jax_run r18_bf16_b256_cold 100 --model resnet18 --batch 256 --dtype bf16
  part torch_r18_b256 150 "$PY" -m benchmarks.torch_memory --model resnet18 --batch 256 \
    --variants bf16_compiled
  part loop_r50_bf16_b256 150 "$PY" -m benchmarks.loop_throughput --model resnet50 --batch 256 \
    --dtype bf16 --steps 400 --compilation_cache_dir "$CACHE"
  jax_run r50_bf16_b256_warm 60 --model resnet50 --batch 256 --dtype bf16
  part precision_r50 60 "$PY" -m benchmarks.precision_check --model resnet50 --batch 16
  jax_run r50_bf16_b512_cold 120 --model resnet50 --batch 512 --dtype bf16
  jax_run r50_fp32_b256_cold 120 --model resnet50 --batch 256 --dtype fp32
  ;;
profile)
  # Where the device time goes (benchmarks/step_profile.py), then XLA flags, each against
  # the default step in the same run.
  part profile_r50 90 "$PY" -m benchmarks.step_profile --model resnet50 --batch 256 \
    --dtype bf16 --steps 5 --compilation_cache_dir "$CACHE"
  part profile_r18 60 "$PY" -m benchmarks.step_profile --model resnet18 --batch 256 \
    --dtype bf16 --steps 5 --compilation_cache_dir "$CACHE"
  # Without CUDA graphs the fusions show up one by one instead of as command buffers.
  part profile_r50_no_cuda_graphs 60 "$PY" -m benchmarks.step_profile --model resnet50 \
    --batch 256 --dtype bf16 --steps 5 --compilation_cache_dir "$CACHE" \
    --xla_flags=--xla_gpu_enable_command_buffer=
  jax_run r50_bf16_b256 60 --model resnet50 --batch 256 --dtype bf16
  jax_run r50_bf16_b256_no_cuda_graphs 60 --model resnet50 --batch 256 --dtype bf16 \
    --xla_flags=--xla_gpu_enable_command_buffer=
  jax_run r50_bf16_b256_lhs 60 --model resnet50 --batch 256 --dtype bf16 \
    --xla_flags=--xla_gpu_enable_latency_hiding_scheduler=true
  ;;
*)
  echo "error: unknown plan '$PLAN'; use throughput or profile" >&2
  exit 2
  ;;
esac

echo "=== comparison (${SECONDS}s in all; every row in $RESULTS)"
"$PY" -m benchmarks.compare "$RESULTS" | tee "$OUT/summary.txt"
if [[ $PLAN == profile ]]; then
  grep -A34 'ms device time/step' "$LOG" | tee "$OUT/profile.txt"
fi
