"""The training loop: data in, steps run, metrics written, checkpoints kept.

The loop syncs with the device only at log intervals, evaluations and checkpoints; in
between, steps and metric accumulation are dispatched asynchronously.
"""

import json
import math
import os
import signal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from jax_resnet import (
  checkpointing,
  device_data,
  input_pipeline,
  models,
  optim,
  plot,
  progress,
  reporting,
  sharding,
  summary,
  train,
)

# Fields a resumed run may change: they touch neither the state nor what it means.
SAFE_TO_CHANGE = frozenset(
  {
    'num_epochs',
    'num_train_steps',
    'log_every_steps',
    'eval_every_epochs',
    'checkpoint_every_steps',
    'keep_checkpoints',
    'eval_batch_size',
    'data_dir',
    'deterministic_input',
    'train_dir',
    'eval_dir',
    'eval_split',
    'shuffle_buffer',
    'steps_per_dispatch',
    'data_on_device',
    'cache',
    'remat',
  }
)


class TrainingError(RuntimeError):
  """A failure the user can act on; main.py prints it without a traceback."""


def check_config(config: ml_collections.ConfigDict) -> None:
  """Rejects bad names, sizes and schedule shapes before any data is read or compiled."""

  def fail(field, message):
    raise ValueError(f'config.{field}={config.get(field)!r}: {message}')

  if config.model not in models.MODELS:
    fail('model', f'unknown model. Valid names: {", ".join(models.MODEL_NAMES)}.')
  if config.optimizer not in optim.OPTIMIZERS:
    fail('optimizer', f'unknown optimizer. Valid: {", ".join(optim.OPTIMIZERS)}.')
  if config.get('half_precision_dtype', 'bfloat16') not in train.HALF_PRECISION_DTYPES:
    fail('half_precision_dtype', f'Valid: {", ".join(train.HALF_PRECISION_DTYPES)}.')
  if config.schedule not in optim.SCHEDULES:
    fail('schedule', f'unknown schedule. Valid: {", ".join(optim.SCHEDULES)}.')
  input_pipeline.check_dataset_name(config.dataset)
  for field in (
    'batch_size',
    'eval_batch_size',
    'image_size',
    'num_epochs',
    'log_every_steps',
    'learning_rate',
    'keep_checkpoints',
    'steps_per_dispatch',
  ):
    if not config[field] > 0:
      fail(field, 'must be positive.')
  for field in (
    'checkpoint_every_steps',
    'random_crop_pad',
    'label_smoothing',
    'weight_decay',
    'dropout_rate',
    'eval_every_epochs',
  ):
    if config.get(field, 0) < 0:
      fail(field, 'must be zero or positive.')
  if not 0 <= config.dropout_rate < 1:
    fail('dropout_rate', 'must be in [0, 1).')
  if not 0 <= config.label_smoothing < 1:
    fail('label_smoothing', 'must be in [0, 1).')
  min_size = models.min_image_size(config.model, **dict(config.get('model_options') or {}))
  if config.image_size < min_size:
    fail(
      'image_size',
      f'is too small for {config.model}: its downsamplings need at least '
      f'{min_size}x{min_size} images; use --config.image_size={min_size} or more.',
    )
  if config.cutout_size < 0 or config.cutout_size > config.image_size:
    fail('cutout_size', f'must be between 0 (off) and config.image_size={config.image_size}.')
  if config.schedule == 'onecycle':
    if not 0 < config.onecycle_pct_start < 1:
      fail('onecycle_pct_start', 'must be in (0, 1): the fraction of training spent warming up.')
    for field in ('onecycle_div_factor', 'onecycle_final_div_factor'):
      if not config[field] > 0:
        fail(field, 'must be positive.')
  if config.warmup_epochs < 0 or (
    config.schedule != 'onecycle' and config.warmup_epochs >= config.num_epochs
  ):
    fail('warmup_epochs', f'must be in [0, num_epochs={config.num_epochs}).')
  if config.schedule == 'multistep':
    at = list(config.decay_at)
    if not all(0 < a < 1 for a in at) or at != sorted(at):
      fail('decay_at', 'must be increasing fractions of training in (0, 1).')
  if not 0 <= config.final_learning_rate_fraction <= 1:
    fail('final_learning_rate_fraction', 'must be in [0, 1].')


