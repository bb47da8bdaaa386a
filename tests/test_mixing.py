import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax_resnet.augment import mixing

NUM_CLASSES = 10
LABELS = jnp.arange(8)  # all different, so a row's own label weight is lam
STATIC = ('mixup_alpha', 'cutmix_alpha', 'mix_prob', 'switch_prob', 'label_smoothing')
STATIC += ('cutmix_minmax', 'correct_lam', 'num_classes')
# Everything below runs jitted, with the static config the train step would pass.
mix_batch = jax.jit(mixing.mix_batch, static_argnums=3, static_argnames=STATIC)
BOTH = dict(mixup_alpha=0.8, cutmix_alpha=1.0)


def _images(shape=(8, 6, 5, 3)):
  return jax.random.normal(jax.random.PRNGKey(42), shape)


def _one_hot(labels, smoothing=0.0):
  off = smoothing / NUM_CLASSES
  return np.eye(NUM_CLASSES)[np.asarray(labels)] * (1 - smoothing) + off


def _lam(targets):
  """lam read back from the targets: the weight on each row's own (unsmoothed) label."""
  return float(np.asarray(targets)[0, int(LABELS[0])])


def test_mixup_blends_the_batch_with_its_reverse():
  images = _images()
  lams = []
  for seed in range(5):
    out, targets = mix_batch(
      jax.random.PRNGKey(seed), images, LABELS, NUM_CLASSES, mixup_alpha=1.0, cutmix_alpha=0.0
    )
    lam = _lam(targets)
    lams.append(lam)
    x = np.asarray(images)
    np.testing.assert_allclose(np.asarray(out), lam * x + (1 - lam) * x[::-1], atol=1e-6)
    y = _one_hot(LABELS)
    np.testing.assert_allclose(np.asarray(targets), lam * y + (1 - lam) * y[::-1], atol=1e-6)
    np.testing.assert_allclose(np.asarray(targets).sum(1), 1.0, atol=1e-6)
    assert targets.dtype == jnp.float32 and targets.shape == (8, NUM_CLASSES)
  assert len(set(lams)) == 5 and all(0 < lam < 1 for lam in lams)


def test_label_smoothing_is_applied_before_mixing():
  images, key, smoothing = _images(), jax.random.PRNGKey(3), 0.1
  mix = functools.partial(mix_batch, **BOTH)
  _, plain = mix(key, images, LABELS, NUM_CLASSES)
  _, smoothed = mix(key, images, LABELS, NUM_CLASSES, label_smoothing=smoothing)
  lam = _lam(plain)  # the draws do not depend on the smoothing
  y = _one_hot(LABELS, smoothing)
  np.testing.assert_allclose(np.asarray(smoothed), lam * y + (1 - lam) * y[::-1], atol=1e-6)
  np.testing.assert_allclose(np.asarray(smoothed).sum(1), 1.0, atol=1e-6)
  assert np.asarray(smoothed).min() >= smoothing / NUM_CLASSES - 1e-7


def test_cutmix_lambda_is_the_unpasted_area_exactly():
  b, h, w = 8, 16, 12
  # Example i is the constant i + 1, so its partner (b - 1 - i) differs in every pixel.
  images = jnp.arange(1, b + 1, dtype=jnp.float32)[:, None, None, None] * jnp.ones((b, h, w, 3))
  fractions = set()
  for seed in range(12):
    out, targets = mix_batch(
      jax.random.PRNGKey(seed), images, LABELS, NUM_CLASSES, mixup_alpha=0.0, cutmix_alpha=1.0
    )
    out, x = np.asarray(out), np.asarray(images)
    pasted = (out != x).any(-1)
    assert (pasted == pasted[0]).all()  # one box for the whole batch
    np.testing.assert_array_equal(out[pasted], x[::-1][pasted])  # pasted from the partner
    rows, cols = np.nonzero(pasted[0])
    if rows.size:  # a rectangle
      assert rows.size == (np.ptp(rows) + 1) * (np.ptp(cols) + 1)
    fraction = pasted[0].sum() / (h * w)
    fractions.add(fraction)
    np.testing.assert_allclose(_lam(targets), 1 - fraction, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(targets).sum(1), 1.0, atol=1e-6)
  assert len(fractions) > 6


def test_cutmix_minmax_box_sides_are_within_bounds():
  b, h, w = 4, 20, 20
  images = jnp.arange(1, b + 1, dtype=jnp.float32)[:, None, None, None] * jnp.ones((b, h, w, 1))
  for seed in range(8):
    out, targets = mix_batch(
      jax.random.PRNGKey(seed),
      images,
      LABELS[:b],
      NUM_CLASSES,
      mixup_alpha=0.0,
      cutmix_alpha=0.0,  # minmax turns CutMix on by itself
      cutmix_minmax=(0.2, 0.8),
      correct_lam=False,  # and always corrects lam
    )
    pasted = (np.asarray(out) != np.asarray(images))[0, :, :, 0]
    rows, cols = np.nonzero(pasted)
    assert 4 <= np.ptp(rows) + 1 < 16 and 4 <= np.ptp(cols) + 1 < 16
    np.testing.assert_allclose(_lam(targets), 1 - pasted.sum() / (h * w), rtol=0, atol=1e-6)


def test_both_modes_occur():
  images = _images()
  modes = set()
  for seed in range(16):
    out, _ = mix_batch(jax.random.PRNGKey(seed), images, LABELS, NUM_CLASSES, **BOTH)
    changed = (np.asarray(out) != np.asarray(images)).any(-1)[0]
    modes.add('mixup' if changed.all() else 'cutmix')
  assert modes == {'mixup', 'cutmix'}


def test_no_mix_is_identity_with_smoothed_one_hot_targets():
  images, key = _images(), jax.random.PRNGKey(0)
  y = _one_hot(LABELS, 0.1)
  for options in (
    dict(**BOTH, mix_prob=0.0),
    dict(mixup_alpha=0.0, cutmix_alpha=0.0),
    dict(**BOTH, mix_prob=1e-9),  # the traced no-mix path
  ):
    out, targets = mix_batch(key, images, LABELS, NUM_CLASSES, label_smoothing=0.1, **options)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(images))
    np.testing.assert_allclose(np.asarray(targets), y, atol=1e-6)


def test_deterministic_per_key_and_different_across_keys():
  images = _images()
  mix = lambda seed: mix_batch(jax.random.PRNGKey(seed), images, LABELS, NUM_CLASSES, **BOTH)
  a, b, c = mix(7), mix(7), mix(8)
  np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
  np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))
  assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))
