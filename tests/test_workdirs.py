"""The workdir: what is in the way is named at start; one training run at a time."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from jax_resnet.errors import TrainingError
from jax_resnet.runs import workdirs


def test_a_workdir_that_is_a_file_is_named_as_a_file(tmp_path):
  path = tmp_path / 'run'
  path.write_text('')
  with pytest.raises(TrainingError, match=f'to {path}: it is a file, not a directory'):
    workdirs.check_workdir(str(path))


def test_a_checkpoints_path_that_is_a_file_fails_at_start(tmp_path):
  (tmp_path / 'checkpoints').write_text('')
  with pytest.raises(TrainingError, match='checkpoints is a file, but the checkpoints go there'):
    workdirs.check_workdir(str(tmp_path))


def test_second_lock_names_the_holder(tmp_path):
  with workdirs.lock(str(tmp_path)):
    with pytest.raises(TrainingError) as error:
      with workdirs.lock(str(tmp_path)):
        pass
  message = str(error.value)
  assert f'PID {os.getpid()} on host {socket.gethostname()}' in message
  assert 'in use by another training run' in message
  with workdirs.lock(str(tmp_path)):  # released on exit
    pass


def test_lock_dies_with_its_process(tmp_path):
  """SIGKILL leaves no stale lock: the kernel drops a flock with its process."""
  holder = subprocess.Popen(
    [
      sys.executable,
      '-c',
      'import sys, time; from jax_resnet.runs import workdirs\n'
      'with workdirs.lock(sys.argv[1]):\n  print("locked", flush=True); time.sleep(60)',
      str(tmp_path),
    ],
    stdout=subprocess.PIPE,
    text=True,
  )
  assert holder.stdout.readline().strip() == 'locked'
  with pytest.raises(TrainingError, match=f'PID {holder.pid}'):
    with workdirs.lock(str(tmp_path)):
      pass
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  time.sleep(0.1)
  with workdirs.lock(str(tmp_path)):
    pass


def test_start_over_moves_the_history_aside_and_deletes_nothing(tmp_path):
  for name in ('checkpoints/22', 'checkpoints_best/22'):
    (tmp_path / name).mkdir(parents=True)
  (tmp_path / 'metrics.jsonl').write_text('{"step": 1}\n')
  (tmp_path / 'events.out.tfevents.1.host').write_text('x')
  (tmp_path / 'jax_resnet.log').write_text('kept')
  # A new run is a new tracker run too: W&B would drop steps that go back to 0.
  for name in ('wandb_run_id', 'mlflow_run_id', 'evals.jsonl'):
    (tmp_path / name).write_text('x')
  assert workdirs.has_history(str(tmp_path))
  moved = workdirs.move_history_aside(str(tmp_path))
  assert moved == str(tmp_path / 'previous-0')
  assert sorted(os.listdir(moved)) == [
    'checkpoints',
    'checkpoints_best',
    'evals.jsonl',
    'events.out.tfevents.1.host',
    'metrics.jsonl',
    'mlflow_run_id',
    'wandb_run_id',
  ]
  assert (tmp_path / 'previous-0' / 'checkpoints' / '22').is_dir()
  assert not workdirs.has_history(str(tmp_path))
  assert (tmp_path / 'jax_resnet.log').read_text() == 'kept'
  assert workdirs.move_history_aside(str(tmp_path)) == str(tmp_path / 'previous-1')
