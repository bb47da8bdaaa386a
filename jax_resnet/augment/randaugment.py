"""RandAugment and TrivialAugment-Wide on uint8 NHWC batches, inside the jitted train step.

The op set, magnitude ranges and sign flips follow torchvision's ``RandAugment`` and
``TrivialAugmentWide`` (14 ops, Identity included; no Invert or SolarizeAdd), and every drawn
op is applied. ``magnitude`` is a bin out of ``num_magnitude_bins`` (31, as torchvision), so
torchvision's default ``RandAugment(num_ops=2, magnitude=9)`` is ``rand_augment(keys, x, 2, 9)``.
timm's ``rand-m9`` reads m out of 10: ``num_magnitude_bins=11`` gives that scale. The ranges
then are close to timm's ``inc1`` ones (Posterize aside: timm keeps 4..0 bits, torchvision
8..4), but timm also skips each op with probability 1/2 and draws Invert and SolarizeAdd
where torchvision has Identity.

Each op maps a uint8 image to a uint8 image, rounding to nearest where torchvision truncates.
Geometric ops resample bilinearly (timm picks bilinear or bicubic; torchvision defaults to
nearest) and fill uncovered pixels with 128, timm's grey (torchvision fills 0): grey is
close to the dataset mean, so it normalises to about zero instead of a strong black edge.

Randomness comes from one key per example, so an example's augmentation does not depend
on the batch it lands in or on how that batch is split over devices. Choosing the op per
example under ``vmap`` costs every op for every example; ``apply_op`` keeps that cheap.
"""

import math

import jax
import jax.numpy as jnp

FILL = 128
REC601_LUMA = (0.2989, 0.5870, 0.1140)

OP_NAMES = (
  'Identity',
  'ShearX',
  'ShearY',
  'TranslateX',
  'TranslateY',
  'Rotate',
  'Brightness',
  'Color',
  'Contrast',
  'Sharpness',
  'Posterize',
  'Solarize',
  'AutoContrast',
  'Equalize',
)
NUM_OPS = len(OP_NAMES)

# Ops whose magnitude torchvision negates with probability 1/2.
_SIGNED = ('ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Rotate')
_SIGNED += ('Brightness', 'Color', 'Contrast', 'Sharpness')

# The strongest value of each op (its top magnitude bin) in TrivialAugment-Wide. Posterize's
# value is the number of bits dropped, Solarize's how far the threshold is below 255.
TRIVIAL_AUGMENT_MAX = {
  'ShearX': 0.99,
  'ShearY': 0.99,
  'TranslateX': 32.0,
  'TranslateY': 32.0,
  'Rotate': 135.0,
  'Brightness': 0.99,
  'Color': 0.99,
  'Contrast': 0.99,
  'Sharpness': 0.99,
  'Posterize': 6.0,
  'Solarize': 255.0,
}


def rand_augment_max(height: int, width: int):
  """RandAugment's strongest value per op; translation is relative (150/331 of the side)."""
  enhance = {name: 0.9 for name in ('Brightness', 'Color', 'Contrast', 'Sharpness')}
  return {
    'ShearX': 0.3,
    'ShearY': 0.3,
    'TranslateX': 150.0 / 331.0 * width,
    'TranslateY': 150.0 / 331.0 * height,
    'Rotate': 30.0,
    **enhance,
    'Posterize': 4.0,
    'Solarize': 255.0,
  }


def _to_uint8(x):
  return jnp.clip(jnp.round(x), 0, 255).astype(jnp.uint8)


def _blend(image, degenerate, factor):
  """PIL's ImageEnhance: factor 0 gives ``degenerate``, 1 the image, above 1 extrapolates."""
  image = image.astype(jnp.float32)
  return _to_uint8(factor * image + (1.0 - factor) * degenerate)


def _grayscale(image):
  """[H, W, 1] float luma (ITU-R 601, as PIL and torchvision); grey images pass through."""
  image = image.astype(jnp.float32)
  if image.shape[-1] == 1:
    return image
  # Rec. 601 luma with TensorFlow's (and dm-pix's) rounded weights, summed in that order.
  return jnp.tensordot(image, jnp.asarray(REC601_LUMA, jnp.float32), axes=(-1, -1))[..., None]


