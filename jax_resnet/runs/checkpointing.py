"""Orbax checkpoints of the global train state: the only place that touches them.

The state is saved as global arrays, so a checkpoint restores onto any device count.
Beside it goes a small JSON record, the meta: the step, the input position, the config
and the data set's description (``DatasetInfo``), so a run resumes exactly where it
stopped, a changed config can be checked against it, and eval, export and predict can
rebuild the model from the checkpoint alone. Two managers: ``checkpoints/`` keeps the
newest few, ``checkpoints_best/`` the best one by eval top-1.
"""

import functools
import os
import re
from collections.abc import Callable

import flax.serialization
import jax
import orbax.checkpoint as ocp
from absl import logging

from jax_resnet import trees
from jax_resnet.errors import NotFoundError, UserError

LATEST_DIR = 'checkpoints'
BEST_DIR = 'checkpoints_best'


def _manager(
  directory: str, keep: int, best: bool = False, read_only: bool = False
) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
    max_to_keep=keep,
    create=not read_only,
    read_only=read_only,
    enable_async_checkpointing=True,
    # A save cut short (kill, full disk) leaves a tmp dir; only a writer cleans up, so a
    # reader never deletes a save in progress.
    cleanup_tmp_directories=not read_only,
    best_fn=(lambda metrics: metrics['eval_top1']) if best else None,
    best_mode='max',
  )
  # The handlers named up front, so that a manager that has not saved yet can still read a
  # checkpoint's tree metadata (to tell an incompatible checkpoint from a damaged one).
  handlers = {'state': ocp.StandardCheckpointHandler(), 'meta': ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def failure_reason(error: BaseException) -> str:
  """Why a write failed, in a few words: the OS's reason (TensorStore reports it as
  os_error_code) where there is one, else the error's first line."""
  chain = []
  while error is not None and error not in chain:
    chain.append(error)
    error = error.__cause__ or error.__context__
  for e in chain:
    code = re.search(r"os_error_code='?(\d+)", str(e))
    if code:
      return os.strerror(int(code.group(1)))
    if isinstance(e, OSError) and e.strerror:
      return e.strerror + (f': {e.filename}' if e.filename else '')
  first = chain[0]
  return f'{type(first).__name__}: {str(first).splitlines()[0][:200]}'


class IncompatibleCheckpointError(UserError):
  """An intact checkpoint whose arrays do not fit the state the current config builds."""


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
        f'Saving a checkpoint in {self.directory} failed: {failure_reason(e)}'
      ) from e

  return wrapper


class Checkpoints:
  """The latest-N and best-by-top-1 checkpoints of one workdir.

  ``read_only=True`` (eval, export, predict) creates nothing and deletes nothing, so it
  works on a read-only mount and beside a run that is still training.
  """

  def __init__(self, workdir: str, keep: int = 3, read_only: bool = False):
    workdir = os.path.abspath(workdir)
    self.read_only = read_only
    self.directory = os.path.join(workdir, LATEST_DIR)
    self.best_directory = os.path.join(workdir, BEST_DIR)
    self.latest = _manager(self.directory, keep, read_only=read_only)
    self.best = _manager(self.best_directory, 1, best=True, read_only=read_only)

  @_reporting_save_errors
  def save(self, step: int, state, meta: dict) -> None:
    """Starts an asynchronous save; training continues while it is written."""
    if step in self.latest.all_steps():
      return
    self.latest.save(step, args=_save_args(state, meta))

  @_reporting_save_errors
  def save_best(self, step: int, state, meta: dict, eval_top1: float) -> None:
    self.best.save(step, args=_save_args(state, meta), metrics={'eval_top1': eval_top1})

  def restore(
    self, which: str | int, template_for: Callable[[dict], object]
  ) -> tuple[object, dict | None]:
    """(state, meta) from a checkpoint, or (None, None) when there is none.

    ``which`` is 'latest', 'best' or a step number. The meta is read first;
    ``template_for(meta)`` returns the state to restore into (a fresh state or its
    ``jax.ShapeDtypeStruct`` tree, with the shardings wanted), or raises to refuse the
    checkpoint (an incompatible config). Because the target's shardings decide, a
    checkpoint written on 8 devices restores onto 1 and back. A latest checkpoint that
    fails to restore (a partial or corrupt write) is set aside with a warning and the
    next older one is used.
    """
    if which == 'best':
      manager, steps = self.best, [self.best.best_step()]
      steps = [s for s in steps if s is not None]
    elif which == 'latest':
      manager, steps = self.latest, sorted(self.latest.all_steps(), reverse=True)
    else:
      manager, steps = self.latest, [int(which)]
      if int(which) not in self.latest.all_steps():
        raise NotFoundError(
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
      template = jax.tree.map(ocp.utils.to_shape_dtype_struct, template_for(meta))
      target = _restore_target(manager, step, template)
      try:
        restored = manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
        )
        return _from_target(template, restored['state']), meta
      except Exception as e:
        differences = _differences(manager, step, target)
        if differences:  # intact, but not the model this config builds: not damage
          raise IncompatibleCheckpointError(
            f'The checkpoint at step {step} in {manager.directory} does not fit the model and '
            f'optimizer this config builds (expected: this config, found: the checkpoint; '
            f'{"; ".join(differences[:5])}'
            f'{" ..." if len(differences) > 5 else ""}). It is intact and left as it is: '
            'use the config it was written with (saved in the checkpoint), or a new --workdir.'
          ) from e
        self._set_aside(manager, step, which, e)
    return None, None

  def best_step(self) -> int | None:
    return self.best.best_step()

  def set_aside(self) -> list[str]:
    """The damaged checkpoints renamed STEP.corrupt-N so far (by any run), newest first."""
    if not os.path.isdir(self.directory):
      return []
    names = [n for n in os.listdir(self.directory) if '.corrupt-' in n]
    return [
      os.path.join(self.directory, n)
      for n in sorted(names, key=lambda n: int(n.split('.')[0]), reverse=True)
    ]

  def _set_aside(self, manager, step, which, error):
    """Renames a damaged checkpoint to STEP.corrupt-N (nothing is deleted); a reader
    only skips it."""
    if which != 'latest':
      raise error
    if self.read_only:
      logging.warning(
        'Checkpoint at step %d in %s cannot be read (%s: %s); trying the previous one.',
        step,
        manager.directory,
        type(error).__name__,
        str(error)[:200],
      )
      return
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


