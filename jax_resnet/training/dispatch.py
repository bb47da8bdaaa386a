"""What happens at each step of the loop, decided once per dispatch, and how the steps
are dispatched.

``Events`` turns the config's periods into ``StepActions``: after a dispatch that ended
at a step, whether to read the train metrics, log them, check the weights, evaluate,
save and stop. ``Stepper`` runs one dispatch of k train steps (``steps_per_dispatch``),
compiled ahead of time per (k, training image size); ``ProgressiveResizing`` gives that
size per epoch.
"""

import collections
import dataclasses
from collections.abc import Callable

import jax
import numpy as np
from absl import logging

from jax_resnet.models import model_summary
from jax_resnet.training.step_functions import StepOptions, Teacher, make_train_step
from jax_resnet.training.timeline import Every, Timeline


@dataclasses.dataclass(frozen=True)
class StepActions:
  """What the loop does once a dispatch has reached a step."""

  log: bool  # write the train metrics (every log_every_steps, and the last step)
  evaluate: bool  # run the evaluators, keep the best checkpoint
  save: bool  # write a checkpoint
  stop: bool  # a SIGTERM or Ctrl-C before the last step: save, then stop

  @property
  def read_metrics(self) -> bool:
    """Wait for the dispatched steps and check the loss (log and checkpoint steps)."""
    return self.log or self.save

  @property
  def check_weights(self) -> bool:
    """Nothing non-finite is evaluated for the best checkpoint or saved."""
    return self.evaluate or self.save


@dataclasses.dataclass(frozen=True)
class Events:
  """The steps at which the loop looks at the state."""

  log: Every
  evaluate: Every  # eval_every_epochs=0: at the end only
  checkpoint: Every  # checkpoint_every_epochs and checkpoint_every_steps
  epoch_end: Every  # a multi-step dispatch ends here (the image size may change)
  total_steps: int

  @classmethod
  def of(
    cls,
    timeline: Timeline,
    log_every_steps: int,
    eval_every_epochs: float,
    checkpoint_every_steps: int,
    checkpoint_every_epochs: float,
  ) -> 'Events':
    return cls(
      log=timeline.every(steps=log_every_steps),
      evaluate=timeline.every(epochs=eval_every_epochs),
      checkpoint=timeline.every(steps=checkpoint_every_steps, epochs=checkpoint_every_epochs),
      epoch_end=timeline.every(epochs=1),
      total_steps=timeline.total_steps,
    )

  def at(self, step: int, stop_requested: bool) -> StepActions:
    """The actions at ``step``: the last step logs, evaluates and saves; a stop request
    saves (a checkpoint to resume from) and stops, unless the run ends there anyway."""
    last = step == self.total_steps
    return StepActions(
      log=last or self.log(step),
      evaluate=last or self.evaluate(step),
      save=last or stop_requested or self.checkpoint(step),
      stop=stop_requested and not last,
    )

  def dispatch_size(self, step: int, steps_per_dispatch: int) -> int:
    """How many steps the next dispatch runs: at most ``steps_per_dispatch``, ending no
    later than the next multiple of any period (log, eval, checkpoint, epoch) or the end."""
    until = [steps_per_dispatch, self.total_steps - step]
    for every in (self.log, self.evaluate, self.checkpoint, self.epoch_end):
      until += every.steps_to_next(step)
    return min(until)


@dataclasses.dataclass(frozen=True)
class ProgressiveResizing:
  """FFCV's progressive resizing: the training resolution grows linearly from the first
  to the second of ``progressive_resizing_sizes`` over ``progressive_resizing_epochs``
  (start, end; () is the whole run), rounded to ``progressive_resizing_multiple`` so that
  only a few sizes compile. Off when the sizes are ()."""

  progressive_resizing_sizes: tuple[int, ...] = ()
  progressive_resizing_epochs: tuple[float, ...] = ()
  progressive_resizing_multiple: int = 32

  def size_at(self, epoch: int, num_epochs: float) -> int:
    """The training image size of ``epoch``; 0 when off (the data's own)."""
    if not self.progressive_resizing_sizes:
      return 0
    start, end = self.progressive_resizing_sizes
    first, last = self.progressive_resizing_epochs or (0, num_epochs)
    size = float(np.interp(epoch, [first, last], [start, end]))
    multiple = self.progressive_resizing_multiple
    size = int(round(size / multiple)) * multiple
    return int(min(max(size, min(start, end)), max(start, end)))


class RunAhead:
  """Bounds how far the host dispatches ahead of the device between syncs: each queued
  dispatch holds its batch on the device (154 MB for 1,024 ImageNet images). After a
  dispatch, ``add`` waits for the one ``limit`` dispatches back, never the newest, so the
  device always has ``limit`` dispatches queued and never idles for it."""

  def __init__(self, limit: int = 4):
    self.limit = limit
    self._queued = collections.deque()

  def add(self, outputs) -> None:
    """``outputs``: a dispatch's outputs (its metrics: small, done when it is)."""
    self._queued.append(outputs)
    while len(self._queued) > self.limit:
      jax.block_until_ready(self._queued.popleft())

  def clear(self) -> None:
    """After a sync at a log, eval or checkpoint step nothing is left in flight."""
    self._queued.clear()


class Stepper:
  """Runs one dispatch of k train steps (the single step, or k in one call), each
  program compiled ahead of time on first use (the first logging its FLOPs), at the
  image size of the step's epoch: one compilation per (k, size)."""

  def __init__(
    self,
    options_at_size: Callable[[int], StepOptions],
    learning_rate_fn,
    mesh,
    timeline: Timeline,
    resizing: ProgressiveResizing,
    teacher: Teacher | None,
    compiling,
  ):
    """``options_at_size(size)``: the step options training at ``size`` (0: the data's);
    ``compiling``: a context manager that times the compilations."""
    self._options_at_size, self._learning_rate_fn = options_at_size, learning_rate_fn
    self._mesh, self._timeline, self._resizing = mesh, timeline, resizing
    self._teacher, self._compiling = teacher, compiling
    self._compiled = {}  # (steps in the dispatch, image size) -> compiled step

  def __call__(self, state, batches: list, step: int):
    timeline = self._timeline
    size = self._resizing.size_at(timeline.epoch_and_batch(step)[0], timeline.num_epochs)
    k = len(batches)  # a dispatch cut short by a period end compiles its own length
    args = (state, batches if k > 1 else batches[0])
    if (k, size) not in self._compiled:
      fn = make_train_step(
        self._options_at_size(size),
        self._learning_rate_fn,
        self._mesh,
        steps_per_dispatch=k,
        teacher=self._teacher,
      )
      with self._compiling():
        compiled = fn.lower(*args).compile()
      if k == 1 and not any(key[0] == 1 for key in self._compiled):
        log_flops(compiled, batches[0])
      self._compiled[(k, size)] = compiled
    return self._compiled[(k, size)](*args)

  def hlo_texts(self) -> list[str]:
    """The compiled steps' HLO, for the profile's shapes."""
    return [c.as_text() for c in self._compiled.values()]


def log_flops(compiled, batch) -> None:
  """Logs XLA's FLOPs per training image, from the single step (a multi-step program's
  scan body may be counted once)."""
  flops = model_summary.xla_flops(compiled)
  if flops:
    # The compiled SPMD program is one device's share of the global batch.
    devices = batch['label'].sharding.num_devices
    logging.info(
      'Training FLOPs per image: %.4g G (XLA cost analysis of the train step).',
      flops * devices / batch['label'].shape[0] / 1e9,
    )