def brightness(image, factor):
  """Blends with black: pixel values times ``factor``, clipped."""
  return _blend(image, 0.0, factor)


def color(image, factor):
  """Blends with the image's greyscale: 0 removes colour, 2 doubles saturation."""
  return _blend(image, _grayscale(image), factor)


def contrast(image, factor):
  """Blends with the image's mean grey level (one scalar, as PIL; not per channel)."""
  return _blend(image, jnp.mean(_grayscale(image)), factor)


def sharpness(image, factor):
  """Blends with PIL's smoothing filter (3x3, centre 5/13); the border pixels stay as they are."""
  height, width, _ = image.shape
  if height <= 2 or width <= 2:
    return image
  x = image.astype(jnp.float32)
  window = sum(x[i : height - 2 + i, j : width - 2 + j] for i in range(3) for j in range(3))
  smoothed = jnp.round((window + 4.0 * x[1:-1, 1:-1]) / 13.0)
  return _blend(image, x.at[1:-1, 1:-1].set(smoothed), factor)


def posterize(image, bits):
  """Keeps the ``bits`` most significant bits of every value (8 is the identity)."""
  mask = jnp.left_shift(255, 8 - jnp.asarray(bits, jnp.int32)) & 255
  return image & mask.astype(jnp.uint8)


def solarize(image, threshold):
  """Inverts values at or above ``threshold`` (torchvision and PIL use >=)."""
  return jnp.where(image >= threshold, 255 - image, image)


def auto_contrast(image):
  """Stretches each channel linearly to span 0..255; constant channels are left alone."""
  x = image.astype(jnp.float32)
  low = jnp.min(x, axis=(0, 1))
  high = jnp.max(x, axis=(0, 1))
  flat = high == low
  scale = jnp.where(flat, 1.0, 255.0 / jnp.where(flat, 1.0, high - low))
  return _to_uint8((x - jnp.where(flat, 0.0, low)) * scale)


def _equalize_channel(channel):
  """PIL's ImageOps.equalize on one [H, W] uint8 channel (histogram + cdf lookup table)."""
  values = channel.astype(jnp.int32)
  histogram = jnp.bincount(values.ravel(), length=256)
  # PIL spreads all pixels but those at the channel's top value over 255 steps.
  step = (values.size - histogram[jnp.max(values)]) // 255
  lut = (jnp.cumsum(histogram) + step // 2) // jnp.maximum(step, 1)
  lut = jnp.clip(jnp.concatenate([jnp.zeros(1, lut.dtype), lut[:-1]]), 0, 255)
  return jnp.where(step == 0, channel, lut[values].astype(jnp.uint8))


def equalize(image):
  """Equalises each channel's histogram, as PIL and torchvision."""
  return jax.vmap(_equalize_channel, in_axes=-1, out_axes=-1)(image)


def _affine(image, matrix, fill):
  """Pulls output pixel (y, x) from ``matrix @ (y, x, 1)`` bilinearly; outside it is ``fill``.

  Gathers whole pixels (all channels per index) from the flattened image: on this CPU it is
  much faster than ``dm_pix.affine_transform``, which interpolates over the channel axis too.
  An identity matrix reproduces the image exactly.
  """
  height, width, channels = image.shape
  ys, xs = jnp.meshgrid(jnp.arange(height), jnp.arange(width), indexing='ij')
  ys, xs = ys.astype(jnp.float32), xs.astype(jnp.float32)
  (a, b, c), (d, e, f) = matrix
  src_y, src_x = a * ys + b * xs + c, d * ys + e * xs + f
  y0, x0 = jnp.floor(src_y), jnp.floor(src_x)
  wy, wx = src_y - y0, src_x - x0
  pixels = image.reshape(height * width, channels).astype(jnp.float32)
  out = jnp.zeros((height, width, channels), jnp.float32)
  for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
    y, x = y0 + dy, x0 + dx
    weight = (wy if dy else 1.0 - wy) * (wx if dx else 1.0 - wx)
    inside = (y >= 0) & (y <= height - 1) & (x >= 0) & (x <= width - 1)
    index = (jnp.clip(y, 0, height - 1) * width + jnp.clip(x, 0, width - 1)).astype(jnp.int32)
    value = jnp.where(inside[..., None], pixels[index], float(fill))
    out = out + weight[..., None] * value
  return _to_uint8(out)


# Inverse affine matrices, rows (y_in, x_in) as functions of (y, x, 1) of the output pixel.
IDENTITY = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0))


