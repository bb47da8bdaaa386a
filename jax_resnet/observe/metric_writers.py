"""Metric writing: TensorBoard through clu, plus a JSON-lines log for scripts and plots.

Only process 0 writes; the others log nothing but errors.
"""

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from clu import metric_writers


class JsonlWriter(metric_writers.MetricWriter):
  """Appends one JSON object per write to ``path``: {"step": ..., name: value, ...}."""

  def __init__(self, path: str):
    self._path = path
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    record = {'step': int(step)}
    record.update({k: _to_float(v) for k, v in scalars.items()})
    with open(self._path, 'a') as f:
      f.write(json.dumps(record) + '\n')

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


def _to_float(value) -> float:
  return float(np.asarray(value))


def create_writer(workdir: str) -> metric_writers.MetricWriter:
  """TensorBoard + metrics.jsonl on process 0; logging only elsewhere."""
  if jax.process_index() > 0:
    return metric_writers.create_default_writer(workdir, just_logging=True)
  return metric_writers.MultiWriter(
    [
      metric_writers.create_default_writer(workdir, asynchronous=False),
      JsonlWriter(os.path.join(workdir, 'metrics.jsonl')),
    ]
  )


def last_record(workdir: str, key: str) -> dict | None:
  """The last record of ``workdir/metrics.jsonl`` that has ``key``, or None."""
  path = os.path.join(workdir, 'metrics.jsonl')
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
