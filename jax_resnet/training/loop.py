"""The training loop: data in, steps run, metrics written, checkpoints kept.

``train_and_evaluate`` builds the run (``_build``: data, model, state resumed from the
workdir's newest checkpoint, jitted steps, evaluators), then ``_loop`` runs it. The loop
syncs with the device only at log steps, evaluations and checkpoints; in between,
steps and metric accumulation are dispatched asynchronously. Every "every N steps or
epochs" decision is a ``timeline.Every``.
"""

import contextlib
import dataclasses
import json
import math
import os
import typing

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from jax_resnet import parallel
from jax_resnet.configuration import validation
from jax_resnet.data import batching
from jax_resnet.data.common import shuffle_seed
from jax_resnet.data.sources import Dataset, load_dataset
from jax_resnet.errors import TrainingError
from jax_resnet.models import model_summary
from jax_resnet.observe import metric_writers, plot, profiling, progress
from jax_resnet.runs import workdirs as workdir_lib
from jax_resnet.runs.checkpointing import Checkpoints
from jax_resnet.training import optimizers, preemption, step_functions, warm_start
from jax_resnet.training.evaluation import Evaluator
from jax_resnet.training.timeline import Every, Timeline

TIMING_FILE = 'timing.json'  # the latest run's wall time by part (profiling.RunClock)


@dataclasses.dataclass
class _Run:
  """Everything the loop needs, built once."""

  config: ml_collections.ConfigDict
  workdir: str
  mesh: jax.sharding.Mesh
  dataset: Dataset
  timeline: Timeline
  learning_rate_fn: optax.Schedule
  state: step_functions.TrainState
  start_step: int
  checkpoints: Checkpoints
  evaluators: list
  teacher: step_functions.Teacher | None = None


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
      workdir_lib.ensure_writable(workdir)
    with _lock(workdir):
      with clock.part('setup'):
        if start_over and jax.process_index() == 0 and workdir_lib.has_history(workdir):
          logging.warning(
            'Starting over: moved the earlier run to %s.',
            workdir_lib.move_history_aside(workdir),
          )
        run = _build(config, workdir, mesh, resume_from)
      try:
        return _loop(run, stop, clock)
      finally:
        with clock.part('checkpoint'):
          try:
            run.checkpoints.close()
          except Exception:  # a failed save has been reported already
            pass
        _write_timing(run, clock)


def _write_timing(run: '_Run', clock: profiling.RunClock) -> None:
  if jax.process_index() != 0:
    return
  try:
    clock.write(os.path.join(run.workdir, TIMING_FILE), start_step=run.start_step)
  except OSError as e:  # a full disk has been reported already; this is not worth a crash
    logging.warning('Could not write %s: %s', TIMING_FILE, e)


def _lock(workdir: str):
  """The workdir's training lock, held by process 0 for the whole run."""
  return workdir_lib.lock(workdir) if jax.process_index() == 0 else contextlib.nullcontext()


def _build(config: ml_collections.ConfigDict, workdir: str, mesh, resume_from: str) -> _Run:
  dataset = load_dataset(config, workdir)
  info = dataset.info
  timeline = Timeline.from_config(config, info.num_train)
  model = step_functions.create_model(config, info.num_classes)
  learning_rate_fn = optimizers.create_learning_rate_fn(config, timeline)
  state = step_functions.create_train_state(
    jax.random.PRNGKey(config.seed), config, model, info.image_shape, learning_rate_fn, mesh
  )
  checkpoints = Checkpoints(workdir, config.keep_checkpoints)
  state, start_step = _resume(checkpoints, config, state, resume_from)
  if start_step == 0 and config.init_from:
    source = warm_start.load_source(config.init_from, config.model)
    state = warm_start.apply(state, source, info.class_names)
  eval_fn = step_functions.make_eval_step(config, info.num_classes, info.mean, info.std, mesh)
  evaluators = [Evaluator(dataset, eval_fn, mesh, config.eval_batch_size)]
  if config.ema_decay:  # the averaged weights, beside the raw ones: eval_top1_ema, ...
    evaluators.append(Evaluator(dataset, eval_fn, mesh, config.eval_batch_size, use_ema=True))
  teacher = None
  if config.distill_from:
    teacher = warm_start.load_teacher(config, info.num_classes)
  return _Run(
    config,
    workdir,
    mesh,
    dataset,
    timeline,
    learning_rate_fn,
    state,
    start_step,
    checkpoints,
    evaluators,
    teacher,
  )