def shear_x_matrix(factor):
  """x_in = x + factor * (y + 1/2): torchvision's shear about the top-left corner."""
  return ((1.0, 0.0, 0.0), (factor, 1.0, factor * 0.5))


def shear_y_matrix(factor):
  """y_in = y + factor * (x + 1/2)."""
  return ((1.0, factor, factor * 0.5), (0.0, 1.0, 0.0))


def translate_x_matrix(pixels):
  """Moves the content ``pixels`` to the right (negative: left)."""
  return ((1.0, 0.0, 0.0), (0.0, 1.0, -pixels))


def translate_y_matrix(pixels):
  """Moves the content ``pixels`` down (negative: up)."""
  return ((1.0, 0.0, -pixels), (0.0, 1.0, 0.0))


def rotate_matrix(degrees, height: int, width: int):
  """Counter-clockwise by ``degrees`` about the image centre, as PIL and torchvision."""
  cy, cx = (height - 1) / 2, (width - 1) / 2
  cos, sin = jnp.cos(jnp.deg2rad(degrees)), jnp.sin(jnp.deg2rad(degrees))
  return (
    (cos, sin, cy - cos * cy - sin * cx),
    (-sin, cos, cx + sin * cy - cos * cx),
  )


def shear_x(image, factor, fill=FILL):
  return _affine(image, shear_x_matrix(factor), fill)


def shear_y(image, factor, fill=FILL):
  return _affine(image, shear_y_matrix(factor), fill)


def translate_x(image, pixels, fill=FILL):
  return _affine(image, translate_x_matrix(pixels), fill)


def translate_y(image, pixels, fill=FILL):
  return _affine(image, translate_y_matrix(pixels), fill)


def rotate(image, degrees, fill=FILL):
  return _affine(image, rotate_matrix(degrees, *image.shape[:2]), fill)


def _matrices(value, height: int, width: int):
  """[NUM_OPS, 2, 3]: each op's warp for signed strength ``value``; identity for pixel ops."""
  geometric = {
    'ShearX': shear_x_matrix(value),
    'ShearY': shear_y_matrix(value),
    'TranslateX': translate_x_matrix(jnp.trunc(value)),
    'TranslateY': translate_y_matrix(jnp.trunc(value)),
    'Rotate': rotate_matrix(value, height, width),
  }
  return jnp.array([geometric.get(name, IDENTITY) for name in OP_NAMES], jnp.float32)


def _pixel_ops(image, value):
  """Every distinct pixel op's output, stacked [9, H, W, C]; slot 0 is the image itself."""
  return jnp.stack(
    [
      image,
      brightness(image, 1.0 + value),
      color(image, 1.0 + value),
      contrast(image, 1.0 + value),
      sharpness(image, 1.0 + value),
      posterize(image, 8 - jnp.round(value).astype(jnp.int32)),
      solarize(image, 255.0 - value),
      auto_contrast(image),
      equalize(image),
    ]
  )


# The _pixel_ops slot each op in OP_NAMES reads: Identity and the geometric ops read the image.
_PIXEL_SLOT = (0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8)


def apply_op(image, op_index, value, fill: int = FILL):
  """Applies op ``OP_NAMES[op_index]`` with signed strength ``value`` to one HWC uint8 image.

  ``value`` is in the op's own units (shear factor, pixels, degrees, enhance factor - 1, bits
  dropped, 255 - threshold); 0 is the op's weakest setting, the identity for all but
  AutoContrast, Equalize and Solarize (whose threshold 255 still inverts pure white).

  Per-example op choice under ``vmap`` costs every op whatever the choice, so this computes
  each pixel op once, picks one from the stack, and runs one shared warp (the op's matrix,
  identity for pixel ops, which reproduces the image exactly). The stack is deliberate: with
  ``lax.switch`` XLA fused the resulting select into the warp's gathers and recomputed every
  op per interpolation corner, 3x slower on CPU.
  """
  value = jnp.asarray(value, jnp.float32)
  pixels = _pixel_ops(image, value)[jnp.asarray(_PIXEL_SLOT)[op_index]]
  return _affine(pixels, _matrices(value, *image.shape[:2])[op_index], fill)


