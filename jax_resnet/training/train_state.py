"""The train state, how it is created, and the weight EMA it carries.

Parameters are float32 whatever the compute dtype. The state holds one fixed PRNG key;
each step folds its step number in, so a resumed run repeats every random choice.
"""

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax.training import dynamic_scale as dynamic_scale_lib
from flax.training import train_state

from jax_resnet import parallel


class TrainState(train_state.TrainState):
  batch_stats: Any
  rng: jax.Array  # fixed base key; each step folds in its step number
  dynamic_scale: dynamic_scale_lib.DynamicScale | None = None  # fp16 loss scaling
  # {'params', 'batch_stats'} averaged over steps (config.ema_decay); None when off.
  ema: Any = None


def create_train_state(
  rng,
  model,
  image_shape: Sequence[int],
  tx: optax.GradientTransformation,
  mesh=None,
  *,
  ema: bool = False,
  loss_scaling: bool = False,
  abstract: bool = False,
) -> TrainState:
  """Initialises a replicated train state (float32 parameters whatever the dtype); ``ema``
  adds the weight average, ``loss_scaling`` fp16's dynamic loss scale.

  ``abstract=True`` returns its shapes, dtypes and shardings only (``ShapeDtypeStruct``
  leaves), nothing computed: the target of a checkpoint restore.
  """
  mesh = mesh or parallel.create_mesh()
  init_rng, state_rng = jax.random.split(rng)

  def init():
    variables = model.init(
      {'params': init_rng}, jnp.zeros((1, *image_shape), jnp.float32), train=False
    )
    batch_stats = variables.get('batch_stats', {})
    return TrainState.create(
      apply_fn=model.apply,
      params=variables['params'],
      tx=tx,
      batch_stats=batch_stats,
      rng=state_rng,
      dynamic_scale=dynamic_scale_lib.DynamicScale() if loss_scaling else None,
      ema={'params': variables['params'], 'batch_stats': batch_stats} if ema else None,
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


def ema_decay_at(decay: float, step, warmup: bool = True):
  """The EMA's decay for the update after ``step`` updates. With warm-up, TensorFlow's
  ``ExponentialMovingAverage(num_updates=step)`` rule, min(decay, (1 + step) / (10 +
  step)), so the random initialisation leaves the average within tens of steps (at a
  constant 0.99 it would still weigh 0.99^220 = 11% after the default job's 220 steps;
  benchmarks/RESULTS.md has what that costs). Without, timm's constant decay."""
  if not warmup:
    return decay
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def update_ema(ema, state: TrainState, decay):
  """decay * ema + (1 - decay) * the new parameters and BatchNorm statistics."""
  new = {'params': state.params, 'batch_stats': state.batch_stats}
  return jax.tree.map(lambda e, x: decay * e + (1 - decay) * x, ema, new)


def ema_state(state: TrainState) -> TrainState:
  """``state`` with its EMA weights and statistics in place of the trained ones."""
  return state.replace(params=state.ema['params'], batch_stats=state.ema['batch_stats'])
