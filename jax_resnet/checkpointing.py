"""Orbax checkpoints of the global train state: the only place that touches them.

The state is saved as global arrays, so a checkpoint restores onto any device count.
Beside it goes a small JSON record (the step and the input position) for resuming.
"""

import os
from typing import Optional, Tuple

import jax
import orbax.checkpoint as ocp


def create_manager(workdir: str, keep: int = 3) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints'),
                               options=options)


def save(manager: ocp.CheckpointManager, step: int, state, meta: dict) -> None:
  """Starts an asynchronous save; training continues while it is written."""
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             meta=ocp.args.JsonSave(meta)))


def restore_latest(manager: ocp.CheckpointManager, state) -> Tuple[object, Optional[dict]]:
  """(state, meta) from the newest checkpoint, or (state, None) when there is none.

  ``state`` is a freshly initialised state: its shapes, dtypes and shardings are the
  target, so a checkpoint written on 8 devices restores onto 1 and back.
  """
  step = manager.latest_step()
  if step is None:
    return state, None
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
  return restored['state'], dict(restored['meta'])
