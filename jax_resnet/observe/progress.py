"""Training progress: a live one-line bar on a terminal, plain log lines otherwise.

  progress = Progress(total_steps, steps_per_epoch, batch_size, start_step)
  for step in ...:
    progress.tick(step)                      # every step: host-side only, no device sync
    if step % log_every == 0:
      progress.log(step, summary)            # summary: train_loss, train_top1, learning_rate
  progress.close()

On a terminal the bar (epoch, step, images/s, loss, ETA) is redrawn in place at most
every ``min_interval`` seconds; other log records clear it first, so they print on
clean lines, and the next redraw puts it back under them. When output is not a
terminal (a file, a pipe, a batch job), ``log`` writes one plain log line per call
and ``tick`` writes nothing.

Kept over ``clu.periodic_actions.ReportProgress``, which logs steps/s, percent done and
ETA every N steps or seconds: it has no in-place terminal bar, no images/s and no loss.
"""

import logging as std_logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from typing import TextIO

from absl import logging


def format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


class _ClearBarFilter(std_logging.Filter):
  """Clears the bar before a log record is written to the same terminal."""

  def __init__(self, progress: 'Progress'):
    super().__init__()
    self._progress = progress

  def filter(self, record):
    self._progress.clear()
    return True


class Progress:
  """Reports training progress; see the module docstring."""

  def __init__(
    self,
    total_steps: int,
    steps_per_epoch: int,
    batch_size: int,
    start_step: int = 0,
    stream: TextIO | None = None,
    is_tty: bool | None = None,
    min_interval: float = 0.2,
    log_fn: Callable[..., None] = logging.info,
    clock: Callable[[], float] = time.time,
    epoch_origin: tuple[int, int] = (0, 0),
  ):
    self.total_steps = total_steps
    self.steps_per_epoch = max(1, steps_per_epoch)
    self.epoch_origin = epoch_origin  # Timeline.epoch_origin: where epochs count from
    self.batch_size = batch_size
    self.stream = stream or sys.stderr
    if is_tty is None:
      is_tty = (
        hasattr(self.stream, 'isatty') and self.stream.isatty() and os.environ.get('TERM') != 'dumb'
      )
    self.is_tty = bool(is_tty)
    self.min_interval = min_interval
    self._log_fn = log_fn
    self._clock = clock
    now = clock()
    self._start_time, self._start_step = now, start_step
    self._window = (now, start_step)  # for the rate since the previous log line
    self._last_draw = 0.0
    self._step = start_step
    self._metrics: Mapping[str, float] = {}
    self._drawn = False
    self._ticked = False
    self._filter = None
    if self.is_tty:
      self._filter = _ClearBarFilter(self)
      for handler in self._handlers():
        handler.addFilter(self._filter)

  @staticmethod
  def _handlers():
    """absl's handler and the root logger's (absl's before app.run, or basicConfig's)."""
    handlers = [logging.get_absl_handler()]
    handlers += [h for h in std_logging.getLogger().handlers if h not in handlers]
    return handlers

  def images_per_sec(self, now: float | None = None) -> float:
    """The rate since the first step reported (ticks are dispatches, so approximate)."""
    now = self._clock() if now is None else now
    steps = self._step - self._start_step
    return steps * self.batch_size / max(now - self._start_time, 1e-9)

  def epochs(self, step: int) -> float:
    """Epochs done after ``step`` steps."""
    origin_step, origin_epoch = self.epoch_origin
    return origin_epoch + (step - origin_step) / self.steps_per_epoch

  def eta(self, images_per_sec: float) -> float:
    return (self.total_steps - self._step) * self.batch_size / max(images_per_sec, 1e-9)

  def tick(self, step: int) -> None:
    """Called each step; redraws the bar on a terminal, no more often than min_interval."""
    if not self._ticked:  # time from the first step done: leaves out its compilation
      self._ticked = True
      self._start_time, self._start_step = self._clock(), step
    self._step = step
    if self.is_tty:
      now = self._clock()
      if now - self._last_draw >= self.min_interval or step == self.total_steps:
        self._draw(now)

  def log(self, step: int, metrics: Mapping[str, float]) -> None:
    """At a log step, with the averaged train metrics (train_loss, train_top1, ...)."""
    self._step = step
    self._metrics = dict(metrics)
    now = self._clock()
    if self.is_tty:
      self._draw(now)
      return
    window_time, window_step = self._window
    rate = (step - window_step) * self.batch_size / max(now - window_time, 1e-9)
    self._window = (now, step)
    self._log_fn(
      'step %d/%d  epoch %.2f  loss %.4f  top1 %.4f  lr %.4g  %.0f img/s  ETA %s',
      step,
      self.total_steps,
      self.epochs(step),
      metrics.get('train_loss', float('nan')),
      metrics.get('train_top1', float('nan')),
      metrics.get('learning_rate', float('nan')),
      rate,
      format_eta(self.eta(rate)),
    )

  def line(self, now: float | None = None, width: int | None = None) -> str:
    """The bar's text: epoch, a bar over the epoch, step, img/s, loss, ETA."""
    now = self._clock() if now is None else now
    width = width or shutil.get_terminal_size((100, 20)).columns
    epoch = max(1, math.ceil(self.epochs(self._step)))  # the epoch the step is in
    num_epochs = math.ceil(self.epochs(self.total_steps))
    rate = self.images_per_sec(now)
    parts = [
      f'epoch {min(epoch, num_epochs)}/{num_epochs}',
      f'step {self._step}/{self.total_steps}',
      f'{rate:.0f} img/s',
    ]
    if 'train_loss' in self._metrics:
      parts.append(f'loss {self._metrics["train_loss"]:.4f}')
    parts.append(f'ETA {format_eta(self.eta(rate)) if rate > 0 else "?"}')
    text = '  '.join(parts)
    bar_width = min(30, width - len(text) - 4)
    if bar_width >= 5:
      done = self._step / max(self.total_steps, 1)
      filled = int(round(done * bar_width))
      text = f'[{"#" * filled}{"." * (bar_width - filled)}] ' + text
    return text[: max(width - 1, 10)]

  def _draw(self, now: float) -> None:
    self.stream.write('\r\x1b[K' + self.line(now))
    self.stream.flush()
    self._drawn = True
    self._last_draw = now

  def clear(self) -> None:
    """Erases the bar (a log line is about to be written); the next tick redraws it."""
    if self._drawn:
      self.stream.write('\r\x1b[K')
      self.stream.flush()
      self._drawn = False
      self._last_draw = 0.0

  def close(self) -> None:
    """Leaves the final bar on its own line and stops watching log records."""
    if self.is_tty and self._drawn:
      self.stream.write('\n')
      self.stream.flush()
      self._drawn = False
    if self._filter is not None:
      for handler in self._handlers():
        handler.removeFilter(self._filter)
      self._filter = None
