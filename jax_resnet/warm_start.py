"""Weights in: a new run that starts from existing weights (``config.init_from``).

``init_from`` names one of:

- ``WORKDIR``: another run's best checkpoint (its latest when it has no best);
  ``WORKDIR:latest`` or ``WORKDIR:STEP`` to choose;
- an export of this project, in any ``--export_format`` (msgpack with its ``.json``
  sidecar, safetensors, torchvision);
- a ``.safetensors`` file in torchvision's ResNet state-dict layout without this project's
  metadata: torchvision's or timm's weights (``conv1.weight``, ``bn1.running_var``,
  ``layer3.1.conv2.weight``, ``fc.weight``, ...; OIHW kernels).

Parameters and BatchNorm statistics are copied into the new run's freshly initialised
state; its step, optimizer state and schedule start fresh under the new config. A
classifier head with another class count keeps its fresh initialisation (the log says
so); any other difference is one error listing the first differing keys and shapes. It
applies only at step 0: a run that has its own checkpoint resumes that.
"""

import dataclasses
import os

import jax
import numpy as np
from absl import logging
from flax import traverse_util

from jax_resnet import export, runs
from jax_resnet import torchvision_weights as tw
from jax_resnet.errors import ConfigError, NotFoundError

COLLECTIONS = ('params', 'batch_stats')
HEAD = 'head'


@dataclasses.dataclass
class Source:
  """Weights to start from."""

  variables: dict  # {'params', 'batch_stats'} as numpy arrays
  description: str  # where they came from, for the log
  class_names: tuple[str, ...] = ()  # the head's classes, when known


def load_source(init_from: str, model_name: str, field: str = 'init_from') -> Source:
  workdir, which = split(init_from)
  if workdir is not None:
    run = runs.load(workdir, which)
    return Source(
      jax.tree.map(np.asarray, run.variables),
      f'{workdir} ({which} checkpoint, step {run.step}, {run.config.model})',
      tuple(run.info.class_names),
    )
  if not os.path.isfile(init_from):
    raise NotFoundError(
      f'config.{field}={init_from!r} is neither a run directory (WORKDIR, WORKDIR:latest, '
      'WORKDIR:STEP) nor a file (an export, or torchvision-layout .safetensors).'
    )
  if export.is_safetensors(init_from):
    tensors, metadata = tw.load_safetensors(init_from)
    if metadata is None:  # torchvision's or timm's own weights
      return Source(tw.from_torchvision(tensors, model_name), f'{init_from} (torchvision layout)')
  variables, metadata = export.read_export(init_from)
  return Source(
    variables,
    f'{init_from} (export of {metadata["model"]}, step {metadata["step"]})',
    tuple(metadata.get('class_names', ())),
  )


def split(init_from: str) -> tuple[str | None, str | int]:
  """(workdir, which) for a run directory (with an optional :latest or :STEP), else
  (None, '')."""
  if os.path.isdir(init_from):
    return init_from, 'best'
  head, _, tail = init_from.rpartition(':')
  if head and os.path.isdir(head) and (tail in ('best', 'latest') or tail.isdigit()):
    return head, int(tail) if tail.isdigit() else tail
  return None, ''


def _names(names, shown: int = 4) -> str:
  return ', '.join(names[:shown]) + (f', ... ({len(names)})' if len(names) > shown else '')


