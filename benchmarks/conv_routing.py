"""Whole train steps with and without ``jax_resnet.models.cpu_conv``'s CPU formulations, A/B.

  python benchmarks/conv_routing.py --targets            # the four settings of the issue
  python benchmarks/conv_routing.py --config_name=resnet20_cifar10 --batch=128 --image_size=32 \\
      --variants=plain,routed+pool+noynnconv --rounds=20

For each variant, ``jax_resnet.benchmark.benchmark_step`` runs once (the real jitted train
step: synthetic data on the device, donated state, fp32 unless ``--half_precision``) and
its images/s are printed. The train step it compiled is kept (caught at
``Lowered.compile``), with its last state and batch, and then the variants' steps run
**interleaved one step at a time**: ``--rounds`` rounds, each variant one step per round,
blocking. On a machine shared with other jobs a run-by-run comparison mostly measures the
other jobs (identical programs differed by 30% run to run at load 6); step-by-step
interleaving lets the load fall on all variants alike. Reported per variant: median and
fastest step, images/s at the median, and the median over rounds of its step time over
the first variant's in the same round.

jax_resnet/models/resnet.py is not edited: within a variant, ``jax_resnet.models.resnet``
sees a ``flax.linen`` whose ``Conv`` is
``functools.partial(nn.Conv, conv_general_dilated=routed_conv)`` (same parameter names)
and, with ``+pool``, whose ``max_pool`` is ``jax_resnet.models.cpu_conv.max_pool``.

Variants (comma-separated), each ``CONV[+OPTION...]``:

* ``plain``: ``lax.conv_general_dilated``, as resnet.py does today.
* ``routed``: ``jax_resnet.models.cpu_conv.routed_conv``.
* ``+pool``: the stem's max-pool is ``jax_resnet.models.cpu_conv.max_pool`` (ImageNet stems
  only).
* ``+noynnconv``: the step compiled with ``jax_resnet.models.cpu_conv.CPU_COMPILER_OPTIONS``
  (YNNPACK
  keeps dots and reductions but no convolutions: the same as
  ``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution``).
* ``+xla:NAME=VALUE``: any other XLA compile option for the step, e.g.
  ``plain+xla:xla_cpu_prefer_vector_width=512`` or ``+xla:xla_cpu_enable_fast_math=true``.
"""

import contextlib
import importlib
import os
import statistics
import sys
import time

import jax
from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conv_shapes import patch_models  # noqa: E402

from jax_resnet.benchmark import synthetic  # noqa: E402
from jax_resnet.models import cpu_conv  # noqa: E402

# (config module, batch, image size): the four settings.
TARGETS = (
  ('resnet20_cifar10', 128, 32),
  ('resnet50_imagenet', 8, 224),
  ('resnet50_imagenet', 16, 64),
  ('resnet18_imagenet', 16, 64),
)


class _Caught:
  """A compiled program that keeps the arguments and results of its latest call."""

  def __init__(self, compiled):
    self.compiled, self.calls, self.args, self.out = compiled, 0, None, None

  def __call__(self, *args):
    self.out = self.compiled(*args)
    self.args, self.calls = args, self.calls + 1
    return self.out

  def __getattr__(self, name):
    return getattr(self.compiled, name)


@contextlib.contextmanager
def catch_compiles(options=None):
  """Within: every ``Lowered.compile()`` gets ``options`` (XLA compiler options) and
  returns a ``_Caught``; yields the list of them."""
  caught = []
  compile_ = jax.stages.Lowered.compile

  def compile_with(self, compiler_options=None, **kwargs):
    merged = {**(options or {}), **(compiler_options or {})} or None
    caught.append(_Caught(compile_(self, merged, **kwargs)))
    return caught[-1]

  jax.stages.Lowered.compile = compile_with
  try:
    yield caught
  finally:
    jax.stages.Lowered.compile = compile_


def _option_value(text):
  """XLA option values as XLA's option parser wants them: bools and ints, not strings."""
  if text.lower() in ('true', 'false'):
    return text.lower() == 'true'
  return int(text) if text.lstrip('-').isdigit() else text


