"""Never lose a run: exact resume after SIGKILL, SIGTERM or Ctrl-C; damaged, lost or
incompatible checkpoints; two runs on one workdir; divergence; read-only finished runs."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import ROOT, run_main

ARGS = [
  '--config=configs/default.py',
  '--config.image_size=8',
  '--config.batch_size=64',
  '--config.num_epochs=1',
  '--config.checkpoint_every_steps=3',
  '--config.log_every_steps=1',
  '--config.eval_every_epochs=0.5',
]  # 22 steps, evaluated at 11 and 22


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


def saved_steps(workdir, directory='checkpoints'):
  """The steps of the checkpoints in ``WORKDIR/directory`` (not those set aside)."""
  return sorted(int(s) for s in os.listdir(os.path.join(workdir, directory)) if s.isdigit())


def final_state(workdir, directory='checkpoints', step=None):
  """A checkpoint's (default: the newest's) whole train state as numpy arrays (read in
  this process)."""
  import warnings

  import jax
  import orbax.checkpoint as ocp

  step = saved_steps(workdir, directory)[-1] if step is None else step
  directory = os.path.join(workdir, directory)
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


def test_sigterm_saves_and_exits_cleanly_then_resumes_exactly(reference, tmp_path):
  """Ctrl-C (SIGINT) goes to the same handler (preemption.SIGNALS); the start-up test
  below sends both."""
  signum = signal.SIGTERM
  _, expected = reference
  workdir = str(tmp_path / 'run')
  code, out, err = start_and_signal(workdir, 7, signum)
  assert code == 0, err[-3000:]
  assert f'Received {signal.Signals(signum).name}' in err
  assert 'Rerun the same command to resume' in err
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
  before = sorted(os.listdir(os.path.join(ckpt, '22', 'state')))
  result = run_main([*ARGS, f'--workdir={workdir}'])
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'incomplete or corrupt' in result.stderr
  assert f'at step {steps[-2]}' in result.stderr
  # Renamed, not deleted; and the console says so without a library's traceback.
  assert sorted(os.listdir(os.path.join(ckpt, '22.corrupt-0', 'state'))) == before
  assert 'Traceback' not in result.stderr and len(result.stderr.splitlines()) < 40
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
  """Neither checkpoints/ nor checkpoints_best/ ever holds a non-finite state (the best
  checkpoint used to be written before the finiteness check). Evaluated at every step:
  the finite early states are evaluated and the best of them kept; the step whose state
  went non-finite (with a loss still finite) is not evaluated."""
  workdir = str(tmp_path / 'run')
  result = run_main(
    [
      *ARGS,
      f'--workdir={workdir}',
      '--config.schedule=constant',
      '--config.learning_rate=1e12',
      '--config.warmup_epochs=0.5',
      '--config.checkpoint_every_steps=1',
      '--config.eval_every_epochs=0.05',  # every step
    ]
  )
  assert result.returncode == 1
  assert 'Training diverged' in result.stderr and 'last finite loss' in result.stderr
  # The loss was still finite: the state check caught it and says what it found.
  after = result.stderr.split('Training diverged: the weights are no longer finite by step ')
  stopped = int(after[1].split()[0])
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  evals = [r for r in records if 'eval_top1' in r]
  assert evals and all(r['step'] < stopped for r in evals), (stopped, evals)
  # The stop step's loss was finite: the state check, not the loss check, caught it, at a
  # step due for an evaluation that the non-finite state did not get.
  (last,) = [r for r in records if r['step'] == stopped and 'train_loss' in r]
  assert np.isfinite(last['train_loss'])
  best = max(evals, key=lambda r: r['eval_top1'])
  assert saved_steps(workdir, 'checkpoints_best') == [best['step']]
  steps = saved_steps(workdir)
  assert steps and max(steps) < stopped, 'the finite early steps should have been checkpointed'
  for directory, kept in (('checkpoints', steps), ('checkpoints_best', [best['step']])):
    for step in kept:
      _, leaves = final_state(workdir, directory, step)
      floats = [x for x in leaves if x.dtype.kind == 'f']
      assert floats and all(np.isfinite(x).all() for x in floats), (directory, step)


def evals(workdir) -> list[dict]:
  """What --mode=eval recorded, in WORKDIR/evals.jsonl."""
  with open(os.path.join(workdir, 'evals.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_eval_mode_reports_a_saved_run_in_its_own_record(reference, tmp_path):
  """Eval mode's results go to evals.jsonl, never into the training history: a finished
  run's rerun still reports its own final evaluation after an eval of an older
  checkpoint (it used to report that eval's numbers as the run's)."""
  import shutil

  workdir = str(tmp_path / 'run')
  shutil.copytree(reference[0], workdir)
  before = open(os.path.join(workdir, 'metrics.jsonl')).read()
  last_eval = [json.loads(line) for line in before.splitlines() if 'eval_top1' in line][-1]
  result = run_main([*ARGS, f'--workdir={workdir}', '--mode=eval', '--checkpoint=latest'])
  assert result.returncode == 0, result.stderr[-3000:]
  older = run_main([*ARGS, f'--workdir={workdir}', '--mode=eval', '--checkpoint=18'])
  assert older.returncode == 0, older.stderr[-3000:]
  assert open(os.path.join(workdir, 'metrics.jsonl')).read() == before
  latest, older_eval = evals(workdir)
  assert latest['step'] == 22 and latest['eval_top1'] == pytest.approx(last_eval['eval_top1'])
  assert (latest['checkpoint'], latest['weights'], older_eval['step']) == ('latest', 'raw', 18)
  assert latest['data']['dataset'] == 'digits'
  rerun = run_main([*ARGS, f'--workdir={workdir}'])
  assert rerun.returncode == 0 and 'is finished' in rerun.stderr
  assert f'eval_top1 {last_eval["eval_top1"]:.4f}' in rerun.stdout
  assert 'eval_top5' in latest and 'eval_loss' in latest


def test_exported_variables_are_the_trained_ones(reference):
  import jax
  import jax.numpy as jnp
  from flax import serialization

  from jax_resnet import models

  variables = serialization.msgpack_restore(export(reference[0]))
  model = models.create_model('resnet20', 10)
  logits = model.apply(variables, jnp.zeros((3, 8, 8, 1)), train=False)
  assert logits.shape == (3, 10) and np.isfinite(np.asarray(logits)).all()
  # The checkpoint's parameters, bit for bit, not a fresh initialisation.
  import orbax.checkpoint as ocp

  saved = ocp.PyTreeCheckpointer().restore(os.path.join(reference[0], 'checkpoints', '22', 'state'))
  for a, b in zip(jax.tree.leaves(variables['params']), jax.tree.leaves(saved['params'])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  fresh = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), train=False)
  assert not np.array_equal(
    variables['params']['head']['kernel'], np.asarray(fresh['params']['head']['kernel'])
  )


def test_export_to_an_unwritable_path_is_one_error_line_before_any_restore(reference, tmp_path):
  """It used to be a raw traceback after the restore: now one line naming the path, and
  the checkpoint is not even opened (no Orbax manager, no restore in the log)."""
  workdir = _copy(reference, tmp_path)
  blocker = tmp_path / 'file'
  blocker.write_text('not a directory')
  path = f'{blocker}/export/model.msgpack'
  result = run_main([f'--workdir={workdir}', '--mode=export', f'--export_path={path}'])
  assert result.returncode == 1
  log = os.path.join(workdir, 'jax_resnet.log')
  assert [line for line in result.stderr.splitlines() if line.strip()] == [
    f'error: Cannot write the export to {path}: Not a directory. (log: {log})'
  ]
  assert 'exported' not in result.stdout and not os.path.exists(path)
  this_run = open(log).read().split('\n==== ')[-1]  # each run's part starts with ====
  assert '--mode=export' in this_run.splitlines()[0]
  assert 'OutputError' in this_run
  assert 'CheckpointManager' not in this_run and 'Restoring checkpoint' not in this_run


def test_unwritable_workdir_is_reported(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('not a directory')
  result = run_main([*ARGS, f'--workdir={blocker}/run'])
  assert result.returncode == 1
  assert 'Cannot write the run (--workdir) to' in result.stderr


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
  # The console: a few lines, no library's traceback, one whole error line (it used to
  # be 2,369 lines with the error cut off mid-path); the detail is in the log it names.
  lines = result.stderr.splitlines()
  assert 'Traceback' not in result.stderr and len(lines) < 40, result.stderr[-3000:]
  (error,) = [line for line in lines if line.startswith('error:')]
  log = os.path.join(workdir, 'jax_resnet.log')
  assert 'No space left on device' in error and error.endswith(f'(log: {log})'), error
  assert 'rerun the same command to resume' in error
  detail = open(log).read()
  assert 'Traceback' in detail and 'No space left on device' in detail


def _copy(reference, tmp_path):
  import shutil

  workdir = str(tmp_path / 'run')
  shutil.copytree(reference[0], workdir)
  return workdir


def _files(path):
  """{relative path: bytes} of every file under ``path``."""
  out = {}
  for root, _, names in os.walk(path):
    for name in names:
      full = os.path.join(root, name)
      with open(full, 'rb') as f:
        out[os.path.relpath(full, path)] = f.read()
  return out


def test_mismatched_flags_in_eval_and_export_rename_nothing(reference, tmp_path):
  """Eval and export build the model from the checkpoint's own config: a different
  --config.model neither fails nor damages the run, and training it again says it is
  finished instead of adding to its history. They take no lock: both run while a
  training run (here this process) holds the workdir's."""
  from jax_resnet.errors import TrainingError
  from jax_resnet.runs import workdirs as workdir_lib

  workdir = _copy(reference, tmp_path)
  before = _files(os.path.join(workdir, 'checkpoints'))
  path = str(tmp_path / 'x.msgpack')
  with workdir_lib.lock(workdir):
    with pytest.raises(TrainingError, match='in use by another training run'):
      with workdir_lib.lock(workdir):  # held: a training command would stop at start
        pass
    exported = run_main(
      [
        *ARGS,
        f'--workdir={workdir}',
        '--mode=export',
        '--config.model=resnet32',
        f'--export_path={path}',
      ]
    )
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert os.path.getsize(path) > 100_000
    evaluated = run_main(
      [
        *ARGS,
        f'--workdir={workdir}',
        '--mode=eval',
        '--checkpoint=latest',
        '--config.model=resnet32',
      ]
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert 'final eval_loss' in evaluated.stdout and 'in use' not in evaluated.stderr
  assert _files(os.path.join(workdir, 'checkpoints')) == before
  history = open(os.path.join(workdir, 'metrics.jsonl')).read()
  rerun = run_main([*ARGS, f'--workdir={workdir}'])
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert 'is finished (step 22 of 22): nothing to train' in rerun.stderr
  assert open(os.path.join(workdir, 'metrics.jsonl')).read() == history  # nothing appended
  last = [json.loads(line) for line in history.splitlines() if 'eval_top1' in line][-1]
  assert f'eval_top1 {last["eval_top1"]:.4f}' in rerun.stdout


def test_no_restorable_checkpoint_stops_and_names_the_intact_best(reference, tmp_path):
  """Every latest checkpoint overwritten: an error naming what was renamed, the intact
  best checkpoint and the two ways on; never a silent restart over the run's history."""
  workdir = _copy(reference, tmp_path)
  rng = np.random.default_rng(0)
  for root, _, names in os.walk(os.path.join(workdir, 'checkpoints')):
    for name in names:
      path = os.path.join(root, name)
      size = os.path.getsize(path)
      with open(path, 'wb') as f:
        f.write(rng.integers(0, 256, max(size, 16), dtype=np.uint8).tobytes())
  best = _files(os.path.join(workdir, 'checkpoints_best'))
  (best_step,) = os.listdir(os.path.join(workdir, 'checkpoints_best'))
  history = open(os.path.join(workdir, 'metrics.jsonl')).read()
  for _ in range(2):  # and again: still no silent restart
    result = run_main([*ARGS, f'--workdir={workdir}'])
    assert result.returncode == 1, result.stderr[-3000:]
    assert 'can be restored; the damaged ones were renamed, not deleted' in result.stderr
    assert f'The best checkpoint (step {best_step})' in result.stderr
    assert '--resume_from=best' in result.stderr
    assert '--start_over' in result.stderr and 'Traceback' not in result.stderr
    assert _files(os.path.join(workdir, 'checkpoints_best')) == best
    assert open(os.path.join(workdir, 'metrics.jsonl')).read() == history
  assert '22.corrupt-0' in result.stderr
  assert len(result.stderr.splitlines()) < 40

  resumed = run_main([*ARGS, f'--workdir={workdir}', '--resume_from=best'])
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f'checkpoints_best at step {best_step}' in resumed.stderr
  # It really continued from the best checkpoint's state: its first step is the one after
  # it, and the uninterrupted run passed through that state, so (exact resume) it ends with
  # the uninterrupted run's parameters; another state at that step would not.
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    new = [json.loads(line) for line in f.read()[len(history) :].splitlines()]
  assert min(r['step'] for r in new) == int(best_step) + 1 < 22
  assert max(r['step'] for r in new) == 22
  assert_same_state(workdir, reference[1])

  best = _files(os.path.join(workdir, 'checkpoints_best'))
  history = open(os.path.join(workdir, 'metrics.jsonl')).read()
  restarted = run_main([*ARGS, f'--workdir={workdir}', '--start_over'])
  assert restarted.returncode == 0, restarted.stderr[-3000:]
  assert 'moved the earlier run to' in restarted.stderr
  assert _files(os.path.join(workdir, 'previous-0', 'checkpoints_best')) == best
  assert open(os.path.join(workdir, 'previous-0', 'metrics.jsonl')).read() == history
  assert_same_state(workdir, reference[1])  # the same run again, from step 0


def test_a_second_training_on_a_busy_workdir_stops_at_start(reference, tmp_path):
  workdir = str(tmp_path / 'run')
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
  first = subprocess.Popen(
    [sys.executable, os.path.join(ROOT, 'main.py'), *ARGS, f'--workdir={workdir}'],
    cwd=ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  lock = os.path.join(workdir, '.lock')
  deadline = time.time() + 120
  while not (os.path.exists(lock) and str(first.pid) in open(lock).read()):
    assert time.time() < deadline and first.poll() is None
    time.sleep(0.05)
  # Paused while the second starts, so it cannot finish first (a race this test lost when
  # the machine was loaded and the second's start-up outlasted the whole first run).
  first.send_signal(signal.SIGSTOP)
  try:
    second = run_main([*ARGS, f'--workdir={workdir}', '--config.learning_rate=0.1'])
  finally:
    first.send_signal(signal.SIGCONT)
  out, err = first.communicate(timeout=300)
  assert first.returncode == 0, err[-3000:]
  assert second.returncode == 1
  assert f'is in use by another training run (PID {first.pid} on host' in second.stderr
  assert_same_state(workdir, reference[1])  # the first run, untouched by the second


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_while_starting_up_exits_cleanly(tmp_path, signum):
  """The handler is installed first: a preemption notice (or Ctrl-C) during imports is
  not a 143 (or a KeyboardInterrupt traceback)."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
  proc = subprocess.Popen(
    [sys.executable, os.path.join(ROOT, 'main.py'), *ARGS, f'--workdir={tmp_path / "run"}'],
    cwd=ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  time.sleep(0.5)
  proc.send_signal(signum)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert f'Received {signal.Signals(signum).name} before the first step' in err
  assert 'stopped while starting' in out


def test_best_checkpoint_is_the_highest_eval_top1_and_eval_reports_it(reference, tmp_path):
  """The reference run's first evaluation scores higher than its last, so the best
  checkpoint is an older step than the newest: keeping the newest as the best, or an
  eval that defaults to the latest checkpoint, fails here."""
  workdir = _copy(reference, tmp_path)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    scores = {r['step']: r['eval_top1'] for r in map(json.loads, f) if 'eval_top1' in r}
  assert sorted(scores) == [11, 22]
  best = max(scores, key=scores.get)
  newest = saved_steps(workdir)[-1]
  assert best != newest and scores[best] != scores[newest], (
    f'{scores}: this test needs a run whose best evaluation is not its last; change ARGS '
    '(e.g. the learning rate) until it is one'
  )
  assert saved_steps(workdir, 'checkpoints_best') == [best]
  result = run_main([*ARGS, f'--workdir={workdir}', '--mode=eval'])  # default: best
  assert result.returncode == 0, result.stderr[-3000:]
  new = evals(workdir)[-1]
  assert new['step'] == best
  assert new['eval_top1'] == pytest.approx(scores[best], abs=1e-6)
  assert f'eval_top1 {scores[best]:.4f}' in result.stdout


def test_eval_and_export_of_a_read_only_run(reference, read_only_mount, tmp_path):
  read_only_copy = read_only_mount(reference[0])
  with pytest.raises(OSError):
    open(os.path.join(read_only_copy, 'probe'), 'w')
  result = run_main([*ARGS, f'--workdir={read_only_copy}', '--mode=eval'])
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'final eval_loss' in result.stdout and 'read-only' in result.stderr
  path = tmp_path / 'out' / 'model.msgpack'
  exported = run_main(
    [*ARGS, f'--workdir={read_only_copy}', '--mode=export', f'--export_path={path}']
  )
  assert exported.returncode == 0, exported.stderr[-3000:]
  assert path.stat().st_size > 100_000


# Every technique of the modern recipes at once: each keys its randomness by the step.
MODERN = [
  '--config.ema_decay=0.9',
  '--config.mixup_alpha=0.2',
  '--config.cutmix_alpha=1.0',
  '--config.randaugment_layers=2',
  '--config.random_erasing_prob=0.25',
  '--config.stochastic_depth_rate=0.1',
  '--config.sam_rho=0.05',
]


def test_sigkill_with_the_modern_recipe_resumes_bit_exact(tmp_path):
  """kill -9 at a step and moment drawn from a seeded generator, with the modern recipe
  (EMA, Mixup, CutMix, RandAugment, erasing, stochastic depth, SAM): the resumed run ends
  bit-identical to the uninterrupted one."""
  reference = str(tmp_path / 'reference')
  done = run_main([*ARGS, *MODERN, f'--workdir={reference}'])
  assert done.returncode == 0, done.stderr[-3000:]
  records = [json.loads(line) for line in open(os.path.join(reference, 'metrics.jsonl'))]
  # The EMA weights, evaluated beside the raw ones at each evaluation: fractions, and what
  # --mode=eval --weights=ema measures on that checkpoint (not the raw weights' numbers).
  by_step = {r['step']: r for r in records if 'eval_top1' in r}
  assert sorted(by_step) == [11, 22]
  for r in by_step.values():
    assert 0 <= r['eval_top1_ema'] <= 1 and 0 <= r['eval_top5_ema'] <= 1, r
    assert r['eval_top1_ema'] <= r['eval_top5_ema'] and r['eval_loss_ema'] != r['eval_loss']
  evaluated = run_main(
    [*ARGS, f'--workdir={reference}', '--mode=eval', '--weights=ema', '--checkpoint=latest']
  )
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  again = evals(reference)[-1]
  assert again['step'] == 22 and again['weights'] == 'ema'
  for name in ('eval_loss', 'eval_top1', 'eval_top5'):
    assert again[name] == pytest.approx(by_step[22][f'{name}_ema'], abs=1e-5), name
  expected = final_state(reference)
  ema_path = str(tmp_path / 'ema.msgpack')
  exported = run_main(
    [*ARGS, f'--workdir={reference}', '--mode=export', '--weights=ema', f'--export_path={ema_path}']
  )
  assert exported.returncode == 0, exported.stderr[-3000:]
  from jax_resnet.inference.export import read_export

  variables, metadata = read_export(ema_path)
  assert metadata['weights'] == 'ema'
  import orbax.checkpoint as ocp

  saved = ocp.PyTreeCheckpointer().restore(os.path.join(reference, 'checkpoints', '22', 'state'))
  np.testing.assert_array_equal(
    variables['params']['head']['kernel'], saved['ema']['params']['head']['kernel']
  )
  assert not np.array_equal(
    saved['ema']['params']['head']['kernel'], saved['params']['head']['kernel']
  )
  workdir = str(tmp_path / 'run')
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
  proc = subprocess.Popen(
    [sys.executable, os.path.join(ROOT, 'main.py'), *ARGS, *MODERN, f'--workdir={workdir}'],
    cwd=ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  deadline = time.time() + 300
  # A kill at a drawn step, a drawn moment after it is logged (a step, a save or an
  # evaluation may be in flight), with every augmentation and the EMA on.
  rng = random.Random(0)
  at_step, delay = rng.randint(7, 18), rng.uniform(0, 0.3)
  while last_logged_step(workdir) < at_step and proc.poll() is None:
    assert time.time() < deadline
    time.sleep(0.02)
  time.sleep(delay)
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=300)
  resumed = run_main([*ARGS, *MODERN, f'--workdir={workdir}'])
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'Resumed from' in resumed.stderr
  assert_same_state(workdir, expected)


def test_a_full_disk_at_start_is_one_line(small_disk):
  """A workdir on a disk already full: one error line, no traceback (the log file's
  first write failed with a traceback before anything else ran)."""
  filler = small_disk / 'filler'
  with open(filler, 'wb') as f:
    try:
      while True:
        f.write(b'\0' * 65536)
    except OSError:
      pass
  result = run_main([*ARGS, f'--workdir={small_disk / "run"}'])
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr[-3000:]
  (error,) = [line for line in lines if line.startswith('error:')]
  assert 'No space left on device' in error and len(lines) <= 3, lines