def _max_values(table):
  return jnp.array([table.get(name, 0.0) for name in OP_NAMES], jnp.float32)


def _signed_value(key, op_index, strength):
  """Flips the sign with probability 1/2 for the ops torchvision negates."""
  signed = jnp.array([name in _SIGNED for name in OP_NAMES])
  flip = jax.random.bernoulli(key) & signed[op_index]
  return jnp.where(flip, -strength, strength)


def _layer_level(key, magnitude: float, magnitude_std: float, top_bin: int):
  """timm's magnitude noise: N(magnitude, std) clipped to the bins; inf std: U(0, magnitude)."""
  if magnitude_std == 0:
    return jnp.float32(magnitude)
  if math.isinf(magnitude_std):
    return jax.random.uniform(key, (), jnp.float32, 0.0, magnitude)
  noisy = magnitude + magnitude_std * jax.random.normal(key, (), jnp.float32)
  return jnp.clip(noisy, 0.0, top_bin)


def _rand_augment_one(key, image, num_layers, magnitude, top_bin, magnitude_std, fill):
  max_values = _max_values(rand_augment_max(*image.shape[:2]))

  def layer(image, layer_key):
    op_key, sign_key, level_key = jax.random.split(layer_key, 3)
    op_index = jax.random.randint(op_key, (), 0, NUM_OPS)
    level = _layer_level(level_key, magnitude, magnitude_std, top_bin)
    value = _signed_value(sign_key, op_index, max_values[op_index] * level / top_bin)
    return apply_op(image, op_index, value, fill), None

  image, _ = jax.lax.scan(layer, image, jax.random.split(key, num_layers))
  return image


def rand_augment(
  keys,
  images,
  num_layers: int = 2,
  magnitude: float = 9,
  *,
  num_magnitude_bins: int = 31,
  magnitude_std: float = 0.0,
  fill: int = FILL,
):
  """RandAugment on a uint8 NHWC batch: ``num_layers`` ops per example, each uniform over 14.

  ``keys`` holds one PRNG key per example; ops are drawn with replacement and always applied
  (torchvision; timm applies each with probability 1/2). ``magnitude`` is a bin in
  [0, num_magnitude_bins - 1]; ``magnitude_std`` > 0 adds timm's per-op Gaussian noise to it
  (inf: uniform in [0, magnitude]).
  """
  top_bin = num_magnitude_bins - 1
  if not 0 <= magnitude <= top_bin:
    raise ValueError(f'magnitude {magnitude} is outside [0, {top_bin}]')
  if num_layers <= 0:
    return images
  one = lambda key, image: _rand_augment_one(
    key, image, num_layers, magnitude, top_bin, magnitude_std, fill
  )
  return jax.vmap(one)(keys, images)


def _trivial_augment_one(key, image, top_bin, fill):
  op_key, level_key, sign_key = jax.random.split(key, 3)
  op_index = jax.random.randint(op_key, (), 0, NUM_OPS)
  level = jax.random.randint(level_key, (), 0, top_bin + 1).astype(jnp.float32)
  strength = _max_values(TRIVIAL_AUGMENT_MAX)[op_index] * level / top_bin
  return apply_op(image, op_index, _signed_value(sign_key, op_index, strength), fill)


def trivial_augment(keys, images, *, num_magnitude_bins: int = 31, fill: int = FILL):
  """TrivialAugment-Wide: one op per example, uniform over 14, at a uniform magnitude bin.

  Ranges are torchvision's wide ones (translation in absolute pixels, up to 32).
  """
  one = lambda key, image: _trivial_augment_one(key, image, num_magnitude_bins - 1, fill)
  return jax.vmap(one)(keys, images)


