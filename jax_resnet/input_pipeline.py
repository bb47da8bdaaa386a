"""tf.data input: the embedded digits set and tensorflow-datasets (CIFAR-10/100, ...).

Batches are process-local dicts of numpy arrays: ``image`` uint8 NHWC, ``label`` int32,
and for eval a float ``mask`` that is 0 on padding. Normalisation and Cutout happen on
the device (see augment.py), so the host only crops, flips and ships uint8.

Augmentation randomness is stateless and keyed by (seed, epoch, example index), so an
epoch's batches are the same however many threads decode them and wherever a run resumes.
"""

import dataclasses
import math
from typing import Iterator, Optional, Tuple

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

# TensorFlow must never take accelerator memory from JAX.
tf.config.set_visible_devices([], 'GPU')

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
KNOWN_STATS = {
    'cifar10': ((0.4914 * 255, 0.4822 * 255, 0.4465 * 255),
                (0.2470 * 255, 0.2435 * 255, 0.2616 * 255)),
    'cifar100': ((0.5071 * 255, 0.4865 * 255, 0.4409 * 255),
                 (0.2673 * 255, 0.2564 * 255, 0.2762 * 255)),
}
EMBEDDED_DATASETS = ('digits',)
DIGITS_SPLIT_SEED = 0  # fixed: the digits train/test split never changes
DIGITS_TEST_FRACTION = 0.2


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  num_classes: int
  num_train: int
  num_eval: int
  image_shape: Tuple[int, int, int]  # what the model sees: (H, W, C)
  mean: Tuple[float, ...]  # per channel, in uint8 units
  std: Tuple[float, ...]


@dataclasses.dataclass
class Dataset:
  """A data set split for this process: tf.data sources plus what the model needs."""
  info: DatasetInfo
  train: tf.data.Dataset  # unbatched {'image', 'label'}, this process's shard
  eval: tf.data.Dataset


def check_dataset_name(name: str) -> None:
  if name in EMBEDDED_DATASETS:
    return
  try:
    tfds.builder_cls(name)
  except Exception:  # tfds raises DatasetNotFoundError with a long list
    raise ValueError(
        f'Unknown dataset {name!r}. Valid: {", ".join(EMBEDDED_DATASETS)}, or any '
        'tensorflow-datasets name such as cifar10, cifar100, imagenet2012.') from None


def load_dataset(config: ml_collections.ConfigDict, workdir: Optional[str] = None) -> Dataset:
  """The configured data set; ``workdir`` receives any files describing it (class maps)."""
  check_dataset_name(config.dataset)
  if config.dataset == 'digits':
    return _load_digits(config)
  return _load_tfds(config)


def _load_digits(config) -> Dataset:
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
    images = tf.cast(tf.round(tf.clip_by_value(
        tf.image.resize(images, (size, size), method='bilinear'), 0, 255)), tf.uint8).numpy()
  x_train = images[train]
  mean = tuple(float(m) for m in x_train.reshape(-1, 1).mean(0))
  std = tuple(float(s) for s in x_train.reshape(-1, 1).std(0))
  info = DatasetInfo(num_classes=10, num_train=len(train), num_eval=len(test),
                     image_shape=(size, size, 1), mean=mean, std=std)
  index, count = jax.process_index(), jax.process_count()
  return Dataset(
      info,
      train=tf.data.Dataset.from_tensor_slices(
          {'image': x_train[index::count], 'label': labels[train][index::count]}),
      eval=tf.data.Dataset.from_tensor_slices(
          {'image': images[test][index::count], 'label': labels[test][index::count]}))


def _prepare_hint(name: str, data_dir: Optional[str]) -> str:
  where = f' --data_dir={data_dir}' if data_dir else ''
  if name.startswith('imagenet'):
    return ('ImageNet cannot be downloaded automatically: place ILSVRC2012_img_train.tar '
            'and ILSVRC2012_img_val.tar in <data_dir>/downloads/manual/, then run '
            f'`tfds build {name}{where}` once.')
  return f'Prepare it once with `tfds build {name}{where}` on a machine with internet.'


