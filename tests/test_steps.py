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
    'jax_resnet.data.common, jax_resnet.benchmark, jax_resnet.conv, jax_resnet.profiling, '
    'jax_resnet.mixing, jax_resnet.randaugment, jax_resnet.warm_start, jax_resnet.export, '
    'jax_resnet.predict, jax_resnet.torchvision_weights; '
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


def _recipe(config, **fields):
  config.schedule, config.learning_rate, config.image_size = 'constant', 0.1, 8
  for name, value in fields.items():
    config[name] = value
  return config


def test_ema_equals_its_closed_form(config):
  """After n steps the EMA is decay^n p_0 + (1 - decay) sum_i decay^(n - i) p_i."""
  decay = 0.8
  state, train_fn, _ = setup(_recipe(config, ema_decay=decay, ema_warmup=False))
  history = [jax.tree.map(np.array, state.params)]
  for _ in range(4):
    state, _ = train_fn(state, fixed_batch())
    history.append(jax.tree.map(np.array, state.params))
  n = len(history) - 1
  expected = jax.tree.map(
    lambda *ps: (
      decay**n * ps[0] + (1 - decay) * sum(decay ** (n - i) * ps[i] for i in range(1, n + 1))
    ),
    *history,
  )
  for a, b in zip(jax.tree.leaves(state.ema['params']), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-6)


def test_ema_warmup_follows_tensorflows_num_updates_rule(config):
  """With warm-up, update t (from 0) uses min(decay, (1 + t) / (10 + t)): 0.1, 0.18, ..."""
  decay = 0.99
  state, train_fn, _ = setup(_recipe(config, ema_decay=decay))
  expected = jax.tree.map(np.array, state.params)
  for t in range(3):
    state, _ = train_fn(state, fixed_batch())
    d = min(decay, (1 + t) / (10 + t))
    expected = jax.tree.map(
      lambda e, p, d=d: d * e + (1 - d) * np.asarray(p), expected, state.params
    )
  for a, b in zip(jax.tree.leaves(state.ema['params']), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-6)


def test_sam_step_equals_two_hand_computed_passes(config):
  """The gradient at p + rho g/||g|| (g: the first pass's), BN statistics of the first."""
  import optax

  rho = 0.05
  config = _recipe(config, sam_rho=rho, momentum=0.0, weight_decay=0.0)
  state, train_fn, _ = setup(config)
  batch = fixed_batch()
  options = steps.StepOptions.of(config, 10, (127.0,) * 3, (64.0,) * 3)
  step_rng = jax.random.fold_in(state.rng, state.step)
  images, targets = steps.augment_batch(
    step_rng, jnp.asarray(batch['image']), batch['label'], options
  )

  def loss(params):
    logits, updates = state.apply_fn(
      {'params': params, 'batch_stats': state.batch_stats},
      images,
      train=True,
      mutable=['batch_stats'],
    )
    return optax.softmax_cross_entropy(logits, targets).mean(), updates['batch_stats']

  (_, first_stats), g1 = jax.value_and_grad(loss, has_aux=True)(state.params)
  norm = optax.global_norm(g1)
  perturbed = jax.tree.map(lambda p, g: p + rho * g / norm, state.params, g1)
  _, g2 = jax.value_and_grad(loss, has_aux=True)(perturbed)
  expected = jax.tree.map(lambda p, g: np.asarray(p) - 0.1 * np.asarray(g), state.params, g2)
  first_stats = jax.tree.map(np.asarray, first_stats)
  new, _ = train_fn(state, batch)
  for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-6)
  for a, b in zip(jax.tree.leaves(new.batch_stats), jax.tree.leaves(first_stats)):
    np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-6)


def test_distillation_loss_is_t_squared_times_kl():
  rng = np.random.RandomState(0)
  student, teacher = rng.normal(size=(4, 10)), rng.normal(size=(4, 10))
  temperature = 3.0
  soft = lambda x: np.exp(x / temperature) / np.exp(x / temperature).sum(-1, keepdims=True)
  p, q = soft(teacher), soft(student)
  expected = temperature**2 * (p * np.log(p / q)).sum(-1)
  got = steps.distillation_loss(jnp.asarray(student), jnp.asarray(teacher), temperature)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  assert (
    float(steps.distillation_loss(jnp.asarray(teacher), jnp.asarray(teacher), 2.0).max()) < 1e-6
  )


def test_every_augmentation_on_the_device_is_keyed_and_bounded(config):
  """RandAugment, Cutout, random erasing and Mixup/CutMix together: finite images, targets
  that sum to one, the same for the same key, different for another."""
  config = _recipe(
    config,
    randaugment_layers=2,
    cutout_size=3,
    random_erasing_prob=0.5,
    mixup_alpha=0.2,
    cutmix_alpha=1.0,
    label_smoothing=0.1,
  )
  options = steps.StepOptions.of(config, 10, (127.0,) * 3, (64.0,) * 3)
  batch = fixed_batch()
  run = jax.jit(lambda key: steps.augment_batch(key, batch['image'], batch['label'], options))
  images, targets = run(jax.random.PRNGKey(0))
  again, _ = run(jax.random.PRNGKey(0))
  other, _ = run(jax.random.PRNGKey(1))
  assert images.shape == (32, 8, 8, 3) and bool(jnp.isfinite(images).all())
  np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-5)
  assert float(targets.min()) > 0  # label smoothing composed with the mixing
  np.testing.assert_array_equal(images, again)
  assert not np.array_equal(images, other)


def test_bce_loss_and_eval_flip(config):
  config = _recipe(config, loss='bce')
  state, train_fn, eval_fn = setup(config)
  new, metrics = train_fn(state, fixed_batch())
  assert np.isfinite(float(metrics.compute()['train_loss']))
  batch = dict(fixed_batch(8), mask=np.ones(8, np.float32))
  symmetric = dict(
    batch, image=np.concatenate([batch['image'][:, :, :4], batch['image'][:, :, 3::-1]], 2)
  )
  config.eval_flip = True
  flip_fn = steps.make_eval_step(config, 10, (127.0,) * 3, (64.0,) * 3, sharding.create_mesh())
  plain, flipped = eval_fn(new, symmetric).compute(), flip_fn(new, symmetric).compute()
  np.testing.assert_allclose(plain['eval_loss'], flipped['eval_loss'], rtol=1e-5)  # mirror-even
  assert eval_fn(new, batch).compute()['eval_loss'] != flip_fn(new, batch).compute()['eval_loss']
