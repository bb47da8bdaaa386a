"""Export mode: a checkpoint's weights, with what inference needs to use them, as one file
other code loads.

Four formats, one metadata record (``inference_metadata``: the model, its classes and the
eval preprocessing) in each:

- ``msgpack``: flax serialization of ``{'params', 'batch_stats'}``; the metadata goes to a
  JSON sidecar named ``PATH.json`` (``variables.msgpack`` -> ``variables.msgpack.json``),
  since msgpack has no header.
- ``safetensors``: the Flax variables flattened to keys like
  ``params/stage1_block1/Conv_0/kernel``, the metadata as JSON in the header.
- ``torchvision``: safetensors in torchvision's ResNet ``state_dict`` layout (ImageNet-family
  models only), the same header: ``resnet50(num_classes=N).load_state_dict(load_file(PATH))``.
- ``onnx``: the inference function itself (uint8 NHWC images in; logits, probabilities and
  embeddings out; dynamic batch), for runtimes without JAX or PyTorch (``onnx_graph``); the
  metadata in its ``metadata_props``. ``Predictor.from_export`` runs it with onnxruntime.

``read_export`` reads the first three back, bit for bit (an ONNX export is a graph, for
serving, not weights to train on); ``average_checkpoints`` writes the mean of a run's last
checkpoints the same ways. Nothing here imports TensorFlow.
"""

import hashlib
import json
import os

import flax.serialization
import jax
import numpy as np
from absl import logging

from jax_resnet import trees
from jax_resnet.errors import ConfigError, DataError, NotFoundError, OutputError
from jax_resnet.inference import onnx_graph
from jax_resnet.models import torchvision_layout as tw
from jax_resnet.runs import saved_run
from jax_resnet.runs.checkpointing import Checkpoints
from jax_resnet.runs.workdirs import ensure_writable
from jax_resnet.training import build

EXPORT_FORMATS = ('msgpack', 'safetensors', 'torchvision', 'onnx')
# Bumped when a field changes meaning or goes away; new fields keep the version.
FORMAT_VERSION = 1
SIDECAR_SUFFIX = '.json'
WEIGHTS_DIGEST = 'weights_sha256'  # in the sidecar: which msgpack bytes it describes


def export_checkpoint(
  workdir: str,
  path: str,
  which: str | int = 'latest',
  export_format: str = 'msgpack',
  weights: str = 'raw',
) -> str:
  """Writes the ``which`` checkpoint's params, batch statistics and inference metadata to
  ``path`` in ``export_format``; returns ``path``. The workdir is only read. ``weights``
  'ema' exports the run's weight average (config.ema_decay)."""
  _check_format(export_format)
  # Before the checkpoint is read: a wrong path fails in a second, not after the restore.
  ensure_writable(path, 'the export')
  run = saved_run.load_run(workdir, which, weights=weights)
  _write_export(run, jax.tree.map(np.asarray, run.variables), path, export_format, weights)
  logging.info('Exported step %d to %s (%s).', run.step, path, export_format)
  return path


def average_checkpoints(
  workdir: str, path: str, last: int, export_format: str = 'msgpack', weights: str = 'raw'
) -> str:
  """Writes the mean of the run's newest ``last`` kept checkpoints' weights as an export
  (timm's avg_checkpoints.py: a cheap gain at the end of a run); BatchNorm statistics are
  averaged too. The metadata is the newest checkpoint's, plus ``averaged_steps``."""
  _check_format(export_format)
  checkpoints = Checkpoints(workdir, read_only=True)
  try:
    steps = sorted(checkpoints.latest.all_steps())
  finally:
    checkpoints.close()
  if not 0 < last <= len(steps):
    raise ConfigError(
      f'--average_last={last}: {workdir} keeps {len(steps)} checkpoint(s) (steps {steps}); '
      'average at most that many (a run keeps --config.keep_checkpoints of them).'
    )
  ensure_writable(path, 'the export')
  chosen = steps[-last:]
  total = None
  for step in chosen:  # a running sum: one checkpoint in memory at a time
    run = saved_run.load_run(workdir, step, weights=weights)
    as_float64 = jax.tree.map(lambda x: np.asarray(x, np.float64), run.variables)
    total = as_float64 if total is None else jax.tree.map(np.add, total, as_float64)
  mean = jax.tree.map(lambda x: (x / last).astype(np.float32), total)
  _write_export(run, mean, path, export_format, weights, averaged_steps=chosen)
  logging.info('Exported the mean of steps %s to %s (%s).', chosen, path, export_format)
  return path


def _check_format(export_format: str) -> None:
  if export_format not in EXPORT_FORMATS:
    raise ConfigError(
      f'Unknown export format {export_format!r}. Valid: {", ".join(EXPORT_FORMATS)}.'
    )