def _load_tfds(config) -> Dataset:
  builder = tfds.builder(config.dataset, data_dir=config.get('data_dir'))
  try:
    train = _as_dataset(builder, config.train_split, train=True)
    eval_ = _as_dataset(builder, config.eval_split, train=False)
  except AssertionError as e:
    raise FileNotFoundError(
        f'Dataset {config.dataset!r} is not prepared in '
        f'{config.get("data_dir") or "the default tfds data_dir"}. '
        f'{_prepare_hint(config.dataset, config.get("data_dir"))} ({e})') from None
  num_classes = builder.info.features['label'].num_classes
  image_feature = builder.info.features['image']
  channels = image_feature.shape[-1] or 3
  mean, std = KNOWN_STATS.get(config.dataset, (IMAGENET_MEAN, IMAGENET_STD))
  if channels != len(mean):
    mean, std = (sum(mean) / len(mean),) * channels, (sum(std) / len(std),) * channels
  info = DatasetInfo(
      num_classes=num_classes,
      num_train=_num_examples(builder, config.train_split, train),
      num_eval=_num_examples(builder, config.eval_split, eval_),
      image_shape=(config.image_size, config.image_size, channels), mean=mean, std=std)
  resize = lambda x: {'image': _resize_if_needed(x['image'], config.image_size),
                      'label': tf.cast(x['label'], tf.int32)}
  return Dataset(info, train=train.map(resize, tf.data.AUTOTUNE).cache(),
                 eval=eval_.map(resize, tf.data.AUTOTUNE).cache())


def _as_dataset(builder, split: str, train: bool) -> tf.data.Dataset:
  if jax.process_count() > 1:
    split = tfds.split_for_jax_process(split, drop_remainder=train)
  read_config = tfds.ReadConfig(shuffle_seed=0, try_autocache=False)
  return builder.as_dataset(split=split, shuffle_files=False, read_config=read_config)


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


def crop_and_flip(image, seed, pad: int, flip: bool):
  """Pad-and-random-crop plus optional horizontal flip, stateless in ``seed``."""
  if pad > 0:
    h, w = image.shape[0], image.shape[1]
    padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
    image = tf.image.stateless_random_crop(padded, [h, w, image.shape[2]], seed)
  if flip:
    image = tf.image.stateless_random_flip_left_right(
        image, tf.random.experimental.stateless_fold_in(seed, 1))
  return image


def train_batches(dataset: Dataset, config: ml_collections.ConfigDict, local_batch: int,
                  steps_per_epoch: int, start_step: int = 0) -> Iterator[dict]:
  """Process-local train batches from ``start_step`` on, epoch after epoch.

  Each epoch is reshuffled with a seed derived from (config.seed, epoch). On resume,
  the examples before ``start_step`` are skipped before any augmentation is done.
  """
  epoch, skip = divmod(start_step, steps_per_epoch)
  options = tf.data.Options()
  options.deterministic = bool(config.deterministic_input)
  while True:
    epoch_seed = config.seed * 1_000_003 + epoch
    ds = dataset.train.enumerate()
    buffer = min(config.shuffle_buffer, dataset.info.num_train // jax.process_count())
    ds = ds.shuffle(buffer, seed=epoch_seed,
                    reshuffle_each_iteration=False)
    ds = ds.take(steps_per_epoch * local_batch).skip(skip * local_batch)

    def augment(index, example, epoch_seed=epoch_seed):
      seed = tf.stack([tf.constant(epoch_seed, tf.int64), tf.cast(index, tf.int64)])
      return {'image': crop_and_flip(example['image'], seed, config.random_crop_pad,
                                     config.random_flip),
              'label': example['label']}

    ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE)
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
    yield pad_batch({'image': np.zeros((0, *shape), np.uint8),
                     'label': np.zeros((0,), np.int32)}, local_batch)


def pad_batch(batch: dict, size: int) -> dict:
  n = len(batch['label'])
  pad = lambda x: np.concatenate([x, np.zeros((size - n, *x.shape[1:]), x.dtype)])
  out = {k: pad(np.asarray(v)) for k, v in batch.items()}
  out['mask'] = (np.arange(size) < n).astype(np.float32)
  return out
