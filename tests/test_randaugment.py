import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_resnet.augment import image_ops
from jax_resnet.augment import randaugment as ra

# A small non-square image holding both extremes, so H/W mix-ups and 255 handling show. It has
# over 255 pixels: PIL's Equalize (and so torchvision's) leaves smaller images unchanged.
IMAGE = np.random.RandomState(0).randint(0, 256, (17, 16, 3)).astype(np.uint8)
IMAGE[0, 0] = (0, 255, 255)
OPS = {name: i for i, name in enumerate(ra.OP_NAMES)}
# A strength per op (apply_op's units), and what it means to the named op.
VALUES = {
  'Identity': 0.0,
  'ShearX': 0.25,
  'ShearY': -0.2,
  'TranslateX': 2.7,  # truncated to 2 pixels, as torchvision's int()
  'TranslateY': -3.2,
  'Rotate': 20.0,
  'Brightness': 0.4,
  'Color': -0.5,
  'Contrast': 0.6,
  'Sharpness': 0.8,
  'Posterize': 3.0,  # keeps 5 bits
  'Solarize': 100.0,  # threshold 155
  'AutoContrast': 0.0,
  'Equalize': 0.0,
}
NAMED = {
  'Identity': lambda x: x,
  'ShearX': lambda x: ra.shear_x(x, 0.25),
  'ShearY': lambda x: ra.shear_y(x, -0.2),
  'TranslateX': lambda x: ra.translate_x(x, 2.0),
  'TranslateY': lambda x: ra.translate_y(x, -3.0),
  'Rotate': lambda x: ra.rotate(x, 20.0),
  'Brightness': lambda x: ra.brightness(x, 1.4),
  'Color': lambda x: ra.color(x, 0.5),
  'Contrast': lambda x: ra.contrast(x, 1.6),
  'Sharpness': lambda x: ra.sharpness(x, 1.8),
  'Posterize': lambda x: ra.posterize(x, 5),
  'Solarize': lambda x: ra.solarize(x, 155.0),
  'AutoContrast': ra.auto_contrast,
  'Equalize': ra.equalize,
}
# Many ops on IMAGE in one compiled program, padded to one size so that it compiles once.
_apply_ops = jax.jit(jax.vmap(ra.apply_op, in_axes=(None, 0, 0)))
rand_augment = jax.jit(ra.rand_augment, static_argnums=(2, 3), static_argnames='magnitude_std')


def apply_ops(ops, values, size=ra.NUM_OPS * 31 * 2):
  """IMAGE after apply_op for each (op index, value) pair."""
  pad = (0, size - len(ops))
  ops, values = np.pad(np.asarray(ops), pad), np.pad(np.asarray(values, np.float32), pad)
  out = _apply_ops(jnp.asarray(IMAGE), jnp.asarray(ops), jnp.asarray(values))
  return np.asarray(out)[: size - pad[1]]


def _all_ops(values):
  return apply_ops(np.arange(ra.NUM_OPS), values)


def _max_diff(a, b):
  return np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max()


def test_apply_op_runs_each_named_op_jitted_keeping_uint8_and_shape():
  out = _all_ops([VALUES[name] for name in ra.OP_NAMES])
  assert out.dtype == np.uint8 and out.shape == (ra.NUM_OPS, *IMAGE.shape)
  for name, i in OPS.items():
    expected = NAMED[name](jnp.asarray(IMAGE))
    assert expected.dtype == jnp.uint8 and expected.shape == IMAGE.shape
    assert _max_diff(out[i], expected) <= 1, name  # float rounding may differ under jit
    if name != 'Identity':
      assert _max_diff(out[i], IMAGE) > 0, name


def test_zero_strength_is_identity_where_the_op_says_so():
  out = _all_ops(np.zeros(ra.NUM_OPS))
  for name, i in OPS.items():
    if name in ('AutoContrast', 'Equalize'):
      continue
    if name == 'Solarize':  # threshold 255 (torchvision's weakest) still inverts pure white
      np.testing.assert_array_equal(out[i], np.where(IMAGE == 255, 0, IMAGE))
    else:
      np.testing.assert_array_equal(out[i], IMAGE, err_msg=name)


