import json
import os
import subprocess
import sys

import pytest

from jax_resnet.observe import plot

pytest.importorskip('matplotlib')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_run(directory, depth_penalty, steps_per_epoch=None, resumed=False):
  """A small run's metrics.jsonl as the trainer writes it: train and eval records."""
  os.makedirs(directory)
  records = []
  for step in range(10, 110, 10):
    records.append(
      {
        'step': step,
        'train_loss': 2.0 / step * 10 + depth_penalty,
        'train_top1': min(0.99, step / 120),
        'learning_rate': 0.1 / (1 + step),
      }
    )
    if step % 50 == 0:
      records.append(
        {
          'step': step,
          'eval_loss': 1.5 - step / 100 + depth_penalty,
          'eval_top1': step / 130,
          'eval_top5': min(1.0, step / 100),
        }
      )
  if resumed:  # a resumed run logs some steps again
    records += records[-3:]
  with open(os.path.join(directory, 'metrics.jsonl'), 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in records)
  if steps_per_epoch:
    plot.write_run_info(directory, steps_per_epoch, config_name='plain20_cifar10')
  return str(directory)


def test_plot_command_writes_a_png_of_two_runs(tmp_path):
  a = fake_run(tmp_path / 'plain20', 0.3, steps_per_epoch=10)
  b = fake_run(tmp_path / 'resnet20', 0.0, steps_per_epoch=10, resumed=True)
  out = tmp_path / 'curves.png'
  result = subprocess.run(
    [sys.executable, '-m', 'jax_resnet.observe.plot', a, b, '--out', str(out)],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0, result.stderr
  data = out.read_bytes()
  assert data[:8] == b'\x89PNG\r\n\x1a\n'
  assert len(data) > 20_000  # four panels with curves, not an empty canvas

  from PIL import Image

  image = Image.open(out).convert('RGB')
  assert image.size[0] >= 800 and image.size[1] >= 600
  assert len(set(image.getdata())) > 50  # lines and text in several colours


def test_read_run_uses_epochs_when_known_and_later_records_win(tmp_path):
  run = plot.read_run(fake_run(tmp_path / 'r', 0.0, steps_per_epoch=20, resumed=True))
  x, y = run['series']['train_loss']
  assert x == [s / 20 for s in range(10, 110, 10)]  # no duplicates after the resume
  assert run['label'] == 'r'
  bare = plot.read_run(fake_run(tmp_path / 's', 0.0))
  assert bare['series']['eval_top1'][0] == [50, 100]  # no run.json: steps


def test_missing_run_is_a_clear_error(tmp_path):
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'jax_resnet.observe.plot',
      str(tmp_path / 'nope'),
      '--out',
      str(tmp_path / 'x.png'),
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 2
  assert 'error:' in result.stderr and 'nope' in result.stderr
