"""Train-step throughput: the real jitted step on synthetic data already on the device.

``benchmark_step`` (``python -m jax_resnet.benchmark``'s default mode) builds the model,
optimizer and schedule from the config, makes uint8 images and labels on the device (a
rotating set of ``--num_batches`` batches, so no step reads the same buffer twice in a
row; with ``config.data_on_device`` a synthetic data set on the device, cropped and
flipped there each step as in real training) and runs the real train step (normalisation,
Cutout, bf16 compute, donated state; ``config.steps_per_dispatch`` steps per call).
It prints one JSON object (see ``FIELDS``).

``--profile=DIR`` then traces a few more steps into DIR (TensorBoard's profile plugin,
xprof, or Perfetto opens it; see ``jax_resnet.observe.profiling``), prints a table of the top
operations by device time with their shapes to stderr, writes it to DIR/top_ops.txt and
adds it to the JSON as ``top_ops``.

Without TensorFlow installed this runs: it imports only jax, flax, optax, numpy, absl,
ml_collections and the core modules (clu's ``metrics`` module, through the step
functions; clu itself does not need TensorFlow).
"""

import functools
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from jax_resnet import parallel
from jax_resnet.configuration.typed_options import from_config
from jax_resnet.data.common import KNOWN_SIZES, InputOptions, imagenet_stats
from jax_resnet.models import model_summary
from jax_resnet.observe import profiling
from jax_resnet.training import build
from jax_resnet.training.step_functions import make_train_step
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


def epoch_s(dataset: str, images_per_s: float) -> float | None:
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
    data = on_device.DeviceData(images, labels, mesh, from_config(InputOptions, config))
    per_epoch = n // local
    permutation = on_device.epoch_permutation(config.seed, 0, n)
    return lambda step: data.batch(0, step % per_epoch, permutation)
  batches = _synthetic_batches(
    mesh, num_batches, config.batch_size, image_shape, num_classes, config.seed
  )
  return lambda step: batches[step % len(batches)]


def _known_size(dataset: str) -> tuple[int, int]:
  """(training examples, classes) of a known data set, else ImageNet's."""
  return KNOWN_SIZES.get(dataset, KNOWN_SIZES['imagenet2012'])


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
  parallel.check_divisible(config.batch_size, mesh.devices.size, 'batch_size')
  # Unknown data sets get ImageNet's size and classes: the benchmark needs no data.
  num_classes = num_classes or _known_size(config.dataset)[1]
  image_shape = tuple(image_shape or (config.image_size, config.image_size, 3))
  if mean is None or std is None:
    mean, std = imagenet_stats(image_shape[-1])
  k = config.steps_per_dispatch
  dispatches, warmup_dispatches = max(1, -(-steps // k)), max(1, -(-warmup // k))
  state, single_fn, step_fn = train_functions(config, num_classes, mean, std, image_shape, mesh)
  batch_at = _batch_source(config, mesh, image_shape, num_classes, num_batches)
  args_at = batch_at if k == 1 else (lambda i: [batch_at(i * k + j) for j in range(k)])

  start = time.perf_counter()
  lowered = step_fn.lower(state, args_at(0))
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  single = (lowered, compiled) if k == 1 and not config.remat else None
  flops, flops_source = _step_flops(config, state, single_fn, batch_at(0), single, mesh)

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
  timing = dict(
    compile_s=compile_s,
    times=times,
    pipelined_s=pipelined_s,
    loss=loss,
    flops=flops,
    flops_source=flops_source,
    warmup_steps=warmup_dispatches * k,
    timed_steps=dispatches * k,
  )
  result = _step_result(config, mesh, compiled, **timing)
  if top_ops is not None:
    result['profile_dir'] = profile_dir
    result['top_ops'] = top_ops
  _log_step_result(result)
  return result


def train_functions(config, num_classes: int, mean, std, image_shape, mesh):
  """(initial state, jitted single step, jitted step of ``config.steps_per_dispatch``
  steps) for the config, as the trainer builds them."""
  timeline = Timeline.from_config(config, max(_known_size(config.dataset)[0], config.batch_size))
  model = build.model_from_config(config, num_classes, mesh.devices.size)
  state, learning_rate_fn = build.train_state_from_config(
    config, model, image_shape, timeline, mesh
  )
  options = build.step_options(config, num_classes, mean, std)
  single_fn = make_train_step(options, learning_rate_fn, mesh)
  k = config.steps_per_dispatch
  step_fn = (
    single_fn if k == 1 else make_train_step(options, learning_rate_fn, mesh, steps_per_dispatch=k)
  )
  return state, single_fn, step_fn


def _step_result(
  config,
  mesh,
  compiled,
  *,
  compile_s,
  times,
  pipelined_s,
  loss,
  flops,
  flops_source,
  warmup_steps,
  timed_steps,
) -> dict:
  """The FIELDS of one synthetic measurement."""
  devices = list(mesh.devices.flat)
  global_batch = config.batch_size
  images_per_s = timed_steps * global_batch / pipelined_s
  flops_per_image = flops / global_batch if flops else None
  peak = peak_bf16_tflops(devices[0].device_kind)
  mfu = None
  if peak and flops_per_image:
    mfu = flops_per_image * images_per_s / (peak * 1e12 * len(devices))
  return {
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
    'dtype': jnp.dtype(build.compute_dtype(config)).name,
    'remat': config.remat,
    'steps_per_dispatch': config.steps_per_dispatch,
    'data_on_device': config.data_on_device,
    'warmup_steps': warmup_steps,
    'timed_steps': timed_steps,
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
    'epoch_s': epoch_s(config.dataset, images_per_s),
    'peak_bf16_tflops_per_device': peak,
    'mfu': mfu,
    'train_loss': loss,
  }


def _step_flops(config, state, single_fn, batch, single, mesh):
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
      state = state.replace(apply_fn=build.model_from_config(plain, num_classes).apply)
    lowered = single_fn.lower(state, batch)
    single = (lowered, lowered.compile())
  flops = model_summary.xla_flops(single[1])
  if flops is not None:
    return flops * mesh.devices.size, 'compiled'
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
