import jax
import jax.numpy as jnp
import numpy as np

from jax_resnet.augment import image_ops


def test_cutout_zeroes_exactly_the_expected_square():
  key = jax.random.PRNGKey(3)
  b, h, w, size = 4, 12, 10, 4
  images = jnp.ones((b, h, w, 3))
  out = np.asarray(image_ops.cutout(key, images, size))
  # Recompute the centres the documented way: y then x, uniform over the image.
  key_y, key_x = jax.random.split(key)
  cy = np.asarray(jax.random.randint(key_y, (b, 1, 1), 0, h)).ravel()
  cx = np.asarray(jax.random.randint(key_x, (b, 1, 1), 0, w)).ravel()
  for i in range(b):
    expected = np.ones((h, w))
    y0, x0 = cy[i] - size // 2, cx[i] - size // 2
    expected[max(y0, 0) : max(y0 + size, 0), max(x0, 0) : max(x0 + size, 0)] = 0
    np.testing.assert_array_equal(out[i, :, :, 0], expected)
    np.testing.assert_array_equal(out[i, :, :, 2], expected)


def test_cutout_differs_across_examples_and_keys():
  images = jnp.ones((16, 16, 16, 1))
  a = np.asarray(image_ops.cutout(jax.random.PRNGKey(0), images, 6))
  b = np.asarray(image_ops.cutout(jax.random.PRNGKey(1), images, 6))
  assert len({a[i].tobytes() for i in range(16)}) > 8
  assert not np.array_equal(a, b)


def test_cutout_may_cross_the_border_and_is_jittable():
  images = jnp.ones((512, 8, 8, 1))
  out = np.asarray(jax.jit(image_ops.cutout, static_argnums=2)(jax.random.PRNGKey(0), images, 4))
  zeros = (out == 0).reshape(512, -1).sum(1)
  assert zeros.max() == 16  # a whole square inside
  assert zeros.min() < 16  # some holes clipped by the border
  assert zeros.min() > 0  # the centre is always inside the image


def test_cutout_size_zero_is_identity():
  images = jnp.ones((2, 4, 4, 3))
  assert image_ops.cutout(jax.random.PRNGKey(0), images, 0) is images


def test_normalize():
  images = jnp.full((1, 2, 2, 3), 128, jnp.uint8)
  out = image_ops.normalize(images, (128.0, 0.0, 64.0), (1.0, 128.0, 32.0))
  np.testing.assert_allclose(np.asarray(out[0, 0, 0]), [0.0, 1.0, 2.0])


def test_random_pad_crop_shifts_within_the_pad_and_is_keyed_per_example():
  b, h, w, pad = 256, 6, 6, 2
  images = jnp.arange(1, h * w + 1, dtype=jnp.uint8).reshape(1, h, w, 1).repeat(b, 0)
  keys = image_ops.example_keys(jax.random.PRNGKey(0), jnp.arange(b), 0)
  out = np.asarray(jax.jit(image_ops.random_pad_crop, static_argnums=2)(keys, images, pad))
  assert out.shape == images.shape and out.dtype == np.uint8
  padded = np.pad(np.asarray(images[0, :, :, 0]), pad)
  offsets = set()
  for i in range(b):
    matches = [
      (dy, dx)
      for dy in range(2 * pad + 1)
      for dx in range(2 * pad + 1)
      if np.array_equal(padded[dy : dy + h, dx : dx + w], out[i, :, :, 0])
    ]
    assert len(matches) == 1
    offsets.add(matches[0])
  assert len(offsets) == (2 * pad + 1) ** 2  # every offset in [0, 2 * pad] occurs
  again = image_ops.random_pad_crop(keys, images, pad)
  np.testing.assert_array_equal(out, np.asarray(again))
  assert image_ops.random_pad_crop(keys, images, 0) is images


def test_random_flip_mirrors_about_half():
  images = jnp.arange(4, dtype=jnp.uint8).reshape(1, 1, 4, 1).repeat(400, 0)
  keys = image_ops.example_keys(jax.random.PRNGKey(1), jnp.arange(400), 1)
  out = np.asarray(image_ops.random_flip(keys, images))[:, 0, :, 0]
  flipped = (out == [3, 2, 1, 0]).all(1)
  assert ((out == [0, 1, 2, 3]).all(1) | flipped).all()
  assert 0.4 < flipped.mean() < 0.6


def _erase(keys, images, prob, **options):
  return jax.jit(image_ops.random_erasing, static_argnums=2, static_argnames=tuple(options))(
    keys, images, prob, **options
  )


def test_random_erasing_prob_zero_is_identity():
  images = jnp.ones((2, 4, 4, 3))
  keys = image_ops.example_keys(jax.random.PRNGKey(0), jnp.arange(2), 2)
  assert image_ops.random_erasing(keys, images, 0.0) is images


def test_random_erasing_fills_one_rectangle_per_image_with_noise():
  b, h, w = 64, 32, 24
  images = jnp.full((b, h, w, 3), 100.0)  # a value the noise never takes
  keys = image_ops.example_keys(jax.random.PRNGKey(0), jnp.arange(b), 2)
  out = np.asarray(_erase(keys, images, 1.0))
  erased = out != 100.0
  assert (erased == erased[..., :1]).all()  # every channel of an erased pixel
  aspects = []
  for mask in erased[..., 0]:
    rows, cols = np.nonzero(mask)
    eh, ew = np.ptp(rows) + 1, np.ptp(cols) + 1
    assert rows.size == eh * ew  # one filled rectangle
    slack = (eh + ew) / 2 + 0.25  # h and w are rounded from the sampled area
    assert 0.02 * h * w - slack <= eh * ew <= h * w / 3 + slack
    aspects.append(eh / ew)
  assert min(aspects) < 0.8 and max(aspects) > 1.25
  noise = out[erased]
  assert abs(noise.mean()) < 0.1 and abs(noise.std() - 1) < 0.1
  np.testing.assert_array_equal(out, np.asarray(_erase(keys, images, 1.0)))
  other = image_ops.example_keys(jax.random.PRNGKey(1), jnp.arange(b), 2)
  assert not np.array_equal(out, np.asarray(_erase(other, images, 1.0)))


def test_random_erasing_probability_and_count():
  b = 256
  images = jnp.zeros((b, 16, 16, 1))
  keys = image_ops.example_keys(jax.random.PRNGKey(2), jnp.arange(b), 2)
  masks = (np.asarray(_erase(keys, images, 0.5, max_count=3)) != 0)[..., 0]
  areas = masks.sum((1, 2))
  assert 0.4 < (areas > 0).mean() < 0.6
  assert areas.max() <= 16 * 16 / 3 + 3 * 9  # the boxes share the area (+ rounding slack)
  # Several boxes: the erased pixels no longer fill their bounding box.
  boxes = [m.any(1).sum() * m.any(0).sum() for m in masks[areas > 0]]
  assert (np.asarray(boxes) > areas[areas > 0]).sum() > 10
