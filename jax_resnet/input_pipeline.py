"""tf.data input: the embedded digits set, tensorflow-datasets and folders of images.

Batches are process-local dicts of numpy arrays: ``image`` uint8 NHWC, ``label`` int32,
and for eval a float ``mask`` that is 0 on padding. Normalisation and Cutout happen on
the device (see augment.py), so the host only decodes, crops, flips and ships uint8.

Two train augmentations (``config.train_crop``):

- ``pad``: pad-and-random-crop plus flip on decoded, fixed-size images (digits, CIFAR).
  The decoded set is cached in memory; ``device_data.py`` can do the same on the device.
- ``random_resized``: ImageNet-style. The source keeps the encoded JPEG/PNG bytes (tfds
  ``SkipDecoding``) or file paths; each example is decoded only inside the crop window
  (``tf.image.decode_and_crop_jpeg``), resized to ``config.image_size``, flipped and
  optionally colour-jittered. Eval decodes a centred square of
  ``config.eval_crop_fraction`` of the shorter side, i.e. resize-shorter-side to
  ``image_size / 0.875`` then centre crop.

``auto`` picks ``random_resized`` for data sets of variable image size (imagenet2012,
folders) and ``pad`` otherwise.

Augmentation randomness is stateless and keyed by (seed, epoch, example index), so an
epoch's batches are the same however many threads decode them and wherever a run resumes;
on resume, the examples before ``start_step`` are skipped before any read or decode.
Each process reads only its own shard of the examples.
"""

import concurrent.futures
import dataclasses
import hashlib
import io
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

# TensorFlow must never take accelerator memory from JAX.
tf.config.set_visible_devices([], 'GPU')

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
KNOWN_STATS = {
  'cifar10': (
    (0.4914 * 255, 0.4822 * 255, 0.4465 * 255),
    (0.2470 * 255, 0.2435 * 255, 0.2616 * 255),
  ),
  'cifar100': (
    (0.5071 * 255, 0.4865 * 255, 0.4409 * 255),
    (0.2673 * 255, 0.2564 * 255, 0.2762 * 255),
  ),
}
EMBEDDED_DATASETS = ('digits',)
FOLDER = 'folder'
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
CLASS_INDEX_FILE = 'class_index.json'
DIGITS_SPLIT_SEED = 0  # fixed: the digits train/test split never changes
DIGITS_TEST_FRACTION = 0.2
CROP_STYLES = ('auto', 'pad', 'random_resized')
NOT_IN_MEMORY = (
  'config.data_on_device keeps a small, decoded data set (digits, cifar10, cifar100, '
  '...) on the device; this one is decoded from files on the fly. Use '
  '--config.data_on_device=false.'
)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  num_classes: int
  num_train: int
  num_eval: int
  image_shape: tuple[int, int, int]  # what the model sees: (H, W, C)
  mean: tuple[float, ...]  # per channel, in uint8 units
  std: tuple[float, ...]


@dataclasses.dataclass
class Dataset:
  """A data set split for this process: tf.data sources plus what the model needs.

  ``train`` holds this process's raw examples (decoded images, encoded bytes or file
  paths); ``train_transform(example, seed)`` turns one into {'image' uint8, 'label'
  int32}, stateless in ``seed``. ``eval`` is ready to batch.
  """

  info: DatasetInfo
  train: tf.data.Dataset
  eval: tf.data.Dataset
  train_transform: Callable | None = None  # None: pad-and-crop/flip per the config
  decodes: bool = False  # train_transform decodes files: undecodable ones are dropped
  class_names: tuple[str, ...] | None = None
  num_skipped: dict[str, int] = dataclasses.field(default_factory=dict)  # bad files
  # Every process holds the whole (small) train split and takes its rows of each global
  # batch, so the global batches do not depend on the number of processes.
  replicated_train: bool = False


