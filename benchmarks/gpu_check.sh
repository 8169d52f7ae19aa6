#!/usr/bin/env bash
# The whole GPU measurement of issue 7 in one bounded run, from the repo root:
#
#   bash benchmarks/gpu_check.sh [throughput|profile|variants|fused]
#
# The `profile` plan (about 4 minutes) traces the ResNet-50 and ResNet-18 steps and
# tries XLA flags. The `variants` plan is issue 11's A/B sweep: the default step, torch.compile
# and each implementation switch of models.ResNet (index max pool, space-to-depth stem,
# 4-channel input, 1x1 convolutions as dots) and XLA's conv fusion, one process each,
# then the per-shape BN statistics (XLA, two-stage, Pallas) and a profile with bytes and
# GB/s per fusion and the step's HLO; most important first. The `fused` plan is issue
# 13's: the fused 1x1 convolution per shape and the step with bottleneck_impl=fused.
# The default, `throughput`, is what follows.
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
# XLA's caches travel between calls for the plans other than `throughput`: the
# per-fusion autotune results (always) and the compiled programs (when the packed file
# stays under 15 MiB) are packed into $OUT/xla_cache.tgz; copy it to the git-ignored
# gpu_cache/xla_cache.tgz and carry `gpu_cache` into the next call, which unpacks it and
# skips autotuning (and compiling) what it has seen.
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
# The throughput plan starts from empty caches, so its first compile is cold and the
# repeat shows a warm one; the other plans start from what the last call packed.
CACHE_ROOT=$(mktemp -d /tmp/resnet_jax_xla.XXXXXX)
CACHE=$CACHE_ROOT/compilation
AUTOTUNE=$CACHE_ROOT/autotune
CARRIED=${CACHE_IN:-gpu_cache/xla_cache.tgz}
if [[ $PLAN != throughput && -f $CARRIED ]]; then
  tar -xzf "$CARRIED" -C "$CACHE_ROOT" && echo "=== unpacked $CARRIED" | tee -a "$LOG"
fi
mkdir -p "$CACHE" "$AUTOTUNE"
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_per_fusion_autotune_cache_dir=$AUTOTUNE"
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
torchvision.__version__, torch.cuda.get_device_name(), \
'cudnn', torch.backends.cudnn.version())'; $PY -c 'from jax._src.lib import cuda_versions as v; \
print(\"jax cudnn\", v.cudnn_get_version(), \"cuda\", v.cuda_runtime_get_version())'" 2>&1 | tee -a "$LOG"
shopt -s nullglob
wheels=("$WHEELS_DIR"/*.whl)
if ((${#wheels[@]})); then
  part wheels 60 "$PY" -m pip install -q --no-deps --no-index "${wheels[@]}"
fi

# The A/B plans' sizes; REHEARSE=1 runs the same sequence at toy sizes (on the CPU,
# before a lease).
if [[ -n ${REHEARSE:-} ]]; then
  size=(--batch 4 --image_size 64)
  timing=(--steps 1 --windows 1 --warmup 0)
else
  size=(--batch 256)
  timing=(--windows 3)
fi
r50=(--model resnet50 "${size[@]}" --dtype bf16)
r18=(--model resnet18 "${size[@]}" --dtype bf16)

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
variants)
  # Issue 11: every variant against the default step on this card, one process each.
  jax_run r50_default 90 "${r50[@]}" "${timing[@]}"
  part torch_r50 150 "$PY" -m benchmarks.torch_memory --model resnet50 "${size[@]:0:2}" \
    --variants bf16_compiled
  jax_run r50_index_pool 60 "${r50[@]}" "${timing[@]}" --model_override max_pool_impl=index
  jax_run r50_s2d_stem 60 "${r50[@]}" "${timing[@]}" --model_override stem_impl=space_to_depth
  jax_run r50_stem_4ch 60 "${r50[@]}" "${timing[@]}" --model_override stem_input_channels=4
  jax_run r50_dot_1x1 60 "${r50[@]}" "${timing[@]}" --model_override conv1x1_impl=dot
  jax_run r50_conv_fusion 60 "${r50[@]}" "${timing[@]}" \
    --xla_flags=--xla_gpu_experimental_enable_conv_fusion=true
  part bn_stats_r50 90 "$PY" -m benchmarks.bn_stats "${r50[@]}" \
    --ways flax,two_stage,pallas --shape_ways xla,two_stage,pallas
  jax_run r18_default 60 "${r18[@]}" "${timing[@]}"
  part torch_r18 120 "$PY" -m benchmarks.torch_memory --model resnet18 "${size[@]:0:2}" \
    --variants bf16_compiled
  jax_run r18_index_pool 45 "${r18[@]}" "${timing[@]}" --model_override max_pool_impl=index
  jax_run r18_s2d_stem 45 "${r18[@]}" "${timing[@]}" --model_override stem_impl=space_to_depth
  part profile_r50 90 "$PY" -m benchmarks.step_profile "${r50[@]}" --steps 5 \
    --compilation_cache_dir "$CACHE" --top 30 --show_fusions 6 --dump_hlo "$OUT" \
    --xla_flags=--xla_gpu_enable_command_buffer=
  jax_run r50_default_again 45 "${r50[@]}" "${timing[@]}"
  ;;
fused)
  # Issue 13: the fused 1x1 convolution per ResNet-50 shape, then the whole step with
  # bottleneck_impl=fused, against the default and torch.compile on this card.
  jax_run r50_default 90 "${r50[@]}" "${timing[@]}"
  part torch_r50 150 "$PY" -m benchmarks.torch_memory --model resnet50 "${size[@]:0:2}" \
    --variants bf16_compiled
  part fused_conv_r50 150 "$PY" -m benchmarks.fused_conv "${size[@]}" --dtype bf16 \
    --ways xla,pallas,pallas_xla_wgrad --passes fwd,fwd_bwd
  jax_run r50_fused 90 "${r50[@]}" "${timing[@]}" --model_override bottleneck_impl=fused
  part profile_r50_fused 90 "$PY" -m benchmarks.step_profile "${r50[@]}" --steps 5 \
    --compilation_cache_dir "$CACHE" --top 30 --model_override bottleneck_impl=fused \
    --xla_flags=--xla_gpu_enable_command_buffer=
  jax_run r50_default_again 45 "${r50[@]}" "${timing[@]}"
  ;;
*)
  echo "error: unknown plan '$PLAN'; use throughput, profile, variants or fused" >&2
  exit 2
  ;;
esac

echo "=== comparison (${SECONDS}s in all; every row in $RESULTS)"
"$PY" -m benchmarks.compare "$RESULTS" | tee "$OUT/summary.txt"
if [[ $PLAN != throughput ]]; then
  grep -A60 'ms device time/step' "$LOG" >"$OUT/profile.txt"
  tar -czf "$OUT/xla_cache.tgz" -C "$CACHE_ROOT" autotune compilation
  if (($(stat -c %s "$OUT/xla_cache.tgz") > 15 * 2 ** 20)); then  # 16 MiB per file comes back
    tar -czf "$OUT/xla_cache.tgz" -C "$CACHE_ROOT" autotune  # too big to come back: autotune only
  fi
  ls -l "$OUT/xla_cache.tgz"
fi
