"""Never lose a run: exact resume after SIGKILL, SIGTERM, damaged checkpoints, NaN."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, run_main

ARGS = [
  '--config=configs/default.py',
  '--config.image_size=8',
  '--config.batch_size=64',
  '--config.num_epochs=1',
  '--config.checkpoint_every_steps=3',
  '--config.log_every_steps=1',
  '--config.eval_every_epochs=1',
]  # 22 steps


def export(workdir, which='latest'):
  """The exported variables, through main.py's --mode=export, as msgpack bytes."""
  path = os.path.join(workdir, f'export-{which}.msgpack')
  result = run_main(
    [
      *ARGS,
      f'--workdir={workdir}',
      '--mode=export',
      f'--checkpoint={which}',
      f'--export_path={path}',
    ]
  )
  assert result.returncode == 0, result.stderr[-3000:]
  with open(path, 'rb') as f:
    return f.read()


def final_state(workdir):
  """The newest checkpoint's whole train state as numpy arrays (read in this process)."""
  import warnings

  import jax
  import orbax.checkpoint as ocp

  directory = os.path.join(workdir, 'checkpoints')
  step = max(int(s) for s in os.listdir(directory) if s.isdigit())
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    state = ocp.PyTreeCheckpointer().restore(os.path.join(directory, str(step), 'state'))
  return step, [np.asarray(x) for x in jax.tree.leaves(state)]


def assert_same_state(workdir, expected):
  step, leaves = final_state(workdir)
  assert step == expected[0] == 22
  assert len(leaves) == len(expected[1])
  for a, b in zip(leaves, expected[1]):
    np.testing.assert_array_equal(a, b)  # bit for bit


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """An uninterrupted run and its final train state."""
  workdir = str(tmp_path_factory.mktemp('reference'))
  result = run_main([*ARGS, f'--workdir={workdir}'])
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, final_state(workdir)


def last_logged_step(workdir):
  try:
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      return max([json.loads(line)['step'] for line in f if line.strip()] or [0])
  except (FileNotFoundError, json.JSONDecodeError):
    return 0


