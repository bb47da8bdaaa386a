"""Orbax checkpoints of the global train state: the only place that touches them.

The state is saved as global arrays, so a checkpoint restores onto any device count.
Beside it goes a small JSON record: the step, the input position and the config, so a
run resumes exactly where it stopped and a changed config can be checked against it.
Two managers: ``checkpoints/`` keeps the newest few, ``checkpoints_best/`` the best one
by eval top-1.
"""

import functools
import os

import flax.serialization
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging


def _manager(directory: str, keep: int, best: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
    max_to_keep=keep,
    create=True,
    enable_async_checkpointing=True,
    cleanup_tmp_directories=True,  # a save cut short (kill, full disk) leaves a tmp dir
    best_fn=(lambda metrics: metrics['eval_top1']) if best else None,
    best_mode='max',
  )
  return ocp.CheckpointManager(directory, options=options)


class CheckpointSaveError(OSError):
  """A checkpoint could not be written (full disk, lost permissions, ...)."""


def _reporting_save_errors(method):
  """Turns whatever orbax raises for a failed (possibly earlier, async) save into one error."""

  @functools.wraps(method)
  def wrapper(self, *args, **kwargs):
    try:
      return method(self, *args, **kwargs)
    except Exception as e:
      raise CheckpointSaveError(
        f'Saving a checkpoint in {self.directory} failed: {type(e).__name__}: {str(e)[:300]}'
      ) from e

  return wrapper


class Checkpoints:
  """The latest-N and best-by-top-1 checkpoints of one workdir."""

  def __init__(self, workdir: str, keep: int = 3):
    workdir = os.path.abspath(workdir)
    self.directory = os.path.join(workdir, 'checkpoints')
    self.latest = _manager(self.directory, keep)
    self.best = _manager(os.path.join(workdir, 'checkpoints_best'), 1, best=True)

  @_reporting_save_errors
  def save(self, step: int, state, meta: dict) -> None:
    """Starts an asynchronous save; training continues while it is written."""
    if step in self.latest.all_steps():
      return
    self.latest.save(step, args=_save_args(state, meta))

  @_reporting_save_errors
  def save_best(self, step: int, state, meta: dict, eval_top1: float) -> None:
    self.best.save(step, args=_save_args(state, meta), metrics={'eval_top1': eval_top1})

  def restore(self, state, which: str | int = 'latest', check=None) -> tuple[object, dict | None]:
    """(state, meta) from a checkpoint, or (state, None) when there is none.

    ``which`` is 'latest', 'best' or a step number. ``state`` is a freshly initialised
    state: its shapes, dtypes and shardings are the target, so a checkpoint written on 8
    devices restores onto 1 and back. A latest checkpoint that fails to restore (a
    partial or corrupt write) is set aside with a warning and the next older one is used.
    ``check(meta)`` runs before the state is read, to refuse an incompatible config.
    """
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    if which == 'best':
      manager, steps = self.best, [self.best.best_step()]
      steps = [s for s in steps if s is not None]
    elif which == 'latest':
      manager, steps = self.latest, sorted(self.latest.all_steps(), reverse=True)
    else:
      manager, steps = self.latest, [int(which)]
      if int(which) not in self.latest.all_steps():
        raise FileNotFoundError(
          f'No checkpoint at step {which} in {self.directory}; '
          f'available: {sorted(self.latest.all_steps())}.'
        )
    for step in steps:
      try:
        meta = dict(
          manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
        )
      except Exception as e:  # orbax raises many kinds for a damaged directory
        self._set_aside(manager, step, which, e)
        continue
      if check is not None:
        check(meta)  # a config mismatch is the user's to fix, not damage to skip
      try:
        restored = manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
        )
        return restored['state'], meta
      except Exception as e:
        self._set_aside(manager, step, which, e)
    return state, None

  def _set_aside(self, manager, step, which, error):
    """Renames a damaged checkpoint to STEP.corrupt-N (nothing is deleted)."""
    if which != 'latest':
      raise error
    path = os.path.join(str(manager.directory), str(step))
    n = 0
    while os.path.exists(f'{path}.corrupt-{n}'):
      n += 1
    if jax.process_index() == 0:
      os.rename(path, f'{path}.corrupt-{n}')
    manager.reload()
    logging.warning(
      'Checkpoint at step %d in %s is incomplete or corrupt (%s: %s); moved '
      'it to %s.corrupt-%d and trying the previous one.',
      step,
      manager.directory,
      type(error).__name__,
      str(error)[:200],
      step,
      n,
    )

  @_reporting_save_errors
  def wait(self) -> None:
    """Blocks until pending saves are on disk; raises if a save failed."""
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    self.best.close()


def _save_args(state, meta):
  return ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))


def export_variables(state, path: str) -> None:
  """Writes params and batch statistics as one msgpack file (flax serialization)."""
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  data = flax.serialization.msgpack_serialize(jax.tree.map(np.asarray, variables))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(data)


def load_variables(path: str) -> dict:
  """The variables dict written by ``export_variables``, ready for ``model.apply``."""
  with open(path, 'rb') as f:
    return flax.serialization.msgpack_restore(f.read())