def _restore_target(manager, step: int, template):
  """The restore target in the checkpoint's own layout: its saved tree (nested dicts and
  lists) with ``template``'s shapes, dtypes and shardings at each saved path. A field the
  state gained later (the weight EMA, say) and left None is simply not asked for, so a
  checkpoint written before it existed restores as it always did. Falls back to the
  template when the saved tree cannot be read (the restore then says what is wrong)."""
  try:
    saved = manager.item_metadata(step)['state'].tree
  except Exception:
    return template
  wanted = trees.flatten(flax.serialization.to_state_dict(template))
  missing = object()

  def build(tree, prefix):
    if isinstance(tree, dict):
      return {k: build(v, (*prefix, str(k))) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
      return [build(v, (*prefix, str(i))) for i, v in enumerate(tree)]
    return wanted.get('/'.join(prefix), missing if tree is not None else None)

  target = build(saved, ())
  unsaved = {p for p, leaf in wanted.items() if leaf is not None} - set(trees.flatten(saved))
  if unsaved or any(leaf is missing for leaf in trees.flatten(target).values()):
    return template  # a real difference: the restore fails and says which
  return target


def _from_target(template, restored):
  """What the restore returned, as ``template``'s type (a TrainState)."""
  if not isinstance(restored, dict):
    return restored  # restored into the template itself

  def fill(wanted, got):
    """``got`` in ``wanted``'s (state-dict) layout: lists become index-keyed dicts, and
    what was saved as None (an empty optimizer state, an unused field) comes back as the
    template has it."""
    if got is None:
      return wanted
    if isinstance(wanted, dict):
      got = dict(enumerate(got)) if isinstance(got, list) else got
      return {
        k: fill(v, got.get(k, got.get(int(k)) if k.isdigit() else None)) for k, v in wanted.items()
      }
    return got

  state_dict = fill(flax.serialization.to_state_dict(template), restored)
  return flax.serialization.from_state_dict(template, state_dict)


def _differences(manager, step: int, target) -> list[str]:
  """How a checkpoint's saved tree differs from ``target`` (keys and shapes); empty when
  they agree or the saved tree cannot be read (then the checkpoint is damaged)."""
  try:
    saved = trees.shapes(manager.item_metadata(step)['state'].tree)
  except Exception:  # unreadable metadata: damage, not a mismatch
    return []
  wanted = trees.shapes(flax.serialization.to_state_dict(target))
  if not saved:
    return []
  return trees.differences(dict(sorted(wanted.items())), dict(sorted(saved.items())))


def _save_args(state, meta):
  return ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
