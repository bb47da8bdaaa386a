"""Metric writing: TensorBoard through clu, plus a JSON-lines log for scripts and plots.

Only process 0 writes; the others log nothing but errors.
"""

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging
from clu import metric_writers

METRICS_FILE = 'metrics.jsonl'  # the training history: train and eval metrics by step
EVALS_FILE = 'evals.jsonl'  # --mode=eval's results, apart from the training history


class ScalarsOnlyWriter(metric_writers.MetricWriter):
  """A writer of scalars alone: clu's other kinds of record are ignored."""

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    pass

  def close(self):
    pass


class JsonlWriter(ScalarsOnlyWriter):
  """Appends one JSON object per write to ``path``: {"step": ..., name: value, ...}.

  A last line cut short by a crash mid-write is moved to ``PATH.partial-N`` first (with a
  warning), so the next record starts on a line of its own and the history stays JSONL.
  """

  def __init__(self, path: str):
    self._path = path
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    repair_partial_line(path)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    record = {'step': int(step)}
    record.update({k: _to_float(v) for k, v in scalars.items()})
    with open(self._path, 'a') as f:
      f.write(json.dumps(record) + '\n')


def repair_partial_line(path: str) -> str | None:
  """Moves a last line without its newline (a write cut short) to ``PATH.partial-N`` and
  cuts it from ``path``; returns where it went, or None when there was none."""
  if not os.path.isfile(path):
    return None
  with open(path, 'rb') as f:
    data = f.read()
  if not data or data.endswith(b'\n'):
    return None
  keep = data.rfind(b'\n') + 1
  n = 0
  while os.path.exists(f'{path}.partial-{n}'):
    n += 1
  aside = f'{path}.partial-{n}'
  with open(aside, 'wb') as f:
    f.write(data[keep:])
  with open(path, 'r+b') as f:
    f.truncate(keep)
  logging.warning(
    '%s ended in a line cut short (a crash while writing it): moved that line to %s.', path, aside
  )
  return aside


def append_record(path: str, record: Mapping[str, Any]) -> None:
  """One JSON line appended to ``path`` in one write (its folder made if need be)."""
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  repair_partial_line(path)
  with open(path, 'a') as f:
    f.write(json.dumps(record) + '\n')


def _to_float(value) -> float:
  return float(np.asarray(value))


def create_writer(workdir: str, trackers=()) -> metric_writers.MetricWriter:
  """TensorBoard + metrics.jsonl (+ ``trackers``: observe/trackers.py) on process 0;
  logging only elsewhere."""
  if jax.process_index() > 0:
    return metric_writers.create_default_writer(workdir, just_logging=True)
  return metric_writers.MultiWriter(
    [
      metric_writers.create_default_writer(workdir, asynchronous=False),
      JsonlWriter(os.path.join(workdir, METRICS_FILE)),
      *trackers,
    ]
  )


def last_record(workdir: str, key: str) -> dict | None:
  """The last record of ``workdir/metrics.jsonl`` that has ``key``, or None."""
  path = os.path.join(workdir, METRICS_FILE)
  if jax.process_index() > 0 or not os.path.exists(path):
    return None
  found = None
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:  # a line cut short by a crash
        continue
      if key in record:
        found = record
  return found
