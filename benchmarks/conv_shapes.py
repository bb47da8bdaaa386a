"""Times every convolution of a model, forward and both gradients, one shape at a time.

  python benchmarks/conv_shapes.py --model=resnet18 --image_size=64 --batch=16
  python benchmarks/conv_shapes.py --model=resnet20 --image_size=32 --batch=128 \\
      --impls=plain,routed
  python benchmarks/conv_shapes.py --zoo   # the seven model/size/batch settings below

The shapes come from the real model (``jax_resnet.models.resnet`` traced with a recording
``conv_general_dilated``), each distinct (N, H, W, Cin, Cout, k, stride) once with its
count in the model. For each, three jitted programs are timed: the forward conv, the
gradient with respect to the input (``jax.vjp`` in the input only: XLA's transposed
"input-gradient" conv) and the gradient with respect to the kernel (the "kernel-gradient"
conv). The implementations named by ``--impls`` are timed in interleaved rounds (every
program once per round, in turn), so a machine shared with other jobs slows them alike;
each cell is the fastest of the rounds (on a shared machine a median mostly measures the
other jobs; the fastest round is stable to a few percent). GFLOP/s counts
2 * N * Ho * Wo * kh * kw * Cin * Cout for each of the three (the same arithmetic).

Every rate is compared with a reference: a 2048^3 fp32 matmul timed in the same process
(``gemm``). Marks: ``!!`` below 10% of it, ``!`` below 30%. The stem's input gradient is
not part of a train step (images need none) and is shown in brackets, left out of sums.

Implementations: ``plain`` (``lax.conv_general_dilated``), ``routed``
(``jax_resnet.models.cpu_conv.routed_conv``, which picks a formulation by shape on CPU) and
``matmul`` (every conv as patches times kernel matrix, ``jax_resnet.models.cpu_conv.matmul_conv``).
XLA flags apply as usual through ``XLA_FLAGS``; the header prints them. The last
columns: the conv's time per train step (count x (fwd + dx + dw)) for each implementation
and the first's over the last's.
"""

import contextlib
import functools
import os
import sys
import time

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jax_resnet.models import (
  cpu_conv,
  resnet,  # noqa: E402
)

ZOO = (
  ('resnet18', 64, 16),
  ('resnet18', 128, 16),
  ('resnet18', 224, 8),
  ('resnet50', 64, 16),
  ('resnet50', 128, 16),
  ('resnet50', 224, 8),
  ('resnet20', 32, 128),
)
OPS = ('fwd', 'dx', 'dw')
_DN = ('NHWC', 'HWIO', 'NHWC')


class _Linen:
  """``flax.linen`` as ``jax_resnet.models.resnet`` sees it, with some functions replaced."""

  def __init__(self, **replaced):
    self.__dict__.update(replaced)

  def __getattr__(self, name):
    return getattr(flax.linen, name)


@contextlib.contextmanager
def patch_models(conv_general_dilated=None, max_pool=None):
  """Within: ``jax_resnet.models.resnet`` builds every ``nn.Conv`` with this conv op and/or pools
  with this ``max_pool``, without editing resnet.py.

  Parameter names do not change (the module class is still ``Conv``).
  """
  replaced = {}
  if conv_general_dilated is not None:
    replaced['Conv'] = functools.partial(flax.linen.Conv, conv_general_dilated=conv_general_dilated)
  if max_pool is not None:
    replaced['max_pool'] = max_pool
  saved = resnet.nn
  resnet.nn = _Linen(**replaced)
  try:
    yield
  finally:
    resnet.nn = saved


def model_convs(name: str, image_size: int, batch: int, dtype=jnp.float32):
  """[(x_shape, w_shape, strides, padding, is_first)] of every conv call, in order."""
  calls = []

  def record(lhs, rhs, window_strides, padding, **kwargs):
    if isinstance(padding, str):
      padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
    calls.append((lhs.shape, rhs.shape, tuple(window_strides), tuple(map(tuple, padding))))
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)

  num_classes = 10 if resnet.MODELS[name]['stem'] == 'cifar' else 1000
  model = resnet.create_model(name, num_classes, dtype=dtype)
  x = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
  with patch_models(conv_general_dilated=record):
    jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0), x)
  return [(*c, i == 0) for i, c in enumerate(calls)]


def distinct(calls):
  """Distinct shapes in first-seen order, with counts."""
  counts = {}
  for c in calls:
    counts[c] = counts.get(c, 0) + 1
  return list(counts.items())


def _impl(name):
  if name == 'plain':
    return functools.partial(lax.conv_general_dilated, dimension_numbers=_DN)
  if name == 'routed':
    return functools.partial(cpu_conv.routed_conv, dimension_numbers=_DN)
  if name == 'matmul':
    return lambda x, w, strides, padding: cpu_conv.matmul_conv(x, w, strides, padding)
  raise ValueError(f'unknown implementation {name!r}')


def programs(impl, x, w, g, strides, padding):
  f = lambda x, w: impl(x, w, strides, padding)
  progs = {
    'fwd': jax.jit(f),
    'dx': jax.jit(lambda x, w, g: jax.vjp(lambda x: f(x, w), x)[1](g)[0]),
    'dw': jax.jit(lambda x, w, g: jax.vjp(lambda w: f(x, w), w)[1](g)[0]),
  }
  args = {'fwd': (x, w), 'dx': (x, w, g), 'dw': (x, w, g)}
  return {op: (progs[op], args[op]) for op in OPS}


