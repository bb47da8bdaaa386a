"""The jitted train and eval steps and their metrics.

No TensorFlow here, so a synthetic-data benchmark runs where TensorFlow is absent; the
loop that feeds these steps is ``training/loop.py``. Every random choice of a step comes
from ``fold_in(state.rng, state.step)``, so a resumed run repeats it exactly.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from clu import metrics

from jax_resnet import loss_functions, parallel
from jax_resnet.augment import image_ops
from jax_resnet.augment.pipeline import AugmentOptions, augment_batch, resize_images
from jax_resnet.models import cpu_conv
from jax_resnet.training import optimizers
from jax_resnet.training.train_state import TrainState, ema_decay_at, update_ema


@dataclasses.dataclass(frozen=True)
class StepOptions:
  """What the train and eval steps do besides augmenting (static: a change recompiles).
  Field names are the config's (``configuration.options.from_config`` fills them)."""

  augment: AugmentOptions
  loss: str = 'softmax'
  sam_rho: float = 0.0
  ema_decay: float = 0.0
  ema_warmup: bool = True
  distill_weight: float = 0.5  # used only with a teacher
  distill_temperature: float = 4.0
  eval_image_size: int = 0  # evaluate at this size; 0: as given
  eval_flip: bool = False
  grad_accum_steps: int = 1  # micro-batches per optimizer step


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


def sam_gradients(value_and_grad, params, grads, rho: float):
  """Foret et al.'s sharpness-aware minimisation: the gradient taken again at the
  parameters moved by ``rho`` along the normalised first gradient ``grads``."""
  scale = rho / (optax.global_norm(grads) + 1e-12)
  perturbed = jax.tree.map(lambda p, g: p + scale * g, params, grads)
  _, sharp_grads = value_and_grad(perturbed)
  return sharp_grads


def with_ema(old: TrainState, new: TrainState, options: StepOptions) -> TrainState:
  """``new`` with its weight average moved towards its weights (when the state has one)."""
  if old.ema is None:
    return new
  decay = ema_decay_at(options.ema_decay, old.step, options.ema_warmup)
  return new.replace(ema=update_ema(old.ema, new, decay))


def _keep_finite(new: TrainState, old: TrainState, is_finite, dynamic_scale) -> TrainState:
  """fp16: the update is skipped (params, optimizer state, statistics kept) when the
  gradients overflowed; the loss scale moves either way."""
  keep = lambda a, b: jax.tree.map(functools.partial(jnp.where, is_finite), a, b)
  return new.replace(
    params=keep(new.params, old.params),
    opt_state=keep(new.opt_state, old.opt_state),
    batch_stats=keep(new.batch_stats, old.batch_stats),
    dynamic_scale=dynamic_scale,
  )


def _loss_fn(state: TrainState, batch_stats, inputs, rng, options: StepOptions):
  """The training loss of ``inputs`` (images, targets, teacher logits or None) as a
  function of the parameters: ``params -> (mean loss, (logits, new batch_stats))``."""
  images, targets, teacher_logits = inputs

  def loss_fn(params):
    logits, updates = state.apply_fn(
      {'params': params, 'batch_stats': batch_stats},
      images,
      train=True,
      mutable=['batch_stats'],
      rngs={'dropout': rng},
    )
    loss = loss_functions.training_loss(
      logits,
      targets,
      loss=options.loss,
      teacher_logits=teacher_logits,
      distill_weight=options.distill_weight,
      distill_temperature=options.distill_temperature,
    )
    return loss.mean(), (logits, updates['batch_stats'])

  return loss_fn


def _gradients(state: TrainState, batch_stats, inputs, rng, options: StepOptions):
  """(loss, logits, new batch_stats, gradients) of one pass; with ``options.sam_rho`` the
  gradients are ``sam_gradients`` (the statistics the first pass's)."""
  value_and_grad = jax.value_and_grad(
    _loss_fn(state, batch_stats, inputs, rng, options), has_aux=True
  )
  (loss, (logits, new_stats)), grads = value_and_grad(state.params)
  if options.sam_rho:
    grads = sam_gradients(value_and_grad, state.params, grads, options.sam_rho)
  return loss, logits, new_stats, grads


