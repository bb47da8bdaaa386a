"""Train batches (deterministic, resumable) and eval batches (each example once)."""

import numpy as np
from helpers import input_options

from jax_resnet.data import batching, sources


def test_train_batches_are_deterministic_and_resume_mid_epoch(config):
  ds = sources.load_dataset(config)
  steps = ds.info.num_train // 32
  first = [
    b
    for _, b in zip(range(steps + 3), batching.train_batches(ds, input_options(config), 32, steps))
  ]
  resumed = [
    b
    for _, b in zip(
      range(5), batching.train_batches(ds, input_options(config), 32, steps, start_step=steps - 2)
    )
  ]
  for a, b in zip(first[steps - 2 :], resumed):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  # A new epoch is a new shuffle.
  assert not np.array_equal(first[0]['label'], first[steps]['label'])


def test_eval_counts_every_example_exactly_once(config):
  ds = sources.load_dataset(config)
  n = ds.info.num_eval
  local = 64
  assert n % local  # the interesting case: a ragged tail
  steps = batching.num_eval_steps(ds.info, local)
  batches = list(batching.eval_batches(ds, local, steps))
  assert len(batches) == steps
  assert all(b['image'].shape[0] == local for b in batches)
  assert sum(b['mask'].sum() for b in batches) == n
  labels = np.concatenate([b['label'][b['mask'] > 0] for b in batches])
  assert np.bincount(labels, minlength=10).sum() == n
