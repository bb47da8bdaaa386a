"""The training loop: data in, steps run, metrics written, checkpoints kept.

``train_and_evaluate`` prepares the run (``prepare.prepare_run``), then ``_loop`` runs
it: after each dispatch of steps it asks ``Events`` once what this step calls for
(``StepActions``) and runs the handlers for it. It syncs with the device only at log
steps, evaluations and checkpoints; in between, steps and metric accumulation are
dispatched asynchronously.
"""

import contextlib
import math
import os
import typing

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from jax_resnet import parallel
from jax_resnet.configuration import validation
from jax_resnet.configuration.typed_options import from_config
from jax_resnet.data import batching
from jax_resnet.data.common import InputOptions
from jax_resnet.errors import TrainingError
from jax_resnet.inference import export
from jax_resnet.models import model_summary
from jax_resnet.observe import metric_writers, plot, profiling, progress, trackers
from jax_resnet.runs import workdirs
from jax_resnet.training import build, preemption
from jax_resnet.training.dispatch import (
  Events,
  ProgressiveResizing,
  RunAhead,
  StepActions,
  Stepper,
)
from jax_resnet.training.prepare import PreparedRun, prepare_run
from jax_resnet.training.timeline import Every

TIMING_FILE = 'timing.json'  # the latest run's wall time by part (profiling.RunClock)
# The best checkpoint's export that a finished run gives trackers that keep files (MLflow).
TRACKED_EXPORT = os.path.join('export', 'best_model.safetensors')


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  resume_from: str = 'latest',
  start_over: bool = False,
  started_at: float | None = None,
) -> dict:
  """Trains (resuming from workdir's latest checkpoint) and returns final eval metrics,
  or ``{'stopped_at_step': N}`` after a SIGTERM or Ctrl-C.

  ``resume_from='best'`` continues from ``checkpoints_best/`` when every latest
  checkpoint is lost; ``start_over`` moves an earlier run's checkpoints and metrics to
  ``WORKDIR/previous-N/`` and starts at step 0. Without either, a workdir whose
  checkpoints cannot be restored is an error, never a silent restart.

  The run's wall time by part goes to ``WORKDIR/timing.json`` (``started_at``: a
  ``time.perf_counter()`` from the process's start, to count start-up too).
  """
  clock = profiling.RunClock(started_at)
  with preemption.StopRequest() as stop:
    with clock.part('setup'):
      mesh = parallel.create_mesh()
      validation.validate(config, mesh.devices.size)
      workdirs.check_workdir(workdir)
    with _lock(workdir):
      try:
        with clock.part('setup'), stop.starting():
          if start_over and jax.process_index() == 0 and workdirs.has_history(workdir):
            with stop.uninterrupted():
              moved = workdirs.move_history_aside(workdir)
            logging.warning('Starting over: moved the earlier run to %s.', moved)
          run = prepare_run(config, workdir, mesh, resume_from)
      except preemption.StoppedWhileStarting:
        return _stopped_while_starting(stop)
      try:
        return _loop(run, stop, clock)
      finally:
        with clock.part('checkpoint'):
          try:
            run.checkpoints.close()
          except Exception:  # a failed save has been reported already
            pass
        _write_timing(run, clock)


def _write_timing(run: PreparedRun, clock: profiling.RunClock) -> None:
  if jax.process_index() != 0:
    return
  try:
    clock.write(os.path.join(run.workdir, TIMING_FILE), start_step=run.start_step)
  except OSError as e:  # a full disk has been reported already; this is not worth a crash
    logging.warning('Could not write %s: %s', TIMING_FILE, e)


def _lock(workdir: str):
  """The workdir's training lock, held by process 0 for the whole run."""
  return workdirs.lock(workdir) if jax.process_index() == 0 else contextlib.nullcontext()


