"""Train state, the jitted train and eval steps, and their metrics.

This module is the core of the trainer and imports no TensorFlow, so a synthetic-data
benchmark runs where TensorFlow is absent. The loop that feeds it lives in
training/loop.py.
"""

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from clu import metrics
from flax.training import dynamic_scale as dynamic_scale_lib
from flax.training import train_state

from jax_resnet import parallel
from jax_resnet.augment import image_ops, mixing, randaugment
from jax_resnet.models import cpu_conv, resnet
from jax_resnet.training import optimizers

# Tags folded into a step's key for each random choice added after Cutout and dropout
# (those two keep the split they always had, so earlier runs train the same).
MIX_TAG, RANDAUGMENT_TAG, ERASING_TAG = 1001, 1002, 1003


class TrainState(train_state.TrainState):
  batch_stats: Any
  rng: jax.Array  # fixed base key; each step folds in its step number
  dynamic_scale: dynamic_scale_lib.DynamicScale | None = None  # fp16 loss scaling
  # {'params', 'batch_stats'} averaged over steps (config.ema_decay); None when off.
  ema: Any = None


@dataclasses.dataclass(frozen=True)
class StepOptions:
  """What the train and eval steps take from the config (static: a change recompiles)."""

  num_classes: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  dtype: Any = jnp.float32
  label_smoothing: float = 0.0
  cutout_size: int = 0
  mixup_alpha: float = 0.0
  cutmix_alpha: float = 0.0
  mix_prob: float = 1.0
  mix_switch_prob: float = 0.5
  randaugment_layers: int = 0
  randaugment_magnitude: float = 9.0
  randaugment_magnitude_std: float = 0.0
  randaugment_bins: int = 31
  trivial_augment: bool = False
  random_erasing_prob: float = 0.0
  loss: str = 'softmax'
  sam_rho: float = 0.0
  ema_decay: float = 0.0
  ema_warmup: bool = True
  distill_weight: float = 0.0
  distill_temperature: float = 1.0
  image_size: int | None = None  # train at this size (progressive resizing); None: as given
  eval_image_size: int | None = None  # evaluate at this size; None: as given
  eval_flip: bool = False

  @classmethod
  def of(cls, config: ml_collections.ConfigDict, num_classes: int, mean, std, **overrides):
    return cls(
      num_classes=num_classes,
      mean=tuple(mean),
      std=tuple(std),
      dtype=compute_dtype(config),
      label_smoothing=config.label_smoothing,
      cutout_size=config.cutout_size,
      mixup_alpha=config.mixup_alpha,
      cutmix_alpha=config.cutmix_alpha,
      mix_prob=config.mix_prob,
      mix_switch_prob=config.mix_switch_prob,
      randaugment_layers=config.randaugment_layers,
      randaugment_magnitude=config.randaugment_magnitude,
      randaugment_magnitude_std=config.randaugment_magnitude_std,
      randaugment_bins=config.randaugment_bins,
      trivial_augment=config.trivial_augment,
      random_erasing_prob=config.random_erasing_prob,
      loss=config.loss,
      sam_rho=config.sam_rho,
      ema_decay=config.ema_decay,
      ema_warmup=config.ema_warmup,
      distill_weight=config.distill_weight if config.distill_from else 0.0,
      distill_temperature=config.distill_temperature,
      eval_image_size=config.eval_image_size or None,
      eval_flip=config.eval_flip,
      **overrides,
    )

  @property
  def mixes(self) -> bool:
    return self.mixup_alpha > 0 or self.cutmix_alpha > 0


def top_k_correct(logits, labels, k: int):
  """1.0 where the label is among the k highest logits."""
  k = min(k, logits.shape[-1])
  _, top = jax.lax.top_k(logits, k)
  return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
  train_loss: metrics.Average.from_output('loss')
  train_top1: metrics.Average.from_output('top1')
  learning_rate: metrics.LastValue.from_output('learning_rate')


@flax.struct.dataclass
class EvalMetrics(metrics.Collection):
  eval_loss: metrics.Average.from_output('loss')
  eval_top1: metrics.Average.from_output('top1')
  eval_top5: metrics.Average.from_output('top5')