def _write_export(run, variables: dict, path: str, export_format: str, weights: str, **extra):
  """``variables`` (numpy) with ``run``'s inference metadata, in ``export_format``."""
  metadata = {**inference_metadata(run, export_format), 'weights': weights, **extra}
  if export_format == 'torchvision':
    check_torchvision_layout(metadata)
    if run.info.image_shape[-1] != 3:
      logging.warning(
        "%s takes %d-channel images: torchvision's conv1 must be rebuilt for them before "
        'load_state_dict.',
        path,
        run.info.image_shape[-1],
      )
  if jax.process_index() == 0:
    WRITERS[export_format](variables, path, metadata)


def inference_metadata(run: saved_run.SavedRun, export_format: str | None = None) -> dict:
  """What a predictor needs besides the weights, JSON-ready (tuples as lists); the
  ``export_format`` is None for a run read straight from its workdir.

  ``model_options`` are the keywords ``build.model_from_config`` passes, less ``dtype``:
  inference runs in float32 whatever the training compute dtype. ``image_shape`` is what
  the model takes at inference: eval's size (``config.eval_image_size`` when set: train
  low, test high); ``train_image_shape`` the size it trained at (the size of a 'pad'
  set's stored images, which eval resizes to ``image_shape`` on the device).
  """
  config, info = run.config, run.info
  return {
    'format_version': FORMAT_VERSION,
    'export_format': export_format,
    'model': config.model,
    'model_options': build.model_options(config),
    'num_classes': info.num_classes,
    'image_shape': list(eval_image_shape(config.eval_image_size, info)),
    'train_image_shape': list(info.image_shape),
    'mean': [float(m) for m in info.mean],
    'std': [float(s) for s in info.std],
    'class_names': list(info.class_names),
    'crop_style': info.crop_style,
    'eval_crop_fraction': float(info.eval_crop_fraction),
    'resize_antialias': info.resize_antialias,
    'step': run.step,
    'config': json.loads(config.to_json_best_effort()),
  }


def eval_image_shape(eval_image_size: int, info) -> tuple[int, int, int]:
  """The images eval feeds the model (as ``data/transforms.eval_transform`` decodes and
  the eval step resizes them): ``eval_image_size`` square, else the training shape."""
  height, width, channels = info.image_shape
  if eval_image_size:
    return (eval_image_size, eval_image_size, channels)
  return (height, width, channels)


def check_torchvision_layout(metadata: dict) -> None:
  """Refuses, as a UserError, a model torchvision has no ResNet for (CIFAR, preact, plain)."""
  model, stem = metadata['model'], metadata['model_options'].get('stem', 'imagenet')
  if model not in tw.SUPPORTED_MODELS or stem != 'imagenet':
    described = f'{model!r}' + (f' with stem={stem!r}' if stem != 'imagenet' else '')
    raise ConfigError(
      f"export_format='torchvision' needs one of {', '.join(tw.SUPPORTED_MODELS)} with the "
      f"default stem='imagenet'; this run's model is {described}, which torchvision has no "
      "layout for. Use export_format='safetensors' or 'msgpack'."
    )


def sidecar_path(path: str) -> str:
  """Where a msgpack export keeps its metadata: ``PATH.json``."""
  return path + SIDECAR_SUFFIX


def write_msgpack(variables: dict, path: str, metadata: dict | None = None) -> None:
  """``variables`` as one msgpack file (flax serialization), ``metadata`` in ``PATH.json``
  with the SHA-256 of the weights' bytes: an export cut short between the two renames
  leaves a pair that ``read_export`` refuses, never one it reads as a single export."""
  data = flax.serialization.msgpack_serialize(jax.tree.map(np.asarray, variables))
  if metadata is not None:
    sidecar = {**metadata, WEIGHTS_DIGEST: hashlib.sha256(data).hexdigest()}
    text = json.dumps(sidecar, indent=2, sort_keys=True).encode()
    _write_atomically(sidecar_path(path) + '.next', lambda tmp: _write_bytes(tmp, text))
  _write_atomically(path, lambda tmp: _write_bytes(tmp, data))
  if metadata is not None:
    try:
      os.replace(sidecar_path(path) + '.next', sidecar_path(path))
    except OSError as e:
      raise OutputError(
        f'Cannot write the export to {sidecar_path(path)}: {e.strerror or e}.'
      ) from None


def write_safetensors(variables: dict, path: str, metadata: dict) -> None:
  """The flat Flax variables (``params/.../kernel``), ``metadata`` in the header."""
  flat = trees.flatten(trees.weights_only(variables))
  tensors = {key: np.asarray(value) for key, value in flat.items()}
  _write_atomically(path, lambda tmp: tw.save_safetensors(tmp, tensors, metadata))