# AutoAugment (Cubuk et al. 2019) as torchvision's ``AutoAugment``: each policy is 25
# sub-policies of two (op, probability, magnitude bin of 10, or None for ops without
# one); torchvision's tables, op for op.
_AUTOAUGMENT_BINS = 10
AUTOAUGMENT_POLICIES = {
  'imagenet': (
    (('Posterize', 0.4, 8), ('Rotate', 0.6, 9)),
    (('Solarize', 0.6, 5), ('AutoContrast', 0.6, None)),
    (('Equalize', 0.8, None), ('Equalize', 0.6, None)),
    (('Posterize', 0.6, 7), ('Posterize', 0.6, 6)),
    (('Equalize', 0.4, None), ('Solarize', 0.2, 4)),
    (('Equalize', 0.4, None), ('Rotate', 0.8, 8)),
    (('Solarize', 0.6, 3), ('Equalize', 0.6, None)),
    (('Posterize', 0.8, 5), ('Equalize', 1.0, None)),
    (('Rotate', 0.2, 3), ('Solarize', 0.6, 8)),
    (('Equalize', 0.6, None), ('Posterize', 0.4, 6)),
    (('Rotate', 0.8, 8), ('Color', 0.4, 0)),
    (('Rotate', 0.4, 9), ('Equalize', 0.6, None)),
    (('Equalize', 0.0, None), ('Equalize', 0.8, None)),
    (('Invert', 0.6, None), ('Equalize', 1.0, None)),
    (('Color', 0.6, 4), ('Contrast', 1.0, 8)),
    (('Rotate', 0.8, 8), ('Color', 1.0, 2)),
    (('Color', 0.8, 8), ('Solarize', 0.8, 7)),
    (('Sharpness', 0.4, 7), ('Invert', 0.6, None)),
    (('ShearX', 0.6, 5), ('Equalize', 1.0, None)),
    (('Color', 0.4, 0), ('Equalize', 0.6, None)),
    (('Equalize', 0.4, None), ('Solarize', 0.2, 4)),
    (('Solarize', 0.6, 5), ('AutoContrast', 0.6, None)),
    (('Invert', 0.6, None), ('Equalize', 1.0, None)),
    (('Color', 0.6, 4), ('Contrast', 1.0, 8)),
    (('Equalize', 0.8, None), ('Equalize', 0.6, None)),
  ),
  'cifar10': (
    (('Invert', 0.1, None), ('Contrast', 0.2, 6)),
    (('Rotate', 0.7, 2), ('TranslateX', 0.3, 9)),
    (('Sharpness', 0.8, 1), ('Sharpness', 0.9, 3)),
    (('ShearY', 0.5, 8), ('TranslateY', 0.7, 9)),
    (('AutoContrast', 0.5, None), ('Equalize', 0.9, None)),
    (('ShearY', 0.2, 7), ('Posterize', 0.3, 7)),
    (('Color', 0.4, 3), ('Brightness', 0.6, 7)),
    (('Sharpness', 0.3, 9), ('Brightness', 0.7, 9)),
    (('Equalize', 0.6, None), ('Equalize', 0.5, None)),
    (('Contrast', 0.6, 7), ('Sharpness', 0.6, 5)),
    (('Color', 0.7, 7), ('TranslateX', 0.5, 8)),
    (('Equalize', 0.3, None), ('AutoContrast', 0.4, None)),
    (('TranslateY', 0.4, 3), ('Sharpness', 0.2, 6)),
    (('Brightness', 0.9, 6), ('Color', 0.2, 8)),
    (('Solarize', 0.5, 2), ('Invert', 0.0, None)),
    (('Equalize', 0.2, None), ('AutoContrast', 0.6, None)),
    (('Equalize', 0.2, None), ('Equalize', 0.6, None)),
    (('Color', 0.9, 9), ('Equalize', 0.6, None)),
    (('AutoContrast', 0.8, None), ('Solarize', 0.2, 8)),
    (('Brightness', 0.1, 3), ('Color', 0.7, 0)),
    (('Solarize', 0.4, 5), ('AutoContrast', 0.9, None)),
    (('TranslateY', 0.9, 9), ('TranslateY', 0.7, 9)),
    (('AutoContrast', 0.9, None), ('Solarize', 0.8, 3)),
    (('Equalize', 0.8, None), ('Invert', 0.1, None)),
    (('TranslateY', 0.7, 9), ('AutoContrast', 0.9, None)),
  ),
  'svhn': (
    (('ShearX', 0.9, 4), ('Invert', 0.2, None)),
    (('ShearY', 0.9, 8), ('Invert', 0.7, None)),
    (('Equalize', 0.6, None), ('Solarize', 0.6, 6)),
    (('Invert', 0.9, None), ('Equalize', 0.6, None)),
    (('Equalize', 0.6, None), ('Rotate', 0.9, 3)),
    (('ShearX', 0.9, 4), ('AutoContrast', 0.8, None)),
    (('ShearY', 0.9, 8), ('Invert', 0.4, None)),
    (('ShearY', 0.9, 5), ('Solarize', 0.2, 6)),
    (('Invert', 0.9, None), ('AutoContrast', 0.8, None)),
    (('Equalize', 0.6, None), ('Rotate', 0.9, 3)),
    (('ShearX', 0.9, 4), ('Solarize', 0.3, 3)),
    (('ShearY', 0.8, 8), ('Invert', 0.7, None)),
    (('Equalize', 0.9, None), ('TranslateY', 0.6, 6)),
    (('Invert', 0.9, None), ('Equalize', 0.6, None)),
    (('Contrast', 0.3, 3), ('Rotate', 0.8, 4)),
    (('Invert', 0.8, None), ('TranslateY', 0.0, 2)),
    (('ShearY', 0.7, 6), ('Solarize', 0.4, 8)),
    (('Invert', 0.6, None), ('Rotate', 0.8, 4)),
    (('ShearY', 0.3, 7), ('TranslateX', 0.9, 3)),
    (('ShearX', 0.1, 6), ('Invert', 0.6, None)),
    (('Solarize', 0.7, 2), ('TranslateY', 0.6, 7)),
    (('ShearY', 0.8, 4), ('Invert', 0.8, None)),
    (('ShearX', 0.7, 9), ('TranslateY', 0.8, 3)),
    (('ShearY', 0.8, 5), ('AutoContrast', 0.7, None)),
    (('ShearX', 0.7, 2), ('Invert', 0.1, None)),
  ),
}
# AutoAugment's op beyond RandAugment's 14: 255 - x. Its index follows OP_NAMES's.
INVERT = NUM_OPS


