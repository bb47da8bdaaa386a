"""Optimizers, built from the config on optax (the schedules are in ``schedules``).

Every optimizer accepts ``tx.update(grads, opt_state, params, value=loss)``: the
'plateau' schedule (reduce-on-plateau) reads the training loss from ``value``; the
others ignore it.
"""

import jax
import jax.numpy as jnp
import ml_collections
import optax
import optax.contrib

from jax_resnet.training.schedules import PlateauSchedule

OPTIMIZERS = ('sgd', 'adamw', 'adam', 'lars', 'lamb')


def _decay_mask(params):
  """Weight decay on conv and dense kernels only: not on BN scales/biases nor head bias."""

  return jax.tree.map(lambda p: p.ndim > 1, params)


def create_optimizer(
  config: ml_collections.ConfigDict, learning_rate_fn: optax.Schedule
) -> optax.GradientTransformation:
  """The configured optimizer; with the 'plateau' schedule, reduce-on-plateau after it.

  Reduce-on-plateau (Keras's ReduceLROnPlateau) averages the training loss passed as
  ``value=`` over each epoch and multiplies the learning rate by
  ``config.plateau_factor`` after ``config.plateau_patience`` epochs without a relative
  improvement of ``config.plateau_rtol``, down to ``config.plateau_min_scale`` times the
  peak; ``config.plateau_cooldown`` epochs pass after a reduction before counting again.
  """
  tx = _clipped(_fine_tuning(_base_optimizer(config, learning_rate_fn), config), config)
  if isinstance(learning_rate_fn, PlateauSchedule):
    tx = optax.chain(
      tx,
      optax.contrib.reduce_on_plateau(
        factor=config.plateau_factor,
        patience=config.plateau_patience,
        rtol=config.plateau_rtol,
        cooldown=config.plateau_cooldown,
        min_scale=config.plateau_min_scale,
        accumulation_size=max(1, learning_rate_fn.steps_per_epoch),
      ),
    )
  return optax.with_extra_args_support(tx)


FROZEN, HEAD, BODY = 'frozen', 'head', 'body'


def frozen_groups(freeze: str) -> tuple[str, ...]:
  """``config.freeze`` as parameter-group prefixes: '' none, 'backbone' everything but the
  head, else comma-separated groups ('stem', 'stage1', ..., 'final_bn')."""
  return tuple(g.strip() for g in freeze.split(',') if g.strip())


def parameter_group(name: str, frozen: tuple[str, ...]) -> str:
  """FROZEN, HEAD or BODY for the top-level parameter module ``name`` (stem_conv,
  stage2_block1, head, ...)."""
  group = name.split('_')[0]
  if 'backbone' in frozen and name != 'head':
    return FROZEN
  if group in frozen or name in frozen:
    return FROZEN
  return HEAD if name == 'head' else BODY


def _fine_tuning(tx, config: ml_collections.ConfigDict):
  """``tx`` for the trained parameters; frozen ones get exactly zero updates (they skip
  the optimizer, so no weight decay either) and the head's updates are scaled by
  ``config.head_learning_rate_multiplier``. Without either, ``tx`` as it is (the same
  optimizer state as always)."""
  frozen = frozen_groups(config.freeze)
  multiplier = config.head_learning_rate_multiplier
  if not frozen and multiplier == 1.0:
    return tx
  labels = lambda params: _group_labels(params, frozen)
  transforms = {
    BODY: tx,
    HEAD: optax.chain(tx, optax.scale(multiplier)) if multiplier != 1.0 else tx,
    FROZEN: optax.set_to_zero(),
  }
  return optax.multi_transform(transforms, labels)


