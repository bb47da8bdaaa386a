"""Searches CIFAR ResNet stage depths and widths for the parameter counts seed 002 reports
for its ResNet-26/34/50 (4,196,906 / 4,348,082 / 4,815,794 at 10 classes).

The architecture is the one ``resnet*_small`` uses (models/registry.py): a 3x3 stem conv
of the first stage's width with BatchNorm, four stages of basic or bottleneck blocks
(stride 2 from the second), projection shortcuts (1x1 conv + BN) where the shape
changes, global pooling and a 10-way head. Parameters as PyTorch counts them (BN scale
and bias; no running statistics). The count is a closed form, checked against the Flax
models' own counts before the search.

    python benchmarks/seed002_search.py
"""

import numpy as np

TARGETS = {'resnet26': 4_196_906, 'resnet34': 4_348_082, 'resnet50': 4_815_794}
# (block, stage sizes) per name: the depth counts convolutions plus the stem and head.
CANDIDATES = {
  'resnet26': [('basic', s) for s in ((2, 3, 4, 3), (3, 3, 3, 3), (2, 2, 4, 4), (4, 4, 2, 2))]
  + [('bottleneck', (2, 2, 2, 2))],
  'resnet34': [('basic', (3, 4, 6, 3))],
  'resnet50': [('bottleneck', (3, 4, 6, 3))],
}
WIDTHS = np.arange(8, 321, 4)  # every multiple of 4 up to 320, for each stage
CLASSES = 10


def _block(block, c_in, w, stride):
  """Parameters of one block (numpy-broadcast over widths); returns (count, c_out)."""
  if block == 'basic':
    count = c_in * w * 9 + 2 * w + w * w * 9 + 2 * w
    c_out = w
  else:
    count = c_in * w + 2 * w + w * w * 9 + 2 * w + w * 4 * w + 8 * w
    c_out = 4 * w
  needs_projection = (stride != 1) or np.broadcast_to(c_in != c_out, np.shape(count))
  count = count + np.where(needs_projection, c_in * c_out + 2 * c_out, 0)
  return count, c_out


def count(block, stages, widths, classes=CLASSES, in_channels=3):
  """The parameter count of the architecture with these stage ``widths`` (arrays allowed)."""
  c = widths[0]
  total = in_channels * c * 9 + 2 * c  # stem conv + BN
  for i, (n, w) in enumerate(zip(stages, widths)):
    for j in range(n):
      params, c = _block(block, c, w, 2 if i > 0 and j == 0 else 1)
      total = total + params
  return total + c * classes + classes


def _check_against_the_models():
  import jax
  import jax.numpy as jnp

  from jax_resnet import models

  for name in ('resnet26_small', 'resnet34_small', 'resnet50_small'):
    arch = models.MODELS[name]
    block = 'basic' if arch['block_cls'].expansion == 1 else 'bottleneck'
    model = models.create_model(name, CLASSES)
    shapes = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    flax_count = sum(x.size for x in jax.tree.leaves(shapes['params']))
    assert count(block, arch['stage_sizes'], arch['widths']) == flax_count, name


def _exact(block, stages, target):
  """Width tuples, never narrowing, whose count is ``target`` (one first width at a time)."""
  rest = np.meshgrid(WIDTHS, WIDTHS, WIDTHS, indexing='ij', sparse=True)
  found, closest = [], (None, None)
  for w0 in WIDTHS:
    totals = count(block, stages, (np.int64(w0), *rest))
    never_narrowing = (w0 <= rest[0]) & (rest[0] <= rest[1]) & (rest[1] <= rest[2])
    gap = np.where(never_narrowing, np.abs(totals - target), np.iinfo(np.int64).max)
    for index in zip(*np.nonzero(gap == 0)):
      found.append((int(w0), *(int(WIDTHS[i]) for i in index)))
    best = np.unravel_index(np.argmin(gap), gap.shape)
    if closest[0] is None or gap[best] < closest[0]:
      closest = (int(gap[best]), (int(w0), *(int(WIDTHS[i]) for i in best)))
  return found, closest


def search():
  for name, target in TARGETS.items():
    print(f'{name}: target {target:,}')
    for block, stages in CANDIDATES[name]:
      found, (gap, widths) = _exact(block, stages, target)
      shown = ', '.join(map(str, found[:4])) if found else f'none; closest {widths}, off by {gap:,}'
      print(f'  {block} {stages}: {len(found)} exact: {shown}')


if __name__ == '__main__':
  _check_against_the_models()
  search()
