"""Training time in one unit, the optimizer step.

The config speaks in epochs (``num_epochs``, ``warmup_epochs``, ``eval_every_epochs``,
``checkpoint_every_epochs``), in steps (``num_train_steps``, ``log_every_steps``,
``checkpoint_every_steps``) and in fractions of training (``decay_at``,
``onecycle_pct_start``). ``Timeline`` converts all of them to steps, once, for the loop,
the schedules and the benchmark; ``Every`` is the one helper for every "every N steps
or epochs" decision.
"""

import dataclasses

import ml_collections

from jax_resnet.data import common


@dataclasses.dataclass(frozen=True)
class Every:
  """A periodic event: at multiples of any of ``periods`` (in steps; empty: never),
  counted from step ``offset`` (a timeline's epoch origin)."""

  periods: tuple[int, ...] = ()
  offset: int = 0

  def __call__(self, step: int) -> bool:
    return any((step - self.offset) % p == 0 for p in self.periods)

  def steps_to_next(self, step: int) -> list[int]:
    """For each period, the steps from ``step`` to its next multiple."""
    return [p - (step - self.offset) % p for p in self.periods]


@dataclasses.dataclass(frozen=True)
class Timeline:
  """How long training is, in steps, and where epochs start.

  ``epoch_origin`` is the (step, epoch) from which epochs of ``steps_per_epoch`` count:
  (0, 0), unless the run resumed after its training set changed size, when the epochs
  before it had the old size (``training/prepare.epoch_origin``).
  """

  steps_per_epoch: int
  total_steps: int
  epoch_origin: tuple[int, int] = (0, 0)

  @classmethod
  def from_config(
    cls,
    config: ml_collections.ConfigDict,
    num_train: int,
    epoch_origin: tuple[int, int] = (0, 0),
  ) -> 'Timeline':
    """``num_train`` examples in global batches of ``config.batch_size`` (the tail of an
    epoch that does not fill a batch is dropped); ``num_train_steps`` > 0 wins over
    ``num_epochs``, which counts the epochs before ``epoch_origin`` too."""
    steps_per_epoch = num_train // config.batch_size
    if steps_per_epoch == 0:
      from jax_resnet.errors import ConfigError

      raise ConfigError(
        f'config.batch_size={config.batch_size} is larger than the {num_train} training '
        'examples; lower it.'
      )
    origin = (int(epoch_origin[0]), int(epoch_origin[1]))
    if config.num_train_steps > 0:
      return cls(steps_per_epoch, int(config.num_train_steps), origin)
    remaining = max(0, int((config.num_epochs - origin[1]) * steps_per_epoch))
    return cls(steps_per_epoch, origin[0] + remaining, origin)

  @property
  def num_epochs(self) -> float:
    """How many epochs the whole run is, those before the origin included."""
    origin_step, origin_epoch = self.epoch_origin
    return origin_epoch + (self.total_steps - origin_step) / self.steps_per_epoch

  def steps(self, epochs: float) -> int:
    """Whole steps in ``epochs`` (which may be fractional)."""
    return int(epochs * self.steps_per_epoch)

  def fraction(self, fraction: float) -> int:
    """The step at ``fraction`` of training."""
    return int(fraction * self.total_steps)

  def every(self, *, steps: int = 0, epochs: float = 0.0) -> Every:
    """Every ``steps`` steps and every ``epochs`` epochs (0 turns either off; a period
    shorter than one step becomes one step)."""
    periods = [int(steps)] if steps > 0 else []
    if epochs > 0:
      periods.append(max(1, self.steps(epochs)))
    return Every(tuple(periods), self.epoch_origin[0])

  def epoch_and_batch(self, step: int) -> tuple[int, int]:
    """(epoch, batch within the epoch) of the step about to run after ``step`` steps."""
    return common.epoch_and_batch(step, self.steps_per_epoch, self.epoch_origin)
