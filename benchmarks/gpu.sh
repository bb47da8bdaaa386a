#!/usr/bin/env bash
# Train-step throughput on one GPU: ResNet-50 at 224x224 (bf16 vs fp32, batch sizes,
# remat, XLA flags) and ResNet-20 on CIFAR (steps per dispatch). One JSON file per run in
# $OUT (default benchmarks/out), plus a summary table on stdout.
#
#   OUT=/some/dir bash benchmarks/gpu.sh [quick|targets|sweep|flags|big|all]
#
# Run `quick` first (under 5 minutes): ResNet-50 bf16 images/s and MFU, and ResNet-20 on
# CIFAR with 1 and 8 steps per dispatch. Every other stage fits one 10-minute device call,
# compiles included: each run has its own time limit and the stage's sum is under 570 s.
# The script checks its imports before any run and exits non-zero when any run failed.
# SMOKE=1 shrinks every run (32 px, batch 8, 2 steps) to check the script on a CPU.
#
# Needs jax with CUDA, flax, optax, numpy, absl-py, ml_collections and clu (clu.metrics
# needs no TensorFlow); no TensorFlow, tensorboard or tensorflow-datasets. Wheels found
# in .whl/ are installed first (into /tmp/site), for a machine that lacks some and has no
# registry. With the device tool, whose image lacks ml_collections and clu: here, once,
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl \
#       ml_collections==1.1.0 clu==0.0.12
# then a call per stage: run(command="OUT=$OUT bash benchmarks/gpu.sh targets",
# carry=[".whl"]), then sweep, then flags.
# Each run is its own process so XLA_FLAGS can differ; --compare runs are in-process.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out}
WHICH=${1:-targets}
case $WHICH in
  quick|targets|sweep|flags|big|all) ;;
  *) echo "unknown stage '$WHICH': quick, targets, sweep, flags, big or all" >&2; exit 2 ;;
esac
PYTHON=${PYTHON:-python3}
if compgen -G '.whl/*.whl' > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
mkdir -p "$OUT"
# What the benchmark needs, checked before anything is timed: a missing module fails
# every run the same way, so it is named once here instead.
if ! "$PYTHON" -c 'import jax, flax, optax, numpy, absl, ml_collections, clu.metrics
import jax_resnet.benchmark.synthetic' > "$OUT/imports.log" 2>&1; then
  echo "gpu.sh: the benchmark cannot be imported (see $OUT/imports.log):" >&2
  tail -n 3 "$OUT/imports.log" >&2
  exit 1
fi
STEPS=${STEPS:-30}
R50="--config=configs/resnet50_imagenet.py --steps=$STEPS --warmup=5"
R20="--config=configs/resnet20_cifar10.py --steps=$((STEPS * 8)) --warmup=16\
 --config.half_precision=true"
SMALL=()
if [[ ${SMOKE:-0} == 1 ]]; then  # the script's own check on a CPU: every run tiny
  R50="--config=configs/resnet50_imagenet.py --steps=2 --warmup=1"
  R20="--config=configs/resnet20_cifar10.py --steps=2 --warmup=1 --config.half_precision=true"
  SMALL=(--config.image_size=32 --config.batch_size=8 --compare.image_size=32
         --compare.batch_size=8)
fi
FAILED=0