def _resume(checkpoints: Checkpoints, config, state, resume_from: str):
  """(state, step) to start from: the newest restorable checkpoint (or the best one,
  when asked), else step 0 in a workdir that never held a checkpoint."""

  def resumable(meta):
    validation.check_resumable(meta['config'], config)
    return state

  if resume_from == 'best' and checkpoints.latest.all_steps():
    raise TrainingError(
      f'{checkpoints.directory} still holds checkpoints (steps '
      f'{sorted(checkpoints.latest.all_steps())}): rerun without --resume_from=best to '
      'resume from the newest; --resume_from=best is for a run whose latest checkpoints '
      'are lost.'
    )
  restored, meta = checkpoints.restore(resume_from, resumable)
  if meta is None:
    if resume_from == 'best':
      raise TrainingError(f'No best checkpoint to resume from in {checkpoints.best_directory}.')
    if checkpoints.set_aside() or checkpoints.best_step() is not None:
      raise TrainingError(_nothing_restorable(checkpoints, resumable))
    return state, 0
  start_step = int(meta['step'])
  logging.info(
    'Resumed from %s at step %d (epoch %d, batch %d).',
    checkpoints.best_directory if resume_from == 'best' else checkpoints.directory,
    start_step,
    meta['epoch'],
    meta['batch_in_epoch'],
  )
  return restored, start_step


def _nothing_restorable(checkpoints: Checkpoints, resumable) -> str:
  """The error for a workdir that had checkpoints of which none restores."""
  moved = ', '.join(os.path.basename(p) for p in checkpoints.set_aside()) or 'none'
  try:
    _, meta = checkpoints.restore('best', resumable)
  except Exception:  # a damaged best checkpoint
    meta = None
  if meta:
    best = (
      f'The best checkpoint (step {meta["step"]}) in {checkpoints.best_directory} is intact: '
      'rerun with --resume_from=best to continue training from it. '
    )
  else:
    best = f'There is no intact best checkpoint in {checkpoints.best_directory}. '
  return (
    f'No checkpoint in {checkpoints.directory} can be restored; the damaged ones were '
    f'renamed, not deleted ({moved}). {best}To start over from step 0 instead, rerun with '
    '--start_over: the earlier checkpoints, metrics and curves move to WORKDIR/previous-N/.'
  )


def _meta(run: _Run, step: int) -> dict:
  """What a checkpoint records beside the state: where the input stands, the config and
  the data description (so eval, export and predict need neither flags nor data)."""
  epoch, batch_in_epoch = run.timeline.epoch_and_batch(step)
  return {
    'step': step,
    'epoch': epoch,
    'batch_in_epoch': batch_in_epoch,
    'shuffle_seed': shuffle_seed(run.config.seed, epoch),
    'config': json.loads(run.config.to_json_best_effort()),
    'data': run.dataset.info.to_json(),
  }