def _policy_table(policy: str):
  """([P, 2] op indices, [P, 2] probabilities, [P, 2] magnitude bins) of a policy."""
  index = {name: i for i, name in enumerate(OP_NAMES)} | {'Invert': INVERT}
  subs = AUTOAUGMENT_POLICIES[policy]
  ops = jnp.array([[index[op] for op, _, _ in sub] for sub in subs], jnp.int32)
  probs = jnp.array([[p for _, p, _ in sub] for sub in subs], jnp.float32)
  bins = jnp.array([[m or 0 for _, _, m in sub] for sub in subs], jnp.float32)
  return ops, probs, bins


def _auto_augment_one(key, image, policy: str, fill):
  ops, probs, bins = _policy_table(policy)
  max_values = _max_values(rand_augment_max(*image.shape[:2]))
  policy_key, prob_key, sign_key = jax.random.split(key, 3)
  chosen = jax.random.randint(policy_key, (), 0, ops.shape[0])
  draws = jax.random.uniform(prob_key, (2,))
  sign_keys = jax.random.split(sign_key, 2)
  for i in range(2):  # torchvision: op i applies when its draw <= its probability
    op = ops[chosen, i]
    plain = jnp.where(op == INVERT, 0, op)  # Invert: the identity, then 255 - x
    strength = max_values[plain] * bins[chosen, i] / (_AUTOAUGMENT_BINS - 1)
    out = apply_op(image, plain, _signed_value(sign_keys[i], plain, strength), fill)
    out = jnp.where(op == INVERT, 255 - image, out)
    image = jnp.where(draws[i] <= probs[chosen, i], out, image)
  return image


def auto_augment(keys, images, policy: str, *, fill: int = FILL):
  """AutoAugment on a uint8 NHWC batch: per example, one of ``policy``'s 25 sub-policies,
  each of its two ops applied with its probability at its magnitude (signed ops negated
  with probability 1/2), as torchvision's ``AutoAugment(AutoAugmentPolicy(policy))``."""
  if policy not in AUTOAUGMENT_POLICIES:
    raise ValueError(f'Unknown AutoAugment policy {policy!r}: {", ".join(AUTOAUGMENT_POLICIES)}.')
  return jax.vmap(lambda key, image: _auto_augment_one(key, image, policy, fill))(keys, images)
