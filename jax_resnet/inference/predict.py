"""Predict: class probabilities for images, from a run's workdir or from an export.

``Predictor`` applies the run's own eval preprocessing (``image_prep``: eval's crop and
resize in numpy and Pillow, since prediction runs where TensorFlow is absent), so callers
pass plain uint8 images of any size. ``predict_files`` runs a predictor over image files
into a CSV.
"""

import concurrent.futures
import csv
import functools
import glob
import json
import os
from collections.abc import Iterable, Sequence

import jax
import numpy as np
from absl import logging

from jax_resnet import models
from jax_resnet.augment import image_ops
from jax_resnet.errors import DataError, NotFoundError, OutputError
from jax_resnet.inference import export, onnx_graph
from jax_resnet.inference.image_prep import center_crop, read_image, resize_bilinear, to_channels
from jax_resnet.runs import saved_run
from jax_resnet.runs.workdirs import ensure_writable

DEFAULT_BATCH_SIZE = 256
# What a folder is searched for; files named explicitly or by a glob are tried whatever
# their extension.
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
DECODE_THREADS = 8


class Predictor:
  """A trained model with its eval preprocessing: uint8 images in, probabilities out."""

  def __init__(self, variables: dict, metadata: dict, batch_size: int = DEFAULT_BATCH_SIZE):
    """``variables``/``metadata`` as ``export.read_export`` returns them."""
    self._describe(metadata, batch_size)
    model = models.create_model(metadata['model'], self.num_classes, **metadata['model_options'])
    self._variables = jax.device_put(jax.tree.map(np.asarray, variables))
    normalisation = dict(mean=tuple(metadata['mean']), std=tuple(metadata['std']))
    self._forward = jax.jit(
      functools.partial(_probabilities, model.apply, **normalisation), static_argnames='flip'
    )
    self._features = jax.jit(functools.partial(_features, model.apply, **normalisation))

  def _describe(self, metadata: dict, batch_size: int) -> None:
    """What every predictor knows from the metadata: classes, shapes, preprocessing."""
    self.metadata = metadata
    self.num_classes = int(metadata['num_classes'])
    self.image_shape = tuple(metadata['image_shape'])  # eval's size: what the model takes
    # A 'pad' set's stored size, which eval resizes from (exports before the field: the same).
    self.train_image_shape = tuple(metadata.get('train_image_shape', self.image_shape))
    self.class_names = tuple(metadata['class_names']) or tuple(
      str(i) for i in range(self.num_classes)
    )
    self.batch_size = batch_size

  @classmethod
  def from_workdir(
    cls,
    workdir: str,
    which: str | int = 'best',
    batch_size: int = DEFAULT_BATCH_SIZE,
    weights: str = 'raw',
  ) -> 'Predictor':
    """The ``which`` checkpoint ('best', 'latest' or a step) of a run, its trained
    weights or (``weights='ema'``) their average; only reads ``workdir``."""
    run = saved_run.load_run(workdir, which, weights=weights)
    return cls(run.variables, export.inference_metadata(run), batch_size)

  @classmethod
  def from_export(cls, path: str, batch_size: int = DEFAULT_BATCH_SIZE) -> 'Predictor':
    """A file ``export.export_checkpoint`` wrote, in any of its formats (an ONNX export
    runs with onnxruntime: ``OnnxPredictor``)."""
    if os.path.isfile(path) and export.is_onnx(path):
      return OnnxPredictor(path, batch_size)
    return cls(*export.read_export(path), batch_size)

  def prepare(self, image: np.ndarray) -> np.ndarray:
    """One uint8 image (HW or HWC, any size) as the model takes it: eval's crop and resize,
    at eval's size (``config.eval_image_size`` when the run set it).

    'random_resized' sets crop and resize straight to that size, as eval decodes them.
    'pad' sets are resized to the size the data source stores, then, when eval's differs,
    as ``augment.pipeline.resize_images`` resizes them on the device (antialiased; equal within one
    level on rare .5 ties).
    """
    metadata = self.metadata
    image = to_channels(image, self.image_shape[2])
    antialias = metadata['resize_antialias']
    if metadata['crop_style'] == 'random_resized':
      return resize_bilinear(
        center_crop(image, metadata['eval_crop_fraction']), self.image_shape[:2], antialias
      )
    image = resize_bilinear(image, self.train_image_shape[:2], antialias)
    return resize_bilinear(image, self.image_shape[:2], antialias=True)

  def __call__(self, images, batch_size: int | None = None, flip: bool = False) -> np.ndarray:
    """float32 [N, num_classes] probabilities of a list of uint8 images or an NHWC array.

    ``flip`` averages the probabilities of each image and its mirror image.
    """
    prepared = [self.prepare(image) for image in _as_image_list(images)]
    if not prepared:
      return np.zeros((0, self.num_classes), np.float32)
    return self.predict_prepared(np.stack(prepared), batch_size, flip)

  def predict_prepared(
    self, batch: np.ndarray, batch_size: int | None = None, flip: bool = False
  ) -> np.ndarray:
    """Probabilities of images ``prepare`` has made ready: uint8 [N, *image_shape]."""
    forward = functools.partial(self._forward, self._variables, flip=flip)
    return _in_chunks(forward, batch, batch_size or self.batch_size)

  def embed(self, images, batch_size: int | None = None) -> np.ndarray:
    """float32 [N, embedding_size]: the pooled features the head reads (timm's
    ``num_classes=0`` output), of a list of uint8 images or an NHWC array."""
    prepared = [self.prepare(image) for image in _as_image_list(images)]
    if not prepared:
      return np.zeros((0, self.embedding_size), np.float32)
    return self.embed_prepared(np.stack(prepared), batch_size)

  def embed_prepared(self, batch: np.ndarray, batch_size: int | None = None) -> np.ndarray:
    """Embeddings of images ``prepare`` has made ready."""
    features = functools.partial(self._features, self._variables)
    return _in_chunks(features, batch, batch_size or self.batch_size)

  @property
  def embedding_size(self) -> int:
    """The width of ``embed``'s rows (64 for ResNet-20, 2,048 for ResNet-50)."""
    return int(np.shape(self._variables['params']['head']['kernel'])[0])

  def top_k(
    self, images, k: int = 5, batch_size: int | None = None, flip: bool = False
  ) -> list[list[tuple[str, float]]]:
    """For each image, the ``k`` likeliest (class name, probability), likeliest first."""
    return self.named_top_k(self(images, batch_size, flip), k)

  def named_top_k(self, probabilities: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
    """The ``k`` largest of each row of ``probabilities``, with class names."""
    k = min(k, self.num_classes)
    order = np.argsort(-probabilities, axis=1, kind='stable')[:, :k]
    return [
      [(self.class_names[i], float(row[i])) for i in best]
      for row, best in zip(probabilities, order)
    ]


class OnnxPredictor(Predictor):
  """A ``Predictor`` of an ONNX export (``--export_format=onnx``), run by onnxruntime on the
  CPU: the same preprocessing (from the model's ``metadata_props``), probabilities, flip
  and embeddings, with no JAX in the forward pass."""

  def __init__(self, path: str, batch_size: int = DEFAULT_BATCH_SIZE):
    self._session = onnx_graph.onnxruntime_session(path)
    props = self._session.get_modelmeta().custom_metadata_map
    if onnx_graph.METADATA_KEY not in props:
      raise DataError(
        f'{path} is an ONNX model without the {onnx_graph.METADATA_KEY!r} metadata of a '
        'jax_resnet export; its classes and preprocessing are unknown.'
      )
    self._describe(json.loads(props[onnx_graph.METADATA_KEY]), batch_size)

  def _run(self, batch: np.ndarray, output: str) -> np.ndarray:
    return self._session.run([output], {onnx_graph.INPUT_NAME: batch})[0]

  def predict_prepared(self, batch, batch_size=None, flip=False) -> np.ndarray:
    def forward(chunk):
      probabilities = self._run(chunk, 'probabilities')
      if flip:
        mirrored = self._run(np.ascontiguousarray(chunk[:, :, ::-1]), 'probabilities')
        probabilities = (probabilities + mirrored) / 2
      return probabilities

    return _in_chunks(forward, batch, batch_size or self.batch_size)

  def embed_prepared(self, batch, batch_size=None) -> np.ndarray:
    forward = functools.partial(self._run, output='embeddings')
    return _in_chunks(forward, batch, batch_size or self.batch_size)

  @property
  def embedding_size(self) -> int:
    (embeddings,) = [o for o in self._session.get_outputs() if o.name == 'embeddings']
    return int(embeddings.shape[-1])


def _probabilities(apply_fn, variables, images, mean, std, flip: bool):
  """Softmax of the eval-mode logits, averaged with the mirror image's when ``flip`` (the
  prepared image mirrored, as a train-time flip mirrors the resized one)."""
  x = image_ops.normalize(images, mean, std)
  probabilities = jax.nn.softmax(apply_fn(variables, x, train=False))
  if flip:
    mirrored = jax.nn.softmax(apply_fn(variables, x[:, :, ::-1], train=False))
    probabilities = (probabilities + mirrored) / 2
  return probabilities


def _features(apply_fn, variables, images, mean, std):
  x = image_ops.normalize(images, mean, std)
  return apply_fn(variables, x, train=False, features=True)


def _in_chunks(fn, batch: np.ndarray, batch_size: int) -> np.ndarray:
  """``fn`` over ``batch`` in chunks of ``batch_size``, every chunk queued before the
  first result is awaited; a short last chunk is padded to a power of two (few shapes,
  few compilations)."""
  dispatched = []
  for start in range(0, len(batch), batch_size):
    chunk = batch[start : start + batch_size]
    padded = _pad_to(chunk, min(batch_size, _next_power_of_two(len(chunk))))
    dispatched.append((fn(padded), len(chunk)))
  return np.concatenate([np.asarray(output)[:count] for output, count in dispatched])


def _as_image_list(images) -> list:
  if isinstance(images, np.ndarray) or hasattr(images, 'shape'):
    if np.ndim(images) != 4:
      raise ValueError(
        f'An array of images must be NHWC; got shape {np.shape(images)}. Pass a list for '
        'images of different sizes or a single image.'
      )
  return list(images)


def _pad_to(batch: np.ndarray, size: int) -> np.ndarray:
  if len(batch) == size:
    return batch
  return np.concatenate([batch, np.zeros((size - len(batch), *batch.shape[1:]), batch.dtype)])


def _next_power_of_two(n: int) -> int:
  return 1 << max(0, n - 1).bit_length()


def find_images(inputs: Iterable[str]) -> list[str]:
  """The image files of ``inputs`` (files, folders searched recursively, glob patterns), in
  order, each once; a NotFoundError naming every input that matched nothing."""
  found, missing = [], []
  for pattern in inputs:
    pattern = os.path.expanduser(pattern)
    matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
    files = []
    for match in matches:
      if os.path.isdir(match):
        files += images_under(match)
      elif os.path.isfile(match):
        files.append(match)
    if not files:
      missing.append(pattern)
    found += files
  if missing:
    raise NotFoundError(
      f'No image files at {", ".join(map(repr, missing))} (expected files, folders of '
      f'{"/".join(IMAGE_EXTENSIONS)} images, or glob patterns).'
    )
  return list(dict.fromkeys(found))


def images_under(folder: str) -> list[str]:
  paths = []
  for dirpath, dirnames, filenames in os.walk(folder):
    dirnames.sort()
    paths += [
      os.path.join(dirpath, name)
      for name in sorted(filenames)
      if name.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(dirpath, name))
    ]
  return paths


