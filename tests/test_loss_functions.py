"""The losses: label smoothing, timm's BCE, distillation, the blend the train step uses."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_resnet import loss_functions

NUM_CLASSES = 10


def test_smoothed_one_hot_is_timms():
  """Off value smoothing / classes, on value 1 - smoothing + off: rows sum to one."""
  targets = np.asarray(loss_functions.smooth_one_hot(jnp.array([3, 0]), NUM_CLASSES, 0.1))
  np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(targets[0, 3], 0.9 + 0.01, rtol=1e-6)
  np.testing.assert_allclose(targets[0, 0], 0.01, rtol=1e-6)


def test_binary_cross_entropy_matches_timm_mean_reduction():
  logits = jax.random.normal(jax.random.PRNGKey(0), (4, NUM_CLASSES)) * 3
  targets = jnp.asarray(np.eye(NUM_CLASSES)[np.arange(4)] * 0.7 + 0.3 / NUM_CLASSES, jnp.float32)
  x, t = np.asarray(logits, np.float64), np.asarray(targets, np.float64)
  expected = np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x)))
  losses = loss_functions.binary_cross_entropy(logits, targets)
  assert losses.shape == (4,)
  np.testing.assert_allclose(np.asarray(losses), expected.mean(1), rtol=1e-5)
  # timm reduces with a mean over batch and classes: the batch mean of the per-example loss.
  np.testing.assert_allclose(float(losses.mean()), expected.mean(), rtol=1e-5)
  binarised = loss_functions.binary_cross_entropy(logits, targets, target_threshold=0.2)
  t = (t > 0.2).astype(np.float64)
  expected = np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x)))
  np.testing.assert_allclose(np.asarray(binarised), expected.mean(1), rtol=1e-5)


def test_distillation_loss_is_t_squared_times_kl():
  rng = np.random.RandomState(0)
  student, teacher = rng.normal(size=(4, 10)), rng.normal(size=(4, 10))
  temperature = 3.0
  soft = lambda x: np.exp(x / temperature) / np.exp(x / temperature).sum(-1, keepdims=True)
  p, q = soft(teacher), soft(student)
  expected = temperature**2 * (p * np.log(p / q)).sum(-1)
  got = loss_functions.distillation_loss(jnp.asarray(student), jnp.asarray(teacher), temperature)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  assert (
    float(loss_functions.distillation_loss(jnp.asarray(teacher), jnp.asarray(teacher), 2.0).max())
    < 1e-6
  )


def test_training_loss_blends_hard_and_soft_terms_by_the_weight():
  """(1 - w) * cross-entropy + w * distillation; without a teacher, cross-entropy alone."""
  rng = np.random.RandomState(1)
  logits, teacher = jnp.asarray(rng.normal(size=(4, 10))), jnp.asarray(rng.normal(size=(4, 10)))
  targets = loss_functions.smooth_one_hot(jnp.arange(4), NUM_CLASSES)
  hard = optax.softmax_cross_entropy(logits, targets)
  soft = loss_functions.distillation_loss(logits, teacher, 2.0)
  blended = loss_functions.training_loss(
    logits, targets, teacher_logits=teacher, distill_weight=0.3, distill_temperature=2.0
  )
  np.testing.assert_allclose(blended, 0.7 * hard + 0.3 * soft, rtol=1e-6)
  np.testing.assert_allclose(loss_functions.training_loss(logits, targets), hard, rtol=1e-6)
  assert float(jnp.abs(soft - hard).max()) > 1e-2  # the two terms differ
