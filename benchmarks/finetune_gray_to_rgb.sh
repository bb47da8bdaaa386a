#!/usr/bin/env bash
# A grayscale run (the default digits job, one input channel) fine-tuned on an RGB class
# folder (the same digits, tinted a random colour each, 16x16 PNGs): init_from adapts the
# stem convolution from one input channel to three. Prints both runs' final eval top-1.
#
#   bash benchmarks/finetune_gray_to_rgb.sh [RUNS_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-/tmp/gray_to_rgb}
mkdir -p "$runs"
python - "$runs/folder" <<'PY'
import os, sys
import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
root = sys.argv[1]
digits = load_digits()
rng = np.random.default_rng(0)
order = rng.permutation(len(digits.target))
for n, i in enumerate(order):
  split = 'val' if n % 5 == 0 else 'train'
  tint = rng.uniform(0.3, 1.0, 3)
  gray = digits.images[i] / 16.0
  rgb = (gray[..., None] * tint * 255).astype(np.uint8)
  folder = os.path.join(root, split, str(digits.target[i]))
  os.makedirs(folder, exist_ok=True)
  Image.fromarray(rgb).resize((16, 16), Image.BILINEAR).save(os.path.join(folder, f'{i}.png'))
PY
[ -f "$runs/gray/metrics.jsonl" ] || python main.py --workdir="$runs/gray" > /dev/null 2>&1
python main.py --workdir="$runs/rgb" --config.dataset=folder \
  --config.train_dir="$runs/folder/train" --config.eval_dir="$runs/folder/val" \
  --config.image_size=16 --config.init_from="$runs/gray" --config.num_epochs=5 \
  --config.learning_rate=0.1 > "$runs/rgb.log" 2>&1
grep -h "adapted from" "$runs/rgb.log" | sed 's/.*] //'
python - "$runs" <<'PY'
import json, os, sys
for run in ('gray', 'rgb'):
  with open(os.path.join(sys.argv[1], run, 'metrics.jsonl')) as f:
    last = [json.loads(l) for l in f if 'eval_top1' in l][-1]
  print(f"{run}: eval top-1 {100 * last['eval_top1']:.2f}% at step {last['step']}")
PY
