"""Experiment trackers: a digits run tracked by Weights & Biases (offline) and MLflow (a
file store in the test's folder) gets every metrics.jsonl record at its step in both, the
config, the final summary and artifacts, and a resumed run continues the same tracker
runs; a tracker that cannot start (not installed) or fails is one warning and then off;
a blocked tracker never holds up the caller.
"""

import json
import logging
import os
import struct
import sys
import threading

import pytest
from helpers import digits_config

from jax_resnet.observe import metric_writers, trackers
from jax_resnet.training import loop


def tracked_config(tmp_path, steps: int):
  config = digits_config(image_size=8)
  config.num_train_steps = steps
  config.log_every_steps = 2
  config.eval_every_epochs = 0
  config.wandb_project = 'digits'
  config.wandb_run_name = 'tracked'
  config.mlflow_tracking_uri = f'file://{tmp_path / "mlruns"}'
  config.mlflow_experiment = 'tests'
  return config


def history(workdir) -> list[dict]:
  with open(os.path.join(workdir, metric_writers.METRICS_FILE)) as f:
    return [json.loads(line) for line in f]


def wandb_records(path: str) -> list:
  """The records of an offline W&B run file: LevelDB's log format (32 KiB blocks of
  chunks with 7-byte headers) after W&B's 7-byte file header, each a ``Record``."""
  from wandb.proto import wandb_internal_pb2

  with open(path, 'rb') as f:
    data = f.read()
  block, position, pending, records = 32768, 7, b'', []
  while position + 7 <= len(data):
    if block - position % block < 7:  # a block's tail too short for a header: padding
      position += block - position % block
      continue
    _, length, kind = struct.unpack('<IHB', data[position : position + 7])
    if kind == 0:
      break
    pending += data[position + 7 : position + 7 + length]
    position += 7 + length
    if kind in (1, 4):  # a whole record, or a record's last chunk
      record = wandb_internal_pb2.Record()
      record.ParseFromString(pending)
      records.append(record)
      pending = b''
  return records


def wandb_history(path: str) -> list[dict]:
  """{step, metric: value} of each history record, W&B's own keys (``_runtime`` ...) left out."""
  rows = []
  for record in wandb_records(path):
    if record.WhichOneof('record_type') == 'history':
      items = record.history.item
      items = {i.key or '.'.join(i.nested_key): json.loads(i.value_json) for i in items}
      row = {k: v for k, v in items.items() if not k.startswith('_')}
      rows.append({'step': items['_step'], **row})
  return rows


def test_a_tracked_run_and_its_resume_reach_wandb_and_mlflow(tmp_path, monkeypatch):
  from mlflow.tracking import MlflowClient

  monkeypatch.setenv('WANDB_MODE', 'offline')
  monkeypatch.setenv('WANDB_SILENT', 'true')
  workdir = str(tmp_path / 'run')
  loop.train_and_evaluate(tracked_config(tmp_path, 6), workdir)
  wandb_id = trackers.read_run_id(workdir, trackers.WANDB_RUN_ID_FILE)
  mlflow_id = trackers.read_run_id(workdir, trackers.MLFLOW_RUN_ID_FILE)
  final = loop.train_and_evaluate(tracked_config(tmp_path, 10), workdir)  # resumes at 6
  records = history(workdir)
  assert [r['step'] for r in records if 'train_loss' in r] == [2, 4, 6, 8, 10]

  # W&B: one run id across both, every record at its step, the config, the final summary.
  assert trackers.read_run_id(workdir, trackers.WANDB_RUN_ID_FILE) == wandb_id
  runs = sorted(os.listdir(os.path.join(workdir, 'wandb')))
  runs = [r for r in runs if r.startswith('offline-run-')]
  assert len(runs) == 2 and all(r.endswith(f'-{wandb_id}') for r in runs)
  logged = []
  for run in runs:
    logged += wandb_history(os.path.join(workdir, 'wandb', run, f'run-{wandb_id}.wandb'))
  by_step = {}  # W&B keeps one row per step: a step's train and eval records together
  for record in records:
    by_step.setdefault(record['step'], {}).update(record)
  assert logged == list(by_step.values())
  first = wandb_records(os.path.join(workdir, 'wandb', runs[0], f'run-{wandb_id}.wandb'))
  (run_record,) = [r.run for r in first if r.WhichOneof('record_type') == 'run']
  assert (run_record.project, run_record.display_name) == ('digits', 'tracked')
  config = {item.key: json.loads(item.value_json) for item in run_record.config.update}
  assert config['num_train_steps'] == 6 and config['model'] == 'resnet20'
  summaries = [
    {i.key: json.loads(i.value_json) for i in r.summary.update}
    for r in wandb_records(os.path.join(workdir, 'wandb', runs[1], f'run-{wandb_id}.wandb'))
    if r.WhichOneof('record_type') == 'summary'
  ]
  assert any(s.get('eval_top1') == pytest.approx(final['eval_top1']) for s in summaries)

  # MLflow: one run, every metric with its steps, the config, curves and the export.
  assert trackers.read_run_id(workdir, trackers.MLFLOW_RUN_ID_FILE) == mlflow_id
  client = MlflowClient(tracking_uri=f'file://{tmp_path / "mlruns"}')
  (experiment,) = [e for e in client.search_experiments() if e.name == 'tests']
  (run,) = client.search_runs([experiment.experiment_id])
  assert run.info.run_id == mlflow_id and run.info.status == 'FINISHED'
  for key in ('train_loss', 'eval_top1', 'learning_rate'):
    expected = [(r['step'], r[key]) for r in records if key in r]
    found = sorted((m.step, m.value) for m in client.get_metric_history(mlflow_id, key))
    assert found == pytest.approx(expected), key
  assert run.data.params['num_train_steps'] == '6'  # as created; a resume changes none
  assert run.data.params['model'] == 'resnet20'
  assert run.data.params['model_options.kernel_init'] == 'he_normal'  # nested fields, flat
  artifacts = {a.path for a in client.list_artifacts(mlflow_id)}
  assert artifacts == {'curves.png', os.path.basename(loop.TRACKED_EXPORT)}


