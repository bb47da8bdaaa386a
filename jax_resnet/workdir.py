"""The run directory: checked before anything is computed."""

import os

from jax_resnet.errors import TrainingError


def ensure_writable(workdir: str) -> None:
  """Creates ``workdir`` if needed and proves it takes a file, or raises TrainingError."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, '.write_test')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise TrainingError(
      f'Cannot write to --workdir={workdir}: {e}. Choose a writable directory.'
    ) from None
