"""Train-step throughput: the real jitted step on synthetic data already on the device.

  python -m jax_resnet.benchmark --config=configs/resnet50_imagenet.py \\
      [--config.FIELD=VALUE ...] [--steps=20] [--warmup=3] [--json_out=PATH] \\
      [--compare=OTHER_CONFIG.py [--compare.FIELD=VALUE ...]] [--mode=synthetic|pipeline] \\
      [--profile=DIR]

``--mode=synthetic`` (default) builds the model, optimizer and schedule from the config,
makes uint8 images and labels on the device (a rotating set of ``--num_batches``
batches, so no step reads the same buffer twice in a row; with
``config.data_on_device`` a synthetic data set on the device, cropped and flipped
there each step as in real training) and runs the real train step (normalisation,
Cutout, bf16 compute, donated state; ``config.steps_per_dispatch`` steps per call).
It prints one JSON object (see ``FIELDS``).

``--mode=pipeline`` measures, on the config's real data source, the input pipeline alone,
the step alone (as above) and the whole loop, and names the bottleneck. Only this
mode imports TensorFlow (through ``jax_resnet.data``).

``--profile=DIR`` then traces a few more steps into DIR (TensorBoard's profile plugin,
xprof, or Perfetto opens it; see ``jax_resnet.observe.profiling``), prints a table of the top
operations by device time with their shapes to stderr, writes it to DIR/top_ops.txt and
adds it to the JSON as ``top_ops``.

``--compare`` runs a second config in the same process and adds ``ratio``: its images/s
over the first's. Without TensorFlow installed, synthetic mode still runs: this module
imports only jax, flax, optax, numpy, absl, ml_collections and the core modules (clu's
``metrics`` module, through the step functions; clu itself does not need TensorFlow).
"""

import functools
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from jax_resnet import parallel
from jax_resnet.configuration import validation
from jax_resnet.data.common import KNOWN_SIZES, imagenet_stats
from jax_resnet.models import model_summary
from jax_resnet.observe import profiling
from jax_resnet.training import optimizers
from jax_resnet.training import (
  step_functions as train_steps,  # `steps` is also a count of steps here
)
from jax_resnet.training.timeline import Timeline

# Dense bf16 peak per device, TFLOP/s (vendor spec sheets); matched in order against
# jax.Device.device_kind, so more specific names come first. None on CPU.
PEAK_BF16_TFLOPS = (
  ('H100 PCIe', 756.0),
  ('H100', 989.0),  # SXM
  ('H200', 989.0),
  ('A100', 312.0),
  ('TPU v4', 275.0),
  ('TPU v5 lite', 197.0),
  ('TPU v5e', 197.0),
  ('TPU v5p', 459.0),
  ('TPU v5', 459.0),
  ('TPU v6 lite', 918.0),
)

# Every field of a synthetic-mode result, with its type (None where the backend has
# no answer: peak memory on CPU, MFU without a known peak). temp_memory_bytes is XLA's
# planned scratch per device for one dispatch (mostly activations kept for the backward
# pass): known on every backend, so memory savings (remat) show on CPU too.
FIELDS = {
  'mode': str,
  'device_kind': str,
  'platform': str,
  'device_count': int,
  'process_count': int,
  'jax_version': str,
  'xla_flags': str,
  'model': str,
  'image_size': int,
  'global_batch': int,
  'dtype': str,
  'remat': bool,
  'steps_per_dispatch': int,
  'data_on_device': bool,
  'warmup_steps': int,
  'timed_steps': int,
  'compile_s': float,
  'step_s_median': float,
  'step_s_p90': float,
  'images_per_s': float,
  'images_per_s_blocking': float,
  'peak_memory_bytes': (int, type(None)),
  'temp_memory_bytes': (int, type(None)),
  'flops_per_image': (float, type(None)),
  'flops_source': str,
  'dataset': str,
  'epoch_s': (float, type(None)),
  'peak_bf16_tflops_per_device': (float, type(None)),
  'mfu': (float, type(None)),
}

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'Config file to benchmark.', lock_config=False
)
_COMPARE = config_flags.DEFINE_config_file(
  'compare',
  None,
  'A second config file run in the same process; the JSON gains '
  '"ratio" (its images/s over --config\'s). Override with --compare.FIELD=VALUE.',
  lock_config=False,
)
flags.DEFINE_enum(
  'mode',
  'synthetic',
  ['synthetic', 'pipeline'],
  'synthetic: the train step on device-resident synthetic data. pipeline: '
  'input alone, step alone and the whole loop on the real data source.',
)
flags.DEFINE_integer('steps', 20, 'Timed train steps (rounded up to whole dispatches).')
flags.DEFINE_integer('warmup', 3, 'Untimed steps after compilation.')
flags.DEFINE_integer('num_batches', 4, 'Synthetic batches on the device, used in turn.')
flags.DEFINE_integer('num_classes', None, 'Head size; default from config.dataset.')
flags.DEFINE_string('json_out', None, 'Also write the JSON object to this file.')
flags.DEFINE_string(
  'profile',
  None,
  'Also trace --profile_steps steps into this directory and print the top operations.',
)
flags.DEFINE_integer('profile_steps', 3, 'Steps traced with --profile.')