def _loop(run: PreparedRun, stop: preemption.StopRequest, clock: profiling.RunClock) -> dict:
  if run.start_step >= run.timeline.total_steps:
    return _finished(run)
  if stop.requested(run.start_step, Every((1,))):  # a signal while starting up
    return _stopped_before_start(run, stop)
  parts = _LoopParts.start(run, clock)
  state, step, eval_metrics = run.state, run.start_step, {}
  outcome = 'failed'  # what the trackers are told at the end
  try:
    while step < run.timeline.total_steps:
      state, step = _dispatch(run, parts, state, step, clock)
      actions = parts.events.at(step, stop.requested(step, parts.events.log))
      eval_metrics = _handle(actions, run, parts, state, step, clock) or eval_metrics
      if actions.stop:
        outcome = 'stopped'
        return _stopped(run, stop, step, clock)
    _finish(run, parts, clock, eval_metrics)
    outcome = 'finished'
  except OSError as e:
    raise TrainingError(
      f'Writing to {run.workdir} failed by step {step}: {e}. The earlier '
      f'checkpoints in {run.checkpoints.directory} are intact; free '
      'space or fix permissions, then rerun the same command to resume.'
    ) from e
  finally:
    with clock.part('logging'):
      parts.bar.close()
      parts.writer.flush()
      for tracker in parts.trackers:
        tracker.close(outcome)
  return eval_metrics


class _LoopParts(typing.NamedTuple):
  """What the loop works with, built when it starts: the metric writer (with the
  experiment trackers in it), the batch iterator (positioned at the start step), the
  events, the stepper, the profiler window, the progress bar and the train metrics since
  the last log."""

  writer: object
  trackers: list
  batches: object
  events: Events
  run_steps: Stepper
  profiler: profiling.StepProfiler
  bar: progress.Progress
  totals: '_TrainTotals'
  run_ahead: RunAhead

  @classmethod
  def start(cls, run: PreparedRun, clock: profiling.RunClock) -> '_LoopParts':
    config, timeline, info = run.config, run.timeline, run.dataset.info
    with clock.part('logging'):
      tracking = trackers.start(config, run.workdir)
      writer = metric_writers.create_writer(run.workdir, tracking)
      _log_start(run, writer)
    with clock.part('input_wait'):
      batches = batching.global_train_batches(
        run.dataset,
        from_config(InputOptions, config),
        run.mesh,
        timeline.steps_per_epoch,
        run.start_step,
        timeline.epoch_origin,
      )
    run_steps = Stepper(
      lambda size: build.step_options(config, info.num_classes, info.mean, info.std, size),
      run.learning_rate_fn,
      run.mesh,
      timeline,
      from_config(ProgressiveResizing, config),
      run.teacher,
      lambda: clock.part('compile'),
    )
    profiler = profiling.StepProfiler(
      os.path.join(run.workdir, 'profile'),
      config.profile_first_step,
      config.profile_steps,
      run_steps.hlo_texts,
    )
    bar = progress.Progress(
      timeline.total_steps,
      timeline.steps_per_epoch,
      config.batch_size,
      run.start_step,
      epoch_origin=timeline.epoch_origin,
    )
    events = Events.of(
      timeline,
      config.log_every_steps,
      config.eval_every_epochs,
      config.checkpoint_every_steps,
      config.checkpoint_every_epochs,
    )
    return cls(
      writer, tracking, batches, events, run_steps, profiler, bar, _TrainTotals(), RunAhead()
    )


def _dispatch(run: PreparedRun, parts: _LoopParts, state, step: int, clock):
  """Runs the next dispatch of steps; returns (state, the step reached). Nothing waits
  for the device here."""
  k = parts.events.dispatch_size(step, run.config.steps_per_dispatch)
  with clock.part('input_wait'):
    batches = [next(parts.batches) for _ in range(k)]
  parts.profiler.before(step, state)
  with clock.part('steps'):
    state, step_metrics = parts.run_steps(state, batches, step)
  step += k
  with clock.part('logging'):
    parts.bar.tick(step)
    parts.profiler.after(step, state)
  with clock.part('steps'):  # merged on the device; can wait when the host runs ahead
    parts.totals.add(step_metrics)
    parts.run_ahead.add(step_metrics)
  return state, step


