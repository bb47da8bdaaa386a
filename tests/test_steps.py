import sys

import jax
import jax.numpy as jnp
import numpy as np

from jax_resnet import optim, sharding, steps
from jax_resnet.timeline import Timeline


def setup(config, num_classes=10, size=8):
  config.image_size = size
  model = steps.create_model(config, num_classes)
  lr_fn = optim.create_learning_rate_fn(config, Timeline(10, 100))
  mesh = sharding.create_mesh()
  state = steps.create_train_state(
    jax.random.PRNGKey(0), config, model, (size, size, 3), lr_fn, mesh
  )
  train_fn, eval_fn = steps.make_steps(config, lr_fn, num_classes, (127.0,) * 3, (64.0,) * 3, mesh)
  return state, train_fn, eval_fn


def fixed_batch(n=32, size=8, num_classes=10):
  rng = np.random.RandomState(0)
  return {
    'image': rng.randint(0, 256, (n, size, size, 3)).astype(np.uint8),
    'label': rng.randint(0, num_classes, (n,)).astype(np.int32),
  }


def train_losses(config, steps=8):
  state, train_fn, eval_fn = setup(config)
  batch = fixed_batch()
  losses = []
  for _ in range(steps):
    state, m = train_fn(state, batch)
    losses.append(float(m.compute()['train_loss']))
  return state, losses


def test_sgd_steps_lower_the_loss_on_a_fixed_batch(config):
  config.schedule = 'constant'
  config.learning_rate = 0.1
  state, losses = train_losses(config)
  assert losses[-1] < 0.85 * losses[0], losses
  assert all(b < a for a, b in zip(losses, losses[1:])), losses
  assert int(state.step) == 8


def test_bf16_train_step_runs_and_params_stay_fp32(config):
  config.half_precision = True
  config.schedule = 'constant'
  config.learning_rate = 0.05
  state, losses = train_losses(config)
  assert losses[-1] < losses[0]
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(state.params))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(state.batch_stats))


def test_eval_step_respects_mask(config):
  state, _, eval_fn = setup(config)
  batch = fixed_batch(8)
  full = eval_fn(state, dict(batch, mask=np.ones(8, np.float32))).compute()
  half_batch = {k: v[:4] for k, v in batch.items()}
  half = eval_fn(state, dict(half_batch, mask=np.ones(4, np.float32))).compute()
  masked = eval_fn(state, dict(batch, mask=(np.arange(8) < 4).astype(np.float32))).compute()
  np.testing.assert_allclose(masked['eval_loss'], half['eval_loss'], rtol=1e-5)
  assert set(full) == {'eval_loss', 'eval_top1', 'eval_top5'}
  assert 0.0 <= float(full['eval_top1']) <= float(full['eval_top5']) <= 1.0


def test_label_smoothing_and_cutout_change_the_step(config):
  config.schedule = 'constant'
  plain = train_losses(config, steps=2)[0].params
  config.label_smoothing = 0.1
  smoothed = train_losses(config, steps=2)[0].params
  config.label_smoothing = 0.0
  config.cutout_size = 4
  cut = train_losses(config, steps=2)[0].params
  diff = lambda a, b: max(
    float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )
  assert diff(plain, smoothed) > 1e-6
  assert diff(plain, cut) > 1e-6


def test_top_k_correct():
  logits = jnp.array([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05]])
  labels = jnp.array([2, 2])
  np.testing.assert_array_equal(steps.top_k_correct(logits, labels, 1), [0, 0])
  np.testing.assert_array_equal(steps.top_k_correct(logits, labels, 2), [1, 0])
  np.testing.assert_array_equal(steps.top_k_correct(logits, labels, 5), [1, 1])


def test_core_imports_without_tensorflow():
  import subprocess

  code = (
    'import sys; import jax_resnet.models, jax_resnet.steps, jax_resnet.optim, '
    'jax_resnet.augment, jax_resnet.sharding, jax_resnet.checkpointing, '
    'jax_resnet.timeline, jax_resnet.validation, jax_resnet.runs, jax_resnet.data.on_device, '
    'jax_resnet.data.common, jax_resnet.benchmark; '
    'assert "tensorflow" not in sys.modules, "core imported tensorflow"'
  )
  subprocess.run([sys.executable, '-c', code], check=True)


def test_fp16_with_dynamic_loss_scaling(config):
  config.half_precision = True
  config.half_precision_dtype = 'float16'
  config.schedule = 'constant'
  config.learning_rate = 0.1
  state, losses = train_losses(config, steps=6)
  assert losses[-1] < losses[0], losses
  assert state.dynamic_scale is not None
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(state.params))


def test_fp16_overflow_skips_the_update_and_lowers_the_scale(config):
  """A step whose scaled gradients overflow leaves params, BN statistics and optimizer
  state exactly as they were and halves the loss scale (flax's DynamicScale)."""
  config.half_precision = True
  config.half_precision_dtype = 'float16'
  config.schedule = 'constant'
  config.learning_rate = 0.1
  state, train_fn, _ = setup(config)
  huge = state.dynamic_scale.replace(scale=jnp.asarray(2.0**120, jnp.float32))
  state = state.replace(dynamic_scale=huge)  # the scaled loss overflows float16
  before = jax.tree.map(np.array, (state.params, state.batch_stats, state.opt_state))  # copies
  after, _ = train_fn(state, fixed_batch())
  for a, b in zip(
    jax.tree.leaves(before), jax.tree.leaves((after.params, after.batch_stats, after.opt_state))
  ):
    np.testing.assert_array_equal(a, np.asarray(b))
  assert float(after.dynamic_scale.scale) == 2.0**119
  assert int(after.step) == 1  # the step is counted, its update skipped