def check_dataset_name(name: str) -> None:
  if name in EMBEDDED_DATASETS or name == FOLDER:
    return
  try:
    tfds.builder_cls(name)
  except Exception:  # tfds raises DatasetNotFoundError with a long list
    raise ValueError(
      f'Unknown dataset {name!r}. Valid: {", ".join(EMBEDDED_DATASETS)}, {FOLDER} '
      '(class sub-folders of JPEG/PNG files in config.train_dir/config.eval_dir), or '
      'any tensorflow-datasets name such as cifar10, cifar100, imagenet2012.'
    ) from None


def load_dataset(config: ml_collections.ConfigDict, workdir: str | None = None) -> Dataset:
  """The configured data set; ``workdir`` receives any files describing it (class maps)."""
  check_dataset_name(config.dataset)
  if config.dataset == 'digits':
    return _load_digits(config)
  if config.dataset == FOLDER:
    return _load_folder(config, workdir)
  return _load_tfds(config)


def _crop_style(config, variable_size: bool) -> str:
  style = config.get('train_crop', 'auto')
  if style not in CROP_STYLES:
    raise ValueError(f'config.train_crop={style!r}: valid values are {", ".join(CROP_STYLES)}.')
  if style == 'auto':
    return 'random_resized' if variable_size else 'pad'
  return style


# ----------------------------------------------------------------------------- digits


def _digits_arrays(config):
  """scikit-learn's bundled 1,797 8x8 digits, split 80/20 with a fixed seed."""
  from sklearn import datasets as sk_datasets

  digits = sk_datasets.load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int32)
  order = np.random.RandomState(DIGITS_SPLIT_SEED).permutation(len(labels))
  num_test = int(round(len(labels) * DIGITS_TEST_FRACTION))
  test, train = order[:num_test], order[num_test:]
  size = config.image_size
  if size != images.shape[1]:
    images = tf.cast(
      tf.round(tf.clip_by_value(tf.image.resize(images, (size, size), method='bilinear'), 0, 255)),
      tf.uint8,
    ).numpy()
  x_train = images[train]
  mean = tuple(float(m) for m in x_train.reshape(-1, 1).mean(0))
  std = tuple(float(s) for s in x_train.reshape(-1, 1).std(0))
  info = DatasetInfo(
    num_classes=10,
    num_train=len(train),
    num_eval=len(test),
    image_shape=(size, size, 1),
    mean=mean,
    std=std,
  )
  return x_train, labels[train], images[test], labels[test], info


def _load_digits(config) -> Dataset:
  x_train, y_train, x_test, y_test, info = _digits_arrays(config)
  index, count = jax.process_index(), jax.process_count()
  return Dataset(
    info,
    train=tf.data.Dataset.from_tensor_slices({'image': x_train, 'label': y_train}),
    eval=tf.data.Dataset.from_tensor_slices(
      {'image': x_test[index::count], 'label': y_test[index::count]}
    ),
    train_transform=_pad_transform(config),
    replicated_train=True,
  )


# ------------------------------------------------------------------------------- tfds


def _prepare_hint(name: str, data_dir: str | None) -> str:
  where = f' --data_dir={data_dir}' if data_dir else ''
  if name.startswith('imagenet'):
    return (
      'ImageNet cannot be downloaded automatically: place ILSVRC2012_img_train.tar '
      'and ILSVRC2012_img_val.tar in <data_dir>/downloads/manual/, then run '
      f'`tfds build {name}{where}` once.'
    )
  return f'Prepare it once with `tfds build {name}{where}` on a machine with internet.'