def start_and_signal(workdir, at_step, signum, extra_delay=0.0):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
  proc = subprocess.Popen(
    [sys.executable, os.path.join(ROOT, 'main.py'), *ARGS, f'--workdir={workdir}'],
    cwd=ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  deadline = time.time() + 300
  while last_logged_step(workdir) < at_step and proc.poll() is None:
    assert time.time() < deadline
    time.sleep(0.02)
  time.sleep(extra_delay)
  proc.send_signal(signum)
  out, err = proc.communicate(timeout=300)
  return proc.returncode, out, err


@pytest.mark.parametrize('seed', [0, 1])
def test_sigkill_at_a_random_step_then_resume_is_bit_exact(reference, tmp_path, seed):
  _, expected = reference
  rng = random.Random(seed)
  workdir = str(tmp_path / 'run')
  code, _, _ = start_and_signal(workdir, rng.randint(2, 18), signal.SIGKILL, rng.uniform(0, 0.3))
  assert code == -signal.SIGKILL
  resumed = run_main([*ARGS, f'--workdir={workdir}'])
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert_same_state(workdir, expected)


def test_sigterm_saves_and_exits_cleanly_then_resumes_exactly(reference, tmp_path):
  _, expected = reference
  workdir = str(tmp_path / 'run')
  code, out, err = start_and_signal(workdir, 7, signal.SIGTERM)
  assert code == 0, err[-3000:]
  assert 'Received SIGTERM' in err and 'Rerun the same command to resume' in err
  stopped = int(out.split('stopped at step ')[1].split(';')[0])
  assert 7 <= stopped < 22
  assert str(stopped) in os.listdir(os.path.join(workdir, 'checkpoints'))
  resumed = run_main([*ARGS, f'--workdir={workdir}'])
  assert resumed.returncode == 0
  assert f'at step {stopped}' in resumed.stderr
  assert_same_state(workdir, expected)


def test_damaged_latest_checkpoint_is_skipped(reference, tmp_path):
  import shutil

  ref_dir, expected = reference
  workdir = str(tmp_path / 'run')
  shutil.copytree(ref_dir, workdir)
  ckpt = os.path.join(workdir, 'checkpoints')
  steps = sorted(int(s) for s in os.listdir(ckpt) if s.isdigit())
  assert steps[-1] == 22 and len(steps) == 3  # keep_checkpoints
  for root, _, files in os.walk(os.path.join(ckpt, '22', 'state')):
    for name in files:
      with open(os.path.join(root, name), 'r+b') as f:
        f.truncate(max(0, os.path.getsize(f.name) // 3))
  result = run_main([*ARGS, f'--workdir={workdir}'])
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'incomplete or corrupt' in result.stderr
  assert f'at step {steps[-2]}' in result.stderr
  assert_same_state(workdir, expected)


def test_incompatible_config_is_refused_naming_fields(reference, tmp_path):
  import shutil

  workdir = str(tmp_path / 'run')
  shutil.copytree(reference[0], workdir)
  result = run_main(
    [
      *ARGS,
      f'--workdir={workdir}',
      '--config.model=resnet32',
      '--config.num_epochs=2',
      '--config.log_every_steps=5',
    ]
  )
  assert result.returncode == 1
  assert "model: checkpoint 'resnet20', now 'resnet32'" in result.stderr
  assert 'num_epochs' not in result.stderr.split('Safe to change')[0]
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == sorted(
    os.listdir(os.path.join(reference[0], 'checkpoints'))
  )


def test_nan_loss_stops_and_keeps_only_finite_checkpoints(tmp_path):
  workdir = str(tmp_path / 'run')
  result = run_main(
    [
      *ARGS,
      f'--workdir={workdir}',
      '--config.schedule=constant',
      '--config.learning_rate=1e12',
      '--config.warmup_epochs=0.5',
      '--config.checkpoint_every_steps=1',
    ]
  )
  assert result.returncode == 1
  assert 'Training diverged' in result.stderr and 'last finite loss' in result.stderr
  steps = [s for s in os.listdir(os.path.join(workdir, 'checkpoints')) if s.isdigit()]
  assert steps, 'the finite early steps should have been checkpointed'
  _, leaves = final_state(workdir)
  assert all(np.isfinite(x).all() for x in leaves if x.dtype.kind == 'f')


def test_eval_mode_reports_a_saved_run(reference, tmp_path):
  import shutil

  workdir = str(tmp_path / 'run')
  shutil.copytree(reference[0], workdir)
  before = open(os.path.join(workdir, 'metrics.jsonl')).read().splitlines()
  result = run_main([*ARGS, f'--workdir={workdir}', '--mode=eval', '--checkpoint=latest'])
  assert result.returncode == 0, result.stderr[-3000:]
  after = open(os.path.join(workdir, 'metrics.jsonl')).read().splitlines()
  new = json.loads(after[-1])
  assert len(after) == len(before) + 1
  last_eval = [json.loads(line) for line in before if 'eval_top1' in line][-1]
  assert new['step'] == 22 and new['eval_top1'] == pytest.approx(last_eval['eval_top1'])
  assert 'eval_top5' in new and 'eval_loss' in new


def test_exported_variables_load_into_create_model(reference):
  import jax.numpy as jnp
  from flax import serialization

  from jax_resnet import models

  variables = serialization.msgpack_restore(export(reference[0]))
  model = models.create_model('resnet20', 10)
  logits = model.apply(variables, jnp.zeros((3, 8, 8, 1)), train=False)
  assert logits.shape == (3, 10) and np.isfinite(np.asarray(logits)).all()


def test_unwritable_workdir_is_reported(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('not a directory')
  result = run_main([*ARGS, f'--workdir={blocker}/run'])
  assert result.returncode == 1
  assert 'Cannot write to --workdir' in result.stderr


@pytest.fixture
def small_disk(tmp_path):
  """A 3 MiB tmpfs: room for one digits checkpoint, not for the next."""
  mount_point = tmp_path / 'small_disk'
  mount_point.mkdir()
  mounted = subprocess.run(
    ['mount', '-t', 'tmpfs', '-o', 'size=3m', 'tmpfs', str(mount_point)], capture_output=True
  )
  if mounted.returncode:
    pytest.skip('mounting a small tmpfs needs root: ' + mounted.stderr.decode()[:200])
  yield mount_point
  subprocess.run(['umount', str(mount_point)])


def test_full_disk_while_saving_is_reported_and_earlier_checkpoint_survives(small_disk):
  workdir = str(small_disk / 'run')
  result = run_main(
    [
      '--config=configs/default.py',
      '--config.image_size=8',
      '--config.num_epochs=3',
      '--config.eval_every_epochs=0',
      f'--workdir={workdir}',
    ]
  )
  assert result.returncode == 1
  assert f'error: Writing to {workdir} failed' in result.stderr
  assert 'No space left' in result.stderr and 'are intact' in result.stderr
  assert '11' in os.listdir(os.path.join(workdir, 'checkpoints'))
