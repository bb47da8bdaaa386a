"""Train state, the jitted train and eval steps, and their metrics.

This module is the core of the trainer and imports no TensorFlow, so a synthetic-data
benchmark runs where TensorFlow is absent. The loop that feeds it lives in training.py.
"""

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

from jax_resnet import augment, models, optim, sharding


class TrainState(train_state.TrainState):
  batch_stats: Any
  rng: jax.Array  # fixed base key; each step folds in its step number
  dynamic_scale: dynamic_scale_lib.DynamicScale | None = None  # fp16 loss scaling


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
  """``config.model_options`` as ``models.create_model`` keywords; None: the model's own."""
  return {k: v for k, v in config.model_options.items() if v is not None}


def model_kwargs(config: ml_collections.ConfigDict) -> dict:
  """Every ``models.create_model`` keyword the config sets, except the compute dtype (an
  export records these; inference runs in float32)."""
  return {
    'dropout_rate': config.dropout_rate,
    'bn_momentum': config.bn_momentum,
    'bn_epsilon': config.bn_epsilon,
    'zero_init_residual': config.zero_init_residual,
    'remat': config.remat,
    **model_options(config),
  }


def create_model(config: ml_collections.ConfigDict, num_classes: int):
  """The config's model with a ``num_classes``-way head."""
  return models.create_model(
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
  mesh = mesh or sharding.create_mesh()
  tx = optim.create_optimizer(config, learning_rate_fn)
  init_rng, state_rng = jax.random.split(rng)

  def init():
    variables = model.init(
      {'params': init_rng}, jnp.zeros((1, *image_shape), jnp.float32), train=False
    )
    dynamic_scale = (
      dynamic_scale_lib.DynamicScale() if compute_dtype(config) == jnp.float16 else None
    )
    return TrainState.create(
      apply_fn=model.apply,
      params=variables['params'],
      tx=tx,
      batch_stats=variables.get('batch_stats', {}),
      rng=state_rng,
      dynamic_scale=dynamic_scale,
    )

  # The classic (non-partitionable) threefry compiles this init of many small random
  # tensors 2-4x faster on CPU; the parameters are replicated, so nothing is lost.
  with jax.threefry_partitionable(False):
    if abstract:
      replicated = sharding.replicated(mesh)
      return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
        jax.eval_shape(init),
      )
    return jax.jit(init, out_shardings=sharding.replicated(mesh))()


def cross_entropy(logits, labels, num_classes: int, label_smoothing: float = 0.0):
  targets = (
    optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
    if label_smoothing
    else jax.nn.one_hot(labels, num_classes)
  )
  return optax.softmax_cross_entropy(logits, targets)


def preprocess(images, mean, std, dtype, cutout_size: int = 0, key=None):
  """uint8 batch -> normalised compute-dtype batch, with Cutout when training."""
  x = augment.normalize(images, mean, std, jnp.float32)
  if cutout_size:
    x = augment.cutout(key, x, cutout_size)
  return x.astype(dtype)


