"""A run read back from its workdir: the model and train state of one checkpoint,
rebuilt from the checkpoint's own config and data description.

Eval, export (and anything else that uses a trained model) start here, so they need no
flags that match the training run and no training data. Nothing in the workdir is
created, renamed or deleted: a finished run on a read-only mount loads as well.
"""

import dataclasses

import ml_collections

from jax_resnet import parallel
from jax_resnet.configuration import defaults
from jax_resnet.data.common import DatasetInfo
from jax_resnet.errors import ConfigError, TrainingError
from jax_resnet.runs.checkpointing import Checkpoints
from jax_resnet.training import build
from jax_resnet.training.timeline import Timeline
from jax_resnet.training.train_state import TrainState, ema_state


@dataclasses.dataclass
class SavedRun:
  """One checkpoint of a run, ready to use."""

  workdir: str
  step: int
  config: ml_collections.ConfigDict  # the config the checkpoint was written with
  info: DatasetInfo  # the training data's description (classes, image shape, mean/std)
  model: object  # models.ResNet
  state: TrainState

  @property
  def variables(self) -> dict:
    """What ``model.apply`` takes: params and BatchNorm statistics."""
    return {'params': self.state.params, 'batch_stats': self.state.batch_stats}


def config_from_meta(meta: dict) -> ml_collections.ConfigDict:
  """The checkpoint's config, with any field added since it was written at its default."""
  return defaults.merged_with_defaults(meta['config'])


def info_from_meta(meta: dict) -> DatasetInfo | None:
  """The checkpoint's data description; None for checkpoints written before it was kept."""
  return DatasetInfo.from_json(meta['data']) if 'data' in meta else None


def abstract_state(config, info: DatasetInfo, mesh):
  """The (model, abstract train state) a checkpoint of ``config`` on ``info`` restores into."""
  model = build.model_from_config(config, info.num_classes)
  timeline = Timeline.from_config(config, max(info.num_train, config.batch_size))
  state, _ = build.train_state_from_config(
    config, model, info.image_shape, timeline, mesh, abstract=True
  )
  return model, state


# Which weights ``load_run`` returns: the trained ones, or their average (config.ema_decay).
# main.py's --weights takes these.
WEIGHTS = ('raw', 'ema')


def load_run(workdir: str, which: str | int = 'best', mesh=None, weights: str = 'raw') -> SavedRun:
  """The run's ``which`` checkpoint ('best' (else the latest), 'latest' or a step);
  ``weights='ema'`` puts its averaged weights and statistics (config.ema_decay) in place
  of the trained ones."""
  if weights not in WEIGHTS:
    raise ConfigError(f'weights={weights!r}: must be one of {", ".join(WEIGHTS)}.')
  mesh = mesh or parallel.create_mesh()
  checkpoints = Checkpoints(workdir, read_only=True)
  try:
    if which == 'best' and checkpoints.best_step() is None:
      which = 'latest'
    built = {}

    def template_for(meta):
      config = config_from_meta(meta)
      info = info_from_meta(meta) or _info_from_data(config, workdir)
      built['config'], built['info'] = config, info
      built['model'], state = abstract_state(config, info, mesh)
      return state

    state, meta = checkpoints.restore(which, template_for)
  finally:
    checkpoints.close()
  if meta is None:
    raise TrainingError(
      f'No {which} checkpoint in {checkpoints.directory}: train first with --mode=train.'
    )
  if weights == 'ema':
    if state.ema is None:
      raise ConfigError(
        f'--weights=ema: the run in {workdir} kept no weight average (its ema_decay is 0).'
      )
    state = ema_state(state)
  return SavedRun(workdir, int(meta['step']), state=state, **built)


def _info_from_data(config, workdir: str) -> DatasetInfo:
  """For a checkpoint that predates the stored data description: read the eval split."""
  from jax_resnet.data.sources import load_dataset

  return load_dataset(config, workdir, splits=('eval',)).info