def _load_tfds(config) -> Dataset:
  builder = tfds.builder(config.dataset, data_dir=config.get('data_dir') or None)
  image_feature = builder.info.features['image']
  shape = tuple(image_feature.shape)
  style = _crop_style(config, shape[0] is None or shape[1] is None)
  channels = shape[-1] or 3
  decoders = {'image': tfds.decode.SkipDecoding()} if style == 'random_resized' else None
  try:
    train = _as_dataset(builder, config.train_split, train=True, decoders=decoders)
    eval_ = _as_dataset(builder, config.eval_split, train=False, decoders=decoders)
  except AssertionError as e:
    raise FileNotFoundError(
      f'Dataset {config.dataset!r} is not prepared in '
      f'{config.get("data_dir") or "the default tfds data_dir"}. '
      f'{_prepare_hint(config.dataset, config.get("data_dir"))} ({e})'
    ) from None
  num_classes = builder.info.features['label'].num_classes
  mean, std = KNOWN_STATS.get(config.dataset, (IMAGENET_MEAN, IMAGENET_STD))
  if channels != len(mean):
    mean, std = (sum(mean) / len(mean),) * channels, (sum(std) / len(std),) * channels
  info = DatasetInfo(
    num_classes=num_classes,
    num_train=_num_examples(builder, config.train_split, train),
    num_eval=_num_examples(builder, config.eval_split, eval_),
    image_shape=(config.image_size, config.image_size, channels),
    mean=mean,
    std=std,
  )
  cache = bool(config.get('cache', True))
  keep = lambda x: {'image': x['image'], 'label': tf.cast(x['label'], tf.int32)}
  if style == 'pad':
    resize = lambda x: {
      'image': _resize_if_needed(x['image'], config.image_size),
      'label': tf.cast(x['label'], tf.int32),
    }
    train = train.map(resize, tf.data.AUTOTUNE)
    eval_ = eval_.map(resize, tf.data.AUTOTUNE)
    if cache:
      train, eval_ = train.cache(), eval_.cache()
    return Dataset(info, train=train, eval=eval_, train_transform=_pad_transform(config))
  train, eval_ = train.map(keep), eval_.map(keep)
  if cache:  # the encoded bytes: cheap to hold for CIFAR-sized sets, not for ImageNet
    train, eval_ = train.cache(), eval_.cache()
  eval_ = eval_.map(_eval_transform(config, channels), tf.data.AUTOTUNE)
  return Dataset(
    info,
    train=train,
    eval=eval_.ignore_errors(log_warning=True),
    train_transform=_random_resized_transform(config, channels),
    decodes=True,
  )


def _as_dataset(builder, split: str, train: bool, decoders=None) -> tf.data.Dataset:
  if jax.process_count() > 1:
    split = tfds.split_for_jax_process(split, drop_remainder=train)
  read_config = tfds.ReadConfig(shuffle_seed=0, try_autocache=False)
  return builder.as_dataset(
    split=split, shuffle_files=False, read_config=read_config, decoders=decoders
  )


def _num_examples(builder, split: str, ds: tf.data.Dataset) -> int:
  """The global size of a split (info when prepared; counted when mocked in tests)."""
  try:
    return builder.info.splits[split].num_examples
  except (KeyError, ValueError):
    local = int(ds.reduce(0, lambda n, _: n + 1).numpy())
    return local * jax.process_count()


def _resize_if_needed(image, size: int):
  if image.shape[0] == size and image.shape[1] == size:
    return image
  image = tf.image.resize(image, (size, size), method='bilinear', antialias=True)
  return tf.cast(tf.round(tf.clip_by_value(image, 0, 255)), tf.uint8)


# ----------------------------------------------------------------------------- folder


