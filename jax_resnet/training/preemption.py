"""Preemption: a SIGTERM (a scheduler's notice) or Ctrl-C becomes a checkpoint and a
clean exit between two steps, on every process at the same step.

``catch_early`` runs as main.py's first statement, so a signal that arrives while the
program is still starting (imports) is remembered, not fatal; ``StopRequest`` takes the
remembered signal over. While the run starts (``StopRequest.starting``: the data scan and
image verification, the restore) there is nothing to save yet, so a signal ends the
start-up at once instead of waiting for it to finish; sections that must not be cut
(moving a history aside) run ``uninterrupted``. Modes that do not train give the signals
back their default behaviour with ``release_early``.
"""

import contextlib
import os
import signal
from collections.abc import Callable

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_early: list[int] = []  # signals received before a StopRequest took over


def catch_early() -> None:
  for sig in SIGNALS:
    signal.signal(sig, lambda signum, frame: _early.append(signum))


def release_early() -> None:
  """Default handlers again; a signal caught early is delivered now."""
  signal.signal(signal.SIGTERM, signal.SIG_DFL)
  signal.signal(signal.SIGINT, signal.default_int_handler)
  for signum in _early:
    os.kill(os.getpid(), signum)


class StoppedWhileStarting(BaseException):  # noqa: N818 (not an error: a stop)
  """A signal while the run was starting: raised from the handler, so it cuts short
  whatever start-up work is in progress; a BaseException, so that no ``except Exception``
  in that work swallows it."""


class StopRequest:
  """Remembers a SIGTERM/SIGINT so the loop can checkpoint and exit between steps.

  Use as a context manager around the whole run; the previous handlers come back on
  exit.
  """

  def __init__(self):
    self.signum = _early[-1] if _early else None
    self._previous = {}
    self._starting = False

  def __enter__(self):
    for sig in SIGNALS:
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    self.signum = signum
    if self._starting:
      self._starting = False
      raise StoppedWhileStarting(signum)

  @contextlib.contextmanager
  def starting(self):
    """Inside, a signal (or one received earlier) raises StoppedWhileStarting."""
    if self.signum is not None:
      raise StoppedWhileStarting(self.signum)
    self._starting = True
    try:
      yield
    finally:
      self._starting = False

  @contextlib.contextmanager
  def uninterrupted(self):
    """Inside ``starting``: a signal waits for the end of this section."""
    starting, self._starting = self._starting, False
    try:
      yield
    finally:
      self._starting = starting
    if starting and self.signum is not None:
      self._starting = False
      raise StoppedWhileStarting(self.signum)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  @property
  def name(self) -> str:
    return signal.Signals(self.signum).name if self.signum else 'a stop signal'

  def requested(self, step: int, at: Callable[[int], bool]) -> bool:
    """Whether to stop; across processes only at steps where ``at(step)`` holds (a
    ``timeline.Every``: the log steps), so that all processes agree on one step."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
      return self.signum is not None
    if not at(step):
      return False
    flags = multihost_utils.process_allgather(np.array(self.signum is not None))
    return bool(np.any(flags))