def _log_start(run: _Run, writer) -> None:
  config, info, timeline = run.config, run.dataset.info, run.timeline
  if run.start_step == 0:
    writer.write_hparams(
      {k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))}
    )
  if jax.process_index() == 0:
    plot.write_run_info(
      run.workdir, timeline.steps_per_epoch, model=config.model, dataset=config.dataset
    )
    model = step_functions.create_model(config, info.num_classes)
    logging.info(
      '%s',
      model_summary.summarize(model, info.image_shape, flops=False).format(
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
    timeline.total_steps,
    timeline.steps_per_epoch,
    config.batch_size,
    run.mesh.devices.size,
    jax.process_count(),
  )


def _loop(run: _Run, stop: preemption.StopRequest, clock: profiling.RunClock) -> dict:
  config, timeline, state = run.config, run.timeline, run.state
  if run.start_step >= timeline.total_steps:
    return _finished(run)
  if stop.requested(run.start_step, Every((1,))):  # a signal while starting up
    return _stopped_before_start(run, stop)
  writer, batches, events, run_steps, profiler, bar = _LoopParts.start(run, clock)
  train_metrics, eval_metrics, last_finite = None, {}, None
  step = run.start_step
  try:
    while step < timeline.total_steps:
      k = dispatch_size(step, config.steps_per_dispatch, timeline.total_steps, events.periods)
      with clock.part('input_wait'):
        batch_list = [next(batches) for _ in range(k)]
      profiler.before(step, state)
      with clock.part('steps'):
        state, step_metrics = run_steps(state, batch_list, step)
      step += k
      with clock.part('logging'):
        bar.tick(step)
        profiler.after(step, state)
      with clock.part('steps'):  # merged on the device; can wait when the host runs ahead
        train_metrics = step_metrics if train_metrics is None else train_metrics.merge(step_metrics)
      is_last = step == timeline.total_steps
      save = events.save(step, timeline.total_steps)
      stopping = stop.requested(step, events.log)

      if events.log(step) or is_last or save or stopping:
        with clock.part('steps'):  # waits for the dispatched steps
          scalars = {k: float(v) for k, v in train_metrics.compute().items()}
        _check_finite(scalars, step, last_finite, run.workdir)
        last_finite = (step, scalars['train_loss'])
      if events.log(step) or is_last:
        with clock.part('logging'):
          writer.write_scalars(step, scalars)
          bar.log(step, scalars)
        train_metrics = None
      if events.evaluate(step) or is_last or save or stopping:
        with clock.part('steps'):
          _check_state_finite(state, step, last_finite, run.workdir)  # before anything is kept
      if events.evaluate(step) or is_last:
        with clock.part('eval'):
          eval_metrics = _evaluate(run, state, step, writer, clock)
      if save or stopping:
        with clock.part('checkpoint'):
          run.checkpoints.save(step, state, _meta(run, step))
      if stopping and not is_last:
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
    with clock.part('checkpoint'):
      run.checkpoints.wait()
    with clock.part('logging'):
      writer.flush()
      if jax.process_index() == 0:
        plot.save_curves(run.workdir)
  except OSError as e:
    raise TrainingError(
      f'Writing to {run.workdir} failed by step {step}: {e}. The earlier '
      f'checkpoints in {run.checkpoints.directory} are intact; free '
      'space or fix permissions, then rerun the same command to resume.'
    ) from e
  finally:
    with clock.part('logging'):
      bar.close()
      writer.flush()
  return eval_metrics


def _stopped_before_start(run: _Run, stop: preemption.StopRequest) -> dict:
  logging.warning(
    'Received %s before the first step: stopped with nothing new to save. Rerun the same '
    'command to %s.',
    stop.name,
    'resume' if run.start_step else 'start',
  )
  return {'stopped_at_step': run.start_step}


class _LoopParts(typing.NamedTuple):
  """What the loop works with, built when it starts: the metric writer, the batch
  iterator (positioned at the start step), the events, the stepper, the profiler window
  and the progress bar."""

  writer: object
  batches: object
  events: '_Events'
  run_steps: '_Stepper'
  profiler: profiling.StepProfiler
  bar: progress.Progress

  @classmethod
  def start(cls, run: _Run, clock: profiling.RunClock) -> '_LoopParts':
    config, timeline = run.config, run.timeline
    with clock.part('logging'):
      writer = metric_writers.create_writer(run.workdir)
      _log_start(run, writer)
    with clock.part('input_wait'):
      batches = batching.global_train_batches(
        run.dataset, config, run.mesh, timeline.steps_per_epoch, run.start_step
      )
    run_steps = _Stepper(run, clock)
    profiler = profiling.StepProfiler(
      os.path.join(run.workdir, 'profile'),
      config.profile_first_step,
      config.profile_steps,
      run_steps.hlo_texts,
    )
    bar = progress.Progress(
      timeline.total_steps, timeline.steps_per_epoch, config.batch_size, run.start_step
    )
    return cls(writer, batches, _Events.of(config, timeline), run_steps, profiler, bar)


def _evaluate(
  run: _Run, state, step: int, writer, clock: profiling.RunClock | None = None, save_best=True
) -> dict:
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
      run.checkpoints.save_best(step, state, _meta(run, step), metrics['eval_top1'])
  return metrics


def _finished(run: _Run) -> dict:
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


@dataclasses.dataclass(frozen=True)
class _Events:
  """The steps at which the loop looks at the state."""

  log: Every
  evaluate: Every  # eval_every_epochs=0: at the end only
  checkpoint: Every  # checkpoint_every_epochs and checkpoint_every_steps
  epoch_end: Every  # a multi-step dispatch ends here (the image size may change)

  @classmethod
  def of(cls, config: ml_collections.ConfigDict, timeline: Timeline) -> '_Events':
    return cls(
      log=timeline.every(steps=config.log_every_steps),
      evaluate=timeline.every(epochs=config.eval_every_epochs),
      checkpoint=timeline.every(
        steps=config.checkpoint_every_steps, epochs=config.checkpoint_every_epochs
      ),
      epoch_end=timeline.every(epochs=1),
    )

  def save(self, step: int, total_steps: int) -> bool:
    """Whether ``step`` writes a checkpoint: every ``checkpoint_every_epochs`` and every
    ``checkpoint_every_steps``, and the last step (a preemption saves on its own)."""
    return step == total_steps or self.checkpoint(step)

  @property
  def periods(self) -> tuple[int, ...]:
    """A multi-step dispatch ends at each of these."""
    return (
      self.log.periods + self.evaluate.periods + self.checkpoint.periods + (self.epoch_end.periods)
    )


class _Stepper:
  """Runs one dispatch of k train steps: the single step or the multi-step function
  (``config.steps_per_dispatch``), each compiled ahead of time on first use (the first
  logging its FLOPs), at the image size of the step's epoch (one compilation per size
  with progressive resizing)."""

  def __init__(self, run: _Run, clock: profiling.RunClock):
    info = run.dataset.info
    self._run, self._clock = run, clock
    self._args = (run.config, run.learning_rate_fn, info.num_classes, info.mean, info.std)
    self._compiled = {}  # (steps in the dispatch, image size) -> compiled step

  def __call__(self, state, batches: list, step: int):
    run = self._run
    size = train_image_size(run.config, run.timeline.epoch_and_batch(step)[0])
    k = len(batches)  # a dispatch cut short by a period end compiles its own length
    args = (state, batches if k > 1 else batches[0])
    if (k, size) not in self._compiled:
      options = dict(mesh=run.mesh, teacher=run.teacher, image_size=size)
      make = step_functions.make_multi_train_step if k > 1 else step_functions.make_train_step
      with self._clock.part('compile'):
        compiled = make(*self._args, **options).lower(*args).compile()
      if k == 1 and not any(key[0] == 1 for key in self._compiled):
        _log_flops(compiled, batches[0])
      self._compiled[(k, size)] = compiled
    return self._compiled[(k, size)](*args)

  def hlo_texts(self) -> list[str]:
    """The compiled steps' HLO, for the profile's shapes."""
    return [c.as_text() for c in self._compiled.values()]


def train_image_size(config: ml_collections.ConfigDict, epoch: int) -> int | None:
  """The training resolution of ``epoch`` under progressive resizing (FFCV's rule: linear
  from start to end size over [start_epoch, end_epoch], rounded to
  ``progressive_resizing_multiple`` so that only a few sizes compile); None when off."""
  if not config.progressive_resizing:
    return None
  start, end, first, last = config.progressive_resizing
  size = float(np.interp(epoch, [first, last], [start, end]))
  multiple = config.progressive_resizing_multiple
  size = int(round(size / multiple)) * multiple
  return int(min(max(size, min(start, end)), max(start, end)))


def dispatch_size(step: int, steps_per_dispatch: int, total_steps: int, periods) -> int:
  """How many steps the next dispatch runs: at most ``steps_per_dispatch``, ending no
  later than the next multiple of any period (log, eval, checkpoint, epoch) or the end."""
  return min([steps_per_dispatch, total_steps - step] + [p - step % p for p in periods])


def _log_flops(compiled, batch) -> None:
  """Logs XLA's FLOPs per training image, from the single step (a multi-step program's
  scan body may be counted once)."""
  flops = model_summary.xla_flops(compiled)
  if flops:
    # The compiled SPMD program is one device's share of the global batch.
    devices = batch['label'].sharding.num_devices
    logging.info(
      'Training FLOPs per image: %.4g G (XLA cost analysis of the train step).',
      flops * devices / batch['label'].shape[0] / 1e9,
    )


@jax.jit
def _all_finite(tree):
  return jax.tree.reduce(lambda a, b: a & b, jax.tree.map(lambda x: jnp.isfinite(x).all(), tree))


def _check_finite(scalars: dict, step: int, last_finite, workdir: str):
  if not math.isfinite(scalars['train_loss']):
    _diverged(f'the loss is {scalars["train_loss"]}', step, last_finite, workdir)


def _check_state_finite(state, step: int, last_finite, workdir: str):
  """A finite loss can hide an update that blew up: nothing non-finite is evaluated for
  the best checkpoint or saved."""
  if not bool(_all_finite((state.params, state.batch_stats))):
    _diverged('the weights are no longer finite', step, last_finite, workdir)


def _diverged(what: str, step: int, last_finite, workdir: str):
  last = f'{last_finite[1]:.4g} at step {last_finite[0]}' if last_finite else 'none yet'
  raise TrainingError(
    f'Training diverged: {what} by step {step} (last finite loss: {last}). '
    'Lower --config.learning_rate or add warm-up (--config.warmup_epochs). The '
    f'checkpoints in {workdir}/checkpoints and checkpoints_best hold only finite states.'
  )
