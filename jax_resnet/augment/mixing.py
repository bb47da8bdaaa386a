"""Mixup and CutMix for the jitted train step, with timm's ``Mixup`` semantics ('batch' mode).

One lambda per batch, and the batch is mixed with its own reverse ``x[::-1]`` (an odd-sized
batch's middle example is paired with itself; timm requires an even batch). All random
choices come from one key and are made with ``jnp.where`` on traced values, so one compiled
step covers mix or no mix, Mixup or CutMix; the alphas and probabilities are static.

The returned targets are soft label vectors, ready for the losses of ``jax_resnet.loss_functions``.
Label smoothing (``loss_functions.smooth_one_hot``) is applied here, before the mixing, as timm
does: the loss must then not smooth again.
"""

import jax
import jax.numpy as jnp

from jax_resnet.loss_functions import smooth_one_hot


def mixup_targets(labels, num_classes: int, lam, label_smoothing: float = 0.0):
  """timm's ``mixup_target``: lam * y + (1 - lam) * y[::-1], y the smoothed one-hot labels."""
  targets = smooth_one_hot(labels, num_classes, label_smoothing)
  return lam * targets + (1.0 - lam) * targets[::-1]


def _rand_bbox(key, height: int, width: int, lam):
  """timm's ``rand_bbox``: a (1 - lam)-area box centred uniformly, clipped to the image.

  Sides are int(side * sqrt(1 - lam)), but the box spans centre -/+ half that rounded down,
  so its unclipped sides are even: lam is corrected to the box actually pasted.
  """
  ratio = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(height * ratio).astype(jnp.int32)
  cut_w = jnp.floor(width * ratio).astype(jnp.int32)
  key_y, key_x = jax.random.split(key)
  cy = jax.random.randint(key_y, (), 0, height)
  cx = jax.random.randint(key_x, (), 0, width)
  top, bottom = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  left, right = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  return top, bottom, left, right


def _rand_bbox_minmax(key, height: int, width: int, minmax):
  """timm's ``rand_bbox_minmax``: sides uniform in [min, max) of the image's, placed inside."""
  low, high = minmax
  keys = jax.random.split(key, 4)
  cut_h = jax.random.randint(keys[0], (), int(height * low), int(height * high))
  cut_w = jax.random.randint(keys[1], (), int(width * low), int(width * high))
  top = jax.random.randint(keys[2], (), 0, height - cut_h)
  left = jax.random.randint(keys[3], (), 0, width - cut_w)
  return top, top + cut_h, left, left + cut_w


def _cutmix_mask(key, height: int, width: int, lam, cutmix_minmax):
  """[height, width, 1] True inside the box to paste (half-open: top <= y < bottom)."""
  if cutmix_minmax is None:
    top, bottom, left, right = _rand_bbox(key, height, width, lam)
  else:
    top, bottom, left, right = _rand_bbox_minmax(key, height, width, cutmix_minmax)
  ys = jnp.arange(height)[:, None, None]
  xs = jnp.arange(width)[None, :, None]
  return (ys >= top) & (ys < bottom) & (xs >= left) & (xs < right)


def _sample_lam(key, mixup_alpha: float, cutmix_alpha: float, mix_prob: float, switch_prob: float):
  """timm's ``_params_per_batch``: (lam, use_cutmix); lam is 1 when no mix happens.

  One Beta draw whose alpha follows the mode (Beta sampling is the costly part to compile).
  """
  key_apply, key_switch, key_lam = jax.random.split(key, 3)
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(key_switch) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  alpha = jnp.where(use_cutmix, cutmix_alpha, mixup_alpha).astype(jnp.float32)
  apply = jax.random.uniform(key_apply) < mix_prob
  lam = jnp.where(apply, jax.random.beta(key_lam, alpha, alpha), 1.0)
  return lam.astype(jnp.float32), apply & use_cutmix


def mix_batch(
  key,
  images,
  labels,
  num_classes: int,
  *,
  mixup_alpha: float,
  cutmix_alpha: float,
  mix_prob: float = 1.0,
  switch_prob: float = 0.5,
  label_smoothing: float = 0.0,
  cutmix_minmax=None,
  correct_lam: bool = True,
):
  """Mixes a normalised NHWC batch with its reverse; returns (images, [B, num_classes] targets).

  With probability ``mix_prob`` a mix happens: CutMix with probability ``switch_prob`` when
  both alphas are positive (else whichever is), lam ~ Beta(alpha, alpha). Mixup blends
  lam * x + (1 - lam) * x[::-1]; CutMix pastes a box of x[::-1] and, with ``correct_lam``,
  sets lam to the unpasted fraction (always, with ``cutmix_minmax``, which also turns
  CutMix on with alpha 1, as timm). With both alphas 0 the images come back unchanged.
  """
  if cutmix_minmax is not None:
    cutmix_alpha = 1.0
  if (mixup_alpha <= 0 and cutmix_alpha <= 0) or mix_prob <= 0:
    return images, smooth_one_hot(labels, num_classes, label_smoothing)
  _, height, width, _ = images.shape
  key_lam, key_box = jax.random.split(key)
  lam, cutmix = _sample_lam(key_lam, mixup_alpha, cutmix_alpha, mix_prob, switch_prob)
  flipped = images[::-1]
  mixed = images
  if mixup_alpha > 0:  # lam is 1 when nothing mixes: x comes back exactly
    mixed = lam.astype(images.dtype) * images + (1 - lam).astype(images.dtype) * flipped
  if cutmix_alpha > 0:
    inside = _cutmix_mask(key_box, height, width, lam, cutmix_minmax) & cutmix
    if correct_lam or cutmix_minmax is not None:
      lam = jnp.where(cutmix, 1.0 - jnp.mean(inside, dtype=jnp.float32), lam)
    mixed = jnp.where(cutmix, jnp.where(inside, flipped, images), mixed)
  return mixed, mixup_targets(labels, num_classes, lam, label_smoothing)