def _clipped(tx, config: ml_collections.ConfigDict):
  """``tx`` after gradient clipping (timm's ``--clip-grad``), when the config asks for it:
  to a global norm (``grad_clip_norm``), then adaptively (``agc_clip``, Brock et al. 2021:
  each output unit's gradient at most agc_clip times its weights' norm, the head left out
  as timm's train.py leaves it). Frozen parameters' gradients are zeroed first, so they
  count in no norm. Without clipping, ``tx`` as it is (the same optimizer state)."""
  clips = []
  if config.grad_clip_norm:
    clips.append(optax.clip_by_global_norm(config.grad_clip_norm))
  if config.agc_clip:
    not_head = lambda params: {
      k: jax.tree.map(lambda _, k=k: k != HEAD, v) for k, v in params.items()
    }
    clips.append(optax.masked(optax.adaptive_grad_clip(config.agc_clip), not_head))
  if not clips:
    return tx
  frozen = frozen_groups(config.freeze)
  if frozen:
    is_frozen = lambda params: jax.tree.map(
      lambda group: group == FROZEN, _group_labels(params, frozen)
    )
    clips.insert(0, optax.masked(optax.set_to_zero(), is_frozen))
  return optax.chain(*clips, tx)


def _group_labels(params, frozen: tuple[str, ...]):
  """``params``' tree with each leaf replaced by its ``parameter_group``."""
  return {
    name: jax.tree.map(lambda _, n=name: parameter_group(n, frozen), sub)
    for name, sub in params.items()
  }


def plateau_scale(opt_state):
  """The reduce-on-plateau learning-rate multiplier in ``opt_state``; 1.0 without one."""
  states = [
    s
    for s in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, optax.contrib.ReduceLROnPlateauState)
    )
    if isinstance(s, optax.contrib.ReduceLROnPlateauState)
  ]
  return states[0].scale if states else jnp.float32(1.0)


def apply_gradients(state, grads, loss, **replace):
  """``state.apply_gradients`` that also passes the loss to the optimizer (plateau)."""
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params, value=loss)
  return state.replace(
    step=state.step + 1,
    params=optax.apply_updates(state.params, updates),
    opt_state=opt_state,
    **replace,
  )


def current_learning_rate(learning_rate_fn, step, opt_state):
  """The rate the step used: the schedule's value times any reduce-on-plateau scale."""
  return learning_rate_fn(step) * plateau_scale(opt_state)


def _base_optimizer(config, learning_rate_fn):
  mask = _decay_mask if config.weight_decay_kernels_only else None
  if config.optimizer == 'sgd':
    # Coupled L2 decay (added to the gradient before momentum), as in torch.optim.SGD
    # and the papers whose recipes the configs reproduce.
    return optax.chain(
      optax.add_decayed_weights(config.weight_decay, mask),
      optax.sgd(learning_rate_fn, momentum=config.momentum or None, nesterov=config.nesterov),
    )
  if config.optimizer == 'adamw':
    return optax.adamw(
      learning_rate_fn,
      b1=config.adam_b1,
      b2=config.adam_b2,
      weight_decay=config.weight_decay,
      mask=mask,
    )
  if config.optimizer == 'adam':
    return optax.chain(
      optax.add_decayed_weights(config.weight_decay, mask),
      optax.adam(learning_rate_fn, b1=config.adam_b1, b2=config.adam_b2),
    )
  kernels = mask or True  # the trust ratio, like the decay, skips BN and biases when asked
  if config.optimizer == 'lars':
    # Large-batch SGD (You et al. 2017; MLPerf's ResNet-50 at batch 3,000+): each layer's
    # step scaled by trust_coefficient * ||w|| / ||g + wd w||.
    return optax.lars(
      learning_rate_fn,
      weight_decay=config.weight_decay,
      weight_decay_mask=kernels,
      trust_coefficient=config.lars_trust_coefficient,
      trust_ratio_mask=kernels,
      momentum=config.momentum,
      nesterov=config.nesterov,
    )
  if config.optimizer == 'lamb':
    # Adam with a layer-wise trust ratio (You et al. 2019; timm's ResNet strikes back A3):
    # optax.lamb's chain, its trust ratio masked like the decay (optax.lamb rescales every
    # layer; timm's Lamb leaves the undecayed BN parameters and biases unscaled).
    return optax.chain(
      optax.scale_by_adam(b1=config.adam_b1, b2=config.adam_b2, eps=1e-6),
      optax.add_decayed_weights(config.weight_decay, mask),
      optax.masked(optax.scale_by_trust_ratio(), kernels),
      optax.scale_by_learning_rate(learning_rate_fn),
    )
  raise ValueError(f'Unknown optimizer {config.optimizer!r}. Valid: {", ".join(OPTIMIZERS)}.')
