"""End to end through main.py, in subprocesses as a user would run it."""

import json
import os

from helpers import run_main

FAST = [
  '--config=configs/default.py',
  '--config.image_size=8',
  '--config.batch_size=64',
  '--config.model=resnet20',
  '--config.log_every_steps=5',
  '--config.eval_every_epochs=1',
]


def read_jsonl(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_main_trains_writes_metrics_and_checkpoints_then_resumes(tmp_path):
  workdir, cache = str(tmp_path / 'run'), tmp_path / 'xla_cache'
  first = run_main(  # with its own compilation cache, not the test session's
    [*FAST, f'--workdir={workdir}', '--config.num_epochs=1', f'--compilation_cache_dir={cache}'],
    env={'JAX_COMPILATION_CACHE_DIR': None},
  )
  assert first.returncode == 0, first.stderr[-3000:]
  assert any(cache.iterdir()), 'the compiled steps were not cached'
  records = read_jsonl(workdir)
  keys = set().union(*records)
  assert {
    'step',
    'train_loss',
    'train_top1',
    'learning_rate',
    'eval_loss',
    'eval_top1',
    'eval_top5',
  } <= keys
  steps_per_epoch = records[-1]['step']
  assert steps_per_epoch == 1438 // 64
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == [str(steps_per_epoch)]
  assert 'img/s' in first.stderr and 'ETA' in first.stderr
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(workdir))

  # Same command with one more epoch: resumes at the checkpoint, ends at the new end.
  # (Two steps per dispatch here, a safe change, so the lax.scan path runs end to end.)
  second = run_main(
    [*FAST, f'--workdir={workdir}', '--config.num_epochs=2', '--config.steps_per_dispatch=2']
  )
  assert second.returncode == 0, second.stderr[-3000:]
  assert f'Resumed from {workdir}/checkpoints at step {steps_per_epoch}' in second.stderr
  new = read_jsonl(workdir)[len(records) :]
  assert min(r['step'] for r in new) > steps_per_epoch
  assert max(r['step'] for r in new) == 2 * steps_per_epoch
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints')), key=int) == [
    str(steps_per_epoch),
    str(2 * steps_per_epoch),
  ]


def test_unknown_model_fails_before_compiling(tmp_path):
  result = run_main(
    ['--config=configs/default.py', f'--workdir={tmp_path}', '--config.model=resnet51']
  )
  assert result.returncode != 0
  assert "config.model='resnet51': unknown model" in result.stderr
  assert 'resnet56' in result.stderr
  assert not os.path.exists(tmp_path / 'checkpoints')


def test_batch_not_divisible_by_devices_names_the_numbers(tmp_path):
  result = run_main(
    ['--config=configs/default.py', f'--workdir={tmp_path}', '--config.batch_size=30'],
    env={'XLA_FLAGS': '--xla_force_host_platform_device_count=4'},
  )
  assert result.returncode != 0
  assert 'config.batch_size=30 must be a positive multiple of the device count 4' in result.stderr


def _console_lines(result):
  return [line for line in result.stderr.splitlines() if line.strip()]


def test_misspelt_field_is_one_line_naming_the_fix(tmp_path):
  result = run_main(
    ['--config=configs/default.py', f'--workdir={tmp_path}', '--config.learnng_rate=0.1']
  )
  assert result.returncode == 1
  assert _console_lines(result) == [
    'error: --config.learnng_rate: no such config field. Did you mean '
    '--config.learning_rate? The fields are in jax_resnet/configuration/defaults.py.'
  ]


def test_missing_config_file_is_one_line(tmp_path):
  result = run_main(['--config=configs/nope.py', f'--workdir={tmp_path}'])
  assert result.returncode == 1
  assert _console_lines(result) == [
    'error: --config=configs/nope.py: no such config file (a Python file with get_config()).'
  ]


def test_a_user_error_is_one_line_with_the_detail_in_the_log_file(tmp_path):
  result = run_main(
    ['--config=configs/default.py', f'--workdir={tmp_path}', '--config.momentum=1.5']
  )
  assert result.returncode == 1
  lines = _console_lines(result)
  assert len(lines) == 1 and lines[0].startswith('error: config.momentum=1.5: must be in [0, 1)')
  log = tmp_path / 'jax_resnet.log'
  assert f'(log: {log})' in lines[0]
  assert 'Traceback' in log.read_text() and 'ConfigError' in log.read_text()


BUG = """
import runpy, sys
from jax_resnet.training import loop
def broken(*args, **kwargs):
  raise RuntimeError('a bug in the trainer')
loop.train_and_evaluate = broken
sys.argv = ['main.py'] + sys.argv[1:]
runpy.run_path('main.py', run_name='__main__')
"""


