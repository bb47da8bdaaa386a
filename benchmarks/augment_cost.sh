#!/usr/bin/env bash
# The step-time cost of each on-device augmentation (and of them all), as images/s over
# the plain step's: ResNet-20, batch 128, 32x32, fp32, --compare in one process each.
# The first row compares the plain step with itself: the run-to-run noise of a ratio.
#
#   bash benchmarks/augment_cost.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/augment_cost}
mkdir -p "$out"
declare -A settings=(
  [none]=""
  [mixup_cutmix]="--compare.mixup_alpha=0.2 --compare.cutmix_alpha=1.0"
  [randaugment]="--compare.randaugment_layers=2 --compare.randaugment_magnitude=9"
  [trivialaugment]="--compare.trivial_augment=true"
  [random_erasing]="--compare.random_erasing_prob=0.25"
  [all]="--compare.mixup_alpha=0.2 --compare.cutmix_alpha=1.0 --compare.randaugment_layers=2 --compare.random_erasing_prob=0.25"
)
order=(none mixup_cutmix randaugment trivialaugment random_erasing all)
for name in "${order[@]}"; do
  # shellcheck disable=SC2086
  python -m jax_resnet.benchmark --config=configs/resnet20_cifar10.py \
    --compare=configs/resnet20_cifar10.py --steps=30 --warmup=3 ${settings[$name]} \
    --json_out="$out/$name.json" > /dev/null 2>"$out/$name.log"
done
python - "$out" "${order[@]}" <<'PY'
import json, os, sys
out, names = sys.argv[1], sys.argv[2:]
print('| augmentation | plain images/s | with it | ratio |')
print('|---|---:|---:|---:|')
for name in names:
  with open(os.path.join(out, f'{name}.json')) as f:
    r = json.load(f)
  print(f"| {name} | {r['config']['images_per_s']:.1f} | {r['compare']['images_per_s']:.1f} "
        f"| {r['ratio']:.3f} |")
PY
