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
state, and the weight EMA (``config.ema_decay``) starts from them; its step, optimizer state
and schedule start fresh under the new config. A classifier head with another class count,
or none in the source (timm's ``num_classes=0``), keeps its fresh initialisation (the log
says so); any other difference, torchvision-layout weights of another model included, is
one error listing the first differing keys and shapes. It applies only at step 0: a run
that has its own checkpoint resumes that.
"""

import dataclasses
import os

import jax
import numpy as np
from absl import logging

from jax_resnet import trees
from jax_resnet.errors import ConfigError, NotFoundError
from jax_resnet.inference import export
from jax_resnet.models import torchvision_layout as tw
from jax_resnet.runs import saved_run

HEAD = 'head'


@dataclasses.dataclass
class Source:
  """Weights to start from."""

  variables: dict  # {'params', 'batch_stats'} as numpy arrays
  description: str  # where they came from, for the log
  class_names: tuple[str, ...] = ()  # the head's classes, when known
  model: str = ''  # the model they are weights of, when known (names the fix of a mismatch)


def load_source(init_from: str, model_name: str, field: str = 'init_from') -> Source:
  workdir, which = split(init_from)
  if workdir is not None:
    run = saved_run.load_run(workdir, which)
    return Source(
      jax.tree.map(np.asarray, run.variables),
      f'{workdir} ({which} checkpoint, step {run.step}, {run.config.model})',
      tuple(run.info.class_names),
      run.config.model,
    )
  if not os.path.isfile(init_from):
    raise NotFoundError(
      f'config.{field}={init_from!r} is neither a run directory (WORKDIR, WORKDIR:latest, '
      'WORKDIR:STEP) nor a file (an export, or torchvision-layout .safetensors).'
    )
  if export.is_safetensors(init_from):
    tensors, metadata = tw.load_safetensors(init_from)
    if metadata is None:  # torchvision's or timm's own weights
      return _torchvision_source(init_from, tensors, model_name, field)
  variables, metadata = export.read_export(init_from)
  return Source(
    variables,
    f'{init_from} (export of {metadata["model"]}, step {metadata["step"]})',
    tuple(metadata.get('class_names', ())),
    metadata['model'],
  )


def _torchvision_source(path: str, tensors: dict, model_name: str, field: str) -> Source:
  """A state dict in torchvision's layout, converted as the model its keys are of (so that
  ``apply`` reports another model's weights as it reports a run's: the differing keys),
  else as ``model_name``; what does not convert is one ConfigError with tw's key listing."""
  model = tw.matching_model(tensors) or model_name
  try:
    variables = tw.from_torchvision(tensors, model)
  except ValueError as e:  # not a torchvision ResNet's state dict, or no layout for the model
    raise ConfigError(
      f'config.{field}={path!r}: cannot read it as torchvision-layout weights for '
      f'config.model={model_name!r}: {e}'
    ) from None
  return Source(variables, f'{path} (torchvision layout, {model})', model=model)


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


def _flat(collections: dict) -> dict:
  return trees.flatten({c: collections.get(c, {}) for c in trees.WEIGHT_COLLECTIONS})


def apply(state, source: Source, class_names=(), model_name: str = ''):
  """``state`` (of ``model_name``) with ``source``'s parameters and BatchNorm statistics,
  and its weight EMA (``config.ema_decay``) starting from them too. The head stays fresh
  when the source has none (timm's ``num_classes=0``), when its class count differs, or
  when both sides name their classes and the names differ (the rows would mean other
  classes). A stem for other input channels is adapted (``adapt_input_channels``). Logs
  what was loaded, adapted and initialised."""
  fresh = _flat({c: getattr(state, c) for c in trees.WEIGHT_COLLECTIONS})
  given = _flat(source.variables)
  for key in STEM_KERNELS:
    if key in fresh and key in given and _only_input_channels_differ(fresh[key], given[key]):
      have, want = np.shape(given[key])[2], fresh[key].shape[2]
      given[key] = adapt_input_channels(given[key], want)
      logging.info(
        'init_from: %s adapted from %d input channels to %d (%s, as timm).',
        key,
        have,
        want,
        'summed' if want == 1 else 'repeated and scaled',
      )
  reinitialised, why = _head_to_reinitialise(fresh, given, source.class_names, class_names)
  _check_fits(fresh, given, reinitialised, source, model_name)
  loaded = _loaded(fresh, given, reinitialised)
  replaced = trees.unflatten({**fresh, **loaded})
  if state.ema is not None:
    # Put on the device again: the train step donates the state, and XLA refuses one
    # array twice in its arguments ('Attempt to donate the same buffer twice').
    ema = _flat(state.ema)
    replaced['ema'] = trees.unflatten({**ema, **_loaded(ema, given, reinitialised)})
  count = lambda keys: sum(int(np.prod(fresh[k].shape)) for k in keys)
  logging.info(
    'init_from %s: loaded %d arrays (%s values: parameters and BatchNorm statistics%s); '
    'step, optimizer state and schedule start fresh.',
    source.description,
    len(loaded),
    f'{count(loaded):,}',
    ', also the start of the weight EMA' if state.ema is not None else '',
  )
  if reinitialised:
    logging.info(
      'init_from: the classifier head has %s: re-initialised %s.', why, ', '.join(reinitialised)
    )
  return state.replace(**replaced)