def _handle(actions: StepActions, run: PreparedRun, parts: _LoopParts, state, step, clock):
  """Runs what ``actions`` call for, in order; returns the eval metrics, if evaluated."""
  eval_metrics = None
  if actions.read_metrics:
    with clock.part('steps'):  # waits for the dispatched steps
      scalars = parts.totals.read(step, run.workdir)
    parts.run_ahead.clear()
  if actions.log:
    with clock.part('logging'):
      parts.writer.write_scalars(step, scalars)
      parts.bar.log(step, scalars)
    parts.totals.reset()
  if actions.check_weights:
    with clock.part('steps'):
      parts.totals.check_weights(state, step, run.workdir)  # before anything is kept
  if actions.evaluate:
    with clock.part('eval'):
      eval_metrics = _evaluate(run, state, step, parts.writer, clock)
  if actions.save:
    with clock.part('checkpoint'):
      run.checkpoints.save(step, state, run.meta(step))
  return eval_metrics


class _TrainTotals:
  """The train metrics merged on the device since the last log, and the last finite loss
  (for the divergence error)."""

  def __init__(self):
    self.metrics, self.last_finite = None, None

  def add(self, step_metrics) -> None:
    self.metrics = step_metrics if self.metrics is None else self.metrics.merge(step_metrics)

  def reset(self) -> None:
    self.metrics = None

  def read(self, step: int, workdir: str) -> dict:
    """The metrics as floats (a sync); a non-finite loss stops training."""
    scalars = {k: float(v) for k, v in self.metrics.compute().items()}
    if not math.isfinite(scalars['train_loss']):
      self._diverged(f'the loss is {scalars["train_loss"]}', step, workdir)
    self.last_finite = (step, scalars['train_loss'])
    return scalars

  def check_weights(self, state, step: int, workdir: str) -> None:
    """A finite loss can hide an update that blew up: nothing non-finite is evaluated for
    the best checkpoint or saved."""
    if not bool(_all_finite((state.params, state.batch_stats))):
      self._diverged('the weights are no longer finite', step, workdir)

  def _diverged(self, what: str, step: int, workdir: str):
    last = self.last_finite
    last = f'{last[1]:.4g} at step {last[0]}' if last else 'none yet'
    raise TrainingError(
      f'Training diverged: {what} by step {step} (last finite loss: {last}). '
      'Lower --config.learning_rate or add warm-up (--config.warmup_epochs). The '
      f'checkpoints in {workdir}/checkpoints and checkpoints_best hold only finite states.'
    )


@jax.jit
def _all_finite(tree):
  return jax.tree.reduce(lambda a, b: a & b, jax.tree.map(lambda x: jnp.isfinite(x).all(), tree))


def _evaluate(run: PreparedRun, state, step: int, writer, clock=None, save_best=True) -> dict:
  """Runs every evaluator, writes and logs their metrics, keeps the best checkpoint."""
  metrics = {}
  for evaluator in run.evaluators:
    metrics.update(evaluator(state))
  writer.write_scalars(step, metrics)
  logging.info(
    'step %d eval: %s', step, '  '.join(f'{k} {v:.4f}' for k, v in sorted(metrics.items()))
  )
  if save_best:
    with clock.part('checkpoint') if clock else contextlib.nullcontext():
      run.checkpoints.save_best(step, state, run.meta(step), metrics['eval_top1'])
  return metrics


def _stopped(run: PreparedRun, stop: preemption.StopRequest, step: int, clock) -> dict:
  with clock.part('checkpoint'):
    run.checkpoints.wait()
  logging.warning(
    'Received %s: saved a checkpoint at step %d in %s and stopped. '
    'Rerun the same command to resume.',
    stop.name,
    step,
    run.checkpoints.directory,
  )
  return {'stopped_at_step': step}