def peak_bf16_tflops(device_kind: str) -> float | None:
  for name, tflops in PEAK_BF16_TFLOPS:
    if name.lower() in device_kind.lower():
      return tflops
  return None


def _peak_memory(devices) -> int | None:
  peaks = []
  for d in devices:
    try:
      stats = d.memory_stats()
    except Exception:
      stats = None
    if stats and 'peak_bytes_in_use' in stats:
      peaks.append(int(stats['peak_bytes_in_use']))
  return max(peaks) if peaks else None


def _temp_memory(compiled) -> int | None:
  try:
    return int(compiled.memory_analysis().temp_size_in_bytes)
  except Exception:  # a backend without memory analysis
    return None


def _epoch_s(dataset: str, images_per_s: float) -> float | None:
  """Seconds for one epoch of a known training set at this rate."""
  return KNOWN_SIZES[dataset][0] / images_per_s if dataset in KNOWN_SIZES else None


def _synthetic_batches(mesh, count: int, batch: int, image_shape, num_classes: int, seed=0):
  """``count`` global batches of random uint8 images and int32 labels, made on device."""
  out = parallel.batch_sharded(mesh)

  @functools.partial(jax.jit, out_shardings={'image': out, 'label': out})
  def make(key):
    k1, k2 = jax.random.split(key)
    images = jax.random.randint(k1, (batch, *image_shape), 0, 256, jnp.int32)
    return {
      'image': images.astype(jnp.uint8),
      'label': jax.random.randint(k2, (batch,), 0, num_classes, jnp.int32),
    }

  return [make(jax.random.PRNGKey(seed * 1000 + i)) for i in range(count)]


def _batch_source(
  config, mesh, image_shape, num_classes: int, num_batches: int
) -> Callable[[int], dict]:
  """step -> global batch on the device, as real training would see it."""
  if config.data_on_device:
    from jax_resnet.data import on_device  # no TensorFlow

    local = parallel.local_batch_size(config.batch_size, mesh)
    n = max(num_batches, 2) * local
    rng = np.random.default_rng(config.seed)
    images = rng.integers(0, 256, (n, *image_shape), dtype=np.uint8)
    labels = rng.integers(0, num_classes, (n,), dtype=np.int32)
    data = on_device.DeviceData(images, labels, mesh, config)
    per_epoch = n // local
    permutation = on_device.epoch_permutation(config.seed, 0, n)
    return lambda step: data.batch(0, step % per_epoch, permutation)
  batches = _synthetic_batches(
    mesh, num_batches, config.batch_size, image_shape, num_classes, config.seed
  )
  return lambda step: batches[step % len(batches)]


