import jax
import jax.numpy as jnp
import numpy as np
from helpers import MEAN, STD, fixed_batch, train_setup

from jax_resnet import loss_functions
from jax_resnet.augment import image_ops
from jax_resnet.augment.pipeline import augment_batch, resize_images
from jax_resnet.training import build, step_functions


def setup(config, num_classes=10, size=8):
  config.image_size = size
  built = train_setup(config, num_classes)
  return built.state, built.train_fn, built.eval_fn


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
  np.testing.assert_array_equal(step_functions.top_k_correct(logits, labels, 1), [0, 0])
  np.testing.assert_array_equal(step_functions.top_k_correct(logits, labels, 2), [1, 0])
  np.testing.assert_array_equal(step_functions.top_k_correct(logits, labels, 5), [1, 1])


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
  options = build.step_options(config, 10, MEAN, STD)
  step_rng = jax.random.fold_in(state.rng, state.step)
  images, targets = augment_batch(
    step_rng, jnp.asarray(batch['image']), batch['label'], options.augment
  )

  def loss(params):
    logits, updates = state.apply_fn(
      {'params': params, 'batch_stats': state.batch_stats},
      images,
      train=True,
      mutable=['batch_stats'],
    )
    return optax.softmax_cross_entropy(logits, targets).mean(), updates['batch_stats']

  grad = jax.jit(jax.value_and_grad(loss, has_aux=True))  # one compile for both passes
  (_, first_stats), g1 = grad(state.params)
  norm = optax.global_norm(g1)
  perturbed = jax.tree.map(lambda p, g: p + rho * g / norm, state.params, g1)
  _, g2 = grad(perturbed)
  expected = jax.tree.map(lambda p, g: np.asarray(p) - 0.1 * np.asarray(g), state.params, g2)
  first_stats = jax.tree.map(np.asarray, first_stats)
  new, _ = train_fn(state, batch)
  for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-6)
  for a, b in zip(jax.tree.leaves(new.batch_stats), jax.tree.leaves(first_stats)):
    np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-6)


def _recording(state):
  """``state`` whose model records the shape of each batch it is traced with."""
  shapes = []

  def apply_fn(variables, images, **kwargs):
    shapes.append(tuple(images.shape))
    return state.apply_fn(variables, images, **kwargs)

  return state.replace(apply_fn=apply_fn), shapes


@jax.jit
def _eval_logits(state, images):
  """The model's logits in inference mode on uint8 ``images``."""
  x = image_ops.normalize(jnp.asarray(images), MEAN, STD, jnp.float32)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  return state.apply_fn(variables, x, train=False)


def _resized(images, size):
  """jax.image.resize's antialiased bilinear resize, rounded back to uint8."""
  shape = (images.shape[0], size, size, images.shape[3])
  out = jax.image.resize(jnp.asarray(images, jnp.float32), shape, 'bilinear', antialias=True)
  return np.asarray(jnp.clip(jnp.round(out), 0, 255).astype(jnp.uint8))


def test_bce_loss_and_eval_flip(config):
  """eval_flip's logits are the mean of the plain and the mirrored images' logits."""
  config = _recipe(config, loss='bce')
  state, train_fn, eval_fn = setup(config)
  new, metrics = train_fn(state, fixed_batch())
  assert np.isfinite(float(metrics.compute()['train_loss']))
  batch = dict(fixed_batch(8), mask=np.ones(8, np.float32))
  config.eval_flip = True
  flip_fn = train_setup(config).eval_fn
  plain = _eval_logits(new, batch['image'])
  mirrored = _eval_logits(new, batch['image'][:, :, ::-1])
  loss = lambda logits: float(loss_functions.cross_entropy(logits, batch['label'], 10).mean())
  top1 = lambda logits: float(step_functions.top_k_correct(logits, batch['label'], 1).mean())
  got, got_plain = flip_fn(new, batch).compute(), eval_fn(new, batch).compute()
  np.testing.assert_allclose(got['eval_loss'], loss((plain + mirrored) / 2), rtol=1e-5)
  np.testing.assert_allclose(got['eval_top1'], top1((plain + mirrored) / 2))
  np.testing.assert_allclose(got_plain['eval_loss'], loss(plain), rtol=1e-5)
  # The three candidates differ, so the equality above tells them apart.
  for alone in (plain, mirrored):
    assert abs(loss(alone) - loss((plain + mirrored) / 2)) > 1e-3