def _finish(run: PreparedRun, parts: _LoopParts, clock, eval_metrics: dict) -> None:
  with clock.part('checkpoint'):
    run.checkpoints.wait()
  with clock.part('logging'):
    parts.writer.flush()
    if jax.process_index() == 0:
      curves = plot.save_curves(run.workdir)
      if parts.trackers:
        files = [curves] + ([_tracked_export(run)] if run.config.mlflow_tracking_uri else [])
        for tracker in parts.trackers:
          tracker.finish(eval_metrics, files)


def _tracked_export(run: PreparedRun) -> str | None:
  """The best checkpoint (the latest when none was kept) as a safetensors export in
  WORKDIR/export, for trackers that keep the model with the run; None if it fails."""
  path = os.path.join(run.workdir, TRACKED_EXPORT)
  which = 'best' if run.checkpoints.best_step() is not None else 'latest'
  try:
    return export.export_checkpoint(run.workdir, path, which, 'safetensors')
  except Exception as e:  # the run is trained and saved; its tracker copy is a nicety
    logging.warning('Could not export %s for the trackers: %s', path, e)
    return None


def _stopped_while_starting(stop: preemption.StopRequest) -> dict:
  """A signal during the data scan, the verification or the restore: they are cut short;
  the workdir is as it was (its checkpoints untouched)."""
  logging.warning(
    'Received %s before the first step, while starting: stopped with nothing new to save. '
    'Rerun the same command to start or resume.',
    stop.name,
  )
  return {'stopped_at_step': None}


def _stopped_before_start(run: PreparedRun, stop: preemption.StopRequest) -> dict:
  logging.warning(
    'Received %s before the first step: stopped with nothing new to save. Rerun the same '
    'command to %s.',
    stop.name,
    'resume' if run.start_step else 'start',
  )
  return {'stopped_at_step': run.start_step}


def _finished(run: PreparedRun) -> dict:
  """A rerun of a finished run: says so and reports its last evaluation, adding nothing
  to its history (evaluating only when none was recorded)."""
  logging.info(
    'The run in %s is finished (step %d of %d): nothing to train. Raise --config.num_epochs '
    '(or num_train_steps) to train longer; --mode=eval evaluates a checkpoint again.',
    run.workdir,
    run.start_step,
    run.timeline.total_steps,
  )
  recorded = metric_writers.last_record(run.workdir, 'eval_top1')
  if recorded:
    return {k: v for k, v in recorded.items() if k.startswith('eval_')}
  writer = metric_writers.create_writer(run.workdir)
  metrics = _evaluate(run, run.state, run.start_step, writer, save_best=False)
  writer.flush()
  return metrics


def _log_start(run: PreparedRun, writer) -> None:
  config, info, timeline = run.config, run.dataset.info, run.timeline
  history = os.path.join(run.workdir, metric_writers.METRICS_FILE)
  if run.start_step and jax.process_index() == 0 and not os.path.exists(history):
    logging.warning(
      '%s is missing although the run resumes at step %d: its history restarts here (the '
      'checkpoints are intact).',
      history,
      run.start_step,
    )
  if run.start_step == 0:
    writer.write_hparams(
      {k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))}
    )
  if jax.process_index() == 0:
    plot.write_run_info(
      run.workdir, timeline.steps_per_epoch, model=config.model, dataset=config.dataset
    )
    model = build.model_from_config(config, info.num_classes)
    logging.info(
      '%s',
      model_summary.summarize(model, info.image_shape, flops=False).format(
        f'{config.model} ({info.num_classes} classes, {info.image_shape} images)'
      ),
    )
  logging.info(
    '%s on %s: %d train / %d eval examples, %d steps (%d per epoch), '
    'global batch %d on %s in %d process(es).',
    config.model,
    config.dataset,
    info.num_train,
    info.num_eval,
    timeline.total_steps,
    timeline.steps_per_epoch,
    config.batch_size,
    parallel.describe_devices(list(run.mesh.devices.flat)),
    jax.process_count(),
  )
