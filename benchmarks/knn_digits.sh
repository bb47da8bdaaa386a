#!/usr/bin/env bash
# The kNN top-1 (cosine, k=20) of a digits run's embeddings: the digits train and test
# splits the default job uses, written as class folders of PNGs, then
# `--mode=knn --knn_train=TRAIN --knn_eval=TEST`. Trains the default job first when
# RUN has no checkpoint.
#
#   bash benchmarks/knn_digits.sh [RUN [FOLDERS]]
set -euo pipefail
cd "$(dirname "$0")/.."
run=${1:-/tmp/knn_digits/run}
folders=${2:-/tmp/knn_digits/folders}
[ -d "$run/checkpoints" ] || python main.py --workdir="$run" > /dev/null 2>&1
python - "$folders" <<'PY'
import os, sys
from PIL import Image
from jax_resnet.configuration import defaults
from jax_resnet.data import digits
x_train, y_train, x_test, y_test, _ = digits.arrays(defaults.get_config())
for split, images, labels in (('train', x_train, y_train), ('test', x_test, y_test)):
  for i, (image, label) in enumerate(zip(images, labels)):
    folder = os.path.join(sys.argv[1], split, str(label))
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(image[..., 0]).save(os.path.join(folder, f'{i:04d}.png'))
PY
python main.py --workdir="$run" --mode=knn --knn_train="$folders/train" \
  --knn_eval="$folders/test" 2>/dev/null