def _head_to_reinitialise(fresh, given, source_classes, class_names) -> tuple[list[str], str]:
  """The head's keys that keep their fresh initialisation, and why (for the log)."""
  head_keys = sorted(k for k in fresh if k.split('/')[1] == HEAD)
  if head_keys and not any(k in given for k in head_keys):
    return head_keys, 'no weights in the source (a headless model, as timm saves num_classes=0)'
  reshaped = [k for k in head_keys if k in given and np.shape(given[k]) != fresh[k].shape]
  if reshaped and _only_classes_differ(fresh, given, reshaped):
    before, now = np.shape(given[reshaped[0]])[-1], fresh[reshaped[0]].shape[-1]
    return reshaped, f'another class count ({before} classes in the weights, {now} here)'
  renamed = bool(class_names and source_classes) and tuple(class_names) != tuple(source_classes)
  if renamed and not reshaped:
    why = f'other classes ({_names(source_classes)} in the weights, {_names(class_names)} here)'
    return [k for k in head_keys if k in given], why
  return [], ''  # the same head, or a difference that is not a class change: checked next


def _check_fits(fresh, given, reinitialised, source: Source, model_name: str) -> None:
  """One ConfigError listing the first differing keys, unless everything but
  ``reinitialised`` has the same keys and shapes on both sides."""
  expected = {k: fresh[k].shape for k in sorted(fresh) if k not in reinitialised}
  found = {k: np.shape(given[k]) for k in sorted(given) if k not in reinitialised}
  differences = trees.differences(expected, found)
  if not differences:
    return
  fix = 'Use the same --config.model and --config.model_options as the run that wrote them.'
  if source.model and source.model == model_name:
    fix = (
      f'Both are {model_name}: use the model_options the weights were trained with (the '
      'shapes above are what differs).'
    )
  elif source.model:
    fix = (
      f'They are {source.model} weights: use --config.model={source.model}, with the '
      'model_options they were trained with.'
    )
  raise ConfigError(
    f'config.init_from: the weights of {source.description} do not fit this model '
    f'({len(differences)} keys differ, expected: this model, found: the weights; first: '
    f'{"; ".join(differences[:5])}). {fix}'
  )


def _loaded(target: dict, given: dict, reinitialised) -> dict:
  """``given``'s arrays for ``target``'s keys (bar ``reinitialised``), on the device, with
  ``target``'s dtypes and shardings."""
  return {
    k: jax.device_put(np.asarray(given[k], v.dtype), v.sharding)
    for k, v in target.items()
    if k not in reinitialised
  }


# The convolutions that read the image: the 7x7 or 3x3 stem, ResNet-D's first stem conv.
STEM_KERNELS = ('params/stem_conv/kernel', 'params/stem_conv1/kernel')


def _only_input_channels_differ(fresh, given) -> bool:
  have, want = np.shape(given), fresh.shape
  return len(have) == 4 and have[:2] + have[3:] == want[:2] + want[3:] and have[2] != want[2]


def adapt_input_channels(kernel, channels: int) -> np.ndarray:
  """An HWIO stem kernel for ``channels`` input channels, as timm's ``adapt_input_conv``:
  to one channel, the sum over the kernel's channels (a gray image then gives what an RGB
  image of equal channels gave); to more, the channels repeated and scaled by
  old / new channels (an RGB image of equal channels gives what the gray image gave)."""
  kernel = np.asarray(kernel, np.float32)
  if channels == 1:
    return kernel.sum(axis=2, keepdims=True)
  have = kernel.shape[2]
  repeats = -(-channels // have)
  return np.tile(kernel, (1, 1, repeats, 1))[:, :, :channels] * (have / channels)


def _only_classes_differ(fresh, given, keys) -> bool:
  """Whether the head's arrays differ in their last (class) dimension only."""
  return all(
    np.ndim(given[k]) == fresh[k].ndim and np.shape(given[k])[:-1] == fresh[k].shape[:-1]
    for k in keys
  )


def load_teacher(distill_from: str, num_classes: int, dtype, image_shape=None):
  """The knowledge-distillation teacher ``distill_from`` names (a run or an export),
  computing in the student's ``dtype``, as a ``step_functions.Teacher``. A teacher trained
  on other images than ``image_shape`` (the student's) is said in one warning: it sees the
  student's."""
  from jax_resnet import models
  from jax_resnet.training import build
  from jax_resnet.training.step_functions import Teacher

  workdir, which = split(distill_from)
  if workdir is not None:
    run = saved_run.load_run(workdir, which)
    name, options, variables = run.config.model, build.model_options(run.config), run.variables
    teacher_classes, teacher_shape = run.info.num_classes, tuple(run.info.image_shape)
  elif not os.path.isfile(distill_from):
    load_source(distill_from, '', 'distill_from')  # names what is missing
  else:
    variables, metadata = export.read_export(distill_from)
    name, options = metadata['model'], metadata['model_options']
    teacher_classes = metadata['num_classes']
    teacher_shape = tuple(metadata.get('train_image_shape') or metadata.get('image_shape') or ())
  if teacher_classes != num_classes:
    raise ConfigError(
      f'config.distill_from={distill_from!r}: the teacher has {teacher_classes} '
      f'classes, this run {num_classes}; distillation needs the same classes.'
    )
  if image_shape is not None and teacher_shape and teacher_shape != tuple(image_shape):
    logging.warning(
      "The distillation teacher %s was trained on %s images and is fed this run's %s.",
      distill_from,
      'x'.join(map(str, teacher_shape)),
      'x'.join(map(str, image_shape)),
    )
  model = models.create_model(name, num_classes, dtype=dtype, **options)
  variables = jax.device_put(jax.tree.map(np.asarray, variables))
  logging.info('Distilling from %s (%s).', distill_from, name)
  return Teacher(model.apply, variables)
