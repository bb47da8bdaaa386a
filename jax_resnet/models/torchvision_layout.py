"""Weights in torchvision's ResNet ``state_dict`` layout, to and from this project's Flax trees.

The ImageNet-family models (resnet18 ... resnet152) are layer-for-layer torchvision's
ResNet v1.5, so their weights can be handed to PyTorch (torchvision, and timm, whose ResNets
use the same keys) and torchvision/timm ImageNet weights can start a run here. Everything is
numpy: neither torch nor TensorFlow is imported. Files are safetensors, which both sides read
without pickle.

Only the layouts differ: convolutions are HWIO here and OIHW there, the head is [in, out]
here and [out, in] there, BatchNorm's scale/bias/mean/var are weight/bias/running_mean/
running_var, and torchvision keeps a ``num_batches_tracked`` counter per BatchNorm.
"""

import json
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import numpy as np
import safetensors
import safetensors.numpy
from flax import traverse_util

from jax_resnet import models, trees
from jax_resnet.errors import DataError
from jax_resnet.models.blocks import bottleneck_width

METADATA_KEY = 'jax_resnet'
NUM_BATCHES_TRACKED = 'num_batches_tracked'

# How many differing keys an error shows: enough to see the pattern, short enough to read.
_SHOWN_DIFFERENCES = 5
_STEM_KERNEL = 7
_IMAGENET_CLASSES = 1000
_RGB = 3
# torchvision's BatchNorm field, then where Flax keeps it.
_BATCH_NORM_FIELDS = (
  ('weight', 'params', 'scale'),
  ('bias', 'params', 'bias'),
  ('running_mean', 'batch_stats', 'mean'),
  ('running_var', 'batch_stats', 'var'),
)
_HEAD = (('fc.weight', ('params', 'head', 'kernel')), ('fc.bias', ('params', 'head', 'bias')))


def _in_torchvision_layout(arch: dict) -> bool:
  return (
    arch['stem'] == 'imagenet'
    and arch['residual']
    and not arch['preact']
    and arch['shortcut'] == 'projection'
    and not arch.get('se_ratio')  # torchvision's ResNets have no squeeze-and-excitation
  )


SUPPORTED_MODELS = tuple(n for n in models.MODEL_NAMES if _in_torchvision_layout(models.MODELS[n]))


class HeadMismatchError(ValueError):
  """The checkpoint's head has another class count: the backbone fits, the head does not.

  A subclass so that fine-tuning code can catch it and re-initialise only the head, while
  every other mismatch stays a plain ``ValueError``.
  """

  def __init__(self, expected: int, found: int):
    self.expected = expected
    self.found = found
    super().__init__(
      f'The checkpoint has a {found}-class head (fc), the model {expected} classes. To '
      "fine-tune, convert without num_classes and re-initialise params['head']."
    )


class _Entry(NamedTuple):
  """One torchvision tensor and the Flax variable it is (None: num_batches_tracked)."""

  torch_key: str
  flax_path: tuple[str, ...] | None
  torch_shape: tuple[int, ...]


def _conv(torch_name: str, flax_module: tuple[str, ...], out_channels, in_channels, size):
  shape = (out_channels, in_channels, size, size)
  return [_Entry(f'{torch_name}.weight', ('params', *flax_module, 'kernel'), shape)]


def _batch_norm(torch_name: str, flax_module: tuple[str, ...], channels: int):
  entries = [
    _Entry(f'{torch_name}.{field}', (collection, *flax_module, name), (channels,))
    for field, collection, name in _BATCH_NORM_FIELDS
  ]
  return entries + [_Entry(f'{torch_name}.{NUM_BATCHES_TRACKED}', None, ())]


