"""Experiment trackers beside TensorBoard and ``metrics.jsonl``: Weights & Biases
(``config.wandb_project``) and MLflow (``config.mlflow_tracking_uri``), each an optional
extra (``pip install 'jax_resnet[wandb]'``, ``'jax_resnet[mlflow]'``).

Each tracker is a clu ``MetricWriter`` in the run's writer, so it gets every record
``metrics.jsonl`` gets, at the same steps. Its calls, its start included, run in one
thread of its own, in order: a slow network or a tracker that fails never blocks or fails
a training step. A tracker that cannot start or fails later is one warning line, and
training goes on with TensorBoard and ``metrics.jsonl`` (the record a tracker can be
refilled from).

A resumed run continues the same tracker run: its id is kept in the workdir
(``wandb_run_id``, ``mlflow_run_id``). Only process 0 tracks.
"""

import os
import queue
import secrets
import string
import threading
import time
from collections.abc import Callable, Sequence

import jax
from absl import logging
from flax import traverse_util

from jax_resnet.observe.metric_writers import ScalarsOnlyWriter

WANDB_RUN_ID_FILE = 'wandb_run_id'
MLFLOW_RUN_ID_FILE = 'mlflow_run_id'
# How long the end of a run waits for a tracker to send what it was given.
CLOSE_TIMEOUT_S = 120.0
MLFLOW_METRICS_PER_BATCH = 1000  # MLflow's limits per log_batch call
MLFLOW_PARAMS_PER_BATCH = 100
MLFLOW_PARAM_LENGTH = 6000


def start(config, workdir: str) -> list['Tracker']:
  """The trackers ``config`` asks for (none on processes other than 0), starting in their
  own threads."""
  if jax.process_index() > 0:
    return []
  trackers = []
  if config.wandb_project:
    trackers.append(WandbTracker(config, workdir))
  if config.mlflow_tracking_uri:
    trackers.append(MlflowTracker(config, workdir))
  return trackers


class Tracker(ScalarsOnlyWriter):
  """A tracker fed through a queue by a thread of its own. Subclasses implement
  ``_open`` (in that thread), ``_log``, ``_summarise`` and ``_end``."""

  name = 'tracker'
  extra = ''  # the pip extra that installs it

  def __init__(self, config, workdir: str):
    self.config, self.workdir = config, workdir
    self._queue = queue.Queue()
    self._failed = self._opened = self._closed = False
    self._thread = threading.Thread(target=self._work, name=f'{self.name}-tracker', daemon=True)
    self._thread.start()
    self._submit(self._open)

  # What the loop calls (the main thread): each returns at once.

  def write_scalars(self, step: int, scalars) -> None:
    self._submit(self._log, int(step), {k: float(v) for k, v in scalars.items()})

  def finish(self, summary: dict, artifacts: Sequence[str] = ()) -> None:
    """The run's final metrics, and files to keep with the run (those that exist)."""
    files = [path for path in artifacts if path and os.path.isfile(path)]
    self._submit(self._summarise, dict(summary), files)

  def flush(self) -> None:
    pass  # the thread sends as it goes; ``close`` waits for it

  def close(self, outcome: str = 'finished') -> None:
    """Ends the tracker run ('finished', 'stopped' to resume later, or 'failed') and waits
    up to CLOSE_TIMEOUT_S for what was queued to be sent."""
    if self._closed:
      return
    self._closed = True
    self._submit(self._end, outcome)
    self._queue.put(None)
    self._thread.join(CLOSE_TIMEOUT_S)
    if self._thread.is_alive():
      logging.warning(
        '%s has not sent everything within %.0f s; the run ended without waiting for it '
        '(metrics.jsonl has every record).',
        self.name,
        CLOSE_TIMEOUT_S,
      )

  # The tracker's own thread.

  def _submit(self, fn: Callable, *args) -> None:
    if not self._failed:
      self._queue.put((fn, args))

  def _work(self) -> None:
    while (item := self._queue.get()) is not None:
      fn, args = item
      if self._failed:
        continue
      try:
        fn(*args)
        self._opened = True  # the first call is _open
      except Exception as e:  # any failure of a tracker: it is off, training goes on
        self._failed = True
        logging.warning(
          '%s %s (%s: %s); training goes on with TensorBoard and metrics.jsonl.',
          self.name,
          'stopped tracking this run' if self._opened else 'could not start',
          type(e).__name__,
          str(e).splitlines()[0] if str(e) else '',
        )

  def _import(self, module: str):
    try:
      return __import__(module, fromlist=['_'])
    except ImportError:
      raise RuntimeError(
        f"{module} is not installed: pip install 'jax_resnet[{self.extra}]'"
      ) from None

  def _open(self) -> None:
    raise NotImplementedError

  def _log(self, step: int, scalars: dict) -> None:
    raise NotImplementedError

  def _summarise(self, summary: dict, files: list[str]) -> None:
    raise NotImplementedError

  def _end(self, outcome: str) -> None:
    raise NotImplementedError


