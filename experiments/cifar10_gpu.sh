#!/usr/bin/env bash
# The paper's CIFAR-10 study (Fig. 6, Table 6) on a lent GPU, in one device call:
# run_suite.py --stack trains each depth's plain and residual nets, all seeds, as one
# program (resnet_jax.training.stack), from the JPEG CIFAR-10 archive, without tensorflow.
#
# 1. Here (needs ../shared beside the repository):
#      bash experiments/cifar10_gpu.sh prepare
#    fills the git-ignored gpu_carry/: cifar10_jpeg.npz (53 MiB, decoded there with
#    Pillow) and the pure-Python packages the GPU machines lack (ml_collections, yaml).
# 2. Rehearse here, a few steps of the very same command:
#      STEPS_SCALE=0.0001 DEPTHS=20 bash experiments/cifar10_gpu.sh run
# 3. On the GPU (the device tool), with a limit that leaves time to fetch $OUT:
#      run(command='bash experiments/cifar10_gpu.sh run', carry=['gpu_carry'], timeout_s=590)
#    Knobs (environment): DEPTHS (20,56), SEEDS (2), STEPS_SCALE (1.0 = the paper's 64k
#    steps; pick it from benchmarks/stack_throughput.py's ms/step so that the stacks fit
#    the call), SET (more FIELD=VALUE overrides).
# Writes $OUT/cifar10 (suite.json, each member's metrics.jsonl, logs, DONE with times; no
# checkpoints, to keep what comes back small), $OUT/report (curves, table, JSON) and
# $OUT/xla_cache (carry it into the next call to skip compiling).
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  prepare)
    mkdir -p gpu_carry/site
    cp ../shared/datasets/cifar10_jpeg.npz gpu_carry/
    site=$(python -c 'import ml_collections, os; print(os.path.dirname(os.path.dirname(ml_collections.__file__)))')
    rm -rf gpu_carry/site/ml_collections gpu_carry/site/yaml
    cp -r "$site/ml_collections" "$site/yaml" gpu_carry/site/
    du -sh gpu_carry
    ;;
  run)
    export PYTHONPATH="$PWD/gpu_carry/site${PYTHONPATH:+:$PYTHONPATH}"
    out=${OUT:-/tmp/cifar10_gpu}
    mkdir -p "$out"
    python - <<'PY' | tee "$out/versions.txt"
import jax, flax, optax
print('device', jax.devices()[0].device_kind, 'x', jax.device_count())
print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__)
PY
    # shellcheck disable=SC2086  # SET is a list of FIELD=VALUE words
    python experiments/run_suite.py --suite=cifar10_degradation --workdir="$out/cifar10" \
      --depths="${DEPTHS:-20,56}" --seeds="${SEEDS:-2}" --stack --steps_scale="${STEPS_SCALE:-1.0}" \
      --set data_dir="$PWD/gpu_carry" compilation_cache_dir="$out/xla_cache" \
      checkpoint_every_steps=0 ${SET:-} || status=$?
    python experiments/report.py --workdir="$out/cifar10" --out="$out/report" || true
    find "$out/cifar10" -type d -name checkpoints -prune -exec rm -rf {} +
    exit "${status:-0}"
    ;;
  *)
    echo "usage: bash experiments/cifar10_gpu.sh prepare|run (see the comments at its top)" >&2
    exit 2
    ;;
esac