HALF_PRECISION_DTYPES = {'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def compute_dtype(config: ml_collections.ConfigDict):
  """bf16 (TPUs, Ampere and later GPUs) or fp16 (older GPUs) when half precision is on."""
  if not config.half_precision:
    return jnp.float32
  return HALF_PRECISION_DTYPES[config.half_precision_dtype]


def model_options(config: ml_collections.ConfigDict) -> dict:
  """``config.model_options`` as ``resnet.create_model`` keywords; None: the model's own."""
  return {k: v for k, v in config.model_options.items() if v is not None}


def model_kwargs(config: ml_collections.ConfigDict) -> dict:
  """Every ``resnet.create_model`` keyword the config sets, except the compute dtype (an
  export records these; inference runs in float32)."""
  return {
    'dropout_rate': config.dropout_rate,
    'bn_momentum': config.bn_momentum,
    'bn_epsilon': config.bn_epsilon,
    'zero_init_residual': config.zero_init_residual,
    'remat': config.remat,
    'frozen_batchnorm': config.frozen_batchnorm,
    'stochastic_depth_rate': config.stochastic_depth_rate,
    **model_options(config),
  }


def create_model(config: ml_collections.ConfigDict, num_classes: int):
  """The config's model with a ``num_classes``-way head."""
  return resnet.create_model(
    config.model, num_classes, dtype=compute_dtype(config), **model_kwargs(config)
  )


def create_train_state(
  rng,
  config: ml_collections.ConfigDict,
  model,
  image_shape: Sequence[int],
  learning_rate_fn,
  mesh=None,
  abstract: bool = False,
) -> TrainState:
  """Initialises a replicated train state (float32 parameters whatever the dtype).

  ``abstract=True`` returns its shapes, dtypes and shardings only (``ShapeDtypeStruct``
  leaves), nothing computed: the target of a checkpoint restore.
  """
  mesh = mesh or parallel.create_mesh()
  tx = optimizers.create_optimizer(config, learning_rate_fn)
  init_rng, state_rng = jax.random.split(rng)

  def init():
    variables = model.init(
      {'params': init_rng}, jnp.zeros((1, *image_shape), jnp.float32), train=False
    )
    dynamic_scale = (
      dynamic_scale_lib.DynamicScale() if compute_dtype(config) == jnp.float16 else None
    )
    batch_stats = variables.get('batch_stats', {})
    ema = None
    if config.ema_decay:
      ema = {'params': variables['params'], 'batch_stats': batch_stats}
    return TrainState.create(
      apply_fn=model.apply,
      params=variables['params'],
      tx=tx,
      batch_stats=batch_stats,
      rng=state_rng,
      dynamic_scale=dynamic_scale,
      ema=ema,
    )

  # The classic (non-partitionable) threefry compiles this init of many small random
  # tensors 2-4x faster on CPU; the parameters are replicated, so nothing is lost.
  with jax.threefry_partitionable(False):
    if abstract:
      replicated = parallel.replicated(mesh)
      return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
        jax.eval_shape(init),
      )
    return jax.jit(init, out_shardings=parallel.replicated(mesh))()


def cross_entropy(logits, labels, num_classes: int, label_smoothing: float = 0.0):
  return optax.softmax_cross_entropy(
    logits, mixing.smooth_one_hot(labels, num_classes, label_smoothing)
  )


def preprocess(images, mean, std, dtype, cutout_size: int = 0, key=None):
  """uint8 batch -> normalised compute-dtype batch, with Cutout when training."""
  x = image_ops.normalize(images, mean, std, jnp.float32)
  if cutout_size:
    x = image_ops.cutout(key, x, cutout_size)
  return x.astype(dtype)


def resize_images(images, size: int | None):
  """A batch resized on the device to ``size`` x ``size`` (bilinear), when it differs."""
  if size is None or images.shape[1:3] == (size, size):
    return images
  shape = (images.shape[0], size, size, images.shape[3])
  resized = jax.image.resize(images.astype(jnp.float32), shape, 'bilinear', antialias=True)
  if images.dtype == jnp.uint8:
    return jnp.clip(jnp.round(resized), 0, 255).astype(jnp.uint8)
  return resized