def read_run_id(workdir: str, file: str) -> str | None:
  """The tracker run id a workdir keeps, or None."""
  path = os.path.join(workdir, file)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return f.read().strip() or None


def _keep_run_id(workdir: str, file: str, run_id: str) -> None:
  path = os.path.join(workdir, file)
  tmp = f'{path}.partial-{os.getpid()}'
  with open(tmp, 'w') as f:
    f.write(run_id + '\n')
  os.replace(tmp, path)


class WandbTracker(Tracker):
  """Weights & Biases: the config, every metric at its step, the final summary.
  ``WANDB_MODE`` (offline, disabled) and W&B's other environment variables apply; the
  run's files go to ``WORKDIR/wandb``."""

  name = 'Weights & Biases'
  extra = 'wandb'

  def _open(self) -> None:
    wandb = self._import('wandb')
    run_id = read_run_id(self.workdir, WANDB_RUN_ID_FILE)
    if run_id is None:
      run_id = ''.join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
      _keep_run_id(self.workdir, WANDB_RUN_ID_FILE, run_id)
    self.run = wandb.init(
      project=self.config.wandb_project,
      entity=self.config.wandb_entity or None,
      name=self.config.wandb_run_name or None,
      id=run_id,
      resume='allow',
      dir=self.workdir,
      config=self.config.to_dict(),
      # Our console stays ours: W&B neither wraps stdout nor prints its banner.
      settings=wandb.Settings(console='off', silent=True),
    )

  def _log(self, step: int, scalars: dict) -> None:
    self.run.log(scalars, step=step)

  def _summarise(self, summary: dict, files: list[str]) -> None:
    self.run.summary.update(summary)

  def _end(self, outcome: str) -> None:
    if outcome == 'stopped':
      self.run.mark_preempting()
    self.run.finish(exit_code=1 if outcome == 'failed' else 0)


class MlflowTracker(Tracker):
  """MLflow: the config as parameters, every metric at its step, ``curves.png`` and the
  best checkpoint's export as artifacts. A ``file:`` URI (or a plain path) is MLflow's
  file store, which MLflow 3 keeps behind ``MLFLOW_ALLOW_FILE_STORE``: asked for by name
  here, so it is allowed."""

  name = 'MLflow'
  extra = 'mlflow'

  def _open(self) -> None:
    uri = self.config.mlflow_tracking_uri
    if uri.startswith('file:') or '://' not in uri:
      os.environ.setdefault('MLFLOW_ALLOW_FILE_STORE', 'true')
    tracking = self._import('mlflow.tracking')
    self.entities = self._import('mlflow.entities')
    self.client = tracking.MlflowClient(tracking_uri=uri)
    name = self.config.mlflow_experiment
    experiment = self.client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
    run_id = read_run_id(self.workdir, MLFLOW_RUN_ID_FILE)
    if run_id is not None and self._exists(run_id):
      self.run_id = run_id
      self.client.update_run(run_id, status='RUNNING')
      return
    run = self.client.create_run(
      experiment_id,
      run_name=os.path.basename(os.path.abspath(self.workdir)),
      tags={'workdir': os.path.abspath(self.workdir)},
    )
    self.run_id = run.info.run_id
    _keep_run_id(self.workdir, MLFLOW_RUN_ID_FILE, self.run_id)
    # Parameters once, at the run's creation: MLflow refuses a changed value, and a resumed
    # run may change the safe fields (num_epochs ...).
    params = [
      self.entities.Param(key, str(value)[:MLFLOW_PARAM_LENGTH])
      for key, value in traverse_util.flatten_dict(self.config.to_dict(), sep='.').items()
    ]
    for start in range(0, len(params), MLFLOW_PARAMS_PER_BATCH):
      self.client.log_batch(self.run_id, params=params[start : start + MLFLOW_PARAMS_PER_BATCH])

  def _exists(self, run_id: str) -> bool:
    try:
      self.client.get_run(run_id)
    except Exception:  # another tracking server or store: a new run there
      return False
    return True

  def _log(self, step: int, scalars: dict) -> None:
    now = int(time.time() * 1000)
    metrics = [self.entities.Metric(k, v, now, step) for k, v in scalars.items()]
    for start in range(0, len(metrics), MLFLOW_METRICS_PER_BATCH):
      self.client.log_batch(self.run_id, metrics=metrics[start : start + MLFLOW_METRICS_PER_BATCH])

  def _summarise(self, summary: dict, files: list[str]) -> None:
    for path in files:
      self.client.log_artifact(self.run_id, path)

  def _end(self, outcome: str) -> None:
    status = {'finished': 'FINISHED', 'stopped': 'KILLED'}.get(outcome, 'FAILED')
    self.client.set_terminated(self.run_id, status)
