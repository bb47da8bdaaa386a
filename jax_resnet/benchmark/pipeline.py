"""The input pipeline against the step: ``python -m jax_resnet.benchmark --mode=pipeline``.

On the config's real data source, the input pipeline alone, the step alone (synthetic,
as ``synthetic.benchmark_step``) and the whole loop, and which of input and step is the
bottleneck. The one benchmark mode that imports TensorFlow (through ``jax_resnet.data``).
"""

import time

import jax
import ml_collections
from absl import logging

from jax_resnet import parallel
from jax_resnet.benchmark.synthetic import benchmark_step, epoch_s, train_functions
from jax_resnet.configuration.typed_options import from_config
from jax_resnet.data.common import InputOptions
from jax_resnet.training.timeline import Timeline


def benchmark_pipeline(
  config: ml_collections.ConfigDict, steps: int = 20, warmup: int = 3, num_batches: int = 4
) -> dict:
  """Input alone, step alone and the whole loop on the config's real data source."""
  from jax_resnet.data import batching, sources  # TensorFlow: only in this mode

  mesh = parallel.create_mesh()
  dataset = sources.load_dataset(config, splits=('train',))
  info = dataset.info
  timeline = Timeline.from_config(config, max(info.num_train, config.batch_size))
  make_batches = lambda: batching.global_train_batches(
    dataset, from_config(InputOptions, config), mesh, timeline.steps_per_epoch, 0
  )
  input_s = _time_input(make_batches(), steps, warmup)
  # The step alone, on synthetic data of the same shape.
  step = benchmark_step(
    config, steps, warmup, num_batches, info.num_classes, info.mean, info.std, info.image_shape
  )
  state, train_fn, _ = train_functions(
    config, info.num_classes, info.mean, info.std, info.image_shape, mesh
  )
  loop_s = _time_loop(state, train_fn, make_batches(), steps, warmup)
  images = steps * config.batch_size
  return _pipeline_result(config, step, images / input_s, images / loop_s)


def input_cores() -> int:
  """The CPU cores this process may run on (its affinity, as SLURM or taskset set it)."""
  import os

  return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()


def _time_input(batches, steps: int, warmup: int) -> float:
  """Seconds for ``steps`` batches pulled and copied to the device, no step."""
  for _ in range(warmup):
    jax.block_until_ready(next(batches))
  start = time.perf_counter()
  for _ in range(steps):
    jax.block_until_ready(next(batches))
  return time.perf_counter() - start


def _time_loop(state, train_fn, batches, steps: int, warmup: int) -> float:
  """Seconds for ``steps`` of the trainer's single-step loop, one sync at the end."""
  for _ in range(warmup):
    state, _ = train_fn(state, next(batches))
  jax.block_until_ready(state)
  start = time.perf_counter()
  totals = None
  for _ in range(steps):
    state, metrics = train_fn(state, next(batches))
    totals = metrics if totals is None else totals.merge(metrics)
  jax.block_until_ready((state, totals))
  return time.perf_counter() - start


def _pipeline_result(config, step: dict, input_ips: float, loop_ips: float) -> dict:
  """The step's result with the input's and the loop's rates and the bottleneck named."""
  source = 'device_data' if config.data_on_device else 'tf.data'
  result = {
    **step,
    'mode': 'pipeline',
    'dataset': config.dataset,
    'input_source': source,
    'input_images_per_s': input_ips,
    # The cores this process may use: what one GPU's input costs, per core.
    'input_cores': input_cores(),
    'input_images_per_s_per_core': input_ips / input_cores(),
    'step_images_per_s': step['images_per_s'],
    'loop_images_per_s': loop_ips,
    'images_per_s': loop_ips,
    'epoch_s': epoch_s(config.dataset, loop_ips),
    'bottleneck': 'input' if input_ips < step['images_per_s'] else 'step',
  }
  logging.info(
    '%s on %s (%s): input %.1f img/s (%.1f per core), step %.1f img/s, loop %.1f img/s: '
    'bottleneck %s',
    config.model,
    config.dataset,
    source,
    input_ips,
    result['input_images_per_s_per_core'],
    step['images_per_s'],
    loop_ips,
    result['bottleneck'],
  )
  return result
