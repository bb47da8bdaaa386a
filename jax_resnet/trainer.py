"""The training loop: data in, steps run, metrics written, checkpoints kept.

The loop syncs with the device only at log intervals, evaluations and checkpoints; in
between, steps and metric accumulation are dispatched asynchronously.
"""

import math
import time
from typing import Optional

import jax
import ml_collections
import numpy as np
from absl import logging

from jax_resnet import checkpointing, input_pipeline, models, optim, reporting, sharding
from jax_resnet import train


def check_config(config: ml_collections.ConfigDict) -> None:
  """Rejects bad names and sizes before any data is read or anything compiled."""
  if config.model not in models.MODELS:
    raise ValueError(f'Unknown config.model {config.model!r}. '
                     f'Valid names: {", ".join(models.MODEL_NAMES)}.')
  if config.optimizer not in optim.OPTIMIZERS:
    raise ValueError(f'Unknown config.optimizer {config.optimizer!r}. '
                     f'Valid: {", ".join(optim.OPTIMIZERS)}.')
  if config.schedule not in optim.SCHEDULES:
    raise ValueError(f'Unknown config.schedule {config.schedule!r}. '
                     f'Valid: {", ".join(optim.SCHEDULES)}.')
  input_pipeline.check_dataset_name(config.dataset)
  for field in ('batch_size', 'eval_batch_size', 'image_size', 'num_epochs',
                'log_every_steps'):
    if config[field] <= 0:
      raise ValueError(f'config.{field} must be positive, got {config[field]}.')
  if config.cutout_size < 0 or config.cutout_size > config.image_size:
    raise ValueError(f'config.cutout_size={config.cutout_size} must be between 0 (off) '
                     f'and config.image_size={config.image_size}.')


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


def evaluate(p_eval, state, dataset, config, mesh) -> dict:
  """Top-1/top-5 and loss over the whole eval split, each example counted once."""
  steps = input_pipeline.num_eval_steps(dataset.info, config.eval_batch_size)
  local = sharding.local_batch_size(config.eval_batch_size, mesh, 'eval_batch_size')
  totals = None
  for batch in sharding.prefetch_to_device(
      input_pipeline.eval_batches(dataset, local, steps), mesh):
    step_metrics = p_eval(state, batch)
    totals = step_metrics if totals is None else totals.merge(step_metrics)
  return {k: float(v) for k, v in totals.compute().items()}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from workdir's latest checkpoint) and returns final eval metrics."""
  check_config(config)
  mesh = sharding.create_mesh()
  local_batch = sharding.local_batch_size(config.batch_size, mesh)
  sharding.local_batch_size(config.eval_batch_size, mesh, 'eval_batch_size')

  dataset = input_pipeline.load_dataset(config, workdir)
  info = dataset.info
  steps_per_epoch = info.num_train // config.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f'config.batch_size={config.batch_size} is larger than the '
                     f'{info.num_train} training examples.')
  total_steps = config.num_train_steps if config.num_train_steps > 0 else \
      int(config.num_epochs * steps_per_epoch)

  model = train.create_model_from_config(config, info.num_classes)
  learning_rate_fn = optim.create_learning_rate_fn(config, steps_per_epoch, total_steps)
  state = train.create_train_state(jax.random.PRNGKey(config.seed), config, model,
                                   info.image_shape, learning_rate_fn, mesh)
  manager = checkpointing.create_manager(workdir, config.keep_checkpoints)
  state, meta = checkpointing.restore_latest(manager, state)
  start_step = int(meta['step']) if meta else 0
  if meta:
    logging.info('Resumed from %s/checkpoints at step %d.', workdir, start_step)

  writer = reporting.create_writer(workdir)
  if start_step == 0:
    writer.write_hparams({k: v for k, v in config.items()
                          if isinstance(v, (int, float, str, bool))})
  p_train, p_eval = train.make_steps(config, learning_rate_fn, info.num_classes,
                                     info.mean, info.std, mesh)
  logging.info('%s on %s: %d train / %d eval examples, %d steps (%d per epoch), '
               'global batch %d on %d devices.', config.model, config.dataset,
               info.num_train, info.num_eval, total_steps, steps_per_epoch,
               config.batch_size, mesh.devices.size)

  batches = sharding.prefetch_to_device(
      input_pipeline.train_batches(dataset, config, local_batch, steps_per_epoch,
                                   start_step), mesh)
  eval_every = max(1, int(config.eval_every_epochs * steps_per_epoch))
  train_metrics, eval_metrics = None, {}
  last_log_time, last_log_step = time.time(), start_step
  for step in range(start_step + 1, total_steps + 1):
    state, step_metrics = p_train(state, next(batches))
    train_metrics = step_metrics if train_metrics is None else \
        train_metrics.merge(step_metrics)

    if step % config.log_every_steps == 0 or step == total_steps:
      summary = {k: float(v) for k, v in train_metrics.compute().items()}
      if not math.isfinite(summary['train_loss']):
        raise FloatingPointError(
            f'Loss is {summary["train_loss"]} at step {step}. Lower '
            '--config.learning_rate or enable warm-up; the last epoch checkpoint in '
            f'{workdir}/checkpoints is kept.')
      writer.write_scalars(step, summary)
      now = time.time()
      images_per_sec = (step - last_log_step) * config.batch_size / (now - last_log_time)
      eta = (total_steps - step) * config.batch_size / max(images_per_sec, 1e-9)
      logging.info('step %d/%d  epoch %.2f  loss %.4f  top1 %.4f  lr %.4g  %.0f img/s  '
                   'ETA %s', step, total_steps, step / steps_per_epoch,
                   summary['train_loss'], summary['train_top1'], summary['learning_rate'],
                   images_per_sec, _format_eta(eta))
      train_metrics, last_log_time, last_log_step = None, now, step

    epoch_end = step % steps_per_epoch == 0
    if step % eval_every == 0 or step == total_steps:
      eval_metrics = evaluate(p_eval, state, dataset, config, mesh)
      writer.write_scalars(step, eval_metrics)
      logging.info('step %d eval: loss %.4f  top1 %.4f  top5 %.4f', step,
                   eval_metrics['eval_loss'], eval_metrics['eval_top1'],
                   eval_metrics['eval_top5'])
    if epoch_end or step == total_steps:
      checkpointing.save(manager, step, state,
                         {'step': step, 'epoch': step / steps_per_epoch})

  if not eval_metrics:  # resumed a finished run: report it again
    eval_metrics = evaluate(p_eval, state, dataset, config, mesh)
    writer.write_scalars(total_steps, eval_metrics)
  manager.wait_until_finished()
  manager.close()
  writer.flush()
  return eval_metrics