def augment_batch(key, images, labels, options: StepOptions):
  """The device-side train augmentations, in order: RandAugment or TrivialAugment (uint8),
  normalisation, Cutout, random erasing, Mixup/CutMix. Returns (compute-dtype images,
  [B, classes] targets with label smoothing composed)."""
  cutout_key, _ = jax.random.split(key)  # the split train_step has always used
  ids = jnp.arange(images.shape[0])
  images = resize_images(images, options.image_size)
  if options.randaugment_layers:
    keys = image_ops.example_keys(jax.random.fold_in(key, RANDAUGMENT_TAG), ids, 0)
    images = randaugment.rand_augment(
      keys,
      images,
      options.randaugment_layers,
      options.randaugment_magnitude,
      num_magnitude_bins=options.randaugment_bins,
      magnitude_std=options.randaugment_magnitude_std,
    )
  elif options.trivial_augment:
    keys = image_ops.example_keys(jax.random.fold_in(key, RANDAUGMENT_TAG), ids, 0)
    images = randaugment.trivial_augment(keys, images)
  x = image_ops.normalize(images, options.mean, options.std, jnp.float32)
  if options.cutout_size:
    x = image_ops.cutout(cutout_key, x, options.cutout_size)
  if options.random_erasing_prob:
    keys = image_ops.example_keys(jax.random.fold_in(key, ERASING_TAG), ids, 0)
    x = image_ops.random_erasing(keys, x, options.random_erasing_prob)
  if options.mixes:
    x, targets = mixing.mix_batch(
      jax.random.fold_in(key, MIX_TAG),
      x,
      labels,
      options.num_classes,
      mixup_alpha=options.mixup_alpha,
      cutmix_alpha=options.cutmix_alpha,
      mix_prob=options.mix_prob,
      switch_prob=options.mix_switch_prob,
      label_smoothing=options.label_smoothing,
    )
  else:
    targets = mixing.smooth_one_hot(labels, options.num_classes, options.label_smoothing)
  return x.astype(options.dtype), targets


def training_loss(logits, targets, options: StepOptions, teacher_logits=None):
  """Per-example loss: softmax cross-entropy (or timm's binary cross-entropy) against the
  soft targets, blended with the distillation loss when a teacher is given."""
  if options.loss == 'bce':
    loss = mixing.binary_cross_entropy(logits, targets)
  else:
    loss = optax.softmax_cross_entropy(logits, targets)
  if teacher_logits is None:
    return loss
  weight = options.distill_weight
  return (1 - weight) * loss + weight * distillation_loss(
    logits, teacher_logits, options.distill_temperature
  )