def test_a_bug_keeps_its_traceback_on_the_console(tmp_path):
  import subprocess
  import sys

  from helpers import ROOT

  result = subprocess.run(
    [sys.executable, '-c', BUG, '--config=configs/default.py', f'--workdir={tmp_path}'],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 1
  assert 'Traceback (most recent call last)' in result.stderr
  assert 'RuntimeError: a bug in the trainer' in result.stderr
  assert 'RuntimeError: a bug in the trainer' in (tmp_path / 'jax_resnet.log').read_text()


def test_the_three_commands_are_one(tmp_path):
  """`jax-resnet` (the installed console script), `python -m jax_resnet` and main.py take
  the same flags, from any directory."""
  import shutil
  import sys

  script = shutil.which('jax-resnet')
  assert script, 'the jax-resnet console script is not installed (pip install -e .)'
  helps = [
    run_main(['--helpfull'], command=command, cwd=str(tmp_path))
    for command in ([script], [sys.executable, '-m', 'jax_resnet'], None)
  ]
  for result in helps:
    assert result.returncode == 0, result.stderr[-2000:]
    assert '--mode: <train|eval|export|predict|check|average|embed|knn>' in result.stdout
    assert 'configuration/defaults.py' in result.stdout  # the default --config, any directory
  flag_lists = [result.stdout[result.stdout.index('\nflags:') :] for result in helps]
  assert flag_lists[0] == flag_lists[1] == flag_lists[2]


def test_a_finished_run_exports_and_evaluates_from_another_directory_without_config(
  digits_run, tmp_path
):
  """Its config is in its checkpoint: no --config, and no checkout to run in. The export
  is --mode=average's, the mean of the last two checkpoints."""
  import shutil
  import sys

  from jax_resnet.inference import export

  module = [sys.executable, '-m', 'jax_resnet']
  exported = run_main(
    [f'--workdir={digits_run}', '--mode=average', '--average_last=2']
    + ['--export_path=out/model.msgpack'],
    command=module,
    cwd=str(tmp_path),
  )
  assert exported.returncode == 0, exported.stderr[-3000:]
  assert 'exported the mean of the last 2 checkpoints to out/model.msgpack' in exported.stdout
  variables, metadata = export.read_export(str(tmp_path / 'out' / 'model.msgpack'))
  assert metadata['model'] == 'resnet20' and 'params' in variables
  assert len(metadata['averaged_steps']) == 2
  workdir = shutil.copytree(digits_run, tmp_path / 'run')  # eval appends to metrics.jsonl
  evaluated = run_main(
    [f'--workdir={workdir}', '--mode=eval', '--checkpoint=latest'],
    command=module,
    cwd=str(tmp_path),
  )
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert 'final eval_loss' in evaluated.stdout


def _console_error(result) -> str:
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert result.returncode == 1 and len(lines) == 1 and 'Traceback' not in result.stderr, lines
  return lines[0]


def test_bad_arguments_are_one_line_each(tmp_path):
  """A misspelt --checkpoint, a config file without get_config and a cut-short export are
  each one line naming the fix (each was a traceback of 16 to 26 lines)."""
  line = _console_error(run_main([f'--workdir={tmp_path}', '--mode=eval', '--checkpoint=lastest']))
  assert '--checkpoint=lastest: must be best, latest or a step number' in line
  line = _console_error(run_main([f'--workdir={tmp_path}', '--mode=average']))
  assert '--average_last=K goes with --mode=average' in line
  config = tmp_path / 'no_get_config.py'
  config.write_text('CONFIG = {}\n')
  line = _console_error(run_main([f'--config={config}', f'--workdir={tmp_path}']))
  assert f'--config={config} has no get_config() function' in line
  cut = tmp_path / 'cut.safetensors'
  import numpy as np

  from jax_resnet.models import torchvision_layout

  torchvision_layout.save_safetensors(str(cut), {'w': np.ones((64, 64), np.float32)}, {})
  cut.write_bytes(cut.read_bytes()[:-1000])
  line = _console_error(
    run_main(
      ['--mode=predict', f'--predict_from={cut}', f'--predict_input={tmp_path}'],
      cwd=str(tmp_path),
    )
  )
  assert 'cannot be read as a safetensors file' in line


def test_a_closed_stdout_is_not_a_traceback(tmp_path):
  """The parent shell gone, or a pipe into head: the result line cannot be printed, and
  the run still ends cleanly, without a traceback or pages of logging errors."""
  import subprocess
  import sys

  from helpers import ROOT

  proc = subprocess.Popen(
    [sys.executable, os.path.join(ROOT, 'main.py'), '--mode=check', '--check_devices=1']
    + ['--check_platforms=cpu'],
    cwd=str(tmp_path),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  proc.stdout.close()  # nothing reads what it prints
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert 'Traceback' not in err and 'Logging error' not in err