def _list_class_folders(root: str, field: str) -> tuple[list[str], list[str], list[int]]:
  """(class names sorted, file paths, labels) of ``root``/<class>/**.{jpg,jpeg,png}."""
  if not root:
    raise ValueError(
      f'config.dataset={FOLDER!r} needs config.{field}: a folder with one '
      'sub-folder of JPEG/PNG images per class.'
    )
  if not tf.io.gfile.isdir(root):
    raise FileNotFoundError(f'config.{field}={root!r} is not a directory.')
  classes = sorted(
    name.rstrip('/')
    for name in tf.io.gfile.listdir(root)
    if tf.io.gfile.isdir(os.path.join(root, name))
  )
  if not classes:
    raise ValueError(
      f'config.{field}={root!r} has no class sub-folders; expected {root}/<class name>/<image>.jpg.'
    )
  paths, labels, empty = [], [], []
  for label, name in enumerate(classes):
    found = []
    for dirpath, _, files in tf.io.gfile.walk(os.path.join(root, name)):
      found += [os.path.join(dirpath, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not found:
      empty.append(name)
    paths += sorted(found)
    labels += [label] * len(found)
  if not paths:
    raise ValueError(
      f'config.{field}={root!r} holds no JPEG or PNG images '
      f'({", ".join(IMAGE_EXTENSIONS)}) in its class sub-folders.'
    )
  if empty:
    raise ValueError(
      f'config.{field}={root!r}: class folder(s) with no JPEG or PNG '
      f'images: {", ".join(empty[:10])}{" ..." if len(empty) > 10 else ""}.'
    )
  return classes, paths, labels


def _check_image(path: str) -> str | None:
  """None if ``path`` decodes as a JPEG or PNG, else why not (fast: JPEGs at 1/8 scale)."""
  from PIL import Image

  try:
    with tf.io.gfile.GFile(path, 'rb') as f:
      data = f.read()
    with Image.open(io.BytesIO(data)) as image:
      if image.format not in ('JPEG', 'PNG'):
        return f'{image.format} is not JPEG or PNG'
      if image.format == 'JPEG':
        image.draft('RGB', (max(1, image.size[0] // 8), max(1, image.size[1] // 8)))
      image.load()
  except Exception as e:  # anything Pillow cannot read, tf.data would fail on
    return f'{type(e).__name__}: {e}'
  return None


def _drop_undecodable(
  paths: Sequence[str], labels: Sequence[int], what: str, record: str | None = None
):
  """Drops (and names) the files that do not decode.

  ``record`` (a file in the workdir) remembers the verdict for this exact list of
  files, so a resumed run does not read them all again.
  """
  digest = hashlib.sha1('\n'.join(paths).encode()).hexdigest()
  problems = None
  if record and tf.io.gfile.exists(record):
    try:
      with tf.io.gfile.GFile(record) as f:
        saved = json.load(f)
      if saved.get('digest') == digest:
        bad = dict(saved['bad'])
        problems = [bad.get(p) for p in paths]
    except (ValueError, KeyError, TypeError, tf.errors.OpError):
      problems = None
  if problems is None:
    with concurrent.futures.ThreadPoolExecutor(max(4, os.cpu_count() or 1)) as pool:
      problems = list(pool.map(_check_image, paths))
    if record:
      tf.io.gfile.makedirs(os.path.dirname(record))
      with tf.io.gfile.GFile(record, 'w') as f:
        json.dump(
          {'digest': digest, 'bad': [[p, why] for p, why in zip(paths, problems) if why]}, f
        )
  bad = [(p, why) for p, why in zip(paths, problems) if why]
  for path, why in bad:
    logging.warning('Skipping %s: it cannot be decoded (%s).', path, why)
  if bad:
    logging.warning(
      'Skipped %d of %d %s files on this process that cannot be decoded.',
      len(bad),
      len(paths),
      what,
    )
  keep = [i for i, why in enumerate(problems) if not why]
  return [paths[i] for i in keep], [labels[i] for i in keep], len(bad)


def _global_sum(n: int) -> int:
  if jax.process_count() == 1:
    return n
  from jax.experimental import multihost_utils

  return int(np.sum(multihost_utils.process_allgather(np.asarray(n, np.int64))))


def _read(example):
  return {'image': tf.io.read_file(example['path']), 'label': example['label']}


def _load_folder(config, workdir: str | None) -> Dataset:
  classes, train_paths, train_labels = _list_class_folders(config.get('train_dir'), 'train_dir')
  eval_classes, eval_paths, eval_names = _list_class_folders(config.get('eval_dir'), 'eval_dir')
  unknown = sorted(set(eval_classes) - set(classes))
  if unknown:
    raise ValueError(
      f'config.eval_dir={config.eval_dir!r} has classes absent from '
      f'config.train_dir={config.train_dir!r}: {", ".join(unknown[:10])}'
      f'{" ..." if len(unknown) > 10 else ""}.'
    )
  to_train_label = {i: classes.index(name) for i, name in enumerate(eval_classes)}
  eval_labels = [to_train_label[i] for i in eval_names]
  if workdir and jax.process_index() == 0:
    tf.io.gfile.makedirs(workdir)
    with tf.io.gfile.GFile(os.path.join(workdir, CLASS_INDEX_FILE), 'w') as f:
      json.dump({name: i for i, name in enumerate(classes)}, f, indent=0)

  index, count = jax.process_index(), jax.process_count()
  verify = bool(config.get('verify_images', True))
  skipped = {'train': 0, 'eval': 0}
  splits = {}
  for what, paths, labels in (
    ('train', train_paths, train_labels),
    ('eval', eval_paths, eval_labels),
  ):
    paths, labels = paths[index::count], labels[index::count]  # this process's shard
    if verify:
      record = workdir and os.path.join(workdir, f'verified_{what}_files.{index}.json')
      paths, labels, bad = _drop_undecodable(paths, labels, what, record)
      skipped[what] = _global_sum(bad)
    splits[what] = (paths, labels)
  num_train = _global_sum(len(splits['train'][0]))
  num_eval = _global_sum(len(splits['eval'][0]))
  if num_train == 0:
    raise ValueError(f'No decodable images in config.train_dir={config.train_dir!r}.')
  size = config.image_size
  info = DatasetInfo(
    num_classes=len(classes),
    num_train=num_train,
    num_eval=num_eval,
    image_shape=(size, size, 3),
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
  )
  source = lambda paths, labels: tf.data.Dataset.from_tensor_slices(
    {'path': tf.constant(paths, tf.string), 'label': tf.constant(labels, tf.int32)}
  )
  train = source(*splits['train'])
  eval_ = source(*splits['eval']).map(_read, tf.data.AUTOTUNE)
  if config.get('cache', False):  # the encoded bytes, read once
    train = train.map(_read, tf.data.AUTOTUNE).cache()
    eval_ = eval_.cache()
  eval_ = eval_.map(_eval_transform(config, 3), tf.data.AUTOTUNE)
  return Dataset(
    info,
    train=train,
    eval=eval_.ignore_errors(log_warning=True),
    train_transform=_random_resized_transform(config, 3),
    decodes=True,
    class_names=tuple(classes),
    num_skipped=skipped,
  )


# ------------------------------------------------------------------------ transforms


def crop_and_flip(image, seed, pad: int, flip: bool):
  """Pad-and-random-crop plus optional horizontal flip, stateless in ``seed``."""
  if pad > 0:
    h, w = image.shape[0], image.shape[1]
    padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
    image = tf.image.stateless_random_crop(padded, [h, w, image.shape[2]], seed)
  if flip:
    image = tf.image.stateless_random_flip_left_right(
      image, tf.random.experimental.stateless_fold_in(seed, 1)
    )
  return image


def _pad_transform(config):
  pad, flip = config.random_crop_pad, config.random_flip

  def transform(example, seed):
    return {'image': crop_and_flip(example['image'], seed, pad, flip), 'label': example['label']}

  return transform


def random_resized_crop_window(
  shape, seed, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), attempts: int = 10
):
  """torchvision's RandomResizedCrop window, stateless: int32 [y, x, height, width].

  Up to ``attempts`` (area fraction uniform in ``scale``, aspect ratio log-uniform in
  ``ratio``) candidates; the first that fits the image wins, else a centre crop of the
  whole image clamped to ``ratio``.
  """
  height = tf.cast(shape[0], tf.float32)
  width = tf.cast(shape[1], tf.float32)
  seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 4)
  area = height * width * tf.random.stateless_uniform([attempts], seeds[0], scale[0], scale[1])
  aspect = tf.exp(
    tf.random.stateless_uniform([attempts], seeds[1], math.log(ratio[0]), math.log(ratio[1]))
  )
  w = tf.round(tf.sqrt(area * aspect))
  h = tf.round(tf.sqrt(area / aspect))
  fits = (w > 0) & (h > 0) & (w <= width) & (h <= height)
  first = tf.argmax(tf.cast(fits, tf.int32))
  found = tf.reduce_any(fits)
  in_ratio = width / height
  fallback_w = tf.where(in_ratio > ratio[1], tf.round(height * ratio[1]), width)
  fallback_h = tf.where(in_ratio < ratio[0], tf.round(width / ratio[0]), height)
  crop_h = tf.where(found, h[first], fallback_h)
  crop_w = tf.where(found, w[first], fallback_w)
  u = tf.random.stateless_uniform([2], seeds[2])
  y = tf.where(found, tf.floor(u[0] * (height - crop_h + 1)), tf.floor((height - crop_h) / 2))
  x = tf.where(found, tf.floor(u[1] * (width - crop_w + 1)), tf.floor((width - crop_w) / 2))
  return tf.cast(tf.stack([y, x, crop_h, crop_w]), tf.int32)


def center_crop_window(shape, fraction: float = 0.875):
  """A centred square of ``fraction`` of the shorter side: [y, x, side, side]."""
  height, width = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
  side = tf.maximum(tf.round(tf.minimum(height, width) * fraction), 1.0)
  y, x = tf.floor((height - side) / 2), tf.floor((width - side) / 2)
  return tf.cast(tf.stack([y, x, side, side]), tf.int32)


def _decode_any(data, channels: int):
  """JPEG, PNG (grey, RGBA, 16-bit), ... to uint8 with ``channels`` (grey -> RGB)."""
  image = tf.io.decode_image(data, channels=channels, expand_animations=False, dtype=tf.uint8)
  image.set_shape([None, None, channels])
  return image


def decode_and_crop(data, window_fn, size: int, channels: int = 3, antialias: bool = False):
  """Encoded image -> uint8 [size, size, channels] of the window ``window_fn(shape)``.

  JPEGs are decoded only inside the window (fused decode-and-crop); other formats are
  decoded whole, then sliced. CMYK JPEGs and grey or RGBA PNGs come out RGB. The
  bilinear resize skips antialiasing by default, like the usual TF ImageNet pipelines:
  with it the resize costs about twice the decode.
  """

  def jpeg():
    window = window_fn(tf.io.extract_jpeg_shape(data))
    image = tf.image.decode_and_crop_jpeg(data, window, channels=channels)
    image.set_shape([None, None, channels])
    return image

  def other():
    image = _decode_any(data, channels)
    window = window_fn(tf.shape(image))
    return tf.slice(image, [window[0], window[1], 0], [window[2], window[3], channels])

  image = tf.cond(tf.io.is_jpeg(data), jpeg, other)
  image = tf.image.resize(image, (size, size), method='bilinear', antialias=antialias)
  return tf.cast(tf.round(tf.clip_by_value(image, 0, 255)), tf.uint8)


def color_jitter(
  image, seed, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, prob: float = 1.0
):
  """torchvision-style ColorJitter (fixed order), applied with probability ``prob``.

  brightness/contrast/saturation factors are uniform in [1 - s, 1 + s]; hue shifts by
  up to ``hue`` of a turn. Zero strengths are off; all zero returns ``image``.
  """
  if not (brightness or contrast or saturation or hue) or prob <= 0:
    return image
  seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 5)
  factor = lambda s, strength: tf.random.stateless_uniform(
    [], s, max(0.0, 1 - strength), 1 + strength
  )
  rgb = image.shape[-1] == 3

  def jitter():
    x = tf.cast(image, tf.float32) / 255.0
    if brightness:
      x = x * factor(seeds[1], brightness)
    if contrast:
      x = tf.image.adjust_contrast(x, factor(seeds[2], contrast))
    if saturation and rgb:
      x = tf.image.adjust_saturation(x, factor(seeds[3], saturation))
    if hue and rgb:
      x = tf.image.adjust_hue(x, tf.random.stateless_uniform([], seeds[4], -hue, hue))
    return tf.cast(tf.round(tf.clip_by_value(x, 0.0, 1.0) * 255.0), tf.uint8)

  if prob >= 1:
    return jitter()
  return tf.cond(tf.random.stateless_uniform([], seeds[0]) < prob, jitter, lambda: image)


def inception_color(image, seed):
  """Inception-style colour distortion: one of two orders of brightness (32/255),
  saturation (0.5-1.5), hue (0.2) and contrast (0.5-1.5)."""
  seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 5)
  x = tf.cast(image, tf.float32) / 255.0
  b = lambda x: tf.image.stateless_random_brightness(x, 32.0 / 255.0, seeds[1])
  s = lambda x: tf.image.stateless_random_saturation(x, 0.5, 1.5, seeds[2])
  h = lambda x: tf.image.stateless_random_hue(x, 0.2, seeds[3])
  c = lambda x: tf.image.stateless_random_contrast(x, 0.5, 1.5, seeds[4])
  order = tf.random.stateless_uniform([], seeds[0], 0, 2, tf.int32)
  x = tf.cond(order == 0, lambda: c(h(s(b(x)))), lambda: h(c(b(s(x)))))
  return tf.cast(tf.round(tf.clip_by_value(x, 0.0, 1.0) * 255.0), tf.uint8)


def _encoded(example):
  return tf.io.read_file(example['path']) if 'path' in example else example['image']


def _random_resized_transform(config, channels: int):
  size = config.image_size
  scale = tuple(config.get('crop_scale', (0.08, 1.0)))
  ratio = tuple(config.get('crop_ratio', (3 / 4, 4 / 3)))
  attempts = int(config.get('crop_attempts', 10))
  flip = config.random_flip
  jitter = dict(
    brightness=config.get('color_jitter_brightness', 0.0),
    contrast=config.get('color_jitter_contrast', 0.0),
    saturation=config.get('color_jitter_saturation', 0.0),
    hue=config.get('color_jitter_hue', 0.0),
    prob=config.get('color_jitter_prob', 0.0),
  )
  inception = bool(config.get('inception_color', False)) and channels == 3
  antialias = bool(config.get('resize_antialias', False))
  fold = tf.random.experimental.stateless_fold_in

  def transform(example, seed):
    window_fn = lambda shape: random_resized_crop_window(shape, seed, scale, ratio, attempts)
    image = decode_and_crop(_encoded(example), window_fn, size, channels, antialias)
    if flip:
      image = tf.image.stateless_random_flip_left_right(image, fold(seed, 1))
    image = color_jitter(image, fold(seed, 2), **jitter)
    if inception:
      image = inception_color(image, fold(seed, 3))
    return {'image': image, 'label': tf.cast(example['label'], tf.int32)}

  return transform


def _eval_transform(config, channels: int):
  size, fraction = config.image_size, config.get('eval_crop_fraction', 0.875)
  antialias = bool(config.get('resize_antialias', False))

  def transform(example):
    image = decode_and_crop(
      _encoded(example), lambda s: center_crop_window(s, fraction), size, channels, antialias
    )
    return {'image': image, 'label': tf.cast(example['label'], tf.int32)}

  return transform


# --------------------------------------------------------------------------- batches


def train_batches(
  dataset: Dataset,
  config: ml_collections.ConfigDict,
  local_batch: int,
  steps_per_epoch: int,
  start_step: int = 0,
) -> Iterator[dict]:
  """Process-local train batches from ``start_step`` on, epoch after epoch.

  Each epoch is reshuffled with a seed derived from (config.seed, epoch). On resume,
  the examples before ``start_step`` are skipped before any read, decode or augmentation.
  """
  epoch, skip = divmod(start_step, steps_per_epoch)
  options = tf.data.Options()
  options.deterministic = bool(config.deterministic_input)
  transform = dataset.train_transform or _pad_transform(config)
  while True:
    epoch_seed = config.seed * 1_000_003 + epoch
    ds = dataset.train.enumerate()
    shards = 1 if dataset.replicated_train else jax.process_count()
    per_step = local_batch * jax.process_count() // shards  # examples this stream gives
    buffer = max(1, min(config.shuffle_buffer, dataset.info.num_train // shards))
    ds = ds.shuffle(buffer, seed=epoch_seed, reshuffle_each_iteration=False)
    # repeat(): a process whose shard is a little short (dropped files) wraps around
    # instead of ending its epoch before the others.
    ds = ds.repeat().take(steps_per_epoch * per_step).skip(skip * per_step)
    if per_step != local_batch:  # replicated: keep this process's rows of each batch
      rows = slice(jax.process_index() * local_batch, (jax.process_index() + 1) * local_batch)
      ds = ds.batch(per_step).map(
        lambda index, example, rows=rows: (index[rows], {k: v[rows] for k, v in example.items()})
      )
      ds = ds.unbatch()

    def augment(index, example, epoch_seed=epoch_seed):
      seed = tf.stack([tf.constant(epoch_seed, tf.int64), tf.cast(index, tf.int64)])
      return transform(example, seed)

    ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE)
    if dataset.decodes:  # a file that went bad after loading: skip it, never crash
      ds = ds.ignore_errors(log_warning=True)
    ds = ds.batch(local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    yield from tfds.as_numpy(ds.with_options(options))
    epoch, skip = epoch + 1, 0


def num_eval_steps(info: DatasetInfo, global_eval_batch: int) -> int:
  """Enough batches for the largest process's shard; every process runs this many."""
  per_process = math.ceil(info.num_eval / jax.process_count())
  local_batch = global_eval_batch // jax.process_count()
  return max(1, math.ceil(per_process / local_batch))


def eval_batches(dataset: Dataset, local_batch: int, num_steps: int) -> Iterator[dict]:
  """Fixed-shape eval batches: the tail is padded and masked, so each example counts once."""
  ds = dataset.eval.batch(local_batch).prefetch(tf.data.AUTOTUNE)
  shape = dataset.info.image_shape
  produced = 0
  for batch in tfds.as_numpy(ds):
    yield pad_batch(batch, local_batch)
    produced += 1
  for _ in range(num_steps - produced):  # this process ran out before the others
    yield pad_batch(
      {'image': np.zeros((0, *shape), np.uint8), 'label': np.zeros((0,), np.int32)}, local_batch
    )


def pad_batch(batch: dict, size: int) -> dict:
  n = len(batch['label'])
  pad = lambda x: np.concatenate([x, np.zeros((size - n, *x.shape[1:]), x.dtype)])
  out = {k: pad(np.asarray(v)) for k, v in batch.items()}
  out['mask'] = (np.arange(size) < n).astype(np.float32)
  return out


# ----------------------------------------------------------------- in-memory arrays


def train_arrays(dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:
  """This process's whole train split as (uint8 NHWC images, int32 labels).

  For data sets held decoded in memory (digits, CIFAR: ``train_crop`` 'pad'); the
  input of ``device_data.DeviceData``.
  """
  spec = dataset.train.element_spec
  image_spec = spec.get('image') if isinstance(spec, dict) else None
  if (
    dataset.decodes
    or image_spec is None
    or image_spec.dtype != tf.uint8
    or not image_spec.shape.is_fully_defined()
  ):
    raise ValueError(NOT_IN_MEMORY)
  images, labels = [], []
  for batch in tfds.as_numpy(dataset.train.batch(8192)):
    images.append(batch['image'])
    labels.append(batch['label'])
  return np.concatenate(images), np.concatenate(labels).astype(np.int32)


def load_arrays(config: ml_collections.ConfigDict, workdir: str | None = None):
  """(images, labels, info): this process's in-memory uint8 train set (digits, CIFAR)."""
  if config.dataset == FOLDER:
    raise ValueError(NOT_IN_MEMORY)
  dataset = load_dataset(config, workdir)
  images, labels = train_arrays(dataset)
  return images, labels, dataset.info