def write_torchvision(variables: dict, path: str, metadata: dict) -> None:
  """torchvision's ``state_dict`` keys and layouts, ``metadata`` in the header."""
  try:
    tensors = tw.to_torchvision(variables, metadata['model'])
  except ValueError as e:  # a layout torchvision_layout knows but these variables lack
    raise ConfigError(f"export_format='torchvision' cannot export {path}: {e}") from None
  _write_atomically(path, lambda tmp: tw.save_safetensors(tmp, tensors, metadata))


def write_onnx(variables: dict, path: str, metadata: dict) -> None:
  """The inference function as an ONNX model, ``metadata`` in its ``metadata_props``."""
  data = onnx_graph.to_onnx(variables, metadata).SerializeToString()
  _write_atomically(path, lambda tmp: _write_bytes(tmp, data))


WRITERS = {
  'msgpack': write_msgpack,
  'safetensors': write_safetensors,
  'torchvision': write_torchvision,
  'onnx': write_onnx,
}


def read_export(path: str) -> tuple[dict, dict]:
  """(variables, metadata) of a file ``export_checkpoint`` wrote, in any format.

  ``variables`` is ``{'params', 'batch_stats'}`` of numpy arrays, exactly the exported
  ones; ``metadata`` the ``inference_metadata`` record.
  """
  if not os.path.isfile(path):
    raise NotFoundError(f'No export at {path}.')
  if is_safetensors(path):
    return _read_safetensors(path)
  if is_onnx(path):
    raise DataError(
      f'{path} is an ONNX export: a graph for serving (--predict_from, Predictor.from_export '
      'or onnxruntime), not weights to train on. Warm starts and teachers take a workdir or '
      'a msgpack, safetensors or torchvision export.'
    )
  return _read_msgpack(path)


def _read_safetensors(path: str) -> tuple[dict, dict]:
  tensors, metadata = tw.load_safetensors(path)
  if metadata is None:
    raise DataError(
      f'{path} is a safetensors file without the {tw.METADATA_KEY!r} metadata of a '
      'jax_resnet export; its model and preprocessing are unknown.'
    )
  if metadata.get('export_format') == 'torchvision':
    try:
      variables = tw.from_torchvision(tensors, metadata['model'], metadata['num_classes'])
    except ValueError as e:  # tensors that are not the model its metadata names
      raise DataError(f'{path} does not hold the weights its metadata describes: {e}') from None
    return variables, metadata
  return trees.unflatten(tensors), metadata


def _read_msgpack(path: str) -> tuple[dict, dict]:
  with open(path, 'rb') as f:
    data = f.read()
  try:
    variables = flax.serialization.msgpack_restore(data)
  except Exception:  # msgpack raises several kinds for a file that is not msgpack
    variables = None
  if not isinstance(variables, dict) or 'params' not in variables:
    raise DataError(f'{path} is neither a safetensors nor a msgpack export.')
  sidecar = sidecar_path(path)
  if not os.path.isfile(sidecar):
    raise NotFoundError(
      f'{path} has no metadata sidecar {sidecar}: re-export the checkpoint with '
      '--mode=export, which writes both.'
    )
  with open(sidecar) as f:
    metadata = json.load(f)
  digest = metadata.pop(WEIGHTS_DIGEST, None)  # exports before it was kept have none
  if digest is not None and digest != hashlib.sha256(data).hexdigest():
    raise DataError(
      f'{sidecar} describes other weights than {path} (an export cut short between its '
      'two files): export the checkpoint again.'
    )
  return variables, metadata


def is_safetensors(path: str) -> bool:
  """safetensors files start with the header's length (8 bytes, little-endian), then '{'."""
  with open(path, 'rb') as f:
    head = f.read(9)
  if len(head) < 9 or head[8:9] != b'{':
    return False
  return int.from_bytes(head[:8], 'little') <= os.path.getsize(path) - 8


def is_onnx(path: str) -> bool:
  """An ONNX model is a protobuf whose first field is ``ir_version`` (tag byte 0x08); a
  msgpack export is a map (0x80-0x8f, 0xde or 0xdf), a safetensors file starts with its
  header's length."""
  if is_safetensors(path):
    return False
  with open(path, 'rb') as f:
    return f.read(1) == b'\x08'


def _write_bytes(path: str, data: bytes) -> None:
  with open(path, 'wb') as f:
    f.write(data)


def _write_atomically(path: str, write) -> None:
  """``write(tmp)`` then a rename: a failed export leaves no half-written file at ``path``."""
  ensure_writable(path, 'the export')
  tmp = f'{path}.tmp-{os.getpid()}'
  try:
    write(tmp)
    os.replace(tmp, path)
  except OSError as e:
    raise OutputError(f'Cannot write the export to {path}: {e.strerror or e}.') from None
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
