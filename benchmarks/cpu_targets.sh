#!/usr/bin/env bash
# The CPU throughput targets (fp32, the shapes of the PyTorch comparison in
# benchmarks/RESULTS.md): the project's benchmark on each, one process each, then a table.
#
#   bash benchmarks/cpu_targets.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/cpu_targets}
mkdir -p "$out"
bench() {
  local name=$1 config=$2
  shift 2
  python -m jax_resnet.benchmark "$config" --config.half_precision=false --steps=12 \
    --warmup=3 --json_out="$out/$name.json" "$@" > /dev/null 2>"$out/$name.log"
}
bench resnet20_b128_32 --config=configs/resnet20_cifar10.py
bench resnet50_b8_224 --config=configs/resnet50_imagenet.py --config.batch_size=8 \
  --config.image_size=224
bench resnet50_b16_128 --config=configs/resnet50_imagenet.py --config.batch_size=16 \
  --config.image_size=128
bench resnet50_b16_64 --config=configs/resnet50_imagenet.py --config.batch_size=16 \
  --config.image_size=64
bench resnet18_b16_64 --config=configs/resnet18_imagenet.py --config.batch_size=16 \
  --config.image_size=64
python - "$out" <<'PY'
import json, os, sys
out = sys.argv[1]
print('| model, batch, image | images/s | median step (s) | compile (s) |')
print('|---|---:|---:|---:|')
for name in ('resnet20_b128_32', 'resnet50_b8_224', 'resnet50_b16_128', 'resnet50_b16_64',
             'resnet18_b16_64'):
  with open(os.path.join(out, f'{name}.json')) as f:
    r = json.load(f)
  print(f"| {r['model']}, {r['global_batch']}, {r['image_size']}x{r['image_size']} | "
        f"{r['images_per_s']:.1f} | {r['step_s_median']:.3f} | {r['compile_s']:.1f} |")
PY