def _micro_batches(x, k: int):
  """``x``'s leading (batch) axis as k micro-batches on a new leading axis, example i in
  micro-batch i % k: each device's share of the batch splits in place, no data moves."""
  return jnp.moveaxis(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 1, 0)


def _accumulated_gradients(state: TrainState, inputs, rng, options: StepOptions, unroll: bool):
  """``_gradients`` over ``options.grad_accum_steps`` micro-batches in a scan (one
  micro-batch's activations alive at a time): the mean loss and gradient, the logits in
  batch order, the statistics updated by each micro-batch in turn (as timm's)."""
  k = options.grad_accum_steps

  def body(carry, micro):
    batch_stats, grad_sum, loss_sum = carry
    index, micro_inputs = micro
    micro_rng = jax.random.fold_in(rng, index)
    loss, logits, batch_stats, grads = _gradients(
      state, batch_stats, micro_inputs, micro_rng, options
    )
    return (batch_stats, jax.tree.map(jnp.add, grad_sum, grads), loss_sum + loss), logits

  zeros = jax.tree.map(jnp.zeros_like, state.params)
  micro = (jnp.arange(k), jax.tree.map(lambda x: _micro_batches(x, k), inputs))
  (batch_stats, grad_sum, loss_sum), logits = jax.lax.scan(
    body, (state.batch_stats, zeros, jnp.float32(0)), micro, unroll=unroll
  )
  logits = jnp.moveaxis(logits, 0, 1).reshape(-1, logits.shape[-1])
  return loss_sum / k, logits, batch_stats, jax.tree.map(lambda g: g / k, grad_sum)


def train_step(
  state: TrainState,
  batch,
  *,
  learning_rate_fn: Callable,
  options: StepOptions,
  teacher: Teacher | None = None,
  unroll_micro_batches: bool = False,
):
  """One optimizer step on a global batch of uint8 images; returns (state, TrainMetrics).

  With ``options.sam_rho`` the update uses ``sam_gradients``; the BatchNorm statistics
  are those of the first pass. With ``options.grad_accum_steps`` k > 1 the gradient is
  the mean of k micro-batches' (``_accumulated_gradients``), unrolled when
  ``unroll_micro_batches`` (XLA:CPU, see ``make_train_step``).
  """
  step_rng = jax.random.fold_in(state.rng, state.step)
  _, dropout_rng = jax.random.split(step_rng)
  images, targets = augment_batch(step_rng, batch['image'], batch['label'], options.augment)
  inputs = (images, targets, None if teacher is None else teacher(images))
  if state.dynamic_scale is not None:  # fp16: scale the loss up, skip overflowed updates
    loss_fn = _loss_fn(state, state.batch_stats, inputs, dropout_rng, options)
    dynamic_scale, is_finite, (loss, (logits, batch_stats)), grads = (
      state.dynamic_scale.value_and_grad(loss_fn, has_aux=True)(state.params)
    )
  elif options.grad_accum_steps > 1:
    loss, logits, batch_stats, grads = _accumulated_gradients(
      state, inputs, dropout_rng, options, unroll_micro_batches
    )
  else:
    loss, logits, batch_stats, grads = _gradients(
      state, state.batch_stats, inputs, dropout_rng, options
    )
  # The loss goes to the optimizer too: reduce-on-plateau reads it.
  new_state = optimizers.apply_gradients(state, grads, loss, batch_stats=batch_stats)
  if state.dynamic_scale is not None:
    new_state = _keep_finite(new_state, state, is_finite, dynamic_scale)
  new_state = with_ema(state, new_state, options)
  labels, num_classes = batch['label'], options.augment.num_classes
  return new_state, TrainMetrics.single_from_model_output(
    loss=loss_functions.cross_entropy(logits, labels, num_classes),
    top1=top_k_correct(logits, labels, 1),
    learning_rate=optimizers.current_learning_rate(
      learning_rate_fn, state.step, new_state.opt_state
    ),
  )