class Recording(trackers.Tracker):
  """A tracker that records what reaches it, each log once ``gate`` is open, or fails."""

  name = 'Recording'

  def __init__(self, gate=None, fail_at=None):
    self.gate, self.fail_at, self.logged, self.ended = gate, fail_at, [], None
    super().__init__(config=None, workdir='')

  def _open(self):
    if self.fail_at == 'open':
      raise ConnectionError('no route to the tracking server\nsecond line')

  def _log(self, step, scalars):
    if self.gate is not None:
      self.gate.wait()
    if self.fail_at == step:
      raise ConnectionError('the tracking server went away')
    self.logged.append((step, scalars))

  def _summarise(self, summary, files):
    self.logged.append(('summary', summary, files))

  def _end(self, outcome):
    self.ended = outcome


def test_a_blocked_tracker_never_holds_up_the_caller():
  """The tracker's thread waits at a gate: the caller's writes return all the same (a
  caller that waited would reach the gate only when the safety timer opens it)."""
  gate = threading.Event()
  safety = threading.Timer(60, gate.set)  # a caller that blocks fails instead of hanging
  safety.start()
  tracker = Recording(gate=gate)
  for step in range(4):
    tracker.write_scalars(step, {'loss': 1.0})
  tracker.finish({'eval_top1': 0.5}, ['/nonexistent/curves.png'])
  returned_before_the_gate_opened = not gate.is_set()
  gate.set()
  safety.cancel()
  assert returned_before_the_gate_opened
  tracker.close('stopped')
  assert tracker.logged == [(s, {'loss': 1.0}) for s in range(4)] + [
    ('summary', {'eval_top1': 0.5}, [])
  ]
  assert tracker.ended == 'stopped'


@pytest.mark.parametrize('fail_at', ['open', 2])
def test_a_failing_tracker_is_one_warning_and_is_then_off(fail_at, caplog):
  with caplog.at_level(logging.WARNING):
    tracker = Recording(fail_at=fail_at)
    for step in range(5):
      tracker.write_scalars(step, {'loss': 1.0})
    tracker.close()
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1 and '\n' not in warnings[0]
  what = 'could not start' if fail_at == 'open' else 'stopped tracking this run'
  assert warnings[0].startswith(f'Recording {what} (ConnectionError:')
  assert 'training goes on with TensorBoard and metrics.jsonl' in warnings[0]
  assert tracker.logged == ([] if fail_at == 'open' else [(0, {'loss': 1.0}), (1, {'loss': 1.0})])
  assert tracker.ended is None
  assert not any(t.name == 'Recording-tracker' for t in threading.enumerate())


@pytest.mark.parametrize(
  'tracker, module', [(trackers.WandbTracker, 'wandb'), (trackers.MlflowTracker, 'mlflow.tracking')]
)
def test_a_tracker_that_is_not_installed_is_one_warning_naming_the_extra(
  tracker, module, tmp_path, monkeypatch, caplog
):
  """The real trackers without their package: one warning naming the extra to install,
  and every later call a no-op (the loop goes on as with any failing tracker, above)."""
  monkeypatch.setitem(sys.modules, module, None)
  with caplog.at_level(logging.WARNING):
    started = tracker(tracked_config(tmp_path, 4), str(tmp_path))
    started.write_scalars(2, {'train_loss': 1.0})
    started.finish({'eval_top1': 0.5})
    started.close()
  (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert warning.startswith(f'{tracker.name} could not start (RuntimeError: ')
  assert f"pip install 'jax_resnet[{tracker.extra}]'" in warning
