"""A training run prepared from its config and workdir: the data, the model and its
train state (resumed from the workdir's newest checkpoint, or warm-started), the
learning-rate schedule, the evaluators and the distillation teacher.

With ``build`` and the validation, the last place the ``ConfigDict`` is read before the
loop, which receives a ``PreparedRun``.
"""

import dataclasses
import json
import os

import jax
import ml_collections
import optax
from absl import logging

from jax_resnet.configuration import validation
from jax_resnet.data import folder
from jax_resnet.data.common import FOLDER, DatasetInfo, shuffle_seed
from jax_resnet.data.sources import Dataset, load_dataset
from jax_resnet.errors import TrainingError
from jax_resnet.runs.checkpointing import Checkpoints
from jax_resnet.training import build, warm_start
from jax_resnet.training.evaluation import Evaluator, eval_batch_size
from jax_resnet.training.step_functions import Teacher, make_eval_step
from jax_resnet.training.timeline import Timeline
from jax_resnet.training.train_state import TrainState


@dataclasses.dataclass
class PreparedRun:
  """Everything the loop needs, built once."""

  config: ml_collections.ConfigDict
  workdir: str
  mesh: jax.sharding.Mesh
  dataset: Dataset
  timeline: Timeline
  learning_rate_fn: optax.Schedule
  state: TrainState
  start_step: int
  checkpoints: Checkpoints
  evaluators: list
  teacher: Teacher | None = None

  def meta(self, step: int) -> dict:
    """What a checkpoint records beside the state: where the input stands, the config
    and the data description (so eval, export and predict need neither flags nor data)."""
    epoch, batch_in_epoch = self.timeline.epoch_and_batch(step)
    return {
      'step': step,
      'epoch': epoch,
      'batch_in_epoch': batch_in_epoch,
      'epoch_origin': list(self.timeline.epoch_origin),
      'shuffle_seed': shuffle_seed(self.config.seed, epoch),
      'config': json.loads(self.config.to_json_best_effort()),
      'data': self.dataset.info.to_json(),
    }


def prepare_run(
  config: ml_collections.ConfigDict, workdir: str, mesh, resume_from: str
) -> PreparedRun:
  dataset = load_dataset(config, workdir)
  info = dataset.info
  model = build.model_from_config(config, info.num_classes, mesh.devices.size)
  built = {}

  def build_state(epoch_origin: tuple[int, int]):
    """The fresh train state and schedule of the timeline from ``epoch_origin``."""
    if built.get('origin') != epoch_origin:
      timeline = Timeline.from_config(config, info.num_train, epoch_origin)
      state, learning_rate_fn = build.train_state_from_config(
        config, model, info.image_shape, timeline, mesh
      )
      built.update(origin=epoch_origin, timeline=timeline, state=state, lr=learning_rate_fn)
    return built['state']

  checkpoints = Checkpoints(workdir, config.keep_checkpoints)
  state, start_step = _resume(checkpoints, config, build_state, resume_from, info)
  timeline, learning_rate_fn = built['timeline'], built['lr']
  if config.dataset == FOLDER and jax.process_index() == 0:
    folder.write_class_index(workdir, info.class_names)  # the classes the run trains
  if start_step == 0 and config.init_from:
    source = warm_start.load_source(config.init_from, config.model)
    state = warm_start.apply(state, source, info.class_names, config.model)
  options = build.step_options(config, info.num_classes, info.mean, info.std)
  eval_fn = make_eval_step(options, mesh)
  batch = eval_batch_size(config.eval_batch_size, mesh)
  evaluators = [Evaluator(dataset, eval_fn, mesh, batch)]
  if config.ema_decay:  # the averaged weights, beside the raw ones: eval_top1_ema, ...
    evaluators.append(Evaluator(dataset, eval_fn, mesh, batch, use_ema=True))
  teacher = None
  if config.distill_from:
    teacher = warm_start.load_teacher(
      config.distill_from, info.num_classes, build.compute_dtype(config), info.image_shape
    )
  return PreparedRun(
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


def _resume(checkpoints: Checkpoints, config, build_state, resume_from: str, info: DatasetInfo):
  """(state, step) to start from: the newest restorable checkpoint (or the best one,
  when asked), else step 0 in a workdir that never held a checkpoint. ``build_state``
  makes the state to restore into (and its timeline) for an epoch origin."""

  def resumable(meta):
    validation.check_resumable(meta['config'], config)
    if 'data' not in meta:  # written before runs kept their data description
      return build_state((0, 0))
    check_same_data(DatasetInfo.from_json(meta['data']), info)
    return build_state(epoch_origin(meta, info))

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
    return build_state((0, 0)), 0
  start_step = int(meta['step'])
  logging.info(
    'Resumed from %s at step %d (epoch %d, batch %d).',
    checkpoints.best_directory if resume_from == 'best' else checkpoints.directory,
    start_step,
    meta['epoch'],
    meta['batch_in_epoch'],
  )
  return restored, start_step


def check_same_data(saved: DatasetInfo, now: DatasetInfo) -> None:
  """Refuses data whose classes are not the checkpoint's (renamed, added or removed class
  folders would relabel every example after the change)."""
  if tuple(saved.class_names) != tuple(now.class_names):
    raise TrainingError(
      f"The data's classes are not the checkpoint's: it was trained on "
      f'{_classes(saved.class_names)}, the data now has {_classes(now.class_names)}. '
      'Resuming would give the examples other labels: restore the class folders, or train '
      'in a new --workdir (--config.init_from=THIS_WORKDIR fine-tunes on the new classes).'
    )


def epoch_origin(meta: dict, now: DatasetInfo) -> tuple[int, int]:
  """Where the resumed run's epochs count from (``Timeline.epoch_origin``): the
  checkpoint's own origin; or, when the training set has changed size since it was
  written (one warning with both counts), its step, as the start of a new epoch of the
  new size. The epoch the checkpoint cut short counts as done: its order was a shuffle of
  the old set, and the new set's epochs must each see every example once."""
  saved = DatasetInfo.from_json(meta['data'])
  if saved.num_train == now.num_train:
    return tuple(int(x) for x in meta.get('epoch_origin', (0, 0)))
  step, epoch, batch = int(meta['step']), int(meta['epoch']), int(meta['batch_in_epoch'])
  origin = (step, epoch + (batch > 0))
  logging.warning(
    'The training set had %d examples when the checkpoint at step %d was written and has '
    '%d now: epoch %d starts at that step with the new size, and num_epochs counts on '
    'from there.',
    saved.num_train,
    step,
    now.num_train,
    origin[1],
  )
  return origin


def _classes(names, shown: int = 6) -> str:
  listed = ', '.join(names[:shown]) + (', ...' if len(names) > shown else '')
  return f'{len(names)} classes ({listed})'


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