def eval_step(state: TrainState, batch, *, options: StepOptions):
  """Loss and top-1/top-5 on a padded batch; ``batch['mask']`` drops the padding. With
  ``options.eval_flip``, the logits are averaged with those of the mirrored images."""
  augment = options.augment
  images = resize_images(batch['image'], options.eval_image_size)
  images = image_ops.normalize(images, augment.mean, augment.std, jnp.float32)
  images = images.astype(augment.dtype)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  logits = state.apply_fn(variables, images, train=False)
  if options.eval_flip:
    logits = (logits + state.apply_fn(variables, images[:, :, ::-1], train=False)) / 2
  labels = batch['label']
  return EvalMetrics.single_from_model_output(
    loss=loss_functions.cross_entropy(logits, labels, augment.num_classes),
    top1=top_k_correct(logits, labels, 1),
    top5=top_k_correct(logits, labels, 5),
    mask=batch['mask'],
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
  steps axis. Returns (state, TrainMetrics merged over the steps), equal to calling
  ``train_step`` once per batch, in order. ``unroll=True`` traces the steps one after
  another instead of into a loop: k times the compile time, and the only fast form on
  XLA:CPU (see ``make_train_step``).
  """
  if isinstance(batches, (list, tuple)):
    batches = jax.tree.map(lambda *xs: jnp.stack(xs), *batches)

  def body(state, batch):
    return train_step(state, batch, **step_kwargs)

  state, stacked = jax.lax.scan(body, state, batches, unroll=unroll)
  return state, merge_stacked_metrics(stacked)


def make_train_step(
  options: StepOptions,
  learning_rate_fn,
  mesh,
  *,
  steps_per_dispatch: int = 1,
  teacher: Teacher | None = None,
  unroll: bool | None = None,
):
  """The jitted train step: ``fn(state, batch)`` for one step, or, with
  ``steps_per_dispatch`` k > 1, ``fn(state, [batch_1, ..., batch_k])`` (or one batch
  stacked on a leading axis of k) for k steps in one host dispatch, for small models
  whose steps are shorter than the launch overhead. The state is donated and kept
  replicated.

  The k steps (and gradient accumulation's micro-batches) are unrolled on CPU by default
  (``unroll=None``): inside a while loop,
  XLA:CPU leaves the backward convolutions in layouts it does not canonicalise and runs
  them tens of times slower (benchmarks/RESULTS.md, "Multi-step dispatch"). Elsewhere
  the loop stays rolled, which keeps the compile time independent of k.
  """
  if unroll is None:
    unroll = _platform(mesh) == 'cpu'
  step_kwargs = dict(
    learning_rate_fn=learning_rate_fn,
    options=options,
    teacher=teacher,
    unroll_micro_batches=unroll,
  )
  if steps_per_dispatch == 1:
    fn = functools.partial(train_step, **step_kwargs)
  else:
    fn = functools.partial(multi_train_step, unroll=unroll, **step_kwargs)
  replicated = parallel.replicated(mesh)
  return jax.jit(
    fn,
    donate_argnums=0,
    out_shardings=(replicated, replicated),
    compiler_options=compiler_options(mesh),
  )


def compiler_options(mesh) -> dict | None:
  """XLA options for a train step: on CPU, convolutions run on Eigen rather than YNNPACK,
  whose kernel gradients are slower here (benchmarks/RESULTS.md, "CPU convolutions")."""
  return cpu_conv.CPU_COMPILER_OPTIONS if _platform(mesh) == 'cpu' else None


def _platform(mesh) -> str:
  return mesh.devices.flat[0].platform


def make_eval_step(options: StepOptions, mesh):
  """The jitted ``eval_step``; metrics come back replicated."""
  return jax.jit(
    functools.partial(eval_step, options=options),
    out_shardings=parallel.replicated(mesh),
  )
