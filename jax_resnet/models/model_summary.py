"""A model summary for the start of training: each stage's output shape and parameter
count, the total, and the training FLOPs per image.

Shapes come from ``jax.eval_shape`` over the model's intermediates (nothing is
allocated or run); FLOPs from XLA's cost analysis of the jitted forward + backward pass
of a training step on one image (XLA counts a multiply-add as two FLOPs). No TensorFlow.

  python -m jax_resnet.models.model_summary --model=resnet50 --image_size=224 \\
      --num_classes=1000 [--depth=N]

The per-stage rows are this module's own: flax's ``Module.tabulate`` has one row per
block or layer (18 for ResNet-50 at depth 1, hundreds at full depth) and no training
FLOPs, too long for a run's log; ``--depth=N`` prints flax's table for the detail.
``clu.parameter_overview`` lists every parameter array (hundreds of rows) and no
output shapes, so it does not serve either.
"""

import dataclasses
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

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
    elif self.flops_method != 'not computed':
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
    # are the stem's, and the stem's last convolution's filters its channels (a deep stem
    # has stem_conv1 ... stem_conv3, the others one stem_conv).
    h, w, _ = stages[min(stages)][1]
    last_conv = max(k for k in params if k.startswith('stem_conv'))
    rows.append(Row('stem', (h, w, int(params[last_conv]['kernel'].shape[-1])), stem_params))
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


def xla_flops(stage) -> float | None:
  """'flops' from the cost analysis of a ``jax.stages.Lowered`` or ``Compiled`` (a dict,
  or a list of them on some versions); None when the backend gives none. A compiled
  SPMD program is analysed per device: multiply by the device count for the whole step."""
  try:
    analysis = stage.cost_analysis()
  except Exception:  # some backends analyse only compiled code, some nothing
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get('flops')
  return float(flops) if flops and flops > 0 else None


def _cost(fn, *args) -> tuple[float | None, str]:
  lowered = jax.jit(fn).lower(*args)
  flops = xla_flops(lowered)
  if flops:
    return flops, 'XLA cost analysis of the jitted HLO'
  try:
    flops = xla_flops(lowered.compile())
  except Exception:  # a summary must never stop a run
    flops = None
  if flops:
    return flops, 'XLA cost analysis of the compiled step'
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


def _define_flags():
  from jax_resnet import models

  flags.DEFINE_string('model', 'resnet50', 'A model name (see jax_resnet.models.MODEL_NAMES).')
  flags.DEFINE_integer('image_size', 224, 'Side of the square input.')
  flags.DEFINE_integer('channels', 3, 'Input channels.')
  flags.DEFINE_integer('num_classes', 1000, 'Classifier outputs.')
  flags.DEFINE_enum('stem', None, list(models.STEMS), "The stem; default: the model's own.")
  flags.DEFINE_integer(
    'depth',
    0,
    "0: one row per stage. N > 0: flax's per-module table (Module.tabulate) to depth N, "
    "with each module's forward and backward FLOPs.",
  )


def main(argv) -> int:
  from jax_resnet import models

  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  FLAGS = flags.FLAGS
  if FLAGS.model not in models.MODELS:
    raise app.UsageError(f'Unknown --model={FLAGS.model}. Valid: {", ".join(models.MODEL_NAMES)}.')
  options = {'stem': FLAGS.stem} if FLAGS.stem else {}
  model = models.create_model(FLAGS.model, FLAGS.num_classes, **options)
  shape = (FLAGS.image_size, FLAGS.image_size, FLAGS.channels)
  if FLAGS.depth:
    table = model.tabulate(
      jax.random.PRNGKey(0),
      jnp.zeros((1, *shape), jnp.float32),
      train=False,
      depth=FLAGS.depth,
      compute_flops=True,
      compute_vjp_flops=True,
      console_kwargs={'width': 160},
    )
    print(table)
    return 0
  print(summarize(model, shape).format(f'{FLAGS.model} on {"x".join(map(str, shape))}'))
  return 0


if __name__ == '__main__':
  _define_flags()
  app.run(main)
