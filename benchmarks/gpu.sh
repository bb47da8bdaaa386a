#!/usr/bin/env bash
# Train-step throughput on one GPU: ResNet-50 at 224x224 (bf16 vs fp32, batch sizes,
# remat, XLA flags) and ResNet-20 on CIFAR (steps per dispatch). One JSON file per run in
# $OUT (default benchmarks/out), plus a summary table on stdout.
#
#   OUT=/some/dir bash benchmarks/gpu.sh [quick|full]
#
# Needs jax with CUDA, flax, optax, numpy, absl-py, ml_collections and clu (clu.metrics
# needs no TensorFlow; `pip install --no-deps clu` beside flax is enough); no TensorFlow,
# tensorboard or tensorflow-datasets. With the device tool, one call:
#   run(command="OUT=$OUT bash benchmarks/gpu.sh", timeout_s=600)
# Each run is its own process so XLA_FLAGS can differ; --compare runs are in-process.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
WHICH=${1:-quick}
STEPS=${STEPS:-30}
R50="--config=configs/resnet50_imagenet.py --steps=$STEPS --warmup=5"
R20="--config=configs/resnet20_cifar10.py --steps=$((STEPS * 8)) --warmup=16"

bench() {  # name, extra args...
  local name=$1; shift
  echo "== $name: $*" >&2
  timeout 300 python -m jax_resnet.benchmark "$@" --json_out="$OUT/$name.json" \
      > "$OUT/$name.stdout" 2> "$OUT/$name.log" || echo "   FAILED (see $OUT/$name.log)" >&2
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv \
    > "$OUT/nvidia-smi.csv" 2>&1 || true
python -c 'import jax; print(jax.__version__, jax.devices())' > "$OUT/jax.txt" 2>&1

# ResNet-50: the target (>= 3000 img/s bf16 on one H100) and batch per device.
bench r50_bf16_b256 $R50 --config.batch_size=256
bench r50_bf16_b128_vs_b512 $R50 --config.batch_size=128 \
    --compare=configs/resnet50_imagenet.py --compare.batch_size=512
bench r50_bf16_vs_fp32_b256 $R50 --config.batch_size=256 \
    --compare=configs/resnet50_imagenet.py --compare.batch_size=256 \
    --compare.half_precision=false
# Remat: the cost in speed at the same batch, and whether a batch that needs it pays.
bench r50_bf16_b256_vs_remat $R50 --config.batch_size=256 \
    --compare=configs/resnet50_imagenet.py --compare.batch_size=256 --compare.remat=true
# ResNet-20 on CIFAR: launch overhead, several steps per dispatch, data on the device.
bench r20_dispatch1_vs_8 $R20 --config.data_on_device=true \
    --compare=configs/resnet20_cifar10.py --compare.data_on_device=true \
    --compare.steps_per_dispatch=8

if [ "$WHICH" = full ]; then
  bench r50_bf16_b1024 $R50 --config.batch_size=1024
  bench r50_bf16_b1024_remat $R50 --config.batch_size=1024 --config.remat=true
  # XLA flags: one process each (XLA_FLAGS is read at backend start).
  XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true" \
      bench r50_bf16_b256_lhs $R50 --config.batch_size=256
  XLA_FLAGS="--xla_gpu_enable_triton_gemm=false" \
      bench r50_bf16_b256_notriton $R50 --config.batch_size=256
  XLA_FLAGS="--xla_gpu_autotune_level=0" \
      bench r50_bf16_b256_noautotune $R50 --config.batch_size=256
  bench r20_dispatch1_vs_32 $R20 --config.data_on_device=true \
      --compare=configs/resnet20_cifar10.py --compare.data_on_device=true \
      --compare.steps_per_dispatch=32
  bench r50_cifar_b512 --config=configs/resnet50_cifar10.py --steps=$STEPS --warmup=5 \
      --config.batch_size=512 --config.half_precision=true
fi

python - "$OUT" <<'EOF'
import glob, json, os, sys
def row(name, r):
  fmt = lambda v, f: 'n/a' if v is None else format(v, f)
  print(f"{name:34s} {r['model']:9s} {r['image_size']:4d} {r['global_batch']:5d} "
        f"{r['dtype']:9s} {'remat ' if r['remat'] else ''}k={r['steps_per_dispatch']:<3d} "
        f"{r['images_per_s']:9.0f} img/s "
        f"step {r['step_s_median'] * 1e3:7.2f} ms (p90 {r['step_s_p90'] * 1e3:7.2f}) "
        f"compile {r['compile_s']:5.1f} s  {fmt(r['flops_per_image'] and r['flops_per_image'] / 1e9, '.2f')} "
        f"GFLOP/img  MFU {fmt(r['mfu'] and 100 * r['mfu'], '.1f')}%  "
        f"peak mem {fmt(r['peak_memory_bytes'] and r['peak_memory_bytes'] / 2**30, '.1f')} GiB "
        f"(XLA temp {fmt(r['temp_memory_bytes'] and r['temp_memory_bytes'] / 2**30, '.1f')} GiB) "
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
