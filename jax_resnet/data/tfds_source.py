"""Any tensorflow-datasets data set (CIFAR-10/100, ImageNet, ...), prepared beforehand.

Fixed-size images (CIFAR) are decoded once and cached; variable-size ones (ImageNet)
keep their encoded bytes (``SkipDecoding``) so that training decodes only the crop
window. Each process reads its own slice of each split (``split_for_jax_process``).
"""

import jax
import tensorflow_datasets as tfds

from jax_resnet.data.common import KNOWN_STATS, DatasetInfo, channel_stats, imagenet_stats
from jax_resnet.data.sources import Dataset
from jax_resnet.data.tf_cpu import tf
from jax_resnet.data.transforms import (
  crop_style,
  eval_transform,
  pad_transform,
  random_resized_transform,
  resize_if_needed,
  transform_options,
)
from jax_resnet.errors import NotFoundError


def prepare_hint(name: str, data_dir: str) -> str:
  """How to prepare a data set that tfds cannot find."""
  where = f' --data_dir={data_dir}' if data_dir else ''
  if name.startswith('imagenet'):
    return (
      'ImageNet cannot be downloaded automatically: place ILSVRC2012_img_train.tar '
      'and ILSVRC2012_img_val.tar in <data_dir>/downloads/manual/, then run '
      f'`tfds build {name}{where}` once.'
    )
  return f'Prepare it once with `tfds build {name}{where}` on a machine with internet.'


def load(config, workdir, splits, class_names) -> Dataset:
  del workdir, class_names  # tfds knows its classes
  builder = tfds.builder(config.dataset, data_dir=config.data_dir or None)
  shape = tuple(builder.info.features['image'].shape)
  style = crop_style(config.train_crop, variable_size=shape[0] is None or shape[1] is None)
  channels = shape[-1] or 3
  decoders = {'image': tfds.decode.SkipDecoding()} if style == 'random_resized' else None
  sources = _splits(builder, config, splits, decoders)
  info = _describe(builder, config, sources, style, channels)
  if style == 'pad':
    return _decoded(config, info, sources)
  return _encoded(config, info, sources, channels)


def _splits(builder, config, splits, decoders) -> dict:
  """{'train' and/or 'eval': this process's tf.data source}, or a NotFoundError saying how
  to prepare a data set that is not."""
  wanted = {'train': config.train_split, 'eval': config.eval_split}
  try:
    return {
      what: _as_dataset(builder, wanted[what], train=what == 'train', decoders=decoders)
      for what in splits
    }
  except AssertionError as e:
    raise NotFoundError(
      f'Dataset {config.dataset!r} is not prepared in '
      f'{config.data_dir or "the default tfds data_dir"}. '
      f'{prepare_hint(config.dataset, config.data_dir)} ({e})'
    ) from None


def _describe(builder, config, sources: dict, style: str, channels: int) -> DatasetInfo:
  label = builder.info.features['label']
  if config.dataset in KNOWN_STATS:
    mean, std = channel_stats(*KNOWN_STATS[config.dataset], channels)
  else:
    mean, std = imagenet_stats(channels)
  return DatasetInfo(
    num_classes=label.num_classes,
    num_train=_num_examples(builder, config.train_split, sources.get('train')),
    num_eval=_num_examples(builder, config.eval_split, sources.get('eval')),
    image_shape=(config.image_size, config.image_size, channels),
    mean=mean,
    std=std,
    class_names=tuple(label.names),
    crop_style=style,
    eval_crop_fraction=config.eval_crop_fraction,
    # Fixed-size sets go through resize_if_needed (antialiased); the others, eval_transform.
    resize_antialias=True if style == 'pad' else config.resize_antialias,
  )


def _decoded(config, info: DatasetInfo, sources: dict) -> Dataset:
  """A fixed-size set (CIFAR): decoded once, resized to image_size, cached."""
  resize = lambda x: {
    'image': resize_if_needed(x['image'], config.image_size),
    'label': tf.cast(x['label'], tf.int32),
  }
  ready = {k: ds.map(resize, tf.data.AUTOTUNE) for k, ds in sources.items()}
  if config.cache:
    ready = {k: ds.cache() for k, ds in ready.items()}
  return Dataset(
    info,
    train=ready.get('train'),
    eval=ready.get('eval'),
    train_transform=pad_transform(transform_options(config)),
  )


def _encoded(config, info: DatasetInfo, sources: dict, channels: int) -> Dataset:
  """A variable-size set (ImageNet): encoded bytes, decoded inside the crop window."""
  # Encoded examples keep their file name (ImageNet has one) to name a file that does not
  # decode.
  as_int = lambda x: {
    'image': x['image'],
    'label': tf.cast(x['label'], tf.int32),
    **({'file_name': x['file_name']} if 'file_name' in x else {}),
  }
  ready = {k: ds.map(as_int) for k, ds in sources.items()}
  if config.cache:  # the encoded bytes: cheap to hold for CIFAR-sized sets, not for ImageNet
    ready = {k: ds.cache() for k, ds in ready.items()}
  eval_ = ready.get('eval')
  if eval_ is not None:
    eval_ = eval_.map(eval_transform(transform_options(config), channels), tf.data.AUTOTUNE)
    eval_ = eval_.ignore_errors(log_warning=True)
  return Dataset(
    info,
    train=ready.get('train'),
    eval=eval_,
    train_transform=random_resized_transform(transform_options(config), channels),
    decodes=True,
  )


def _as_dataset(builder, split: str, train: bool, decoders=None) -> tf.data.Dataset:
  if jax.process_count() > 1:
    split = tfds.split_for_jax_process(split, drop_remainder=train)
  read_config = tfds.ReadConfig(shuffle_seed=0, try_autocache=False)
  return builder.as_dataset(
    split=split, shuffle_files=False, read_config=read_config, decoders=decoders
  )


def _num_examples(builder, split: str, ds: tf.data.Dataset | None) -> int:
  """The global size of a split (info when prepared; counted when mocked in tests)."""
  try:
    return builder.info.splits[split].num_examples
  except (KeyError, ValueError):
    if ds is None:
      return 0
    local = int(ds.reduce(0, lambda n, _: n + 1).numpy())
    return local * jax.process_count()
