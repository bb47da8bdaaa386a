"""Preemption: a SIGTERM (a scheduler's notice) or Ctrl-C becomes a checkpoint and a
clean exit between two steps, on every process at the same step."""

import signal

import jax
import numpy as np
from jax.experimental import multihost_utils


class StopRequest:
  """Remembers a SIGTERM/SIGINT so the loop can checkpoint and exit between steps.

  Use as a context manager around the whole run, so a signal during start-up is kept
  too; the previous handlers come back on exit.
  """

  def __init__(self):
    self.signum = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    self.signum = signum

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  @property
  def name(self) -> str:
    return signal.Signals(self.signum).name if self.signum else 'a stop signal'

  def requested(self, step: int, every: int) -> bool:
    """Whether to stop; across processes only at multiples of ``every`` (log steps), so
    that all processes agree on one step."""
    if jax.process_count() == 1:
      return self.signum is not None
    if step % every:
      return False
    flags = multihost_utils.process_allgather(np.array(self.signum is not None))
    return bool(np.any(flags))