def _time(fn, args):
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def gemm_rate(n=2048, rounds=5):
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
  f = jax.jit(jnp.dot)
  jax.block_until_ready(f(a, a))
  return 2 * n**3 / min(_time(f, (a, a)) for _ in range(rounds)) / 1e9


def time_shape(x_shape, w_shape, strides, padding, impls, rounds, dtype=jnp.float32):
  """{impl: {op: fastest seconds}} over interleaved rounds."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(x_shape, np.float32), dtype)
  w = jnp.asarray(rng.standard_normal(w_shape, np.float32) * 0.05, dtype)
  out_shape = jax.eval_shape(
    lambda x, w: lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_DN), x, w
  ).shape
  g = jnp.asarray(rng.standard_normal(out_shape, np.float32), dtype)
  progs = {name: programs(_impl(name), x, w, g, strides, padding) for name in impls}
  for p in progs.values():
    for fn, args in p.values():
      jax.block_until_ready(fn(*args))  # compile and warm up
  times = {name: {op: [] for op in OPS} for name in impls}
  for _ in range(rounds):
    for op in OPS:
      for name in impls:
        times[name][op].append(_time(*progs[name][op]))
  return {name: {op: min(t) for op, t in ops.items()} for name, ops in times.items()}


def flops(x_shape, w_shape, strides, padding):
  n, h, w, _ = x_shape
  kh, kw, cin, cout = w_shape
  ho = (h + sum(padding[0]) - kh) // strides[0] + 1
  wo = (w + sum(padding[1]) - kw) // strides[1] + 1
  return 2 * n * ho * wo * kh * kw * cin * cout, (ho, wo)


def _mark(rate, ref):
  return '!!' if rate < 0.1 * ref else '!' if rate < 0.3 * ref else ''


def sweep(name, image_size, batch, impls, rounds, ref, dtype=jnp.float32):
  shapes = distinct(model_convs(name, image_size, batch, dtype))
  print(
    f'\n## {name} {image_size}x{image_size} batch {batch} {jnp.dtype(dtype).name} '
    f'(load {os.getloadavg()[0]:.1f}, gemm {ref:.0f} GFLOP/s)\n'
  )
  head = '| N,H,W,Cin>Cout | k/s | Ho | n | GFLOP |'
  for impl in impls:
    head += f' {impl} fwd | {impl} dx | {impl} dw |'
  if len(impls) > 1:
    head += ' step ms ' + ' / '.join(impls) + ' | x |'
  print(head)
  print('|' + '---|' * (head.count('|') - 1))
  totals = {impl: 0.0 for impl in impls}
  for (x_shape, w_shape, strides, padding, first), count in shapes:
    fl, (ho, wo) = flops(x_shape, w_shape, strides, padding)
    t = time_shape(x_shape, w_shape, strides, padding, impls, rounds, dtype)
    n, h, w, cin = x_shape
    row = f'| {n},{h},{w},{cin}>{w_shape[3]} | {w_shape[0]}/{strides[0]} | {ho} | {count} | '
    row += f'{fl / 1e9:.3f} |'
    for impl in impls:
      for op in OPS:
        rate = fl / t[impl][op] / 1e9
        cell = f'{t[impl][op] * 1e3:.1f} ({rate:.0f}){_mark(rate, ref)}'
        row += f' [{cell}] |' if (first and op == 'dx') else f' {cell} |'
      used = [op for op in OPS if not (first and op == 'dx')]
      totals[impl] += count * sum(t[impl][op] for op in used)
    if len(impls) > 1:
      step = [count * sum(t[i][op] for op in OPS if not (first and op == 'dx')) for i in impls]
      row += ' ' + ' / '.join(f'{s * 1e3:.1f}' for s in step) + f' | {step[0] / step[-1]:.2f} |'
    print(row, flush=True)
  print(
    '\nsum over the model (count x (fwd + dx + dw), ms per step): '
    + ', '.join(f'{impl} {s * 1e3:.0f}' for impl, s in totals.items())
    + (
      f'; {impls[0]} / {impls[-1]} = {totals[impls[0]] / totals[impls[-1]]:.2f}x'
      if len(impls) > 1
      else ''
    )
  )
  return totals


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  impls = FLAGS.impls.split(',')
  dtype = jnp.dtype(FLAGS.dtype)
  print(
    f'# conv_shapes: jax {jax.__version__}, {jax.devices()[0].device_kind}, '
    f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}, impls {impls}, {FLAGS.rounds} rounds'
  )
  print('# cells: ms (GFLOP/s); !! < 10% of gemm, ! < 30%; [stem dx]: not in a train step')
  ref = gemm_rate()
  settings = ZOO if FLAGS.zoo else ((FLAGS.model, FLAGS.image_size, FLAGS.batch),)
  for name, size, batch in settings:
    sweep(name, size, batch, impls, FLAGS.rounds, ref, dtype)


def _define_flags():
  """Flags, defined only when this file is the program (conv_routing imports it)."""
  flags.DEFINE_string('model', 'resnet18', 'a model name')
  flags.DEFINE_integer('image_size', 64, 'image side')
  flags.DEFINE_integer('batch', 16, 'batch')
  flags.DEFINE_bool('zoo', False, 'all of ZOO, one table each')
  flags.DEFINE_string('impls', 'plain', 'comma-separated: plain,routed,matmul')
  flags.DEFINE_integer('rounds', 5, 'interleaved timing rounds')
  flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'compute dtype')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