def distillation_loss(logits, teacher_logits, temperature: float):
  """Hinton et al.'s soft-target loss: T^2 KL(softmax(teacher/T) || softmax(student/T)),
  per example (T^2 keeps its gradients on the scale of the hard-label loss)."""
  teacher = jax.nn.log_softmax(teacher_logits / temperature)
  student = jax.nn.log_softmax(logits / temperature)
  return temperature**2 * jnp.sum(jnp.exp(teacher) * (teacher - student), axis=-1)


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A trained model whose logits the student learns to match (knowledge distillation);
  its variables are constants of the jitted step."""

  apply_fn: Callable
  variables: Any

  def __call__(self, images):
    logits = self.apply_fn(self.variables, images, train=False)
    return jax.lax.stop_gradient(logits.astype(jnp.float32))

  def __hash__(self):
    return id(self)


def train_step(
  state: TrainState,
  batch,
  *,
  learning_rate_fn: Callable,
  options: StepOptions,
  teacher: Teacher | None = None,
):
  """One optimizer step on a global batch of uint8 images; returns (state, TrainMetrics).

  Every random choice comes from ``fold_in(state.rng, state.step)``, so a resumed run
  repeats it exactly. With ``options.sam_rho`` the gradient is taken a second time at the
  parameters moved by rho along the normalised first gradient (Foret et al.'s SAM); the
  BatchNorm statistics are those of the first pass.
  """
  step_rng = jax.random.fold_in(state.rng, state.step)
  _, dropout_rng = jax.random.split(step_rng)
  images, targets = augment_batch(step_rng, batch['image'], batch['label'], options)
  teacher_logits = None if teacher is None else teacher(images)

  def loss_fn(params):
    logits, updates = state.apply_fn(
      {'params': params, 'batch_stats': state.batch_stats},
      images,
      train=True,
      mutable=['batch_stats'],
      rngs={'dropout': dropout_rng},
    )
    loss = training_loss(logits, targets, options, teacher_logits)
    return loss.mean(), (logits, updates['batch_stats'])

  if state.dynamic_scale is None:
    value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (logits, batch_stats)), grads = value_and_grad(state.params)
    if options.sam_rho:
      scale = options.sam_rho / (optax.global_norm(grads) + 1e-12)
      perturbed = jax.tree.map(lambda p, g: p + scale * g, state.params, grads)
      _, grads = value_and_grad(perturbed)
  else:  # fp16: scale the loss up, and skip the update when the gradients overflow
    dynamic_scale, is_finite, (loss, (logits, batch_stats)), grads = (
      state.dynamic_scale.value_and_grad(loss_fn, has_aux=True)(state.params)
    )
  # The loss goes to the optimizer too: reduce-on-plateau reads it.
  new_state = optimizers.apply_gradients(state, grads, loss, batch_stats=batch_stats)
  if state.dynamic_scale is not None:
    keep_finite = lambda new, old: jax.tree.map(functools.partial(jnp.where, is_finite), new, old)
    new_state = new_state.replace(
      params=keep_finite(new_state.params, state.params),
      opt_state=keep_finite(new_state.opt_state, state.opt_state),
      batch_stats=keep_finite(new_state.batch_stats, state.batch_stats),
      dynamic_scale=dynamic_scale,
    )
  if state.ema is not None:
    decay = ema_decay_at(options.ema_decay, state.step, options.ema_warmup)
    new_state = new_state.replace(ema=update_ema(state.ema, new_state, decay))
  step_metrics = TrainMetrics.single_from_model_output(
    loss=cross_entropy(logits, batch['label'], options.num_classes),
    top1=top_k_correct(logits, batch['label'], 1),
    learning_rate=optimizers.current_learning_rate(
      learning_rate_fn, state.step, new_state.opt_state
    ),
  )
  return new_state, step_metrics


def ema_decay_at(decay: float, step, warmup: bool = True):
  """The EMA's decay for the update after ``step`` updates. With warm-up, TensorFlow's
  ``ExponentialMovingAverage(num_updates=step)`` rule, min(decay, (1 + step) / (10 +
  step)), so the random initialisation leaves the average within tens of steps: at a
  constant 0.99 it still weighs 0.99^220 = 11% after the default job's 220 steps, and
  those EMA weights scored 63-92% where the raw ones scored 99-100%. Without, timm's
  constant decay."""
  if not warmup:
    return decay
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def update_ema(ema, state: TrainState, decay):
  """decay * ema + (1 - decay) * the new parameters and BatchNorm statistics."""
  new = {'params': state.params, 'batch_stats': state.batch_stats}
  return jax.tree.map(lambda e, x: decay * e + (1 - decay) * x, ema, new)


def eval_step(state: TrainState, batch, *, options: StepOptions):
  """Loss and top-1/top-5 on a padded batch; ``batch['mask']`` drops the padding. With
  ``options.eval_flip``, the logits are averaged with those of the mirrored images."""
  images = resize_images(batch['image'], options.eval_image_size)
  images = preprocess(images, options.mean, options.std, options.dtype)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  logits = state.apply_fn(variables, images, train=False)
  if options.eval_flip:
    logits = (logits + state.apply_fn(variables, images[:, :, ::-1], train=False)) / 2
  labels, num_classes = batch['label'], options.num_classes
  return EvalMetrics.single_from_model_output(
    loss=cross_entropy(logits, labels, num_classes),
    top1=top_k_correct(logits, labels, 1),
    top5=top_k_correct(logits, labels, 5),
    mask=batch['mask'],
  )


def ema_state(state: TrainState) -> TrainState:
  """``state`` with its EMA weights and statistics in place of the trained ones."""
  return state.replace(params=state.ema['params'], batch_stats=state.ema['batch_stats'])


def make_steps(
  config: ml_collections.ConfigDict, learning_rate_fn, num_classes: int, mean, std, mesh
):
  """Jitted (train_step, eval_step) for this config."""
  return (
    make_train_step(config, learning_rate_fn, num_classes, mean, std, mesh),
    make_eval_step(config, num_classes, mean, std, mesh),
  )


def make_train_step(
  config: ml_collections.ConfigDict,
  learning_rate_fn,
  num_classes: int,
  mean,
  std,
  mesh,
  teacher: Teacher | None = None,
  image_size: int | None = None,
):
  """Jitted ``train_step`` for this config; the state is donated and kept replicated.
  ``image_size`` trains at that size (progressive resizing)."""
  replicated = parallel.replicated(mesh)
  options = StepOptions.of(config, num_classes, mean, std, image_size=image_size)
  return jax.jit(
    functools.partial(
      train_step, learning_rate_fn=learning_rate_fn, options=options, teacher=teacher
    ),
    donate_argnums=0,
    out_shardings=(replicated, replicated),
    compiler_options=compiler_options(mesh),
  )


def compiler_options(mesh) -> dict | None:
  """XLA options for a train step: on CPU, convolutions run on Eigen rather than YNNPACK,
  whose kernel gradients are 1.4-3x slower here (ResNet-20's step: 1.15-1.40x faster;
  benchmarks/RESULTS.md)."""
  return cpu_conv.CPU_COMPILER_OPTIONS if mesh.devices.flat[0].platform == 'cpu' else None


def make_eval_step(config: ml_collections.ConfigDict, num_classes: int, mean, std, mesh):
  """Jitted ``eval_step`` for this config; metrics come back replicated."""
  return jax.jit(
    functools.partial(eval_step, options=StepOptions.of(config, num_classes, mean, std)),
    out_shardings=parallel.replicated(mesh),
  )


def merge_stacked_metrics(stacked):
  """Folds metrics with a leading steps axis (from ``lax.scan``) into one, in step order."""
  steps = jax.tree.leaves(stacked)[0].shape[0]
  merged = jax.tree.map(lambda x: x[0], stacked)
  for i in range(1, steps):
    merged = merged.merge(jax.tree.map(lambda x, i=i: x[i], stacked))
  return merged


def multi_train_step(state: TrainState, batches, unroll: bool = False, **step_kwargs):
  """Runs ``train_step`` over several batches in one dispatch, with ``lax.scan``.

  ``batches`` is either a list/tuple of batches or one batch whose arrays have a leading
  steps axis. Returns (state, TrainMetrics merged over the steps). The result equals
  that of calling ``train_step`` once per batch, in order (each step folds its own step
  number into the dropout and Cutout keys). ``unroll=True`` traces the k steps one after
  another instead of into a loop: k times the compile time, and the only fast form on
  XLA:CPU (see ``make_multi_train_step``).
  """
  if isinstance(batches, (list, tuple)):
    batches = jax.tree.map(lambda *xs: jnp.stack(xs), *batches)

  def body(state, batch):
    return train_step(state, batch, **step_kwargs)

  state, stacked = jax.lax.scan(body, state, batches, unroll=unroll)
  return state, merge_stacked_metrics(stacked)


def make_multi_train_step(
  config: ml_collections.ConfigDict,
  learning_rate_fn,
  num_classes: int,
  mean,
  std,
  mesh,
  unroll: bool | None = None,
  teacher: Teacher | None = None,
  image_size: int | None = None,
):
  """Jitted ``multi_train_step`` for this config: several steps per host dispatch.

  For small models (CIFAR ResNets) whose steps are shorter than the launch overhead.
  Call ``multi_fn(state, [batch_1, ..., batch_k])`` (or one batch stacked on a leading
  axis of k); it compiles once per k. The state is donated and kept replicated.

  By default (``unroll=None``) the steps are unrolled on CPU: inside a while loop,
  XLA:CPU (jax 0.10) leaves the backward convolutions in layouts it does not
  canonicalise (``f01b_i01o->01bf`` rather than ``b01f_01io->b01f``), and a rolled scan
  of ResNet steps runs tens of times slower than the same steps dispatched one by one
  (``benchmarks/RESULTS.md``). Elsewhere the loop stays rolled, which keeps the compile
  time independent of k.
  """
  replicated = parallel.replicated(mesh)
  if unroll is None:
    unroll = mesh.devices.flat[0].platform == 'cpu'
  return jax.jit(
    functools.partial(
      multi_train_step,
      unroll=unroll,
      learning_rate_fn=learning_rate_fn,
      options=StepOptions.of(config, num_classes, mean, std, image_size=image_size),
      teacher=teacher,
    ),
    donate_argnums=0,
    out_shardings=(replicated, replicated),
    compiler_options=compiler_options(mesh),
  )