def benchmark_step(
  config: ml_collections.ConfigDict,
  steps: int = 20,
  warmup: int = 3,
  num_batches: int = 4,
  num_classes: int | None = None,
  mean: Sequence[float] = None,
  std: Sequence[float] = None,
  image_shape: Sequence[int] = None,
  profile_dir: str | None = None,
  profile_steps: int = 3,
) -> dict:
  """Compiles and times the config's train step on synthetic device data (see FIELDS);
  with ``profile_dir``, then traces ``profile_steps`` more steps there (``top_ops``)."""
  mesh = parallel.create_mesh()
  devices = list(mesh.devices.flat)
  validation.check_divisible(config.batch_size, len(devices), 'batch_size')
  # Unknown data sets get ImageNet's size and classes: the benchmark needs no data.
  num_train, default_classes = KNOWN_SIZES.get(config.dataset, KNOWN_SIZES['imagenet2012'])
  num_classes = num_classes or default_classes
  image_shape = tuple(image_shape or (config.image_size, config.image_size, 3))
  if mean is None or std is None:
    mean, std = imagenet_stats(image_shape[-1])
  mean, std = tuple(mean), tuple(std)
  k = config.steps_per_dispatch
  dispatches = max(1, -(-steps // k))
  warmup_dispatches = max(1, -(-warmup // k))

  timeline = Timeline.from_config(config, max(num_train, config.batch_size))
  learning_rate_fn = optimizers.create_learning_rate_fn(config, timeline)
  model = train_steps.create_model(config, num_classes)
  state = train_steps.create_train_state(
    jax.random.PRNGKey(config.seed), config, model, image_shape, learning_rate_fn, mesh
  )
  batch_at = _batch_source(config, mesh, image_shape, num_classes, num_batches)
  step_options = (config, learning_rate_fn, num_classes, mean, std, mesh)
  single_fn = train_steps.make_train_step(*step_options)
  if k == 1:
    step_fn, args_at = single_fn, batch_at
  else:
    step_fn = train_steps.make_multi_train_step(*step_options)
    args_at = lambda i: [batch_at(i * k + j) for j in range(k)]

  start = time.perf_counter()
  lowered = step_fn.lower(state, args_at(0))
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  single = (lowered, compiled) if k == 1 and not config.remat else None
  flops, flops_source = _step_flops(config, state, single_fn, batch_at(0), single, len(devices))

  for i in range(warmup_dispatches):
    state, metrics = compiled(state, args_at(i))
  jax.block_until_ready(metrics.merge(metrics).compute())  # warms the merge ops too
  state, times = _time_blocking(compiled, state, args_at, warmup_dispatches, dispatches, k)
  state, pipelined_s, loss = _time_pipelined(
    compiled, state, args_at, warmup_dispatches + dispatches, dispatches
  )
  top_ops = None
  if profile_dir:
    first = warmup_dispatches + 2 * dispatches
    state, top_ops = _profile(compiled, state, args_at, first, profile_dir, profile_steps, k)
  del state

  global_batch = config.batch_size
  images_per_s = dispatches * k * global_batch / pipelined_s
  flops_per_image = flops / global_batch if flops else None
  peak = peak_bf16_tflops(devices[0].device_kind)
  mfu = (
    flops_per_image * images_per_s / (peak * 1e12 * len(devices))
    if peak and flops_per_image
    else None
  )
  result = {
    'mode': 'synthetic',
    'device_kind': devices[0].device_kind,
    'platform': devices[0].platform,
    'device_count': len(devices),
    'process_count': jax.process_count(),
    'jax_version': jax.__version__,
    'xla_flags': os.environ.get('XLA_FLAGS', ''),
    'model': config.model,
    'image_size': int(config.image_size),
    'global_batch': int(global_batch),
    'dtype': jnp.dtype(train_steps.compute_dtype(config)).name,
    'remat': config.remat,
    'steps_per_dispatch': k,
    'data_on_device': config.data_on_device,
    'warmup_steps': warmup_dispatches * k,
    'timed_steps': dispatches * k,
    'compile_s': compile_s,
    'step_s_median': statistics.median(times),
    'step_s_p90': float(np.percentile(times, 90)),
    'images_per_s': images_per_s,
    'images_per_s_blocking': global_batch / statistics.median(times),
    'peak_memory_bytes': _peak_memory(devices),
    'temp_memory_bytes': _temp_memory(compiled),
    'flops_per_image': flops_per_image,
    'flops_source': flops_source,
    'dataset': config.dataset,
    'epoch_s': _epoch_s(config.dataset, images_per_s),
    'peak_bf16_tflops_per_device': peak,
    'mfu': mfu,
    'train_loss': loss,
  }
  if top_ops is not None:
    result['profile_dir'] = profile_dir
    result['top_ops'] = top_ops
  _log_step_result(result)
  return result


def _step_flops(config, state, single_fn, batch, single, device_count: int):
  """(FLOPs of one global train step, where they came from).

  From XLA's cost analysis of the compiled (per-device, SPMD partitioned) program, times
  the device count. A scan's body may be counted once, so with several steps per
  dispatch (``single`` None) the single step is compiled for this; with remat, the step
  without it: the recomputed forward is not model work, and MFU counts model FLOPs.
  Falls back to the unpartitioned, unoptimised HLO.
  """
  if single is None:
    if config.remat:
      plain = config.copy_and_resolve_references()
      plain.remat = False
      num_classes = state.params['head']['bias'].shape[0]
      state = state.replace(apply_fn=train_steps.create_model(plain, num_classes).apply)
    lowered = single_fn.lower(state, batch)
    single = (lowered, lowered.compile())
  flops = model_summary.xla_flops(single[1])
  if flops is not None:
    return flops * device_count, 'compiled'
  flops = model_summary.xla_flops(single[0])
  return flops, 'lowered' if flops is not None else 'unavailable'


def _time_blocking(compiled, state, args_at, first: int, dispatches: int, k: int):
  """One dispatch at a time, each waited for: seconds per step of each dispatch."""
  times = []
  for i in range(dispatches):
    args = args_at(first + i)
    start = time.perf_counter()
    state, metrics = compiled(state, args)
    jax.block_until_ready((state, metrics))
    times.append((time.perf_counter() - start) / k)
  return state, times


def _time_pipelined(compiled, state, args_at, first: int, dispatches: int):
  """As the training loop runs: dispatched back to back, metrics merged on the device,
  one sync at the end (includes fetching batches for data_on_device). Returns (state,
  seconds, the mean train loss)."""
  start = time.perf_counter()
  totals = None
  for i in range(dispatches):
    state, metrics = compiled(state, args_at(first + i))
    totals = metrics if totals is None else totals.merge(metrics)
  jax.block_until_ready((state, totals))
  seconds = time.perf_counter() - start
  return state, seconds, float(totals.compute()['train_loss'])


def _profile(compiled, state, args_at, first: int, logdir: str, steps: int, k: int):
  """Traces ``steps`` steps (whole dispatches) into ``logdir``: (state, top-ops rows)."""
  dispatches = max(1, -(-steps // k))
  with profiling.trace(logdir):
    for i in range(dispatches):
      state, metrics = compiled(state, args_at(first + i))
    jax.block_until_ready((state, metrics))
  rows = profiling.top_ops(profiling.latest_xplane(logdir), [compiled.as_text()])
  table = profiling.format_table(rows, dispatches * k)
  with open(os.path.join(logdir, profiling.TOP_OPS_FILE), 'w') as f:
    f.write(table + '\n')
  print(
    f'Top operations over {dispatches * k} step(s), traced into {logdir}:\n{table}', file=sys.stderr
  )
  return state, [
    {
      'op': r.name,
      'ms_per_step': r.total_ms / (dispatches * k),
      'share': r.share,
      'calls_per_step': r.count / (dispatches * k),
      'shapes': r.shapes,
    }
    for r in rows
  ]


def _log_step_result(result: dict) -> None:
  flops, mfu = result['flops_per_image'], result['mfu']
  logging.info(
    '%s %dx%d batch %d %s, %d step(s)/dispatch on %d x %s: %.1f img/s '
    '(median step %.4f s, p90 %.4f s), compile %.1f s, %s GFLOP/image, MFU %s',
    result['model'],
    result['image_size'],
    result['image_size'],
    result['global_batch'],
    result['dtype'],
    result['steps_per_dispatch'],
    result['device_count'],
    result['device_kind'],
    result['images_per_s'],
    result['step_s_median'],
    result['step_s_p90'],
    result['compile_s'],
    f'{flops / 1e9:.3f}' if flops else 'n/a',
    f'{mfu:.1%}' if mfu is not None else 'n/a',
  )


def benchmark_pipeline(
  config: ml_collections.ConfigDict, steps: int = 20, warmup: int = 3, num_batches: int = 4
) -> dict:
  """Input alone, step alone and the whole loop on the config's real data source."""
  from jax_resnet.data import batching, sources  # TensorFlow: only in this mode

  mesh = parallel.create_mesh()
  dataset = sources.load_dataset(config, splits=('train',))
  info = dataset.info
  timeline = Timeline.from_config(config, max(info.num_train, config.batch_size))
  source = 'device_data' if config.data_on_device else 'tf.data'
  make_batches = lambda: batching.global_train_batches(
    dataset, config, mesh, timeline.steps_per_epoch, 0
  )

  # Input alone: batches pulled and copied to the device, no step.
  batches = make_batches()
  for _ in range(warmup):
    jax.block_until_ready(next(batches))
  start = time.perf_counter()
  for _ in range(steps):
    jax.block_until_ready(next(batches))
  input_s = time.perf_counter() - start
  del batches

  # Step alone, on synthetic data of the same shape.
  step = benchmark_step(
    config, steps, warmup, num_batches, info.num_classes, info.mean, info.std, info.image_shape
  )

  # The whole loop: the trainer's single-step loop, one sync at the end.
  learning_rate_fn = optimizers.create_learning_rate_fn(config, timeline)
  model = train_steps.create_model(config, info.num_classes)
  state = train_steps.create_train_state(
    jax.random.PRNGKey(config.seed), config, model, info.image_shape, learning_rate_fn, mesh
  )
  train_fn = train_steps.make_train_step(
    config, learning_rate_fn, info.num_classes, info.mean, info.std, mesh
  )
  batches = make_batches()
  for _ in range(warmup):
    state, _ = train_fn(state, next(batches))
  jax.block_until_ready(state)
  start = time.perf_counter()
  totals = None
  for _ in range(steps):
    state, metrics = train_fn(state, next(batches))
    totals = metrics if totals is None else totals.merge(metrics)
  jax.block_until_ready((state, totals))
  loop_s = time.perf_counter() - start
  del state, totals, batches

  images = steps * config.batch_size
  input_ips, loop_ips = images / input_s, images / loop_s
  result = dict(step)
  result.update(
    {
      'mode': 'pipeline',
      'dataset': config.dataset,
      'input_source': source,
      'input_images_per_s': input_ips,
      'step_images_per_s': step['images_per_s'],
      'loop_images_per_s': loop_ips,
      'images_per_s': loop_ips,
      'epoch_s': _epoch_s(config.dataset, loop_ips),
      'bottleneck': 'input' if input_ips < step['images_per_s'] else 'step',
    }
  )
  logging.info(
    '%s on %s (%s): input %.1f img/s, step %.1f img/s, loop %.1f img/s: bottleneck %s',
    config.model,
    config.dataset,
    source,
    input_ips,
    step['images_per_s'],
    loop_ips,
    result['bottleneck'],
  )
  return result


def run(config: ml_collections.ConfigDict, mode: str = 'synthetic', **kwargs) -> dict:
  if mode == 'pipeline':
    kwargs.pop('num_classes', None)
    return benchmark_pipeline(config, **kwargs)
  return benchmark_step(config, **kwargs)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  kwargs = dict(
    steps=FLAGS.steps,
    warmup=FLAGS.warmup,
    num_batches=FLAGS.num_batches,
    num_classes=FLAGS.num_classes,
  )
  if FLAGS.mode == 'synthetic' and FLAGS.profile:
    kwargs.update(profile_steps=FLAGS.profile_steps)
  elif FLAGS.profile:
    raise app.UsageError('--profile traces the synthetic step: drop --mode=pipeline.')

  def measure(flag, config):
    if FLAGS.profile:  # --compare's trace and table in DIR/compare
      kwargs['profile_dir'] = FLAGS.profile if flag == 'config' else f'{FLAGS.profile}/compare'
    result = run(config, FLAGS.mode, **kwargs)
    result['config_file'] = config_flags.get_config_filename(FLAGS[flag])
    result['overrides'] = {
      k: str(v) for k, v in config_flags.get_override_values(FLAGS[flag]).items()
    }
    gc.collect()
    return result

  result = measure('config', _CONFIG.value)
  if _COMPARE.value is not None:
    other = measure('compare', _COMPARE.value)
    ratio = other['images_per_s'] / result['images_per_s']
    result = {'mode': FLAGS.mode, 'config': result, 'compare': other, 'ratio': ratio}
    logging.info('ratio (--compare images/s over --config images/s): %.3f', ratio)
    print(f'ratio {ratio:.3f}', file=sys.stderr)
  text = json.dumps(result)
  if FLAGS.json_out:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json_out)), exist_ok=True)
    with open(FLAGS.json_out, 'w') as f:
      f.write(text + '\n')
  print(text, flush=True)
