"""On-device augmentation and normalisation, run inside the jitted train step.

The host ships uint8 images; doing the float conversion, normalisation and Cutout
here keeps the host-to-device transfer 4x smaller and the host free for decoding.
"""

import math

import jax
import jax.numpy as jnp


def normalize(images, mean, std, dtype=jnp.float32):
  """uint8 (or float in [0, 255]) NHWC images to zero-mean, unit-variance ``dtype``."""
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return ((images.astype(jnp.float32) - mean) / std).astype(dtype)


def cutout_mask(key, batch: int, height: int, width: int, size: int):
  """A [batch, height, width, 1] mask, 0 inside one size x size square per image.

  Square centres are uniform over the whole image, so a hole may hang over the border
  and cover less than size**2 pixels, as in DeVries & Taylor (2017).
  """
  key_y, key_x = jax.random.split(key)
  cy = jax.random.randint(key_y, (batch, 1, 1), 0, height)
  cx = jax.random.randint(key_x, (batch, 1, 1), 0, width)
  y0, x0 = cy - size // 2, cx - size // 2
  ys = jnp.arange(height)[None, :, None]
  xs = jnp.arange(width)[None, None, :]
  inside = ((ys >= y0) & (ys < y0 + size)) & ((xs >= x0) & (xs < x0 + size))
  return (~inside)[..., None]


def cutout(key, images, size: int):
  """Zeroes one random square per image (the mean, once images are normalised)."""
  if size <= 0:
    return images
  b, h, w, _ = images.shape
  return images * cutout_mask(key, b, h, w, size).astype(images.dtype)


def example_keys(key, indices, tag: int):
  """One key per example, ``fold_in(fold_in(key, index), tag)``: independent of layout."""
  return jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(key, i), tag))(indices)


def random_pad_crop(keys, images, pad: int):
  """Zero-pads each NHWC image by ``pad`` and crops back to its size at a random offset.

  ``keys`` holds one PRNG key per image; offsets are uniform in [0, 2 * pad] on each axis.
  """
  if pad <= 0:
    return images
  _, h, w, c = images.shape
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  offsets = jax.vmap(lambda k: jax.random.randint(k, (2,), 0, 2 * pad + 1))(keys)
  return jax.vmap(lambda image, o: jax.lax.dynamic_slice(image, (o[0], o[1], 0), (h, w, c)))(
    padded, offsets
  )


def random_flip(keys, images):
  """Mirrors each NHWC image left-right with probability 1/2, one key per image."""
  flips = jax.vmap(lambda k: jax.random.bernoulli(k))(keys)
  return jnp.where(flips[:, None, None, None], images[:, :, ::-1], images)


def _erasing_box(shape_u, place_u, height: int, width: int, area_range, log_aspect_range, count):
  """timm's up-to-10 tries at an (h, w) that fits, vectorised: the first fit, placed uniformly.

  ``shape_u`` [2, 10] (area, aspect per try) and ``place_u`` [2] (top, left) are uniforms in
  [0, 1). Returns (top, h, left, w); h = w = 0 when no try fits. Each of ``count`` boxes gets
  1/count of the area.
  """
  area_u, aspect_u = shape_u
  target = (area_range[0] + (area_range[1] - area_range[0]) * area_u) * (height * width) / count
  low, high = log_aspect_range
  aspect = jnp.exp(low + (high - low) * aspect_u)
  hs = jnp.round(jnp.sqrt(target * aspect)).astype(jnp.int32)
  ws = jnp.round(jnp.sqrt(target / aspect)).astype(jnp.int32)
  fits = (hs < height) & (ws < width)
  first = jnp.argmax(fits)
  h, w = jnp.where(fits[first], hs[first], 0), jnp.where(fits[first], ws[first], 0)
  top = jnp.floor(place_u[0] * (height - h + 1)).astype(jnp.int32)  # uniform in [0, height - h]
  left = jnp.floor(place_u[1] * (width - w + 1)).astype(jnp.int32)
  return top, h, left, w


def _erasing_mask(key, height: int, width: int, prob, min_area, max_area, min_aspect, max_count):
  """[height, width] True where one image is erased: 1..max_count boxes, all with prob."""
  keys = jax.random.split(key, 3)
  apply_u, count_u = jax.random.uniform(keys[0], (2,))
  count = jnp.floor(1 + count_u * max_count).astype(jnp.int32)  # uniform in [1, max_count]
  shape_u = jax.random.uniform(keys[1], (max_count, 2, 10))
  place_u = jax.random.uniform(keys[2], (max_count, 2))
  log_aspect_range = (math.log(min_aspect), math.log(1 / min_aspect))
  box = lambda s, p: _erasing_box(
    s, p, height, width, (min_area, max_area), log_aspect_range, count
  )
  top, h, left, w = jax.vmap(box)(shape_u, place_u)
  ys = jnp.arange(height)[None, :, None]
  xs = jnp.arange(width)[None, None, :]
  inside = (ys >= top[:, None, None]) & (ys < (top + h)[:, None, None])
  inside &= (xs >= left[:, None, None]) & (xs < (left + w)[:, None, None])
  inside &= (jnp.arange(max_count) < count)[:, None, None]
  return jnp.any(inside, axis=0) & (apply_u < prob)


def random_erasing(
  keys,
  images,
  prob: float,
  *,
  min_area: float = 0.02,
  max_area: float = 1 / 3,
  min_aspect: float = 0.3,
  max_count: int = 1,
):
  """timm's RandomErasing, 'pixel' mode, on normalised NHWC images, one key per image.

  With probability ``prob`` an image gets 1..max_count rectangles (area fraction uniform in
  [min_area, max_area] / count, log-uniform aspect in [min_aspect, 1 / min_aspect]) filled
  with per-pixel standard normal noise: unit-variance noise matches normalised images.
  """
  if prob <= 0:
    return images
  _, height, width, _ = images.shape

  def erase(key, image):
    mask_key, noise_key = jax.random.split(key)
    mask = _erasing_mask(mask_key, height, width, prob, min_area, max_area, min_aspect, max_count)
    noise = jax.random.normal(noise_key, image.shape, image.dtype)
    return jnp.where(mask[..., None], noise, image)

  return jax.vmap(erase)(keys, images)
