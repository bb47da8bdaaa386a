"""The train step's augmentations in their order, as one function of a uint8 batch.

``augment_batch``: the training resolution (progressive resizing), RandAugment or
TrivialAugment (uint8), normalisation, Cutout, random erasing, then Mixup or CutMix with
label smoothing composed into the targets. ``AugmentOptions`` holds what it takes; its
field names are the config's, so a builder fills it from a config by name
(``configuration.options.from_config``).
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jax_resnet import loss_functions
from jax_resnet.augment import image_ops, mixing, randaugment

# Tags folded into a step's key for each random choice added after Cutout and dropout
# (those two keep the split they always had, so earlier runs train the same).
MIX_TAG, RANDAUGMENT_TAG, ERASING_TAG = 1001, 1002, 1003


@dataclasses.dataclass(frozen=True)
class AugmentOptions:
  """What ``augment_batch`` does (static in the jitted step: a change recompiles)."""

  num_classes: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  dtype: Any = jnp.float32  # the compute dtype the images leave in
  train_image_size: int = 0  # this epoch's size under progressive resizing; 0: as given
  label_smoothing: float = 0.0
  cutout_size: int = 0
  mixup_alpha: float = 0.0
  cutmix_alpha: float = 0.0
  mix_prob: float = 1.0
  mix_switch_prob: float = 0.5
  randaugment_layers: int = 0
  randaugment_magnitude: float = 9.0
  randaugment_magnitude_std: float = 0.0
  randaugment_bins: int = 31
  trivial_augment: bool = False
  autoaugment_policy: str = ''
  random_erasing_prob: float = 0.0

  @property
  def mixes(self) -> bool:
    return self.mixup_alpha > 0 or self.cutmix_alpha > 0


def resize_images(images, size: int):
  """A batch resized on the device to ``size`` x ``size`` (bilinear, antialiased), when
  it differs; 0 leaves it as it is."""
  if not size or images.shape[1:3] == (size, size):
    return images
  shape = (images.shape[0], size, size, images.shape[3])
  resized = jax.image.resize(images.astype(jnp.float32), shape, 'bilinear', antialias=True)
  if images.dtype == jnp.uint8:
    return jnp.clip(jnp.round(resized), 0, 255).astype(jnp.uint8)
  return resized


def augment_batch(key, images, labels, options: AugmentOptions):
  """The device-side train augmentations of a uint8 batch. Returns (compute-dtype images,
  [B, classes] targets with label smoothing composed)."""
  cutout_key, _ = jax.random.split(key)  # the split the train step has always used
  ids = jnp.arange(images.shape[0])
  images = resize_images(images, options.train_image_size)
  if options.randaugment_layers:
    keys = image_ops.example_keys(jax.random.fold_in(key, RANDAUGMENT_TAG), ids, 0)
    images = randaugment.rand_augment(
      keys,
      images,
      options.randaugment_layers,
      options.randaugment_magnitude,
      num_magnitude_bins=options.randaugment_bins,
      magnitude_std=options.randaugment_magnitude_std,
    )
  elif options.trivial_augment:
    keys = image_ops.example_keys(jax.random.fold_in(key, RANDAUGMENT_TAG), ids, 0)
    images = randaugment.trivial_augment(keys, images)
  elif options.autoaugment_policy:
    keys = image_ops.example_keys(jax.random.fold_in(key, RANDAUGMENT_TAG), ids, 0)
    images = randaugment.auto_augment(keys, images, options.autoaugment_policy)
  x = image_ops.normalize(images, options.mean, options.std, jnp.float32)
  if options.cutout_size:
    x = image_ops.cutout(cutout_key, x, options.cutout_size)
  if options.random_erasing_prob:
    keys = image_ops.example_keys(jax.random.fold_in(key, ERASING_TAG), ids, 0)
    x = image_ops.random_erasing(keys, x, options.random_erasing_prob)
  if options.mixes:
    x, targets = mixing.mix_batch(
      jax.random.fold_in(key, MIX_TAG),
      x,
      labels,
      options.num_classes,
      mixup_alpha=options.mixup_alpha,
      cutmix_alpha=options.cutmix_alpha,
      mix_prob=options.mix_prob,
      switch_prob=options.mix_switch_prob,
      label_smoothing=options.label_smoothing,
    )
  else:
    targets = loss_functions.smooth_one_hot(labels, options.num_classes, options.label_smoothing)
  return x.astype(options.dtype), targets
