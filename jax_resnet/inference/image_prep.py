"""Eval's preprocessing in numpy and Pillow, for prediction where TensorFlow is absent.

'random_resized' sets take a centred square of ``eval_crop_fraction`` of the shorter side,
then a bilinear resize to the model's input; 'pad' sets (digits, CIFAR) are resized whole.
The resize repeats TensorFlow's float32 arithmetic, so from the same decoded pixels the
model sees exactly what eval showed it. (JPEGs are the one difference: Pillow decodes them
with libjpeg's accurate DCT, TensorFlow with its fast one, a few levels apart.)
"""

import functools
from collections.abc import Sequence

import numpy as np

# ITU-R 601-2 luma, as Pillow's convert('L'): RGB to one channel.
LUMA = np.array([0.299, 0.587, 0.114], np.float32)
# Pillow modes of 16-bit (or wider) grey pixels; TensorFlow keeps their high byte.
_WIDE_GREY_MODES = ('I', 'I;16', 'I;16B', 'I;16L', 'I;16N')
_GREY_MODES = ('1', 'L', 'LA', 'La')


def to_channels(image, channels: int) -> np.ndarray:
  """uint8 HW or HWC (grey, grey+alpha, RGB, RGBA) as HWC with ``channels`` channels.

  Alpha is dropped (as TensorFlow's decoders do), grey is repeated, RGB becomes luma.
  """
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f'Images must be uint8 (0-255); got {image.dtype}.')
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[2] not in (1, 2, 3, 4):
    raise ValueError(f'An image must be HW or HWC with 1-4 channels; got {image.shape}.')
  image = image[..., :1] if image.shape[2] == 2 else image[..., :3]
  if image.shape[2] == channels:
    return image
  if image.shape[2] == 1:
    return np.repeat(image, channels, axis=2)
  if channels == 1:
    return np.round(image.astype(np.float32) @ LUMA)[..., None].astype(np.uint8)
  raise ValueError(f'Cannot make {channels}-channel images of {image.shape[2]}-channel ones.')


def center_crop(image: np.ndarray, fraction: float) -> np.ndarray:
  """A centred square of ``fraction`` of the shorter side, as eval's crop window (float32
  arithmetic, ties to even, at least one pixel)."""
  height, width = image.shape[:2]
  side = int(max(np.round(np.float32(min(height, width)) * np.float32(fraction)), 1))
  y, x = (height - side) // 2, (width - side) // 2
  return image[y : y + side, x : x + side]


def resize_bilinear(image: np.ndarray, size: Sequence[int], antialias: bool) -> np.ndarray:
  """uint8 HWC to uint8 ``size`` as ``tf.image.resize(method='bilinear')`` then rounding.

  Half-pixel centres, float32 arithmetic in TensorFlow's order, so that even the many
  exact .5 ties of upsampled digits round as they did in training. Without ``antialias``
  each output pixel mixes its 2x2 nearest (TF's ResizeBilinear: width, then height); with
  it a shrink widens the triangle filter to the scale (TF's ScaleAndTranslate: height,
  then width).
  """
  height, width = size
  if image.shape[:2] == (height, width):
    return image
  x = image.astype(np.float32)
  if antialias:
    x = _antialiased_axis(_antialiased_axis(x, 0, height), 1, width)
  else:
    x = _bilinear_axis(_bilinear_axis(x, 1, width), 0, height)
  return np.clip(np.round(x), 0, 255).astype(np.uint8)


def _along(vector: np.ndarray, axis: int, ndim: int) -> np.ndarray:
  shape = [1] * ndim
  shape[axis] = -1
  return vector.reshape(shape)


def _bilinear_axis(x: np.ndarray, axis: int, out_size: int) -> np.ndarray:
  """TF's ResizeBilinear along ``axis``: lower + (upper - lower) * lerp."""
  if x.shape[axis] == out_size:
    return x
  lower, upper, lerp = _bilinear_taps(x.shape[axis], out_size)
  low = np.take(x, lower, axis=axis)
  return low + (np.take(x, upper, axis=axis) - low) * _along(lerp, axis, x.ndim)


@functools.lru_cache(maxsize=64)
def _bilinear_taps(in_size: int, out_size: int):
  """(lower index, upper index, lerp) per output pixel, in float32 as TF computes them."""
  scale = np.float32(in_size) / np.float32(out_size)
  position = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
  floor = np.floor(position)
  lower = np.maximum(floor.astype(np.int64), 0)
  upper = np.minimum(np.ceil(position).astype(np.int64), in_size - 1)
  return lower, upper, (position - floor).astype(np.float32)


def _antialiased_axis(x: np.ndarray, axis: int, out_size: int) -> np.ndarray:
  """TF's ScaleAndTranslate (triangle kernel, antialiased) along ``axis``."""
  if x.shape[axis] == out_size:
    return x
  indices, weights = _antialiased_taps(x.shape[axis], out_size)
  out = np.zeros(x.shape[:axis] + (out_size,) + x.shape[axis + 1 :], np.float32)
  for tap in range(indices.shape[1]):  # zero-weight padding taps add exact zeros
    out += np.take(x, indices[:, tap], axis=axis) * _along(weights[:, tap], axis, x.ndim)
  return out


@functools.lru_cache(maxsize=64)
def _antialiased_taps(in_size: int, out_size: int):
  """(input index, weight) [out_size, taps] of each output pixel, as TF's span weights:
  a triangle of radius max(in/out, 1) around (o + 0.5) * in/out, normalised to sum 1."""
  f32 = np.float32
  inverse_scale = f32(1.0 / float(f32(out_size) / f32(in_size)))
  kernel_scale = max(inverse_scale, f32(1.0))
  spans = []
  for o in range(out_size):
    centre = (f32(o) + f32(0.5)) * inverse_scale
    start = int(np.clip(np.ceil(centre - kernel_scale - f32(0.5)), 0, in_size - 1))
    end = int(np.clip(np.floor(centre + kernel_scale - f32(0.5)), 0, in_size - 1)) + 1
    sources = np.arange(start, end)
    distance = np.abs((sources.astype(f32) + f32(0.5) - centre) * (f32(1.0) / kernel_scale))
    weights = np.where(distance < 1, f32(1.0) - distance, f32(0.0)).astype(f32)
    total = f32(0.0)
    for weight in weights:  # in order, as TF sums them
      total = f32(total + weight)
    spans.append((sources, weights * (f32(1.0) / total)))
  taps = max(len(sources) for sources, _ in spans)
  indices = np.zeros((out_size, taps), np.int64)
  weights = np.zeros((out_size, taps), np.float32)
  for o, (sources, span_weights) in enumerate(spans):
    indices[o, : len(sources)], weights[o, : len(sources)] = sources, span_weights
  return indices, weights


def read_image(path: str) -> np.ndarray:
  """A JPEG or PNG (or anything Pillow decodes) as uint8 HW (grey) or HWC (RGB).

  CMYK, palette and RGBA files become RGB; 16-bit grey keeps its high byte.
  """
  from PIL import Image

  with Image.open(path) as image:
    image.load()
    if image.mode in _WIDE_GREY_MODES:
      return (np.asarray(image).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8)
    return np.asarray(image.convert('L' if image.mode in _GREY_MODES else 'RGB'))
