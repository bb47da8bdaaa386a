#!/usr/bin/env bash
# Each modern-recipe technique alone, and all together, on the default digits job (same
# budget: the default config's 20 epochs), three seeds each; distillation from a ResNet-56
# teacher trained first by the same recipe. Prints the final eval top-1
# (and the EMA weights' where they are kept) as a markdown table.
#
#   bash benchmarks/ablation_digits.sh [RUNS_DIR [NAME ...]]   # NAMEs: only those rows
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-/tmp/ablation_digits}
shift $(($# > 0 ? 1 : 0))
mkdir -p "$runs"
declare -A settings=(
  [baseline]=""
  [ema]="--config.ema_decay=0.99"
  [ema_no_warmup]="--config.ema_decay=0.99 --config.ema_warmup=false"
  [mixup]="--config.mixup_alpha=0.2"
  [cutmix]="--config.cutmix_alpha=1.0"
  [randaugment]="--config.randaugment_layers=2 --config.randaugment_magnitude=9"
  [trivialaugment]="--config.trivial_augment=true"
  [autoaugment]="--config.autoaugment_policy=svhn"  # digits: the policy learned on SVHN's
  # The default's batch of 128 as 4 micro-batches of 32 (BatchNorm statistics per 32).
  [grad_accum4]="--config.grad_accum_steps=4"
  [random_erasing]="--config.random_erasing_prob=0.25"
  [stochastic_depth]="--config.stochastic_depth_rate=0.1"
  [sam]="--config.sam_rho=0.05"
  [bce]="--config.loss=bce"
  [bce_lr4]="--config.loss=bce --config.learning_rate=4.0"  # timm's BCE averages over classes
  # Layer-wise trust ratios: each layer's step is about learning_rate * trust * ||w||, so
  # LARS (trust coefficient 0.001) takes a rate 25x SGD's, LAMB (trust 1) an Adam-like one.
  [lars]="--config.optimizer=lars --config.learning_rate=10.0"
  [lamb]="--config.optimizer=lamb --config.learning_rate=0.01 --config.weight_decay=0.02"
  # The teacher: ResNet-56 trained by the default recipe (seed 0), in $runs/teacher_resnet56.
  [distill]="--config.distill_from=$runs/teacher_resnet56"
  [all]="--config.ema_decay=0.99 --config.mixup_alpha=0.2 --config.cutmix_alpha=1.0 --config.randaugment_layers=2 --config.random_erasing_prob=0.25 --config.stochastic_depth_rate=0.1 --config.sam_rho=0.05"
)
order=(baseline ema ema_no_warmup mixup cutmix randaugment trivialaugment autoaugment grad_accum4 random_erasing stochastic_depth sam bce bce_lr4 lars lamb distill all)
[ $# -gt 0 ] && order=("$@")
[ -f "$runs/teacher_resnet56/metrics.jsonl" ] ||
  python main.py --workdir="$runs/teacher_resnet56" --config.model=resnet56 > /dev/null 2>&1
for name in "${order[@]}"; do
  for seed in 0 1 2; do
    [ -f "$runs/${name}_seed$seed/metrics.jsonl" ] && continue
    # shellcheck disable=SC2086
    python main.py --workdir="$runs/${name}_seed$seed" --config.seed=$seed ${settings[$name]} \
      > /dev/null 2>&1
  done
done
python - "$runs" "${order[@]}" <<'PY'
import json, os, statistics, sys
runs, names = sys.argv[1], sys.argv[2:]
def final(name, seed, key):
  run = name if seed is None else f'{name}_seed{seed}'
  with open(os.path.join(runs, run, 'metrics.jsonl')) as f:
    records = [json.loads(l) for l in f if key in l]
  return records[-1][key] if records else None
print(f"teacher_resnet56: {100 * final('teacher_resnet56', None, 'eval_top1'):.2f}%")
print('| technique | top-1, seeds 0 / 1 / 2 | mean | EMA weights\' mean |')
print('|---|---|---:|---:|')
for name in names:
  top1 = [final(name, s, 'eval_top1') for s in range(3)]
  ema = [final(name, s, 'eval_top1_ema') for s in range(3)]
  ema_mean = f'{100 * statistics.mean(ema):.2f}%' if None not in ema else ''
  print(f'| {name} | ' + ' / '.join(f'{100 * v:.2f}' for v in top1)
        + f' | {100 * statistics.mean(top1):.2f}% | {ema_mean} |')
PY
