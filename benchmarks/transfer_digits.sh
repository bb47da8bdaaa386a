#!/usr/bin/env bash
# Transfer on the embedded digits: pre-train on 0-4, then fine-tune on 5-9 from those
# weights versus training 5-9 from scratch, with the same small budget (2 epochs, the
# default recipe otherwise), three seeds each. Prints each run's final eval top-1.
#
#   bash benchmarks/transfer_digits.sh [RUNS_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-/tmp/transfer_digits}
mkdir -p "$runs"
python main.py --workdir="$runs/pretrain_0to4" --config.digits_classes=01234 > /dev/null
for seed in 0 1 2; do
  for arm in finetuned scratch; do
    init=()
    [ "$arm" = finetuned ] && init=(--config.init_from="$runs/pretrain_0to4")
    python main.py --workdir="$runs/${arm}_5to9_seed$seed" --config.digits_classes=56789 \
      --config.num_epochs=2 --config.seed=$seed "${init[@]}" > /dev/null
  done
done
python - "$runs" <<'PY'
import json, os, statistics, sys
runs = sys.argv[1]
def top1(name):
  with open(os.path.join(runs, name, 'metrics.jsonl')) as f:
    return [json.loads(l) for l in f if 'eval_top1' in l][-1]['eval_top1']
print(f'pre-train 0-4 (20 epochs): {top1("pretrain_0to4"):.4f}')
for arm in ('finetuned', 'scratch'):
  values = [top1(f'{arm}_5to9_seed{s}') for s in range(3)]
  print(f'5-9, 2 epochs, {arm}: ' + ', '.join(f'{v:.4f}' for v in values)
        + f'  (mean {statistics.mean(values):.4f})')
PY
