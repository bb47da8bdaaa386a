"""Small data sets (digits, CIFAR) kept whole on the device: no host work per epoch.

Every local device holds a copy of this process's uint8 train set. Each step the host
only picks the step's example indices from the epoch's permutation (a few hundred int32);
the gather, pad-and-random-crop and flip run in one jitted function, and the batch comes
out as global arrays sharded over the mesh's ``data`` axis, like
``parallel.prefetch_to_device``'s output. Cutout and normalisation stay in the train step.

Randomness is stateless: the epoch's permutation comes from
``fold_in(PRNGKey(options.seed), epoch)``, each example's crop and flip from that epoch
key and the example's index, so resuming at any step reproduces the same batches, and
the batches do not depend on how many devices share the work.

No TensorFlow here: jax and numpy only.
"""

import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jax_resnet import parallel
from jax_resnet.augment import image_ops
from jax_resnet.data.common import InputOptions, epoch_and_batch

CROP_TAG, FLIP_TAG = 0, 1


def epoch_keys(seed: int, epoch):
  """(permutation key, augmentation key) of an epoch."""
  perm_key, aug_key = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), epoch))
  return perm_key, aug_key


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  return np.asarray(jax.random.permutation(epoch_keys(seed, epoch)[0], num_examples))


class DeviceData:
  """This process's uint8 train arrays on its devices, and the batches drawn from them."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, mesh: Mesh, options: InputOptions):
    images, labels = np.asarray(images), np.asarray(labels, np.int32)
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(labels):
      raise ValueError(
        f'Expected uint8 NHWC images and as many labels; got images '
        f'{images.dtype} {images.shape}, labels {labels.shape}.'
      )
    self.mesh, self.seed = mesh, int(options.seed)
    self.num_local = len(labels)
    if self.num_local == 0:
      raise ValueError('No training examples on this process.')
    # Processes may hold a few examples more or less: pad to the largest shard.
    self.num_max = self.num_local
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      self.num_max = int(
        np.max(multihost_utils.process_allgather(np.asarray(self.num_local, np.int64)))
      )
    pad = self.num_max - self.num_local
    if pad:
      images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), np.uint8)])
      labels = np.concatenate([labels, np.zeros((pad,), np.int32)])
    self.local_devices = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    self.local_batch = parallel.local_batch_size(options.batch_size, mesh)
    self.images = self._copy_to_each_device(images)
    self.labels = self._copy_to_each_device(labels)
    batch_sharding = parallel.batch_sharded(mesh)
    self._step = jax.jit(
      functools.partial(
        _make_batch,
        mesh=mesh,
        seed=self.seed,
        num_max=self.num_max,
        pad=int(options.random_crop_pad),
        flip=bool(options.random_flip),
      ),
      out_shardings={'image': batch_sharding, 'label': batch_sharding},
    )

  def _copy_to_each_device(self, array: np.ndarray):
    """[devices, *array.shape], split over 'data': each device's block is the array."""
    global_shape = (self.mesh.devices.size, *array.shape)
    shards = [jax.device_put(array[None], d) for d in self.local_devices]
    return jax.make_array_from_single_device_arrays(
      global_shape, NamedSharding(self.mesh, P(parallel.DATA_AXIS)), shards
    )

  def batch(self, epoch: int, step_in_epoch: int, permutation: np.ndarray = None) -> dict:
    """The global batch of one step: {'image' uint8 NHWC, 'label' int32}."""
    if permutation is None:
      permutation = epoch_permutation(self.seed, epoch, self.num_local)
    positions = (step_in_epoch * self.local_batch + np.arange(self.local_batch)) % self.num_local
    # A globally unique id: the process's block start plus the local index.
    ids = (permutation[positions] + jax.process_index() * self.num_max).astype(np.int32)
    ids = jax.make_array_from_process_local_data(parallel.batch_sharded(self.mesh), ids)
    return self._step(self.images, self.labels, ids, np.int32(epoch))

  def batches(
    self, steps_per_epoch: int, start_step: int = 0, epoch_origin: tuple[int, int] = (0, 0)
  ) -> Iterator[dict]:
    """Global batches from ``start_step`` on, epoch after epoch (dispatched async)."""
    epoch, step = epoch_and_batch(start_step, steps_per_epoch, epoch_origin)
    while True:
      permutation = epoch_permutation(self.seed, epoch, self.num_local)
      for s in range(step, steps_per_epoch):
        yield self.batch(epoch, s, permutation)
      epoch, step = epoch + 1, 0


def device_batches(
  images: np.ndarray,
  labels: np.ndarray,
  mesh: Mesh,
  options: InputOptions,
  steps_per_epoch: int,
  start_step: int = 0,
  epoch_origin: tuple[int, int] = (0, 0),
) -> Iterator[dict]:
  """Global train batches made on the device from process-local uint8 arrays."""
  data = DeviceData(images, labels, mesh, options)
  return data.batches(steps_per_epoch, start_step, epoch_origin)


def _make_batch(images, labels, ids, epoch, *, mesh, seed, num_max, pad, flip):
  aug_key = epoch_keys(seed, epoch)[1]

  def per_device(images, labels, ids):
    local = ids % num_max
    batch = jnp.take(images[0], local, axis=0)
    if pad:
      batch = image_ops.random_pad_crop(image_ops.example_keys(aug_key, ids, CROP_TAG), batch, pad)
    if flip:
      batch = image_ops.random_flip(image_ops.example_keys(aug_key, ids, FLIP_TAG), batch)
    return {'image': batch, 'label': jnp.take(labels[0], local, axis=0)}

  data = P(parallel.DATA_AXIS)
  return jax.shard_map(
    per_device,
    mesh=mesh,
    in_specs=(data, data, data),
    out_specs={'image': data, 'label': data},
    check_vma=False,
  )(images, labels, ids)
