"""A model summary for the start of training: each stage's output shape and parameter
count, the total, and the training FLOPs per image.

Shapes come from ``jax.eval_shape`` over the model's intermediates (nothing is
allocated or run); FLOPs from XLA's cost analysis of the jitted forward + backward pass
of a training step on one image (XLA counts a multiply-add as two FLOPs). No TensorFlow.

  python -m jax_resnet.summary --model=resnet50 --image_size=224 --num_classes=1000
"""

import argparse
import dataclasses
import re
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

_BLOCK = re.compile(r'^stage(\d+)_block(\d+)$')


@dataclasses.dataclass
class Row:
  name: str
  output_shape: tuple[int, ...]  # per image: (H, W, C) or (classes,)
  params: int


@dataclasses.dataclass
class ModelSummary:
  rows: list[Row]
  total_params: int
  batch_stats: int  # BatchNorm running means and variances (not trained)
  forward_flops: float | None  # per image
  train_flops: float | None  # per image, forward + backward
  flops_method: str

  def format(self, title: str = '') -> str:
    name_w = max([len(r.name) for r in self.rows] + [5])
    lines = [title] if title else []
    lines.append(f'{"layer":<{name_w}}  {"output shape":<16}  {"params":>12}')
    for r in self.rows:
      shape = 'x'.join(str(d) for d in r.output_shape)
      lines.append(f'{r.name:<{name_w}}  {shape:<16}  {r.params:>12,}')
    lines.append(f'{"total":<{name_w}}  {"":<16}  {self.total_params:>12,}')
    lines.append(f'BatchNorm statistics (not trained): {self.batch_stats:,}')
    if self.train_flops is not None:
      lines.append(
        f'Training FLOPs per image: {self.train_flops / 1e9:.3f} G '
        f'(forward {self.forward_flops / 1e9:.3f} G; {self.flops_method})'
      )
    else:
      lines.append(f'Training FLOPs per image: unknown ({self.flops_method})')
    return '\n'.join(lines)


def count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def summarize(model, image_shape: Sequence[int], flops: bool = True) -> ModelSummary:
  """The summary of ``model`` (a models.ResNet) on images of ``image_shape`` (H, W, C)."""
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)

  def init(x):
    return model.init_with_output(
      {'params': jax.random.PRNGKey(0)}, x, train=False, capture_intermediates=True
    )

  logits, variables = jax.eval_shape(init, x)
  params = variables['params']
  intermediates = variables.get('intermediates', {})

  stages = {}  # stage number -> (last block number, output shape)
  for key, value in intermediates.items():
    match = _BLOCK.match(key)
    if match:
      i, j = int(match.group(1)), int(match.group(2))
      shape = tuple(jax.tree.leaves(value['__call__'])[0].shape[1:])
      if i not in stages or j > stages[i][0]:
        stages[i] = (j, shape)

  def params_of(prefix):
    return sum(count(v) for k, v in params.items() if k.startswith(prefix))

  rows = []
  stem_params = params_of('stem_')
  if stages:
    # The first stage keeps the stem's resolution (stride 1), so its height and width
    # are the stem's, and the stem convolution's filters its channels.
    h, w, _ = stages[min(stages)][1]
    rows.append(Row('stem', (h, w, int(params['stem_conv']['kernel'].shape[-1])), stem_params))
  for i in sorted(stages):
    rows.append(Row(f'stage{i} ({stages[i][0]} blocks)', stages[i][1], params_of(f'stage{i}_')))
  if 'final_bn' in params:
    rows.append(Row('final_bn', stages[max(stages)][1] if stages else (), params_of('final_bn')))
  rows.append(Row('pool + head', tuple(logits.shape[1:]), params_of('head')))
  total = count(params)
  assert sum(r.params for r in rows) == total, 'a parameter group is missing from the rows'

  forward = train_flops = None
  method = 'not computed'
  if flops:
    forward, train_flops, method = _flops(model, variables, x)
  return ModelSummary(
    rows, total, count(variables.get('batch_stats', {})), forward, train_flops, method
  )


def _cost(fn, *args) -> tuple[float | None, str]:
  lowered = jax.jit(fn).lower(*args)
  try:
    cost = lowered.cost_analysis()
    if cost and cost.get('flops'):
      return float(cost['flops']), 'XLA cost analysis of the jitted HLO'
  except Exception:  # some backends analyse only compiled code
    pass
  try:
    cost = lowered.compile().cost_analysis()
    if isinstance(cost, list):
      cost = cost[0]
    if cost and cost.get('flops'):
      return float(cost['flops']), 'XLA cost analysis of the compiled step'
  except Exception:
    pass
  return None, 'XLA gave no cost analysis'


def _flops(model, variables, x):
  """Forward and forward+backward FLOPs per image, for a training-mode step."""
  params, batch_stats = variables['params'], variables.get('batch_stats', {})

  def loss(params, batch_stats, images):
    logits, _ = model.apply(
      {'params': params, 'batch_stats': batch_stats},
      images,
      train=True,
      mutable=['batch_stats'],
      rngs={'dropout': jax.random.PRNGKey(0)},
    )
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[:, 0])

  def train_pass(params, batch_stats, images):
    return jax.value_and_grad(loss)(params, batch_stats, images)

  forward, method = _cost(loss, params, batch_stats, x)
  train, method = _cost(train_pass, params, batch_stats, x)
  if train is None and forward is not None:
    return forward, 3 * forward, 'estimated as 3 x the forward pass'
  if train is None:
    return None, None, method
  return forward, train, method + ' of forward + backward'


def main(argv=None) -> int:
  from jax_resnet import models

  parser = argparse.ArgumentParser(
    prog='python -m jax_resnet.summary', description='Print a ResNet model summary.'
  )
  parser.add_argument('--model', default='resnet50', choices=models.MODEL_NAMES)
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--channels', type=int, default=3)
  parser.add_argument('--num_classes', type=int, default=1000)
  parser.add_argument('--stem', default=None, choices=('imagenet', 'cifar'))
  args = parser.parse_args(argv)
  options = {'stem': args.stem} if args.stem else {}
  model = models.create_model(args.model, args.num_classes, **options)
  shape = (args.image_size, args.image_size, args.channels)
  print(summarize(model, shape).format(f'{args.model} on {"x".join(map(str, shape))}'))
  return 0


if __name__ == '__main__':
  sys.exit(main())
