"""Host-side tf.data transforms, each stateless in a seed so an epoch's batches are the
same however many threads run them and wherever a run resumes.

Two train augmentations (``config.train_crop``):

- ``pad``: pad-and-random-crop plus flip on decoded, fixed-size images (digits, CIFAR).
- ``random_resized``: ImageNet-style. The example holds encoded JPEG/PNG bytes or a file
  path; it is decoded only inside the crop window (``tf.image.decode_and_crop_jpeg``),
  resized to ``config.image_size``, flipped and optionally colour-jittered. Eval decodes
  a centred square of ``config.eval_crop_fraction`` of the shorter side, i.e.
  resize-shorter-side to ``image_size / 0.875`` then centre crop.

A transform factory (``pad_transform``, ``random_resized_transform``,
``eval_transform``) takes ``TransformOptions`` and returns
``transform(example, seed) -> {'image': uint8 HWC, 'label': int32}``.
"""

import dataclasses
import math

from jax_resnet.data.tf_cpu import tf


@dataclasses.dataclass(frozen=True)
class TransformOptions:
  """What the host transforms do (the config's field names; see its comments)."""

  image_size: int
  eval_image_size: int  # 0: image_size
  random_crop_pad: int
  random_flip: bool
  crop_scale: tuple[float, float]
  crop_ratio: tuple[float, float]
  crop_attempts: int
  eval_crop_fraction: float
  resize_antialias: bool
  color_jitter_prob: float
  color_jitter_brightness: float
  color_jitter_contrast: float
  color_jitter_saturation: float
  color_jitter_hue: float
  inception_color: bool


def transform_options(config) -> TransformOptions:
  """The host transforms' options, read from a config by field name."""
  from jax_resnet.configuration.typed_options import from_config

  return from_config(TransformOptions, config)


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


def pad_transform(options: TransformOptions):
  pad, flip = options.random_crop_pad, options.random_flip

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


def resize_if_needed(image, size: int):
  if image.shape[0] == size and image.shape[1] == size:
    return image
  image = tf.image.resize(image, (size, size), method='bilinear', antialias=True)
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
  """The example's encoded image bytes (read from its file when only the path is kept),
  checked so that an undecodable file is named in a warning before tf.data drops it."""
  data = example['image'] if 'image' in example else tf.io.read_file(example['path'])
  name = example.get('path', example.get('file_name'))
  return data if name is None else _named_if_undecodable(data, name)


def _named_if_undecodable(data, name):
  """``data``, or b'' (which fails to decode, so ``ignore_errors`` drops it) after a
  warning naming the file, when it is not a whole JPEG or PNG.

  A cheap check in the graph (a JPEG ends with its EOI marker, a PNG with its IEND
  chunk) sends only the suspicious files to Pillow, which decides; the start-up
  verification (``config.verify_images``) stays the thorough one.
  """
  tail = tf.strings.substr(tf.strings.join([b'\0' * 8, data]), -8, 8)  # any length
  jpeg_complete = tf.strings.substr(tail, 6, 2) == b'\xff\xd9'
  png_complete = tail == b'IEND\xaeB`\x82'
  is_png = tf.strings.substr(data, 0, 4) == b'\x89PNG'
  complete = tf.where(tf.io.is_jpeg(data), jpeg_complete, tf.where(is_png, png_complete, True))

  def check():
    checked = tf.py_function(_pillow_check, [data, name], tf.string)
    checked.set_shape([])
    return checked

  return tf.cond(complete & (tf.strings.length(data) > 0), lambda: data, check)


def _pillow_check(data, name):
  import io

  from absl import logging
  from PIL import Image

  try:
    with Image.open(io.BytesIO(data.numpy())) as image:
      image.load()
  except Exception as e:  # what Pillow cannot read, TensorFlow cannot decode either
    logging.warning('Skipping %s: it cannot be decoded (%s).', name.numpy().decode(), e)
    return b''
  return data


def random_resized_transform(options: TransformOptions, channels: int):
  size = options.image_size
  scale = tuple(options.crop_scale)
  ratio = tuple(options.crop_ratio)
  attempts = int(options.crop_attempts)
  flip = options.random_flip
  jitter = dict(
    brightness=options.color_jitter_brightness,
    contrast=options.color_jitter_contrast,
    saturation=options.color_jitter_saturation,
    hue=options.color_jitter_hue,
    prob=options.color_jitter_prob,
  )
  inception = options.inception_color and channels == 3
  antialias = options.resize_antialias
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


def eval_transform(options: TransformOptions, channels: int):
  """Decodes the centre crop straight at the eval size (``eval_image_size`` when set:
  train low, test high, as FixRes and FFCV do)."""
  size = options.eval_image_size or options.image_size
  fraction, antialias = options.eval_crop_fraction, options.resize_antialias

  def transform(example):
    image = decode_and_crop(
      _encoded(example), lambda s: center_crop_window(s, fraction), size, channels, antialias
    )
    return {'image': image, 'label': tf.cast(example['label'], tf.int32)}

  return transform


def crop_style(train_crop: str, variable_size: bool) -> str:
  """'pad' or 'random_resized': ``config.train_crop``, with 'auto' decided by whether the
  source's images vary in size (validated in ``jax_resnet.configuration.validation``)."""
  if train_crop == 'auto':
    return 'random_resized' if variable_size else 'pad'
  return train_crop