def predict_files(
  predictor: Predictor,
  inputs: Sequence[str],
  output_csv: str,
  top_k: int = 5,
  batch_size: int | None = None,
  flip: bool = False,
) -> dict:
  """Writes the ``top_k`` classes of each image in ``inputs`` to ``output_csv``.

  Columns: ``path``, then ``class_i``, ``prob_i`` for i in 1..k. A file that does not
  decode is named in a warning and skipped. Returns a summary: ``output_csv``,
  ``num_images`` (rows written), ``num_skipped`` and ``skipped`` (their paths).
  """
  paths = find_images([inputs] if isinstance(inputs, str) else inputs)
  target = os.path.realpath(output_csv)
  if any(os.path.realpath(p) == target for p in paths):
    raise OutputError(
      f'--predict_output={output_csv} is one of the input images: choose another path.'
    )
  batch_size = batch_size or predictor.batch_size
  k = min(top_k, predictor.num_classes)
  num_images, skipped = 0, []
  partial = f'{output_csv}.partial-{os.getpid()}'
  with (
    _CompleteOrNothing(output_csv, partial) as f,
    concurrent.futures.ThreadPoolExecutor(DECODE_THREADS) as pool,
  ):
    writer = csv.writer(f)
    writer.writerow(
      ['path'] + [f'{name}_{i}' for i in range(1, k + 1) for name in ('class', 'prob')]
    )
    for start in range(0, len(paths), batch_size):
      chunk = paths[start : start + batch_size]
      # Decoded and prepared in threads: Pillow and numpy release the GIL.
      prepared = dict(zip(chunk, pool.map(functools.partial(prepare_file, predictor), chunk)))
      skipped += [path for path, image in prepared.items() if image is None]
      decoded = {path: image for path, image in prepared.items() if image is not None}
      rows = _top_k_rows(predictor, decoded, k, batch_size, flip)
      writer.writerows(rows)
      num_images += len(rows)
  if skipped:
    logging.warning('Skipped %d of %d files that cannot be decoded.', len(skipped), len(paths))
  logging.info('Wrote the top-%d classes of %d images to %s.', k, num_images, output_csv)
  return {
    'output_csv': output_csv,
    'num_images': num_images,
    'num_skipped': len(skipped),
    'skipped': skipped,
  }