def test_eval_image_size_resizes_the_eval_batches_only(config):
  """With eval_image_size the eval step's model sees that size (the batch resized on the
  device as jax.image.resize does); the train step keeps image_size."""
  config = _recipe(config, eval_image_size=12)
  state, train_fn, eval_fn = setup(config)
  recorded, shapes = _recording(state)
  batch = dict(fixed_batch(8), mask=np.ones(8, np.float32))
  got = eval_fn(recorded, batch).compute()
  assert shapes == [(8, 12, 12, 3)]
  logits = _eval_logits(state, _resized(batch['image'], 12))
  expected = float(loss_functions.cross_entropy(logits, batch['label'], 10).mean())
  np.testing.assert_allclose(got['eval_loss'], expected, rtol=1e-5)
  at_8 = _eval_logits(state, batch['image'])
  assert abs(float(loss_functions.cross_entropy(at_8, batch['label'], 10).mean()) - expected) > 1e-3
  shapes.clear()
  jax.eval_shape(train_fn, recorded, fixed_batch())  # traced, not run: nothing donated
  assert set(shapes) == {(32, 8, 8, 3)}


def test_train_step_at_a_progressive_resizing_size(config):
  """A train step made for one size of the progressive-resizing ramp trains on the batch
  resized to it (augment.pipeline.resize_images: antialiased bilinear, back to uint8)."""
  config = _recipe(config)
  state, _, _ = setup(config)
  batch = fixed_batch(16, size=16)  # the data at image_size 16, trained at 8
  small_fn = train_setup(config, train_image_size=8).train_fn
  recorded, shapes = _recording(state)
  jax.eval_shape(small_fn, recorded, batch)
  assert set(shapes) == {(16, 8, 8, 3)}

  @jax.jit
  def train_loss(state, images):
    x = image_ops.normalize(images, MEAN, STD, jnp.float32)
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    logits, _ = state.apply_fn(variables, x, train=True, mutable=['batch_stats'])
    return loss_functions.cross_entropy(logits, batch['label'], 10).mean()

  expected = float(train_loss(state, _resized(batch['image'], 8)))
  same = {k: jnp.asarray(v) for k, v in batch.items()}
  assert resize_images(same['image'], 16) is same['image']
  assert resize_images(same['image'], 0) is same['image']
  _, metrics = small_fn(state, batch)
  np.testing.assert_allclose(metrics.compute()['train_loss'], expected, rtol=1e-5)


