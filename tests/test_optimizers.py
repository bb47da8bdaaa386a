"""Optimizers: weight decay masks, trust ratios, reduce-on-plateau, the loss value."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_resnet.training import optimizers, schedules
from jax_resnet.training.timeline import Timeline


def test_weight_decay_only_on_kernels(config):
  config.learning_rate = 1.0
  config.schedule = 'constant'
  config.momentum = 0.0
  config.nesterov = False
  config.weight_decay = 0.1
  params = {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones((2,))}
  tx = optimizers.create_optimizer(
    config, schedules.create_learning_rate_fn(config, Timeline(1, 10))
  )
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  np.testing.assert_allclose(updates['kernel'], -0.1)
  np.testing.assert_allclose(updates['bias'], 0.0)


@pytest.mark.parametrize('field,value', [('optimizer', 'rmsprop'), ('schedule', 'linear')])
def test_unknown_names_list_valid_ones(config, field, value):
  config[field] = value
  with pytest.raises(ValueError, match='Valid'):
    optimizers.create_optimizer(config, schedules.create_learning_rate_fn(config, Timeline(1, 10)))


def test_reduce_on_plateau_cuts_the_rate_after_flat_epochs(config):
  config.schedule = 'plateau'
  config.optimizer = 'adam'
  config.learning_rate = 0.01
  config.weight_decay = 0.0
  config.plateau_factor = 0.5
  config.plateau_patience = 2
  steps_per_epoch = 3
  fn = schedules.create_learning_rate_fn(config, Timeline(steps_per_epoch, 100))
  tx = optimizers.create_optimizer(config, fn)
  params = {'kernel': jnp.ones((2, 2))}
  opt_state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  scales = []
  for step in range(8 * steps_per_epoch):
    loss = 1.0 if step < steps_per_epoch else 2.0  # no better after epoch 1: a plateau
    _, opt_state = tx.update(grads, opt_state, params, value=jnp.float32(loss))
    scales.append(float(optimizers.current_learning_rate(fn, step, opt_state)))
  # Epochs 2 and 3 do not improve on epoch 1: halved at epoch 3's last step, and again
  # two epochs later.
  np.testing.assert_allclose(scales[: 3 * steps_per_epoch - 1], 0.01)
  np.testing.assert_allclose(scales[3 * steps_per_epoch - 1 : 5 * steps_per_epoch - 1], 0.005)
  np.testing.assert_allclose(scales[5 * steps_per_epoch - 1 : 7 * steps_per_epoch - 1], 0.0025)


def test_every_optimizer_takes_the_loss_value(config):
  params = {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones((2,))}
  grads = jax.tree.map(jnp.ones_like, params)
  for name in optimizers.OPTIMIZERS:
    for schedule in schedules.SCHEDULES:
      config.optimizer, config.schedule = name, schedule
      fn = schedules.create_learning_rate_fn(config, Timeline(5, 50))
      tx = optimizers.create_optimizer(config, fn)
      updates, _ = tx.update(grads, tx.init(params), params, value=jnp.float32(1.0))
      assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
      lr = float(optimizers.current_learning_rate(fn, 10, tx.init(params)))
      assert lr == pytest.approx(float(fn(10)))


def test_lars_scales_each_layer_by_its_trust_ratio(config):
  """One LARS step without momentum: -lr * coefficient * ||w|| / ||g + wd w|| * (g + wd w)
  for a kernel; biases and BN parameters skip both the decay and the ratio."""
  config.optimizer, config.momentum, config.weight_decay = 'lars', 0.0, 1e-3
  config.lars_trust_coefficient, config.schedule, config.learning_rate = 0.02, 'constant', 0.5
  tx = optimizers.create_optimizer(
    config, schedules.create_learning_rate_fn(config, Timeline(10, 100))
  )
  rng = np.random.RandomState(0)
  params = {
    'conv': {'kernel': jnp.asarray(rng.normal(size=(3, 3, 4, 8)), jnp.float32)},
    'bn': {'scale': jnp.asarray(rng.normal(size=(8,)), jnp.float32)},
  }
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  w, g = np.asarray(params['conv']['kernel']), np.asarray(grads['conv']['kernel'])
  decayed = g + 1e-3 * w
  trust = 0.02 * np.linalg.norm(w) / np.linalg.norm(decayed)
  np.testing.assert_allclose(updates['conv']['kernel'], -0.5 * trust * decayed, rtol=1e-5)
  np.testing.assert_allclose(updates['bn']['scale'], -0.5 * grads['bn']['scale'], rtol=1e-5)


def test_lamb_scales_each_layer_by_its_trust_ratio(config):
  """One LAMB step: the Adam direction u = m / (sqrt(v) + eps) plus wd w, rescaled per layer
  so that its norm is lr * ||w||; biases and BN parameters skip both the decay and the
  ratio (timm's Lamb on RSB A3's parameter groups), unless weight_decay_kernels_only is off."""
  config.optimizer, config.weight_decay, config.schedule = 'lamb', 0.02, 'constant'
  config.learning_rate = 0.01
  rng = np.random.RandomState(0)
  params = {
    'conv': {'kernel': jnp.asarray(rng.normal(size=(3, 3, 4, 8)), jnp.float32)},
    'bn': {'scale': jnp.asarray(rng.normal(size=(8,)), jnp.float32)},
  }
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)

  def step(config):
    tx = optimizers.create_optimizer(
      config, schedules.create_learning_rate_fn(config, Timeline(10, 100))
    )
    updates, _ = tx.update(grads, tx.init(params), params, value=jnp.float32(1.0))
    return jax.tree.map(np.asarray, updates)

  # The first step's bias-corrected moments are g and g^2: u = g / (|g| + 1e-6).
  adam = lambda g: np.asarray(g) / (np.abs(np.asarray(g)) + 1e-6)
  layer = lambda w, u: -0.01 * np.linalg.norm(w) / np.linalg.norm(u) * u
  w, b = np.asarray(params['conv']['kernel']), np.asarray(params['bn']['scale'])
  u = adam(grads['conv']['kernel']) + 0.02 * w
  updates = step(config)
  np.testing.assert_allclose(updates['conv']['kernel'], layer(w, u), rtol=1e-5)
  assert np.linalg.norm(updates['conv']['kernel']) == pytest.approx(0.01 * np.linalg.norm(w))
  np.testing.assert_allclose(updates['bn']['scale'], -0.01 * adam(grads['bn']['scale']), rtol=1e-5)
  config.weight_decay_kernels_only = False  # then every layer is decayed and rescaled
  everything = step(config)
  np.testing.assert_allclose(everything['conv']['kernel'], layer(w, u), rtol=1e-5)
  u_bn = adam(grads['bn']['scale']) + 0.02 * b
  np.testing.assert_allclose(everything['bn']['scale'], layer(b, u_bn), rtol=1e-5)


def _sgd_update(config, params, grads):
  """One plain SGD step (rate 1, no momentum or decay): the update is -(clipped gradient)."""
  config.optimizer, config.momentum, config.weight_decay = 'sgd', 0.0, 0.0
  config.schedule, config.learning_rate = 'constant', 1.0
  tx = optimizers.create_optimizer(
    config, schedules.create_learning_rate_fn(config, Timeline(10, 100))
  )
  updates, _ = tx.update(grads, tx.init(params), params)
  return jax.tree.map(lambda u: -np.asarray(u), updates)


def _params_and_grads():
  rng = np.random.RandomState(0)
  params = {
    'stem_conv': {'kernel': rng.normal(size=(3, 3, 2, 4))},
    'stem_bn': {'scale': rng.normal(size=(4,)) * 0.01},
    'head': {'kernel': rng.normal(size=(4, 3)) * 0.01},
  }
  params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * 5, jnp.float32), params)
  return params, grads


def test_gradient_clipping_to_a_global_norm(config):
  params, grads = _params_and_grads()
  config.grad_clip_norm = 2.0
  clipped = _sgd_update(config, params, grads)
  total = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads)))
  assert total > 2.0  # the hand computation below clips
  for got, g in zip(jax.tree.leaves(clipped), jax.tree.leaves(grads)):
    np.testing.assert_allclose(got, np.asarray(g) * 2.0 / total, rtol=1e-5)
  config.grad_clip_norm = 1e6  # above the norm: unchanged
  for got, g in zip(jax.tree.leaves(_sgd_update(config, params, grads)), jax.tree.leaves(grads)):
    np.testing.assert_allclose(got, g, rtol=1e-6)


def test_adaptive_gradient_clipping_per_unit_without_the_head(config):
  """timm's adaptive_clip_grad by hand: a conv kernel's units are its output channels
  (HWIO here, OIHW there), a vector is one unit, the weights' norm floored at 1e-3; the
  head's gradient passes unclipped."""
  params, grads = _params_and_grads()
  config.agc_clip = 0.05
  clipped = _sgd_update(config, params, grads)

  def by_hand(w, g, axes):
    w, g = np.asarray(w, np.float64), np.asarray(g, np.float64)
    w_norm = np.sqrt(np.sum(w**2, axis=axes, keepdims=True))
    g_norm = np.sqrt(np.sum(g**2, axis=axes, keepdims=True))
    max_norm = np.maximum(w_norm, 1e-3) * 0.05
    return np.where(g_norm > max_norm, g * max_norm / np.maximum(g_norm, 1e-6), g)

  kernel = by_hand(params['stem_conv']['kernel'], grads['stem_conv']['kernel'], (0, 1, 2))
  np.testing.assert_allclose(clipped['stem_conv']['kernel'], kernel, rtol=1e-5)
  scale = by_hand(params['stem_bn']['scale'], grads['stem_bn']['scale'], None)
  np.testing.assert_allclose(clipped['stem_bn']['scale'], scale, rtol=1e-5)
  assert not np.allclose(kernel, grads['stem_conv']['kernel'])  # it clipped
  np.testing.assert_allclose(clipped['head']['kernel'], grads['head']['kernel'], rtol=1e-6)


def test_frozen_gradients_count_in_no_clipping_norm(config):
  """With config.freeze, the frozen groups' gradients are zeroed before the global norm
  is taken: the trained ones are clipped by their own norm, the frozen ones move not at all."""
  params, grads = _params_and_grads()
  config.grad_clip_norm, config.freeze = 2.0, 'stem'
  clipped = _sgd_update(config, params, grads)
  trained = np.sqrt(np.sum(np.square(grads['head']['kernel'])))  # stem_conv, stem_bn frozen
  assert trained > 2.0
  np.testing.assert_allclose(
    clipped['head']['kernel'], grads['head']['kernel'] * 2.0 / trained, rtol=1e-5
  )
  for group in ('stem_conv', 'stem_bn'):
    for leaf in jax.tree.leaves(clipped[group]):
      np.testing.assert_array_equal(leaf, 0.0)