def _np_blend(image, degenerate, factor):
  mixed = factor * image.astype(np.float64) + (1 - factor) * degenerate
  return np.clip(np.round(mixed), 0, 255).astype(np.uint8)


def _np_gray(image):
  return (image.astype(np.float64) @ [0.2989, 0.587, 0.114])[..., None]


def _np_sharpness(image, factor):
  x = image.astype(np.float64)
  smoothed = x.copy()
  window = sum(
    x[i : i + x.shape[0] - 2, j : j + x.shape[1] - 2] for i in range(3) for j in range(3)
  )
  smoothed[1:-1, 1:-1] = np.round((window + 4 * x[1:-1, 1:-1]) / 13)
  return _np_blend(image, smoothed, factor)


def _np_auto_contrast(image):
  x = image.astype(np.float64)
  low, high = x.min((0, 1)), x.max((0, 1))
  stretched = np.round((x - low) * 255 / np.where(high > low, high - low, 1))
  return np.where(high > low, np.clip(stretched, 0, 255), x).astype(np.uint8)


def _np_equalize_channel(channel):
  """PIL's ImageOps.equalize, transcribed."""
  histogram = np.bincount(channel.ravel(), minlength=256)
  nonzero = histogram[histogram > 0]
  step = (nonzero.sum() - nonzero[-1]) // 255
  if not step:
    return channel
  lut, n = [], step // 2
  for count in histogram:
    lut.append(min(n // step, 255))
    n += count
  return np.asarray(lut, np.uint8)[channel]


def _np_equalize(image):
  return np.stack([_np_equalize_channel(image[..., c]) for c in range(image.shape[-1])], -1)


def test_pixel_ops_match_numpy_references():
  x, image = IMAGE, jnp.asarray(IMAGE)
  for threshold in (0.0, 100.0, 128.0, 255.0):
    expected = np.where(x >= threshold, 255 - x, x)
    np.testing.assert_array_equal(np.asarray(ra.solarize(image, threshold)), expected)
  for bits in range(9):
    expected = x & ((0xFF << (8 - bits)) & 0xFF)
    np.testing.assert_array_equal(np.asarray(ra.posterize(image, bits)), expected)
  for factor in (0.1, 0.5, 1.0, 1.9):
    assert _max_diff(ra.brightness(image, factor), _np_blend(x, 0.0, factor)) <= 1
    assert _max_diff(ra.color(image, factor), _np_blend(x, _np_gray(x), factor)) <= 1
    assert _max_diff(ra.contrast(image, factor), _np_blend(x, _np_gray(x).mean(), factor)) <= 1
    assert _max_diff(ra.sharpness(image, factor), _np_sharpness(x, factor)) <= 1
  assert _max_diff(ra.auto_contrast(image), _np_auto_contrast(x)) <= 1
  np.testing.assert_array_equal(np.asarray(ra.equalize(image)), _np_equalize(x))
  low_contrast = (x // 4 + 100).astype(np.uint8)
  np.testing.assert_array_equal(
    np.asarray(ra.equalize(jnp.asarray(low_contrast))), _np_equalize(low_contrast)
  )
  constant = jnp.full((4, 4, 3), 7, jnp.uint8)  # no spread: both leave it alone
  np.testing.assert_array_equal(np.asarray(ra.equalize(constant)), np.asarray(constant))
  np.testing.assert_array_equal(np.asarray(ra.auto_contrast(constant)), np.asarray(constant))


def test_geometric_ops_move_pixels_as_defined():
  x, image, fill = IMAGE, jnp.asarray(IMAGE), ra.FILL
  h, w, _ = x.shape
  expected = np.full_like(x, fill)
  expected[:, 2:] = x[:, :-2]  # content moves right
  np.testing.assert_array_equal(np.asarray(ra.translate_x(image, 2.0)), expected)
  expected = np.full_like(x, fill)
  expected[:-3] = x[3:]  # content moves up
  np.testing.assert_array_equal(np.asarray(ra.translate_y(image, -3.0)), expected)
  # Half a pixel right: the mean of two neighbours (fill at the left edge), rounded.
  shifted = np.concatenate([np.full_like(x[:, :1], fill), x[:, :-1]], 1).astype(float)
  expected = np.round((shifted + x) / 2).astype(np.uint8)
  np.testing.assert_array_equal(np.asarray(ra.translate_x(image, 0.5)), expected)
  # Shear by 2 shifts row y by 2y + 1 whole pixels: x_in = x + 2 (y + 1/2).
  expected = np.full_like(x, fill)
  for y in range(h):
    for col in range(w):
      if col + 2 * y + 1 < w:
        expected[y, col] = x[y, col + 2 * y + 1]
  np.testing.assert_array_equal(np.asarray(ra.shear_x(image, 2.0)), expected)
  expected = np.full_like(x, fill)
  for y in range(h):
    for col in range(w):
      if y + 2 * col + 1 < h:
        expected[y, col] = x[y + 2 * col + 1, col]
  np.testing.assert_array_equal(np.asarray(ra.shear_y(image, 2.0)), expected)
  square = jnp.asarray(x[:7, :7])
  rotated = np.rot90(x[:7, :7], 1, axes=(0, 1))  # counter-clockwise
  np.testing.assert_array_equal(np.asarray(ra.rotate(square, 90.0)), rotated)
  np.testing.assert_array_equal(np.asarray(ra.rotate(image, 180.0)), x[::-1, ::-1])


def _matches(outputs, grid, table):
  """The (op, level out of 30, sign) in ``grid`` each output is (within float rounding)."""
  values = [table.get(ra.OP_NAMES[i], 0.0) * level / 30 * sign for i, level, sign in grid]
  candidates = apply_ops([i for i, _, _ in grid], values)
  candidates = candidates.reshape(len(grid), -1).astype(np.int16)
  matches = []
  for output in outputs.reshape(len(outputs), -1).astype(np.int16):
    diffs = np.abs(candidates - output).max(1)
    assert diffs.min() <= 1
    matches.append(grid[diffs.argmin()])
  return matches


def _keys(n, seed=0):
  return image_ops.example_keys(jax.random.PRNGKey(seed), jnp.arange(n), 5)


def test_rand_augment_draws_an_op_per_example_deterministically():
  b, magnitude = 64, 15
  images = jnp.broadcast_to(jnp.asarray(IMAGE), (b, *IMAGE.shape))
  out = np.asarray(rand_augment(_keys(b), images, 1, magnitude))
  assert out.dtype == np.uint8 and out.shape == images.shape
  grid = [(i, magnitude, sign) for i in range(ra.NUM_OPS) for sign in (1, -1)]
  # Each example got one of the ops at this magnitude, drawn per example, not per batch.
  matches = _matches(out, grid, ra.rand_augment_max(*IMAGE.shape[:2]))
  assert len({op for op, _, _ in matches}) >= 12
  np.testing.assert_array_equal(out, np.asarray(rand_augment(_keys(b), images, 1, magnitude)))
  assert not np.array_equal(out, np.asarray(rand_augment(_keys(b, 1), images, 1, magnitude)))
  # An example's result depends on its own key only, not on its place in the batch.
  two = np.asarray(rand_augment(_keys(b), images, 2, 9))
  reordered = np.asarray(rand_augment(_keys(b)[::-1], images, 2, 9))
  np.testing.assert_array_equal(two, reordered[::-1])


def test_trivial_augment_draws_an_op_and_a_magnitude_per_example():
  b = 64
  images = jnp.broadcast_to(jnp.asarray(IMAGE), (b, *IMAGE.shape))
  trivial_augment = jax.jit(ra.trivial_augment)
  out = np.asarray(trivial_augment(_keys(b), images))
  assert out.dtype == np.uint8 and out.shape == images.shape
  grid = [(i, level, sign) for i in range(ra.NUM_OPS) for level in range(31) for sign in (1, -1)]
  matches = _matches(out, grid, ra.TRIVIAL_AUGMENT_MAX)
  assert len({op for op, _, _ in matches}) >= 12
  assert len({level for _, level, _ in matches}) >= 15  # and so are the magnitudes
  np.testing.assert_array_equal(out, np.asarray(trivial_augment(_keys(b), images)))


def test_rand_augment_options():
  images = jnp.broadcast_to(jnp.asarray(IMAGE), (64, *IMAGE.shape))
  keys = _keys(64)
  assert ra.rand_augment(keys, images, 0, 9) is images
  with pytest.raises(ValueError):
    ra.rand_augment(keys, images, 2, 31)
  with pytest.raises(ValueError):
    ra.rand_augment(keys, images, 2, 11, num_magnitude_bins=11)
  # timm's magnitude noise: same ops and signs as without it, other strengths.
  plain = np.asarray(rand_augment(keys, images, 1, 15))
  noisy = np.asarray(rand_augment(keys, images, 1, 15, magnitude_std=0.5))
  assert noisy.dtype == np.uint8
  assert 0 < (plain != noisy).any((1, 2, 3)).sum() < 64


def test_grayscale_is_tensorflows_rec601_luma():
  """The luma RandAugment's Color and Contrast blend towards, as tf.image.rgb_to_grayscale
  computes it (the one function dm-pix served; the GPU image has no dm-pix)."""
  from jax_resnet.data.tf_cpu import tf

  rng = np.random.RandomState(3)
  image = rng.randint(0, 256, (9, 7, 3)).astype(np.float32)
  expected = tf.image.rgb_to_grayscale(tf.constant(image)).numpy()
  got = np.asarray(ra._grayscale(jnp.asarray(image)))
  assert got.shape == (9, 7, 1)
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-4)


def test_autoaugment_policies_are_torchvisions_tables():
  for name, policy in ra.AUTOAUGMENT_POLICIES.items():
    assert len(policy) == 25 and all(len(sub) == 2 for sub in policy), name
    for op, probability, level in (op for sub in policy for op in sub):
      assert op in OPS or op == 'Invert', (name, op)
      assert 0 <= probability <= 1 and (level is None or 0 <= level <= 9), (name, op)
  # Spot checks against torchvision's AutoAugmentPolicy tables.
  assert ra.AUTOAUGMENT_POLICIES['imagenet'][0] == (('Posterize', 0.4, 8), ('Rotate', 0.6, 9))
  assert ra.AUTOAUGMENT_POLICIES['cifar10'][14] == (('Solarize', 0.5, 2), ('Invert', 0.0, None))
  assert ra.AUTOAUGMENT_POLICIES['svhn'][24] == (('ShearX', 0.7, 2), ('Invert', 0.1, None))


def test_autoaugment_applies_each_op_with_its_probability_and_magnitude(monkeypatch):
  """Sub-policies with probabilities 1 and 0 make the draws visible: Invert then Posterize
  at bin 8 (torchvision: 8 - round(8 / 2.25) = 4 bits kept); Rotate at bin 9 is 30 degrees
  either way; a probability of 0 leaves the image."""
  b = 16
  images = jnp.broadcast_to(jnp.asarray(IMAGE), (b, *IMAGE.shape))
  auto_augment = jax.jit(ra.auto_augment, static_argnums=2)
  policies = {
    'sure': ((('Invert', 1.0, None), ('Posterize', 1.0, 8)),),
    'never': ((('Invert', 0.0, None), ('Rotate', 0.0, 9)),),
    'rotate': ((('Rotate', 1.0, 9), ('Equalize', 0.0, None)),),
  }
  for name, policy in policies.items():
    monkeypatch.setitem(ra.AUTOAUGMENT_POLICIES, name, policy)
  sure = np.asarray(auto_augment(_keys(b), images, 'sure'))
  np.testing.assert_array_equal(sure[0], ra.posterize(255 - IMAGE, 4))
  assert (sure == sure[0]).all()
  np.testing.assert_array_equal(np.asarray(auto_augment(_keys(b), images, 'never')), images)
  rotated = np.asarray(auto_augment(_keys(b), images, 'rotate'))
  plus, minus = np.asarray(ra.rotate(IMAGE, 30.0)), np.asarray(ra.rotate(IMAGE, -30.0))
  is_plus = (rotated == plus).all((1, 2, 3))
  assert (is_plus | (rotated == minus).all((1, 2, 3))).all() and 0 < is_plus.sum() < b
  # The real policies: per-example draws, the same for the same keys (exact resume).
  out = np.asarray(auto_augment(_keys(b), images, 'imagenet'))
  np.testing.assert_array_equal(out, np.asarray(auto_augment(_keys(b), images, 'imagenet')))
  assert len({o.tobytes() for o in out}) > 4
  with pytest.raises(ValueError):
    ra.auto_augment(_keys(b), images, 'mnist')
