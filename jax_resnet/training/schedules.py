"""Learning-rate schedules over a run's steps, built from the config on optax.

Every schedule is a function of the optimizer step; ``Timeline`` turns the config's
epochs and fractions of training into steps. The 'plateau' schedule is the peak (after
warm-up); the optimizer scales it by reduce-on-plateau's factor
(``optimizers.create_optimizer``).
"""

import ml_collections
import optax

from jax_resnet.training.timeline import Timeline

SCHEDULES = ('onecycle', 'cosine', 'multistep', 'constant', 'plateau')


class PlateauSchedule:
  """The base schedule of 'plateau': warm-up, then the peak, scaled down on plateaus.

  Calling it gives the base rate; the optimizer multiplies its updates by the
  reduce-on-plateau scale held in the optimizer state (see ``current_learning_rate``).
  It carries ``steps_per_epoch`` so the optimizer averages the loss over each epoch.
  """

  def __init__(self, base: optax.Schedule, steps_per_epoch: int):
    self.base = base
    self.steps_per_epoch = steps_per_epoch

  def __call__(self, step):
    return self.base(step)


def peak_learning_rate(config: ml_collections.ConfigDict) -> float:
  """``config.learning_rate``, scaled linearly with batch size when asked (Goyal et al.)."""
  if config.scale_learning_rate:
    return config.learning_rate * config.batch_size / config.base_batch_size
  return config.learning_rate


def create_learning_rate_fn(
  config: ml_collections.ConfigDict, timeline: Timeline
) -> optax.Schedule:
  """The configured schedule over ``timeline.total_steps`` steps."""
  peak = peak_learning_rate(config)
  total_steps = timeline.total_steps
  warmup = timeline.steps(config.warmup_epochs)
  if config.schedule == 'onecycle':
    return optax.cosine_onecycle_schedule(
      transition_steps=total_steps,
      peak_value=peak,
      pct_start=config.onecycle_pct_start,
      div_factor=config.onecycle_div_factor,
      final_div_factor=config.onecycle_final_div_factor,
    )
  if config.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=peak,
      warmup_steps=warmup,
      decay_steps=total_steps,
      end_value=peak * config.final_learning_rate_fraction,
    )
  if config.schedule == 'multistep':
    boundaries = {timeline.fraction(f): config.decay_factor for f in config.decay_at}
    decay = optax.piecewise_constant_schedule(peak, boundaries)
    return _with_warmup(decay, peak, warmup)
  if config.schedule == 'constant':
    return _with_warmup(optax.constant_schedule(peak), peak, warmup)
  if config.schedule == 'plateau':
    return PlateauSchedule(
      _with_warmup(optax.constant_schedule(peak), peak, warmup), timeline.steps_per_epoch
    )
  raise ValueError(f'Unknown schedule {config.schedule!r}. Valid: {", ".join(SCHEDULES)}.')


def _with_warmup(schedule, peak, warmup_steps):
  if warmup_steps <= 0:
    return schedule
  ramp = optax.linear_schedule(0.0, peak, warmup_steps)
  return optax.join_schedules([ramp, lambda s: schedule(s + warmup_steps)], [warmup_steps])
