"""The train step's augmentation pipeline: keyed, bounded, and built from the config."""

import jax
import jax.numpy as jnp
import numpy as np
from helpers import MEAN, STD

from jax_resnet.augment.pipeline import AugmentOptions, augment_batch


def test_every_augmentation_on_the_device_is_keyed_and_bounded(config):
  """RandAugment, Cutout, random erasing and Mixup/CutMix together: finite images, targets
  that sum to one, the same for the same key, different for another."""
  options = AugmentOptions(
    num_classes=10,
    mean=MEAN,
    std=STD,
    randaugment_layers=2,
    cutout_size=3,
    random_erasing_prob=0.5,
    mixup_alpha=0.2,
    cutmix_alpha=1.0,
    label_smoothing=0.1,
  )
  rng = np.random.RandomState(0)
  batch = {
    'image': rng.randint(0, 256, (32, 8, 8, 3)).astype(np.uint8),
    'label': rng.randint(0, 10, (32,)).astype(np.int32),
  }
  run = jax.jit(lambda key: augment_batch(key, batch['image'], batch['label'], options))
  images, targets = run(jax.random.PRNGKey(0))
  again, _ = run(jax.random.PRNGKey(0))
  other, _ = run(jax.random.PRNGKey(1))
  assert images.shape == (32, 8, 8, 3) and bool(jnp.isfinite(images).all())
  np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-5)
  assert float(targets.min()) > 0  # label smoothing composed with the mixing
  np.testing.assert_array_equal(images, again)
  assert not np.array_equal(images, other)


def test_options_are_read_from_the_config_by_field_name(config):
  """Every AugmentOptions field the config has comes from it; the rest are given."""
  import dataclasses

  from jax_resnet.training import build

  config.cutout_size, config.mixup_alpha, config.randaugment_layers = 3, 0.2, 2
  options = build.step_options(config, 7, MEAN, STD, train_image_size=6).augment
  for field in dataclasses.fields(AugmentOptions):
    if field.name in config:
      assert getattr(options, field.name) == config[field.name], field.name
  assert (options.num_classes, options.train_image_size, options.mean) == (7, 6, MEAN)
