"""Learning-rate schedules and optimizers, built from the config on optax."""

import jax
import ml_collections
import optax

OPTIMIZERS = ('sgd', 'adamw', 'adam')
SCHEDULES = ('onecycle', 'cosine', 'multistep', 'constant')


def peak_learning_rate(config: ml_collections.ConfigDict) -> float:
  """``config.learning_rate``, scaled linearly with batch size when asked (Goyal et al.)."""
  if config.scale_learning_rate:
    return config.learning_rate * config.batch_size / config.base_batch_size
  return config.learning_rate


def create_learning_rate_fn(config: ml_collections.ConfigDict, steps_per_epoch: int,
                            total_steps: int) -> optax.Schedule:
  peak = peak_learning_rate(config)
  warmup = int(config.warmup_epochs * steps_per_epoch)
  if config.schedule == 'onecycle':
    return optax.cosine_onecycle_schedule(
        transition_steps=total_steps, peak_value=peak, pct_start=config.onecycle_pct_start,
        div_factor=config.onecycle_div_factor,
        final_div_factor=config.onecycle_final_div_factor)
  if config.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup, decay_steps=total_steps,
        end_value=peak * config.final_learning_rate_fraction)
  if config.schedule == 'multistep':
    boundaries = {int(f * total_steps): config.decay_factor for f in config.decay_at}
    decay = optax.piecewise_constant_schedule(peak, boundaries)
    return _with_warmup(decay, peak, warmup)
  if config.schedule == 'constant':
    return _with_warmup(optax.constant_schedule(peak), peak, warmup)
  raise ValueError(f'Unknown schedule {config.schedule!r}. Valid: {", ".join(SCHEDULES)}.')


def _with_warmup(schedule, peak, warmup_steps):
  if warmup_steps <= 0:
    return schedule
  ramp = optax.linear_schedule(0.0, peak, warmup_steps)
  return optax.join_schedules([ramp, lambda s: schedule(s + warmup_steps)], [warmup_steps])


def _decay_mask(params):
  """Weight decay on conv and dense kernels only: not on BN scales/biases nor head bias."""

  return jax.tree.map(lambda p: p.ndim > 1, params)


def create_optimizer(config: ml_collections.ConfigDict,
                     learning_rate_fn: optax.Schedule) -> optax.GradientTransformation:
  mask = _decay_mask if config.weight_decay_kernels_only else None
  if config.optimizer == 'sgd':
    # Coupled L2 decay (added to the gradient before momentum), as in torch.optim.SGD
    # and the papers whose recipes the configs reproduce.
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay, mask),
        optax.sgd(learning_rate_fn, momentum=config.momentum or None,
                  nesterov=config.nesterov))
  if config.optimizer == 'adamw':
    return optax.adamw(learning_rate_fn, b1=config.adam_b1, b2=config.adam_b2,
                       weight_decay=config.weight_decay, mask=mask)
  if config.optimizer == 'adam':
    return optax.chain(optax.add_decayed_weights(config.weight_decay, mask),
                       optax.adam(learning_rate_fn, b1=config.adam_b1, b2=config.adam_b2))
  raise ValueError(f'Unknown optimizer {config.optimizer!r}. Valid: {", ".join(OPTIMIZERS)}.')
