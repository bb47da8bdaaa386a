"""Batches from a ``Dataset``: process-local numpy dicts, ``image`` uint8 NHWC and
``label`` int32, plus for eval a float ``mask`` that is 0 on padding.

Train batches are reshuffled each epoch with ``shuffle_seed(options.seed, epoch)``, and
each example's augmentation is keyed by (that seed, the example's index), so an epoch's
batches are the same however many threads decode them and wherever a run resumes; on
resume the examples before ``start_step`` are skipped before any read or decode. Eval
batches have a fixed shape: the tail is padded and masked, so each example counts once.
"""

import concurrent.futures
import itertools
import math
from collections.abc import Iterator

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from jax_resnet import parallel
from jax_resnet.data.common import (
  FOLDER,
  DatasetInfo,
  InputOptions,
  epoch_and_batch,
  shuffle_seed,
)
from jax_resnet.data.sources import Dataset, load_dataset
from jax_resnet.data.tf_cpu import tf
from jax_resnet.errors import ConfigError

NOT_IN_MEMORY = (
  'config.data_on_device keeps a small, decoded data set (digits, cifar10, cifar100, '
  '...) on the device; this one is decoded from files on the fly. Use '
  '--config.data_on_device=false.'
)


# How many batches before an epoch ends the next one's pipeline starts, in a thread: its
# shuffle buffer fills while this epoch's last batches are consumed, not after. Never in
# an epoch's first half: two pipelines for the whole of a short epoch slowed the default
# job (11 batches an epoch) on 2 cores.
NEXT_EPOCH_LEAD = 16


def train_batches(
  dataset: Dataset,
  options: InputOptions,
  local_batch: int,
  steps_per_epoch: int,
  start_step: int = 0,
  epoch_origin: tuple[int, int] = (0, 0),
) -> Iterator[dict]:
  """Process-local train batches from ``start_step`` on, epoch after epoch (epochs
  counted from ``epoch_origin``: ``common.epoch_and_batch``).

  Each epoch is reshuffled with a seed derived from (options.seed, epoch). On resume,
  the examples before ``start_step`` are skipped before any read, decode or augmentation.
  The next epoch's pipeline starts ``NEXT_EPOCH_LEAD`` batches before this one ends, so
  its shuffle buffer is full when it is needed; the batches do not depend on when.
  """
  epoch, skip = epoch_and_batch(start_step, steps_per_epoch, epoch_origin)
  start = lambda e, s: _started(
    _epoch_batches(dataset, options, local_batch, steps_per_epoch, e, s)
  )
  with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='next_epoch') as pool:
    current = start(epoch, skip)
    while True:
      remaining = steps_per_epoch - skip
      upcoming = None
      for i, batch in enumerate(current):
        if i == max(remaining - NEXT_EPOCH_LEAD, remaining // 2):
          upcoming = pool.submit(start, epoch + 1, 0)
        yield batch
      epoch, skip = epoch + 1, 0
      current = (upcoming or pool.submit(start, epoch, 0)).result()


def _started(batches: Iterator[dict]) -> Iterator[dict]:
  """``batches`` with its first batch already produced (the pipeline, its shuffle buffer
  filled), then the rest."""
  first = next(batches, None)
  if first is None:
    return iter(())
  return itertools.chain([first], batches)


def _epoch_batches(
  dataset: Dataset, options: InputOptions, local_batch: int, steps_per_epoch: int, epoch, skip
) -> Iterator[dict]:
  """One epoch's batches from batch ``skip`` on: its shuffle, its share and augmentation."""
  tf_options = tf.data.Options()
  tf_options.deterministic = bool(options.deterministic_input)
  transform = dataset.train_transform
  epoch_seed = shuffle_seed(options.seed, epoch)
  ds = dataset.train.enumerate()
  shards = 1 if dataset.replicated_train else jax.process_count()
  per_step = local_batch * jax.process_count() // shards  # examples this stream gives
  buffer = max(1, min(options.shuffle_buffer, dataset.info.num_train // shards))
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

  def augment(index, example):
    seed = tf.stack([tf.constant(epoch_seed, tf.int64), tf.cast(index, tf.int64)])
    return transform(example, seed)

  ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE)
  if dataset.decodes:  # a file that went bad after loading: skip it, never crash
    ds = ds.ignore_errors(log_warning=True)
  ds = ds.batch(local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  return iter(tfds.as_numpy(ds.with_options(tf_options)))


def num_eval_steps(info: DatasetInfo, global_eval_batch: int) -> int:
  """Enough batches for the largest process's shard; every process runs this many."""
  per_process = math.ceil(info.num_eval / jax.process_count())
  local_batch = global_eval_batch // jax.process_count()
  return max(1, math.ceil(per_process / local_batch))


def eval_batches(dataset: Dataset, local_batch: int, num_steps: int) -> Iterator[dict]:
  """Fixed-shape eval batches: the tail is padded and masked, so each example counts once."""
  ds = dataset.eval.batch(local_batch).prefetch(tf.data.AUTOTUNE)
  shape = tuple(dataset.eval.element_spec['image'].shape)  # eval_image_size, where set
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


def train_arrays(dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:
  """This process's whole train split as (uint8 NHWC images, int32 labels).

  For data sets held decoded in memory (digits, CIFAR: ``train_crop`` 'pad'); the
  input of ``on_device.DeviceData``.
  """
  spec = dataset.train.element_spec
  image_spec = spec.get('image') if isinstance(spec, dict) else None
  if (
    dataset.decodes
    or image_spec is None
    or image_spec.dtype != tf.uint8
    or not image_spec.shape.is_fully_defined()
  ):
    raise ConfigError(NOT_IN_MEMORY)
  images, labels = [], []
  for batch in tfds.as_numpy(dataset.train.batch(8192)):
    images.append(batch['image'])
    labels.append(batch['label'])
  return np.concatenate(images), np.concatenate(labels).astype(np.int32)


def load_arrays(config: ml_collections.ConfigDict, workdir: str | None = None):
  """(images, labels, info): this process's in-memory uint8 train set (digits, CIFAR)."""
  if config.dataset == FOLDER:
    raise ConfigError(NOT_IN_MEMORY)
  dataset = load_dataset(config, workdir, splits=('train',))
  images, labels = train_arrays(dataset)
  return images, labels, dataset.info


def global_train_batches(
  dataset: Dataset,
  options: InputOptions,
  mesh,
  steps_per_epoch: int,
  start_step: int,
  epoch_origin: tuple[int, int] = (0, 0),
):
  """Global train batches on the device from ``start_step`` on: made there from the whole
  set for small in-memory sets with ``options.data_on_device``, else from tf.data."""
  if options.data_on_device:
    from jax_resnet.data import on_device

    images, labels = train_arrays(dataset)
    if dataset.replicated_train:  # on_device wants this process's share
      share = slice(jax.process_index(), None, jax.process_count())
      images, labels = images[share], labels[share]
    return on_device.device_batches(
      images, labels, mesh, options, steps_per_epoch, start_step, epoch_origin
    )
  local_batch = parallel.local_batch_size(options.batch_size, mesh)
  return parallel.prefetch_to_device(
    train_batches(dataset, options, local_batch, steps_per_epoch, start_step, epoch_origin), mesh
  )
