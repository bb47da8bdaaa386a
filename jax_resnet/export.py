"""Export mode: a checkpoint's weights as one file other code can load."""

import os

import flax.serialization
import jax
import numpy as np
from absl import logging

from jax_resnet import runs


def export_checkpoint(workdir: str, path: str, which: str | int = 'latest') -> str:
  """Writes the ``which`` checkpoint's params and batch statistics to ``path`` (msgpack)."""
  run = runs.load(workdir, which)
  if jax.process_index() == 0:
    write_msgpack(run.variables, path)
  logging.info('Exported step %d to %s.', run.step, path)
  return path


def write_msgpack(variables: dict, path: str) -> None:
  """``variables`` as one msgpack file (flax serialization)."""
  data = flax.serialization.msgpack_serialize(jax.tree.map(np.asarray, variables))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(data)