def check_compatible(saved: dict, config: ml_collections.ConfigDict) -> None:
  """Refuses to resume under a config that changes the model or optimizer."""
  current = json.loads(config.to_json_best_effort())
  # Fields only one side knows (added or retired by a newer version) are not compared.
  differing = sorted(
    k for k in set(saved) & set(current) if k not in SAFE_TO_CHANGE and saved[k] != current[k]
  )
  if differing:
    details = '; '.join(
      f'{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}' for k in differing
    )
    raise TrainingError(
      f'The checkpoint was written with a different config ({details}). These fields '
      'change the model, optimizer or data and cannot change on resume; use a new '
      f'--workdir, or restore them. Safe to change: {", ".join(sorted(SAFE_TO_CHANGE))}.'
    )


def check_workdir(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, '.write_test')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise TrainingError(
      f'Cannot write to --workdir={workdir}: {e}. Choose a writable directory.'
    ) from None


class _Setup:
  """What training, evaluation and export share: mesh, data, model, state, steps."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    check_config(config)
    check_workdir(workdir)
    self.config = config
    self.mesh = sharding.create_mesh()
    self.local_batch = sharding.local_batch_size(config.batch_size, self.mesh)
    self.local_eval_batch = sharding.local_batch_size(
      config.eval_batch_size, self.mesh, 'eval_batch_size'
    )
    self.dataset = input_pipeline.load_dataset(config, workdir)
    info = self.dataset.info
    self.steps_per_epoch = info.num_train // config.batch_size
    if self.steps_per_epoch == 0:
      raise ValueError(
        f'config.batch_size={config.batch_size} is larger than the '
        f'{info.num_train} training examples.'
      )
    self.total_steps = (
      config.num_train_steps
      if config.num_train_steps > 0
      else int(config.num_epochs * self.steps_per_epoch)
    )
    self.model = train.create_model_from_config(config, info.num_classes)
    self.learning_rate_fn = optim.create_learning_rate_fn(
      config, self.steps_per_epoch, self.total_steps
    )
    self.state = train.create_train_state(
      jax.random.PRNGKey(config.seed),
      config,
      self.model,
      info.image_shape,
      self.learning_rate_fn,
      self.mesh,
    )
    self.p_train, self.p_eval = train.make_steps(
      config, self.learning_rate_fn, info.num_classes, info.mean, info.std, self.mesh
    )
    self.checkpoints = checkpointing.Checkpoints(workdir, config.keep_checkpoints)

  def evaluate(self, state) -> dict:
    """Top-1/top-5 and loss over the whole eval split, each example counted once."""
    steps = input_pipeline.num_eval_steps(self.dataset.info, self.config.eval_batch_size)
    totals = None
    for batch in sharding.prefetch_to_device(
      input_pipeline.eval_batches(self.dataset, self.local_eval_batch, steps), self.mesh
    ):
      step_metrics = self.p_eval(state, batch)
      totals = step_metrics if totals is None else totals.merge(step_metrics)
    return {k: float(v) for k, v in totals.compute().items()}

  def meta(self, step: int) -> dict:
    epoch, batch_in_epoch = divmod(step, self.steps_per_epoch)
    return {
      'step': step,
      'epoch': epoch,
      'batch_in_epoch': batch_in_epoch,
      'shuffle_seed': self.config.seed * 1_000_003 + epoch,
      'config': json.loads(self.config.to_json_best_effort()),
    }

  def restore(self, which: str | int):
    state, meta = self.checkpoints.restore(self.state, which)
    if meta is None:
      raise TrainingError(
        f'No {which} checkpoint in {self.checkpoints.directory}: train first with --mode=train.'
      )
    return state, meta


class _StopRequest:
  """Remembers a SIGTERM/SIGINT so the loop can checkpoint and exit between steps."""

  def __init__(self):
    self.signum = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    self.signum = signum

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def requested(self, step: int, every: int) -> bool:
    """Whether to stop; across processes only at log steps, so all agree on one step."""
    if jax.process_count() == 1:
      return self.signum is not None
    if step % every:
      return False
    flags = multihost_utils.process_allgather(np.array(self.signum is not None))
    return bool(np.any(flags))


def dispatch_size(step: int, steps_per_dispatch: int, total_steps: int, periods) -> int:
  """How many steps the next dispatch runs: at most ``steps_per_dispatch``, ending no
  later than the next multiple of any period (log, eval, checkpoint, epoch) or the end."""
  return min([steps_per_dispatch, total_steps - step] + [p - step % p for p in periods])


def _compile_and_report_flops(p_train, state, batch, batch_size: int):
  """Compiles the train step ahead of time, logging XLA's FLOPs per training image."""
  compiled = p_train.lower(state, batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  if cost and cost.get('flops'):
    logging.info(
      'Training FLOPs per image: %.3f G (XLA cost analysis of the train step).',
      cost['flops'] / batch_size / 1e9,
    )
  return compiled


@jax.jit
def _all_finite(tree):
  return jax.tree.reduce(lambda a, b: a & b, jax.tree.map(lambda x: jnp.isfinite(x).all(), tree))


def _check_finite(scalars: dict, step: int, last_finite, workdir: str):
  loss = scalars['train_loss']
  if not math.isfinite(loss):
    last = f'{last_finite[1]:.4f} at step {last_finite[0]}' if last_finite else 'none yet'
    raise TrainingError(
      f'Training diverged: the loss is {loss} by step {step} (last finite loss: {last}). '
      'Lower --config.learning_rate or add warm-up (--config.warmup_epochs). The '
      f'checkpoints in {workdir}/checkpoints hold only finite states.'
    )


def _train_batches(setup: _Setup, start_step: int):
  """Global train batches: made on the device for small in-memory sets when asked."""
  config = setup.config
  if config.data_on_device:
    images, labels = input_pipeline.train_arrays(setup.dataset)
    if setup.dataset.replicated_train:  # device_data wants this process's share
      share = slice(jax.process_index(), None, jax.process_count())
      images, labels = images[share], labels[share]
    return device_data.device_batches(
      images, labels, setup.mesh, config, setup.steps_per_epoch, start_step
    )
  return sharding.prefetch_to_device(
    input_pipeline.train_batches(
      setup.dataset, config, setup.local_batch, setup.steps_per_epoch, start_step
    ),
    setup.mesh,
  )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from workdir's latest checkpoint) and returns final eval metrics."""
  setup = _Setup(config, workdir)
  info, steps_per_epoch, total_steps = setup.dataset.info, setup.steps_per_epoch, setup.total_steps
  state, meta = setup.checkpoints.restore(
    setup.state, 'latest', check=lambda m: check_compatible(m['config'], config)
  )
  start_step = int(meta['step']) if meta else 0
  if meta:
    logging.info(
      'Resumed from %s at step %d (epoch %d, batch %d).',
      setup.checkpoints.directory,
      start_step,
      meta['epoch'],
      meta['batch_in_epoch'],
    )

  writer = reporting.create_writer(workdir)
  if start_step == 0:
    writer.write_hparams(
      {k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))}
    )
  if jax.process_index() == 0:
    plot.write_run_info(workdir, steps_per_epoch, model=config.model, dataset=config.dataset)
    logging.info(
      '%s',
      summary.summarize(setup.model, info.image_shape, flops=False).format(
        f'{config.model} ({info.num_classes} classes, {info.image_shape} images)'
      ),
    )
  logging.info(
    '%s on %s: %d train / %d eval examples, %d steps (%d per epoch), '
    'global batch %d on %d devices in %d process(es).',
    config.model,
    config.dataset,
    info.num_train,
    info.num_eval,
    total_steps,
    steps_per_epoch,
    config.batch_size,
    setup.mesh.devices.size,
    jax.process_count(),
  )

  batches = _train_batches(setup, start_step)
  # eval_every_epochs=0: evaluate at the end only.
  eval_every = (
    max(1, int(config.eval_every_epochs * steps_per_epoch))
    if config.eval_every_epochs > 0
    else total_steps
  )
  checkpoint_every = config.checkpoint_every_steps or steps_per_epoch
  train_metrics, eval_metrics, last_finite = None, {}, None
  p_train, p_multi = setup.p_train, None
  # Steps at which the loop must look at the state: a multi-step dispatch ends there.
  periods = (config.log_every_steps, eval_every, checkpoint_every, steps_per_epoch)
  bar = progress.Progress(total_steps, steps_per_epoch, config.batch_size, start_step)
  step = start_step
  try:
    with _StopRequest() as stop:
      while step < total_steps:
        k = dispatch_size(step, config.steps_per_dispatch, total_steps, periods)
        if k == 1:
          batch = next(batches)
          if p_train is setup.p_train:
            p_train = _compile_and_report_flops(p_train, state, batch, config.batch_size)
          state, step_metrics = p_train(state, batch)
        else:
          p_multi = p_multi or train.make_multi_train_step(
            config, setup.learning_rate_fn, info.num_classes, info.mean, info.std, setup.mesh
          )
          state, step_metrics = p_multi(state, [next(batches) for _ in range(k)])
        step += k
        bar.tick(step)
        train_metrics = step_metrics if train_metrics is None else train_metrics.merge(step_metrics)
        is_last = step == total_steps
        save = is_last or step % checkpoint_every == 0 or step % steps_per_epoch == 0
        stopping = stop.requested(step, config.log_every_steps)

        if step % config.log_every_steps == 0 or is_last or save or stopping:
          scalars = {k: float(v) for k, v in train_metrics.compute().items()}
          _check_finite(scalars, step, last_finite, workdir)
          last_finite = (step, scalars['train_loss'])
        if step % config.log_every_steps == 0 or is_last:
          writer.write_scalars(step, scalars)
          bar.log(step, scalars)
          train_metrics = None

        if step % eval_every == 0 or is_last:
          eval_metrics = setup.evaluate(state)
          writer.write_scalars(step, eval_metrics)
          logging.info(
            'step %d eval: loss %.4f  top1 %.4f  top5 %.4f',
            step,
            eval_metrics['eval_loss'],
            eval_metrics['eval_top1'],
            eval_metrics['eval_top5'],
          )
          setup.checkpoints.save_best(step, state, setup.meta(step), eval_metrics['eval_top1'])
        if save or stopping:
          if not bool(_all_finite((state.params, state.batch_stats))):  # the update blew up
            _check_finite({'train_loss': float('nan')}, step, last_finite, workdir)
          setup.checkpoints.save(step, state, setup.meta(step))
        if stopping and not is_last:
          setup.checkpoints.wait()
          name = signal.Signals(stop.signum).name if stop.signum else 'a stop signal'
          logging.warning(
            'Received %s: saved a checkpoint at step %d in %s and stopped. '
            'Rerun the same command to resume.',
            name,
            step,
            setup.checkpoints.directory,
          )
          return {'stopped_at_step': step}
    if not eval_metrics:  # resumed a finished run: report it again
      eval_metrics = setup.evaluate(state)
      writer.write_scalars(total_steps, eval_metrics)
    setup.checkpoints.wait()
    writer.flush()
    if jax.process_index() == 0:
      plot.save_curves(workdir)
  except OSError as e:
    raise TrainingError(
      f'Writing to {workdir} failed by step {step}: {e}. The earlier '
      f'checkpoints in {setup.checkpoints.directory} are intact; free '
      'space or fix permissions, then rerun the same command to resume.'
    ) from e
  finally:
    bar.close()
    writer.flush()
    try:
      setup.checkpoints.close()
    except Exception:  # a failed save has been reported already
      pass
  return eval_metrics


def evaluate_checkpoint(
  config: ml_collections.ConfigDict, workdir: str, which: str | int = 'best'
) -> dict:
  """Eval-only: restores a checkpoint and reports (and logs) loss, top-1, top-5."""
  setup = _Setup(config, workdir)
  if which == 'best' and setup.checkpoints.best.best_step() is None:
    which = 'latest'
  state, meta = setup.restore(which)
  metrics = setup.evaluate(state)
  writer = reporting.create_writer(workdir)
  writer.write_scalars(int(meta['step']), metrics)
  writer.flush()
  logging.info('Evaluated the %s checkpoint (step %d): %s', which, meta['step'], metrics)
  setup.checkpoints.close()
  return {**metrics, 'step': int(meta['step'])}


def export_checkpoint(
  config: ml_collections.ConfigDict, workdir: str, path: str, which: str | int = 'latest'
) -> str:
  """Writes a checkpoint's params and batch statistics to one msgpack file."""
  setup = _Setup(config, workdir)
  state, meta = setup.restore(which)
  if jax.process_index() == 0:
    checkpointing.export_variables(state, path)
  setup.checkpoints.close()
  logging.info('Exported step %d to %s.', meta['step'], path)
  return path