bench() {  # seconds, name, extra args...
  local seconds=$1 name=$2; shift 2
  local args=("$@")
  if [[ ${#SMALL[@]} -gt 0 ]]; then  # --compare.* only where there is a --compare
    args+=("${SMALL[@]:0:2}")
    [[ " $* " == *" --compare="* ]] && args+=("${SMALL[@]:2:2}")
  fi
  echo "== $name (at most $seconds s): ${args[*]}" >&2
  if ! timeout "$seconds" "$PYTHON" -m jax_resnet.benchmark "${args[@]}" \
      --json_out="$OUT/$name.json" > "$OUT/$name.stdout" 2> "$OUT/$name.log"; then
    echo "   FAILED (see $OUT/$name.log)" >&2
    FAILED=$((FAILED + 1))
  fi
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv \
    > "$OUT/nvidia-smi.csv" 2>&1 || true
"$PYTHON" -c 'import jax; print(jax.__version__, jax.devices())' > "$OUT/jax.txt" 2>&1

# Stages, each sized for one 10-minute device call (a ResNet-50 process takes a minute
# or two, mostly compiling): the time limits of a stage's runs add up to under 570 s.
case $WHICH in
  quick|all)
    # The headline figures, in under 5 minutes: ResNet-50 bf16 images/s and MFU (the
    # target: >= 3000 img/s on one H100), ResNet-20 on CIFAR at 1 and 8 steps a dispatch.
    bench 150 r50_bf16_b256 $R50 --config.batch_size=256
    bench 120 r20_dispatch1_vs_8 $R20 --config.data_on_device=true \
        --compare=configs/resnet20_cifar10.py --compare.data_on_device=true \
        --compare.half_precision=true --compare.steps_per_dispatch=8
    ;;&
  targets|all)
    bench 180 r18cifar_bf16_b512 --config=configs/resnet18_cutout_cifar10.py --steps=$STEPS \
        --warmup=5 --config.batch_size=512 --config.half_precision=true \
        --config.data_on_device=true
    bench 180 r50_bf16_b512 $R50 --config.batch_size=512
    bench 180 r20_dispatch1_vs_32 $R20 --config.data_on_device=true \
        --compare=configs/resnet20_cifar10.py --compare.data_on_device=true \
        --compare.half_precision=true --compare.steps_per_dispatch=32
    ;;&
  sweep|all)
    # Batch per device and bf16 against fp32 (each a compare: two compiles).
    bench 190 r50_bf16_b128_vs_b512 $R50 --config.batch_size=128 \
        --compare=configs/resnet50_imagenet.py --compare.batch_size=512
    bench 190 r50_bf16_vs_fp32_b256 $R50 --config.batch_size=256 \
        --compare=configs/resnet50_imagenet.py --compare.batch_size=256 \
        --compare.half_precision=false
    ;;&
  flags|all)
    # XLA flags: one process each (XLA_FLAGS is read at backend start).
    XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true" \
        bench 180 r50_bf16_b256_lhs $R50 --config.batch_size=256
    XLA_FLAGS="--xla_gpu_enable_triton_gemm=false" \
        bench 180 r50_bf16_b256_notriton $R50 --config.batch_size=256
    XLA_FLAGS="--xla_gpu_autotune_level=0" \
        bench 180 r50_bf16_b256_noautotune $R50 --config.batch_size=256
    ;;&
  big|all)
    # Remat: the same batch with and without (three compiles: remat's FLOPs come from the
    # step without it), and a batch that needs it.
    bench 280 r50_bf16_b256_vs_remat $R50 --config.batch_size=256 \
        --compare=configs/resnet50_imagenet.py --compare.batch_size=256 --compare.remat=true
    bench 280 r50_bf16_b1024_remat $R50 --config.batch_size=1024 --config.remat=true
    ;;
esac

"$PYTHON" - "$OUT" <<'EOF'
import glob, json, os, sys
def row(name, r):
  fmt = lambda v, f, unit='': 'n/a' if v is None else format(v, f) + unit
  print(f"{name:34s} {r['model']:9s} {r['image_size']:4d} {r['global_batch']:5d} "
        f"{r['dtype']:9s} {'remat' if r['remat'] else '':5s} k={r['steps_per_dispatch']:<3d} "
        f"{r['images_per_s']:9.0f} img/s "
        f"step {r['step_s_median'] * 1e3:7.2f} ms (p90 {r['step_s_p90'] * 1e3:7.2f}) "
        f"epoch {fmt(r['epoch_s'], '.1f', ' s')}  compile {r['compile_s']:5.1f} s  {fmt(r['flops_per_image'] and r['flops_per_image'] / 1e9, '.2f')} "
        f"GFLOP/img  MFU {fmt(r['mfu'] and 100 * r['mfu'], '.1f', '%')}  "
        f"peak mem {fmt(r['peak_memory_bytes'] and r['peak_memory_bytes'] / 2**30, '.1f', ' GiB')} "
        f"(XLA temp {fmt(r['temp_memory_bytes'] and r['temp_memory_bytes'] / 2**30, '.2f', ' GiB')}) "
        f"{r['xla_flags']}")
for path in sorted(glob.glob(os.path.join(sys.argv[1], '*.json'))):
  name = os.path.basename(path)[:-5]
  r = json.load(open(path))
  if 'ratio' in r:
    row(name + ' [config]', r['config'])
    row(name + ' [compare]', r['compare'])
    print(f"{name:34s} ratio compare/config: {r['ratio']:.3f}")
  else:
    row(name, r)
EOF
if [[ $FAILED -gt 0 ]]; then
  echo "gpu.sh: $FAILED run(s) failed; see the .log files in $OUT" >&2
  exit 1
fi