def test_distillation_blends_the_losses_in_the_train_step(config, tmp_path):
  """A teacher exported in the test, loaded by warm_start.load_teacher: the train step
  descends (1 - w) CE + w T^2 KL(teacher || student) at temperature T, the teacher in
  inference mode (its BatchNorm statistics used, never updated)."""
  import optax
  from flax import traverse_util

  from jax_resnet import models
  from jax_resnet.inference import export
  from jax_resnet.training import warm_start

  weight, temperature = 0.3, 2.0
  path = str(tmp_path / 'teacher.msgpack')
  config = _recipe(
    config,
    momentum=0.0,
    weight_decay=0.0,
    distill_from=path,
    distill_weight=weight,
    distill_temperature=temperature,
  )
  state, _, _ = setup(config)
  # The teacher: a ResNet-20 with random weights (the student's, perturbed) and BatchNorm
  # statistics far from a fresh model's, so that its train and inference modes differ.
  rng = np.random.RandomState(1)
  flat = traverse_util.flatten_dict(
    jax.tree.map(np.asarray, {'params': state.params, 'batch_stats': state.batch_stats})
  )
  for key, value in flat.items():
    if key[-1] == 'mean':
      flat[key] = 0.3 * rng.normal(size=value.shape)
    elif key[-1] == 'var':
      flat[key] = rng.uniform(0.5, 2.0, value.shape)
    else:
      flat[key] = value + 0.2 * rng.normal(size=value.shape) * (value.std() + 0.1)
  variables = traverse_util.unflatten_dict({k: v.astype(np.float32) for k, v in flat.items()})
  export.write_msgpack(
    variables, path, {'model': 'resnet20', 'model_options': {}, 'num_classes': 10}
  )
  teacher = warm_start.load_teacher(config.distill_from, 10, build.compute_dtype(config))
  teacher_model = models.create_model('resnet20', 10)
  train_fn = train_setup(config, teacher=teacher).train_fn
  batch = fixed_batch()
  x = image_ops.normalize(jnp.asarray(batch['image']), MEAN, STD, jnp.float32)
  both_modes = jax.jit(
    lambda x: (
      teacher_model.apply(variables, x, train=False),
      teacher_model.apply(variables, x, train=True, mutable=['batch_stats'])[0],
    )
  )
  teacher_logits, train_mode = both_modes(x)
  assert float(jnp.abs(train_mode - teacher_logits).max()) > 0.1  # the modes differ here

  @jax.jit
  def step_by_hand(params, weight):
    """Plain SGD at rate 0.1 on the blended loss, and the BatchNorm statistics."""

    def loss(params):
      logits, updates = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats},
        x,
        train=True,
        mutable=['batch_stats'],
      )
      hard = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])
      soft_teacher = jax.nn.softmax(teacher_logits / temperature)
      kl = jnp.sum(
        soft_teacher * (jnp.log(soft_teacher) - jax.nn.log_softmax(logits / temperature)),
        axis=-1,
      )
      return ((1 - weight) * hard + weight * temperature**2 * kl).mean(), updates['batch_stats']

    (_, stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), stats

  expected, stats = jax.tree.map(np.asarray, step_by_hand(state.params, weight))
  hard_only, _ = jax.tree.map(np.asarray, step_by_hand(state.params, 0.0))
  new, _ = train_fn(state, batch)
  for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-6)
  moved = [np.abs(b - c).max() for b, c in zip(*map(jax.tree.leaves, (expected, hard_only)))]
  assert max(moved) > 1e-3  # the teacher's term changes the step
  for a, b in zip(jax.tree.leaves(new.batch_stats), jax.tree.leaves(stats)):
    np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-6)  # the student's own
  for a, b in zip(jax.tree.leaves(teacher.variables), jax.tree.leaves(variables)):
    np.testing.assert_array_equal(np.asarray(a), b)  # the exported statistics, untouched


def _max_difference(a, b) -> float:
  return max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_gradient_accumulation_equals_the_full_batch_without_batch_statistics(config):
  """4 micro-batches of 8 make the same update as the batch of 32 when BatchNorm uses its
  running statistics (frozen): the mean of the micro-batches' mean gradients is the
  batch's. With BatchNorm's batch statistics, each micro-batch normalises by its own, so
  the update differs, and the running statistics move once per micro-batch."""
  config.schedule = 'constant'
  config.learning_rate = 0.1
  config.frozen_batchnorm = True
  full, full_losses = train_losses(config, steps=2)
  config.grad_accum_steps = 4
  accumulated, accumulated_losses = train_losses(config, steps=2)
  assert int(accumulated.step) == 2  # optimizer steps, not micro-batches
  assert _max_difference(full.params, accumulated.params) < 1e-5
  np.testing.assert_allclose(accumulated_losses, full_losses, rtol=1e-5)
  assert full_losses[1] < full_losses[0]  # the steps moved the weights

  config.frozen_batchnorm = False
  statistics, _ = train_losses(config, steps=1)
  config.grad_accum_steps = 1
  whole, _ = train_losses(config, steps=1)
  assert _max_difference(whole.params, statistics.params) > 1e-4
  assert _max_difference(whole.batch_stats, statistics.batch_stats) > 1e-4


def test_micro_batches_split_each_share_of_the_batch_in_place():
  """Example i goes to micro-batch i % k, so a device's contiguous share of the batch
  holds its share of every micro-batch; the logits come back in batch order."""
  x = jnp.arange(12)
  micro = step_functions._micro_batches(x, 3)
  np.testing.assert_array_equal(micro, [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]])
  np.testing.assert_array_equal(jnp.moveaxis(micro, 0, 1).reshape(-1), x)
