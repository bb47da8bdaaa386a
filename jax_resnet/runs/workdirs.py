"""The run directory: checked before anything is computed, locked while a run trains.

A training run holds an OS-level lock (``fcntl.flock``) on ``WORKDIR/.lock`` for as long
as its process lives: the kernel drops it when the process ends, however it ends
(SIGKILL included), so no stale lock survives. A second training command on the same
workdir stops at start, naming the holder's host and PID. Eval, export and predict take
no lock: they only read.
"""

import contextlib
import fcntl
import json
import os
import socket
import sys
import time

from jax_resnet.errors import OutputError, TrainingError

LOCK_FILE = '.lock'
# What a run leaves in its workdir, moved aside together by --start_over.
HISTORY = (
  'checkpoints',
  'checkpoints_best',
  'metrics.jsonl',
  'run.json',
  'curves.png',
  'class_index.json',
  'export',
  'evals.jsonl',
  'timing.json',
  # Experiment trackers (observe/trackers.py): a new run is a new tracker run.
  'wandb_run_id',
  'mlflow_run_id',
  'wandb',
)
HISTORY_PREFIXES = ('events.out.tfevents.', 'verified_')


def ensure_writable(path: str, what: str, *, directory: bool = False, error=OutputError) -> None:
  """Proves before anything is computed that ``path`` can be written: a file's folder (or,
  with ``directory``, the folder itself) is created and takes a file, and the path is not
  the other kind. Otherwise one ``error`` naming ``what``, the path and the reason."""
  if directory and os.path.exists(path) and not os.path.isdir(path):
    raise error(f'Cannot write {what} to {path}: it is a file, not a directory.')
  if not directory and os.path.isdir(path):
    raise error(f'Cannot write {what} to {path}: it is a directory.')
  folder = path if directory else os.path.dirname(os.path.abspath(path))
  try:
    os.makedirs(folder, exist_ok=True)
    probe = os.path.join(folder, f'.write_test-{os.getpid()}')
    try:
      with open(probe, 'w') as f:  # some bytes: a full disk still takes an empty file
        f.write('ok')
    finally:
      if os.path.exists(probe):
        os.remove(probe)
  except OSError as e:
    raise error(f'Cannot write {what} to {path}: {e.strerror or e}.') from None


def check_workdir(workdir: str) -> None:
  """A training run's workdir takes files, and nothing is in the way of its checkpoints;
  a TrainingError saying what is in the way otherwise."""
  ensure_writable(workdir, 'the run (--workdir)', directory=True, error=TrainingError)
  for sub in ('checkpoints', 'checkpoints_best'):
    path = os.path.join(workdir, sub)
    if os.path.exists(path) and not os.path.isdir(path):
      raise TrainingError(
        f'{path} is a file, but the checkpoints go there: move it away or choose another --workdir.'
      )


@contextlib.contextmanager
def lock(workdir: str):
  """Holds the workdir's training lock, or raises TrainingError naming its holder."""
  path = os.path.join(workdir, LOCK_FILE)
  handle = open(path, 'a+')
  try:
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    handle.seek(0)
    holder = _describe(handle.read())
    handle.close()
    raise TrainingError(
      f'--workdir={workdir} is in use by another training run ({holder}). Wait for it to '
      'finish, stop it, or train in another --workdir.'
    ) from None
  handle.seek(0)
  handle.truncate()
  handle.write(
    json.dumps(
      {
        'host': socket.gethostname(),
        'pid': os.getpid(),
        'started': time.strftime('%Y-%m-%d %H:%M:%S'),
        'command': ' '.join(sys.argv),
      }
    )
  )
  handle.flush()
  try:
    yield
  finally:
    fcntl.flock(handle, fcntl.LOCK_UN)
    handle.close()


def _describe(text: str) -> str:
  try:
    holder = json.loads(text)
    return f'PID {holder["pid"]} on host {holder["host"]}, started {holder["started"]}'
  except (ValueError, KeyError, TypeError):
    return 'holder unknown'


def has_history(workdir: str) -> bool:
  """Whether a run has trained here before (checkpoints, set aside or not, or metrics)."""
  return any(os.path.exists(os.path.join(workdir, name)) for name in HISTORY[:3])


def move_history_aside(workdir: str) -> str:
  """Moves what an earlier run left (checkpoints, metrics, curves, TensorBoard events)
  into ``WORKDIR/previous-N/``; nothing is deleted. Returns that directory."""
  n = 0
  while os.path.exists(os.path.join(workdir, f'previous-{n}')):
    n += 1
  target = os.path.join(workdir, f'previous-{n}')
  os.makedirs(target)
  for name in sorted(os.listdir(workdir)):
    if name in HISTORY or name.startswith(HISTORY_PREFIXES):
      os.rename(os.path.join(workdir, name), os.path.join(target, name))
  return target