class _CompleteOrNothing:
  """The CSV written to ``partial`` beside ``path`` and renamed to ``path`` once complete:
  a run cut short leaves the earlier predictions as they were (and its ``.partial-PID``
  file), and of two runs to one path the last to finish wins, never a mix."""

  def __init__(self, path: str, partial: str):
    self.path, self.partial = path, partial

  def __enter__(self):
    self.file = _open_csv(self.path, self.partial)
    return self.file

  def __exit__(self, kind, error, traceback):
    self.file.close()
    if kind is None:
      try:
        os.replace(self.partial, self.path)
      except OSError as e:
        raise OutputError(
          f'Cannot write the predictions to {self.path}: {e.strerror or e}.'
        ) from None
    elif os.path.exists(self.partial):
      os.remove(self.partial)
    return False


def _open_csv(path: str, partial: str):
  ensure_writable(path, 'the predictions')
  try:
    return open(partial, 'w', newline='')
  except OSError as e:
    raise OutputError(f'Cannot write the predictions to {path}: {e.strerror or e}.') from None


def _top_k_rows(predictor: Predictor, prepared: dict, k: int, batch_size: int, flip: bool):
  """CSV rows (path, class_1, prob_1, ...) of prepared images keyed by their paths."""
  if not prepared:
    return []
  probabilities = predictor.predict_prepared(np.stack(list(prepared.values())), batch_size, flip)
  return [
    [path] + [value for name, p in best for value in (name, f'{p:.6g}')]
    for path, best in zip(prepared, predictor.named_top_k(probabilities, k))
  ]


def prepare_file(predictor: Predictor, path: str) -> np.ndarray | None:
  """The model-ready image of ``path``; None (with a warning naming it) if it cannot be read."""
  try:
    image = read_image(path)
  except Exception as e:  # anything Pillow cannot read is skipped, never a crash
    logging.warning('Skipping %s: it cannot be decoded (%s: %s).', path, type(e).__name__, e)
    return None
  return predictor.prepare(image)
