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
  # Resumed where the set changed size (Timeline.epoch_origin): that step starts epoch 1.
  origin = (steps - 2, 1)
  options = input_options(config)
  regrown = batching.train_batches(
    ds, options, 32, steps, start_step=steps - 2, epoch_origin=origin
  )
  for a, b in zip(first[steps:], [b for _, b in zip(range(3), regrown)]):
    np.testing.assert_array_equal(a['image'], b['image'])


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


def test_the_next_epoch_starts_before_this_one_ends(config, monkeypatch):
  """Its pipeline, and so its shuffle buffer, is started NEXT_EPOCH_LEAD batches before
  the epoch ends (not rebuilt from empty after it), never in the epoch's first half, and
  the batches stay the same."""
  ds = sources.load_dataset(config)
  steps = ds.info.num_train // 32
  options = input_options(config)
  expected = [b for _, b in zip(range(steps + 2), batching.train_batches(ds, options, 32, steps))]
  consumed, started = [0], []
  original = batching._epoch_batches

  def recording(*args):
    started.append((args[-2], consumed[0]))  # (epoch, batches consumed when it started)
    return original(*args)

  monkeypatch.setattr(batching, '_epoch_batches', recording)
  got = []
  for _, batch in zip(range(steps + 2), batching.train_batches(ds, options, 32, steps)):
    got.append(batch)
    consumed[0] += 1
  assert started[0] == (0, 0)
  epoch, at = started[1]
  assert epoch == 1 and steps // 2 <= at <= steps - batching.NEXT_EPOCH_LEAD + 1 < steps
  for a, b in zip(got, expected):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