def parse_variant(name):
  """-> (conv_general_dilated or None, max_pool or None, XLA options)."""
  op, *extras = name.split('+')
  if op not in ('plain', 'routed'):
    raise ValueError(f'unknown variant {name!r}')
  pool, options = None, {}
  for extra in extras:
    if extra == 'pool':
      pool = cpu_conv.max_pool
    elif extra == 'noynnconv':
      options.update(cpu_conv.CPU_COMPILER_OPTIONS)
    elif extra.startswith('xla:'):
      key, _, value = extra[4:].partition('=')
      options[key] = _option_value(value)
    else:
      raise ValueError(f'unknown option {extra!r} in {name!r}')
  return (cpu_conv.routed_conv if op == 'routed' else None), pool, options


def load_config(name, batch, image_size, half_precision):
  config = importlib.import_module(f'configs.{name}').get_config()
  config.batch_size = batch
  config.image_size = image_size
  config.half_precision = half_precision
  return config


def _load():
  return f'load {os.getloadavg()[0]:.1f}'


def run_setting(name, batch, image_size, variants, rounds, steps, warmup, half_precision):
  config = load_config(name, batch, image_size, half_precision)
  print(f'\n## {config.model} {image_size}x{image_size} batch {batch} ({name})\n', flush=True)
  steps_of = {}
  for v in variants:
    conv_op, pool, options = parse_variant(v)
    with patch_models(conv_general_dilated=conv_op, max_pool=pool):
      with catch_compiles(options) as caught:
        result = synthetic.benchmark_step(config, steps=steps, warmup=warmup)
    step = max(caught, key=lambda c: c.calls)  # the train step: called every step
    steps_of[v] = step
    print(
      f'benchmark_step {v:>28}: {result["images_per_s"]:8.2f} img/s, median step '
      f'{result["step_s_median"]:.3f} s, compile {result["compile_s"]:.1f} s, {_load()}',
      flush=True,
    )
  state = {v: s.out[0] for v, s in steps_of.items()}
  batch_args = {v: s.args[1:] for v, s in steps_of.items()}
  times = {v: [] for v in variants}
  load_start = _load()
  for _ in range(rounds):
    for v in variants:
      start = time.perf_counter()
      state[v], metrics = steps_of[v].compiled(state[v], *batch_args[v])
      jax.block_until_ready((state[v], metrics))
      times[v].append(time.perf_counter() - start)
  base = variants[0]
  print(
    f'\n{rounds} rounds, one step of each variant per round ({load_start} at the start, '
    f'{_load()} at the end):\n'
  )
  print(f"| variant | median step | fastest | img/s at median | step / {base}'s |")
  print('|---|---:|---:|---:|---:|')
  for v in variants:
    ratio = statistics.median(a / b for a, b in zip(times[v], times[base]))
    med = statistics.median(times[v])
    print(
      f'| {v} | {med * 1e3:.0f} ms | {min(times[v]) * 1e3:.0f} ms | '
      f'{batch / med:.1f} | {ratio:.2f} ({1 / ratio:.2f}x faster) |'
    )
  print(flush=True)
  del state, steps_of
  return times


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  variants = FLAGS.variants.split(',')
  print(
    f'# conv_routing: jax {jax.__version__}, {jax.devices()[0].device_kind}, '
    f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}, variants {variants}'
  )
  settings = TARGETS if FLAGS.targets else ((FLAGS.config_name, FLAGS.batch, FLAGS.image_size),)
  for name, batch, size in settings:
    run_setting(
      name, batch, size, variants, FLAGS.rounds, FLAGS.steps, FLAGS.warmup, FLAGS.half_precision
    )


def _define_flags():
  """Flags, defined only when this file is the program (conv_shapes' clash);
  ``--steps`` and ``--warmup`` are jax_resnet.benchmark's, with shorter defaults."""
  flags.DEFINE_string('config_name', 'resnet20_cifar10', 'module name in configs/')
  flags.DEFINE_integer('batch', 128, 'global batch')
  flags.DEFINE_integer('image_size', 32, 'image side')
  flags.DEFINE_bool('targets', False, 'the four settings of TARGETS')
  flags.DEFINE_string('variants', 'plain,routed,routed+pool,routed+pool+noynnconv', 'comma list')
  flags.DEFINE_integer('rounds', 10, 'interleaved steps per variant')
  flags.DEFINE_bool('half_precision', False, 'bf16 compute')
  flags.FLAGS.set_default('steps', 5)
  flags.FLAGS.set_default('warmup', 2)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