def apply(state, source: Source, class_names=()):
  """``state`` with ``source``'s parameters and BatchNorm statistics. The head stays
  fresh when its class count differs, or when both sides name their classes and the names
  differ (the rows would mean other classes). Logs what was loaded and initialised."""
  description = source.description
  target = {c: getattr(state, c) for c in COLLECTIONS}
  fresh = traverse_util.flatten_dict(target, sep='/')
  given = traverse_util.flatten_dict({c: source.variables.get(c, {}) for c in COLLECTIONS}, sep='/')
  head_keys = {k for k in fresh if k.split('/')[1] == HEAD}
  reinitialised = sorted(
    k for k in head_keys if k in given and np.shape(given[k]) != fresh[k].shape
  )
  if reinitialised and not _only_classes_differ(fresh, given, reinitialised):
    reinitialised = []  # not a class-count change: reported as a mismatch below
  renamed = bool(class_names and source.class_names) and (
    tuple(class_names) != tuple(source.class_names)
  )
  if renamed and not reinitialised:
    reinitialised = sorted(k for k in head_keys if k in given)
  differences = [
    f'{k}: {_shape_in(given, k)} in the weights, {fresh[k].shape} in this model'
    for k in sorted(fresh)
    if k not in reinitialised and (k not in given or np.shape(given[k]) != fresh[k].shape)
  ]
  differences += [f'{k}: not in this model' for k in sorted(set(given) - set(fresh))]
  if differences:
    raise ConfigError(
      f'config.init_from: the weights of {description} do not fit this model '
      f'({len(differences)} keys differ; first: {"; ".join(differences[:5])}). Use the '
      'same --config.model and --config.model_options as the run that wrote them.'
    )
  loaded = {
    k: jax.device_put(np.asarray(given[k], v.dtype), v.sharding)
    for k, v in fresh.items()
    if k not in reinitialised
  }
  merged = traverse_util.unflatten_dict({**fresh, **loaded}, sep='/')
  count = lambda keys: sum(int(np.prod(fresh[k].shape)) for k in keys)
  logging.info(
    'init_from %s: loaded %d arrays (%s values: parameters and BatchNorm statistics); '
    'step, optimizer state and schedule start fresh.',
    description,
    len(loaded),
    f'{count(loaded):,}',
  )
  if reinitialised:
    before, now = (
      np.shape(given[f'params/{HEAD}/kernel'])[-1],
      fresh[f'params/{HEAD}/kernel'].shape[-1],
    )
    if renamed and before == now:
      why = (
        f'other classes ({_names(source.class_names)} in the weights, {_names(class_names)} here)'
      )
    else:
      why = f'another class count ({before} classes in the weights, {now} here)'
    logging.info(
      'init_from: the classifier head has %s: re-initialised %s.', why, ', '.join(reinitialised)
    )
  return state.replace(**{c: merged[c] for c in COLLECTIONS})


def _shape_in(given: dict, key: str) -> str:
  return str(np.shape(given[key])) if key in given else 'absent'


def _only_classes_differ(fresh, given, keys) -> bool:
  """Whether the head's arrays differ in their last (class) dimension only."""
  return all(
    np.ndim(given[k]) == fresh[k].ndim and np.shape(given[k])[:-1] == fresh[k].shape[:-1]
    for k in keys
  )


def load_teacher(config, num_classes: int):
  """The knowledge-distillation teacher named by ``config.distill_from`` (a run or an
  export), computing in the student's dtype, as a ``steps.Teacher``."""
  from jax_resnet import models, steps

  workdir, which = split(config.distill_from)
  if workdir is not None:
    run = runs.load(workdir, which)
    name, options, variables = run.config.model, steps.model_kwargs(run.config), run.variables
    teacher_classes = run.info.num_classes
  elif not os.path.isfile(config.distill_from):
    load_source(config.distill_from, config.model, 'distill_from')  # names what is missing
  else:
    variables, metadata = export.read_export(config.distill_from)
    name, options = metadata['model'], metadata['model_options']
    teacher_classes = metadata['num_classes']
  if teacher_classes != num_classes:
    raise ConfigError(
      f'config.distill_from={config.distill_from!r}: the teacher has {teacher_classes} '
      f'classes, this run {num_classes}; distillation needs the same classes.'
    )
  model = models.create_model(name, num_classes, dtype=steps.compute_dtype(config), **options)
  variables = jax.device_put(jax.tree.map(np.asarray, variables))
  logging.info('Distilling from %s (%s).', config.distill_from, name)
  return steps.Teacher(model.apply, variables)