def _block(torch_name: str, flax_name: str, arch: dict, in_channels: int, width: int, strides):
  """torchvision's BasicBlock/Bottleneck: conv{k}/bn{k}, then downsample.{0,1} if reshaped;
  a bottleneck's 3x3 conv (conv2) as wide and grouped as the architecture says."""
  block_cls, groups = arch['block_cls'], arch.get('groups', 1)
  kernel_sizes = (3, 3) if block_cls.expansion == 1 else (1, 3, 1)
  out_channels = width * block_cls.expansion
  if block_cls.expansion == 1:
    widths, conv_groups = (width, out_channels), (1, 1)
  else:
    inner = bottleneck_width(width, groups, arch.get('base_width', 64))
    widths, conv_groups = (inner, inner, out_channels), (1, groups, 1)
  entries, channels = [], in_channels
  for k, (size, conv_width) in enumerate(zip(kernel_sizes, widths)):
    name = f'{torch_name}.conv{k + 1}'
    entries += _conv(name, (flax_name, f'Conv_{k}'), conv_width, channels // conv_groups[k], size)
    entries += _batch_norm(f'{torch_name}.bn{k + 1}', (flax_name, f'BatchNorm_{k}'), conv_width)
    channels = conv_width
  if strides != 1 or in_channels != out_channels:
    entries += _conv(
      f'{torch_name}.downsample.0', (flax_name, 'proj_conv'), out_channels, in_channels, 1
    )
    entries += _batch_norm(f'{torch_name}.downsample.1', (flax_name, 'proj_bn'), out_channels)
  return entries


def _layout(model_name: str, in_channels: int, num_classes: int | None) -> list[_Entry]:
  """Every tensor of torchvision's ``model_name`` in state_dict order; no head if None."""
  arch = models.MODELS[model_name]
  block_cls, widths = arch['block_cls'], arch['widths']
  entries = _conv('conv1', ('stem_conv',), widths[0], in_channels, _STEM_KERNEL)
  entries += _batch_norm('bn1', ('stem_bn',), widths[0])
  channels = widths[0]
  for i, (num_blocks, width) in enumerate(zip(arch['stage_sizes'], widths)):
    for j in range(num_blocks):
      strides = 2 if i > 0 and j == 0 else 1
      names = f'layer{i + 1}.{j}', f'stage{i + 1}_block{j + 1}'
      entries += _block(*names, arch, channels, width, strides)
      channels = width * block_cls.expansion
  if num_classes is not None:
    shapes = (num_classes, channels), (num_classes,)
    entries += [_Entry(key, path, shape) for (key, path), shape in zip(_HEAD, shapes)]
  return entries


def _flax_shape(torch_shape: tuple[int, ...]) -> tuple[int, ...]:
  if len(torch_shape) == 4:
    out_channels, in_channels, height, width = torch_shape
    return height, width, in_channels, out_channels
  return tuple(reversed(torch_shape))  # a dense kernel transposes; vectors stay


def _to_torch_array(flax_array) -> np.ndarray:
  array = np.asarray(flax_array, dtype=np.float32)
  array = array.transpose(3, 2, 0, 1) if array.ndim == 4 else array.T
  return np.array(array, order='C')  # a copy: the result shares no memory with the input


def _to_flax_array(torch_array) -> np.ndarray:
  array = np.asarray(torch_array, dtype=np.float32)
  array = array.transpose(2, 3, 1, 0) if array.ndim == 4 else array.T
  return np.array(array, order='C')


def _unsupported(model_name: str, reason: str) -> ValueError:
  return ValueError(
    f'{model_name!r} {reason}: only {", ".join(SUPPORTED_MODELS)} with the default '
    "stem='imagenet' are laid out like torchvision's ResNets (the CIFAR resnet20 ... "
    'resnet110, preact_* and plain* models have no torchvision counterpart).'
  )


def _check_supported(model_name: str):
  if model_name not in SUPPORTED_MODELS:
    raise _unsupported(model_name, 'has no torchvision layout')


def _mismatch_error(subject: str, differences: list[str], fix: str) -> ValueError:
  shown = '\n  '.join(differences[:_SHOWN_DIFFERENCES])
  hidden = len(differences) - _SHOWN_DIFFERENCES
  more = f'\n  ... and {hidden} more' if hidden > 0 else ''
  count = '1 key differs' if len(differences) == 1 else f'{len(differences)} keys differ'
  return ValueError(f'{subject}: {count}:\n  {shown}{more}\n{fix}')


def _matching_model(keys: Iterable[str], key_of, shapes: Mapping[str, tuple] = None) -> str | None:
  """The supported model whose keys (head and counters aside) are exactly ``keys``; with
  ``shapes`` (torchvision's, by key), the one whose shapes are these too where several
  share the keys (resnet50, wide_resnet50_2 and resnext50_32x4d do)."""
  backbone_keys = {key for key in keys if not _is_head_or_counter(key)}
  same_keys = []
  for name in SUPPORTED_MODELS:
    layout = [e for e in _layout(name, _RGB, None) if e.flax_path]
    if backbone_keys == {key_of(e) for e in layout}:
      if shapes is None or _same_shapes(layout, shapes):
        return name
      same_keys.append(name)
  return same_keys[0] if same_keys else None


def _same_shapes(layout: list[_Entry], shapes: Mapping[str, tuple]) -> bool:
  for e in layout:
    found, expected = tuple(shapes[e.torch_key]), e.torch_shape
    if e.torch_key == 'conv1.weight':  # the stem's input channels are the file's own
      found, expected = found[:1] + found[2:], expected[:1] + expected[2:]
    if found != expected:
      return False
  return True


def matching_model(state_dict: Mapping[str, Any]) -> str | None:
  """The supported model whose state_dict keys and shapes ``state_dict`` has (its head and
  ``num_batches_tracked`` counters aside), or None: which model a file of torchvision's or
  timm's weights holds, before it is converted."""
  shapes = {key: np.shape(value) for key, value in state_dict.items()}
  return _matching_model(shapes, lambda e: e.torch_key, shapes)


def _is_head_or_counter(key: str) -> bool:
  return key.startswith(('fc.', 'params/head/')) or key.endswith(NUM_BATCHES_TRACKED)


def _shared_prefix(keys: list[str]) -> str:
  """A prefix like 'module.' (DataParallel) or 'model.' in front of every key, else ''."""
  for key in keys:
    prefix = key.removesuffix('conv1.weight')
    if prefix != key and prefix and all(k.startswith(prefix) for k in keys):
      return prefix
  return ''


def _state_dict_fix(shapes: dict[str, tuple], model_name: str) -> str:
  prefix = _shared_prefix(list(shapes))
  if prefix:
    return f'Every key starts with {prefix!r}: strip that prefix from the keys first.'
  guess = _matching_model(shapes, lambda e: e.torch_key, shapes)
  if guess and guess != model_name:
    return f'These are {guess} weights: convert them as {guess!r} (and train that model).'
  return (
    f"Pass the state_dict of torchvision's (or timm's) {model_name}, or convert as the model "
    'the checkpoint was saved from.'
  )


def _variables_fix(paths: list[str], model_name: str) -> str:
  guess = _matching_model(paths, lambda e: '/'.join(e.flax_path))
  if guess and guess != model_name:
    return f'These are {guess} variables: convert them as {guess!r}.'
  return (
    f'Pass the variables of create_model({model_name!r}, ...) without layout-changing '
    'options (stem, residual, shortcut, preact).'
  )


def _size(value, axis: int, default: int) -> int:
  """A dimension read before validation: a missing or malformed tensor is reported later."""
  shape = () if value is None else np.shape(value)
  return shape[axis] if len(shape) > axis else default


def to_torchvision(variables: Mapping[str, Any], model_name: str) -> dict[str, np.ndarray]:
  """Flax ``{'params', 'batch_stats'}`` of ``model_name`` -> torchvision's state_dict, as numpy.

  float32, C-contiguous copies in state_dict order, with an int64 ``num_batches_tracked`` of
  0 per BatchNorm so that ``load_state_dict(strict=True)`` accepts it (the counter only
  matters for BatchNorm with ``momentum=None``, which torchvision's ResNets do not use).
  """
  _check_supported(model_name)
  flat = traverse_util.flatten_dict(trees.weights_only(variables))
  stem = flat.get(('params', 'stem_conv', 'kernel'))
  if stem is not None and tuple(np.shape(stem)[:2]) != (_STEM_KERNEL, _STEM_KERNEL):
    size = 'x'.join(map(str, np.shape(stem)[:2]))
    raise _unsupported(model_name, f"has a {size} stem convolution (stem='cifar'?)")
  in_channels = _size(stem, 2, _RGB)
  num_classes = _size(flat.get(('params', 'head', 'bias')), 0, _IMAGENET_CLASSES)
  layout = _layout(model_name, in_channels, num_classes)
  expected = {'/'.join(e.flax_path): _flax_shape(e.torch_shape) for e in layout if e.flax_path}
  found = {'/'.join(path): np.shape(value) for path, value in flat.items()}
  differences = trees.differences(expected, found)
  if differences:
    fix = _variables_fix(list(found), model_name)
    raise _mismatch_error(f'The variables are not those of {model_name}', differences, fix)
  return {
    e.torch_key: _to_torch_array(flat[e.flax_path]) if e.flax_path else np.array(0, np.int64)
    for e in layout
  }


def from_torchvision(
  state_dict: Mapping[str, Any], model_name: str, num_classes: int | None = None
) -> dict[str, Any]:
  """torchvision's (or timm's) ResNet state_dict -> this project's Flax variables of numpy.

  The result has the structure of ``model.init``'s ``{'params', 'batch_stats'}``, float32.
  With ``num_classes=None`` the head is the checkpoint's, whatever its class count (none
  when the state_dict has no ``fc``, as timm's ``num_classes=0`` models): compare it with
  the model's and re-initialise it for fine-tuning. With ``num_classes`` set, another class
  count raises ``HeadMismatchError``. Every other difference raises one ``ValueError``
  listing the differing keys; ``num_batches_tracked`` counters are optional and ignored.
  The stem's input channels are the checkpoint's (3 for torchvision's).
  """
  _check_supported(model_name)
  shapes = {key: tuple(np.shape(value)) for key, value in state_dict.items()}
  in_channels = _size(state_dict.get('conv1.weight'), 1, _RGB)
  has_head = 'fc.weight' in shapes or 'fc.bias' in shapes
  found_classes = _size(state_dict.get('fc.weight'), 0, _size(state_dict.get('fc.bias'), 0, 0))
  layout = _layout(model_name, in_channels, found_classes if has_head else None)
  expected = {e.torch_key: e.torch_shape for e in layout if e.flax_path}
  counters = {e.torch_key for e in layout if not e.flax_path}
  differences = trees.differences(expected, {k: s for k, s in shapes.items() if k not in counters})
  if differences:
    fix = _state_dict_fix(shapes, model_name)
    raise _mismatch_error(f'The state_dict is not that of {model_name}', differences, fix)
  if num_classes is not None and num_classes != found_classes:
    raise HeadMismatchError(expected=num_classes, found=found_classes)
  flat = {e.flax_path: _to_flax_array(state_dict[e.torch_key]) for e in layout if e.flax_path}
  return traverse_util.unflatten_dict(flat)


def save_safetensors(
  path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, Any] | None = None
):
  """Writes ``tensors``; ``metadata`` (anything JSON) goes as one JSON string in the header.

  safetensors headers hold only str -> str, so the whole record lives under
  ``METADATA_KEY`` and comes back as it went in (as JSON does: tuples return as lists).
  """
  header = None if metadata is None else {METADATA_KEY: json.dumps(metadata, sort_keys=True)}
  # Not np.ascontiguousarray: it turns 0-d arrays (num_batches_tracked) into shape (1,).
  arrays = {key: np.asarray(value, order='C') for key, value in tensors.items()}
  safetensors.numpy.save_file(arrays, path, metadata=header)


def load_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any] | None]:
  """The tensors and the metadata ``save_safetensors`` wrote (None for other files' headers)."""
  try:
    with safetensors.safe_open(path, framework='np') as file:
      tensors = {key: file.get_tensor(key) for key in file.keys()}
      header = file.metadata() or {}
  except (safetensors.SafetensorError, OSError, ValueError) as e:  # cut short, or not one
    reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    raise DataError(
      f'{path} cannot be read as a safetensors file ({reason}); it may be cut short: export '
      'or download it again.'
    ) from None
  record = header.get(METADATA_KEY)
  return tensors, None if record is None else json.loads(record)