def train_step(
  state: TrainState,
  batch,
  *,
  learning_rate_fn: Callable,
  mean,
  std,
  num_classes: int,
  label_smoothing: float = 0.0,
  cutout_size: int = 0,
  dtype=jnp.float32,
):
  """One SGD step on a global batch of uint8 images; returns (state, TrainMetrics)."""
  step_rng = jax.random.fold_in(state.rng, state.step)
  cutout_rng, dropout_rng = jax.random.split(step_rng)
  images = preprocess(batch['image'], mean, std, dtype, cutout_size, cutout_rng)

  def loss_fn(params):
    logits, updates = state.apply_fn(
      {'params': params, 'batch_stats': state.batch_stats},
      images,
      train=True,
      mutable=['batch_stats'],
      rngs={'dropout': dropout_rng},
    )
    loss = cross_entropy(logits, batch['label'], num_classes, label_smoothing)
    return loss.mean(), (logits, updates['batch_stats'])

  if state.dynamic_scale is None:
    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  else:  # fp16: scale the loss up, and skip the update when the gradients overflow
    dynamic_scale, is_finite, (loss, (logits, batch_stats)), grads = (
      state.dynamic_scale.value_and_grad(loss_fn, has_aux=True)(state.params)
    )
  # The loss goes to the optimizer too: reduce-on-plateau reads it.
  new_state = optim.apply_gradients(state, grads, loss, batch_stats=batch_stats)
  if state.dynamic_scale is not None:
    keep_finite = lambda new, old: jax.tree.map(functools.partial(jnp.where, is_finite), new, old)
    new_state = new_state.replace(
      params=keep_finite(new_state.params, state.params),
      opt_state=keep_finite(new_state.opt_state, state.opt_state),
      batch_stats=keep_finite(new_state.batch_stats, state.batch_stats),
      dynamic_scale=dynamic_scale,
    )
  step_metrics = TrainMetrics.single_from_model_output(
    loss=cross_entropy(logits, batch['label'], num_classes),
    top1=top_k_correct(logits, batch['label'], 1),
    learning_rate=optim.current_learning_rate(learning_rate_fn, state.step, new_state.opt_state),
  )
  return new_state, step_metrics


def eval_step(state: TrainState, batch, *, mean, std, num_classes: int, dtype=jnp.float32):
  """Loss and top-1/top-5 on a padded batch; ``batch['mask']`` drops the padding."""
  images = preprocess(batch['image'], mean, std, dtype)
  logits = state.apply_fn(
    {'params': state.params, 'batch_stats': state.batch_stats}, images, train=False
  )
  return EvalMetrics.single_from_model_output(
    loss=cross_entropy(logits, batch['label'], num_classes),
    top1=top_k_correct(logits, batch['label'], 1),
    top5=top_k_correct(logits, batch['label'], 5),
    mask=batch['mask'],
  )


def make_steps(
  config: ml_collections.ConfigDict, learning_rate_fn, num_classes: int, mean, std, mesh
):
  """Jitted (train_step, eval_step) for this config."""
  return (
    make_train_step(config, learning_rate_fn, num_classes, mean, std, mesh),
    make_eval_step(config, num_classes, mean, std, mesh),
  )


def make_train_step(
  config: ml_collections.ConfigDict, learning_rate_fn, num_classes: int, mean, std, mesh
):
  """Jitted ``train_step`` for this config; the state is donated and kept replicated."""
  replicated = sharding.replicated(mesh)
  return jax.jit(
    functools.partial(
      train_step, **_train_options(config, learning_rate_fn, num_classes, mean, std)
    ),
    donate_argnums=0,
    out_shardings=(replicated, replicated),
  )


def make_eval_step(config: ml_collections.ConfigDict, num_classes: int, mean, std, mesh):
  """Jitted ``eval_step`` for this config; metrics come back replicated."""
  return jax.jit(
    functools.partial(
      eval_step, mean=mean, std=std, num_classes=num_classes, dtype=compute_dtype(config)
    ),
    out_shardings=sharding.replicated(mesh),
  )


def _train_options(config, learning_rate_fn, num_classes: int, mean, std) -> dict:
  """The keyword arguments ``train_step`` takes from the config, for every jitted form."""
  return dict(
    learning_rate_fn=learning_rate_fn,
    mean=mean,
    std=std,
    num_classes=num_classes,
    label_smoothing=config.label_smoothing,
    cutout_size=config.cutout_size,
    dtype=compute_dtype(config),
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
  replicated = sharding.replicated(mesh)
  if unroll is None:
    unroll = mesh.devices.flat[0].platform == 'cpu'
  return jax.jit(
    functools.partial(
      multi_train_step,
      unroll=unroll,
      **_train_options(config, learning_rate_fn, num_classes, mean, std),
    ),
    donate_argnums=0,
    out_shardings=(replicated, replicated),
  )
