"""Evaluation: evaluator objects the training loop runs, and the eval mode.

An ``Evaluator`` computes loss, top-1 and top-5 over one eval split, each example
counted once (batches padded and masked); the loop runs every evaluator in its list,
so a second eval set (or another set of weights) is one more entry.
"""

import os
import time
from collections.abc import Mapping

import jax
from absl import logging

from jax_resnet import parallel
from jax_resnet.data import batching
from jax_resnet.data.sources import Dataset, load_dataset
from jax_resnet.observe import metric_writers
from jax_resnet.runs import saved_run
from jax_resnet.training import build
from jax_resnet.training.step_functions import make_eval_step
from jax_resnet.training.train_state import ema_state

# Fields an evaluation may take from the command line rather than from the checkpoint:
# which data to evaluate on and how to read it. Everything else (model, preprocessing
# statistics, classes) comes from the checkpoint.
EVAL_DATA_FIELDS = frozenset(
  {
    'dataset',
    'data_dir',
    'eval_split',
    'eval_dir',
    'eval_batch_size',
    'eval_crop_fraction',
    'resize_antialias',
    'verify_images',
    'cache',
  }
)


def eval_batch_size(requested: int, mesh) -> int:
  """``config.eval_batch_size`` rounded up to a multiple of the device count (eval batches
  are padded and masked, so every example still counts once), said in one log line."""
  rounded = parallel.round_up_to_devices(requested, mesh.devices.size)
  if rounded != requested:
    logging.info(
      'Evaluating in global batches of %d: config.eval_batch_size=%d rounded up to a '
      'multiple of the %d devices (the padding is masked out).',
      rounded,
      requested,
      mesh.devices.size,
    )
  return rounded


class Evaluator:
  """Loss, top-1 and top-5 of a train state on one data set's eval split."""

  def __init__(self, dataset: Dataset, eval_fn, mesh, global_batch: int, use_ema: bool = False):
    self.dataset = dataset
    self.eval_fn = eval_fn
    self.mesh = mesh
    self.use_ema = use_ema  # the state's EMA weights; metrics named eval_top1_ema, ...
    self.local_batch = parallel.local_batch_size(global_batch, mesh)
    self.num_steps = batching.num_eval_steps(dataset.info, global_batch)

  def __call__(self, state) -> dict[str, float]:
    if self.use_ema:
      state = ema_state(state)
    batches = batching.eval_batches(self.dataset, self.local_batch, self.num_steps)
    totals = None
    for batch in parallel.prefetch_to_device(batches, self.mesh):
      step_metrics = self.eval_fn(state, batch)
      totals = step_metrics if totals is None else totals.merge(step_metrics)
    suffix = '_ema' if self.use_ema else ''
    return {k + suffix: float(v) for k, v in totals.compute().items()}


def evaluate_checkpoint(
  workdir: str, which: str | int = 'best', overrides: Mapping = None, weights: str = 'raw'
) -> dict:
  """Eval mode: a checkpoint's loss, top-1 and top-5 on its eval split, logged and
  appended to ``metrics.jsonl``.

  The model, its classes and normalisation come from the checkpoint; ``overrides``
  (the command line's ``--config.FIELD`` values) may change only the eval data
  (``EVAL_DATA_FIELDS``), e.g. to evaluate on a folder of your own images.
  """
  mesh = parallel.create_mesh()
  run = saved_run.load_run(workdir, which, mesh, weights)
  config = eval_config(run.config, overrides or {})
  dataset = load_dataset(config, workdir, splits=('eval',), class_names=run.info.class_names)
  options = build.step_options(config, run.info.num_classes, run.info.mean, run.info.std)
  eval_fn = make_eval_step(options, mesh)
  batch = eval_batch_size(config.eval_batch_size, mesh)
  metrics = Evaluator(dataset, eval_fn, mesh, batch)(run.state)
  record = {
    'time': time.strftime('%Y-%m-%d %H:%M:%S'),
    'checkpoint': which,
    'step': run.step,
    'weights': weights,
    'data': {k: config[k] for k in sorted(EVAL_DATA_FIELDS) if k != 'eval_batch_size'},
    **metrics,
  }
  path = os.path.join(workdir, metric_writers.EVALS_FILE)
  if jax.process_index() == 0 and os.access(workdir, os.W_OK):
    # Apart from metrics.jsonl: an eval of an older checkpoint or of other data changes
    # neither the run's final evaluation, nor its curves, nor its best checkpoint.
    metric_writers.append_record(path, record)
  elif jax.process_index() == 0:  # a finished run on a read-only mount: report only
    logging.warning('%s is read-only: the result is not kept in %s.', workdir, path)
  logging.info('Evaluated the %s checkpoint (step %d): %s', which, run.step, metrics)
  return {**metrics, 'step': run.step}


def eval_config(saved, overrides: Mapping):
  """The checkpoint's config with the command line's eval-data fields applied."""
  config = saved.copy_and_resolve_references()
  ignored = sorted(set(overrides) - EVAL_DATA_FIELDS)
  if ignored:
    logging.info(
      "Using the checkpoint's own config; ignoring the overrides of %s (evaluation takes "
      'only %s from the command line).',
      ', '.join(ignored),
      ', '.join(sorted(EVAL_DATA_FIELDS)),
    )
  for field in set(overrides) & EVAL_DATA_FIELDS:
    config[field] = overrides[field]
  return config
