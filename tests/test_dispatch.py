"""What the loop does at each step, decided once (Events, StepActions), dispatch sizes,
progressive resizing and the stepper that compiles one program per size."""

import numpy as np
from helpers import train_setup

from jax_resnet.training.dispatch import Events, ProgressiveResizing, Stepper
from jax_resnet.training.timeline import Every, Timeline


def events(timeline, log=0, eval_epochs=0.0, checkpoint_steps=0, checkpoint_epochs=0.0):
  return Events.of(timeline, log, eval_epochs, checkpoint_steps, checkpoint_epochs)


def test_multi_step_dispatches_end_at_every_log_eval_and_checkpoint_step():
  """steps_per_dispatch=k groups steps (lax.scan; its equality with single steps is in
  test_benchmark.py) but never runs past a step where the loop must look at the state."""
  every = Events(Every((4,)), Every((6,)), Every((11,)), Every((11,)), total_steps=30)
  step, ends = 0, []
  while step < 30:
    k = every.dispatch_size(step, 5)
    assert 1 <= k <= 5
    step += k
    ends.append(step)
  must_stop = {s for s in range(1, 31) if any(s % p == 0 for p in (4, 6, 11))} | {30}
  assert must_stop <= set(ends)
  assert ends[:4] == [4, 6, 8, 11]
  assert every.dispatch_size(0, 1) == 1


def test_each_step_is_decided_once_with_the_last_step_and_a_stop_request():
  """The last step logs, evaluates and saves; a stop request saves and stops; metrics are
  read wherever they are logged or a checkpoint is written, weights checked wherever
  anything is kept."""
  e = events(Timeline(steps_per_epoch=5, total_steps=20), log=4, eval_epochs=2.0)
  plain = e.at(3, stop_requested=False)
  assert not (plain.log or plain.evaluate or plain.save or plain.stop or plain.read_metrics)
  logged = e.at(4, stop_requested=False)
  assert logged.log and logged.read_metrics and not (logged.save or logged.check_weights)
  evaluated = e.at(10, stop_requested=False)
  assert evaluated.evaluate and evaluated.check_weights and not evaluated.read_metrics
  stopping = e.at(7, stop_requested=True)
  assert stopping.save and stopping.stop and stopping.read_metrics and stopping.check_weights
  assert not (stopping.log or stopping.evaluate)
  last = e.at(20, stop_requested=True)
  assert last.log and last.evaluate and last.save and not last.stop


def test_checkpoints_follow_checkpoint_every_epochs_and_steps():
  """checkpoint_every_epochs=2 saves every second epoch and 0 only at the end (the loop
  used to save at every epoch end whatever the field said)."""
  timeline = Timeline(steps_per_epoch=5, total_steps=20)

  def saved(epochs, steps=0):
    e = events(timeline, checkpoint_steps=steps, checkpoint_epochs=epochs)
    return [s for s in range(1, 21) if e.at(s, stop_requested=False).save]

  assert saved(1.0) == [5, 10, 15, 20]
  assert saved(2.0) == [10, 20]
  assert saved(0.0) == [20]
  assert saved(0.5) == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]
  assert saved(0.0, steps=6) == [6, 12, 18, 20]
  assert saved(2.0, steps=4) == [4, 8, 10, 12, 16, 20]


def test_progressive_resizing_schedule():
  """FFCV's rule: linear between the epochs, rounded to the multiple, held outside; ()
  epochs ramp over the whole run; () sizes are off (0: the data's size)."""
  assert ProgressiveResizing().size_at(3, 16) == 0
  ramp = ProgressiveResizing((128, 192), (2, 10), 32)
  sizes = [ramp.size_at(epoch, 16) for epoch in range(16)]
  assert sizes[:3] == [128, 128, 128] and sizes[10:] == [192] * 6
  assert set(sizes) == {128, 160, 192} and sizes == sorted(sizes)
  ramp = ProgressiveResizing((8, 16), (0, 4), 4)
  assert [ramp.size_at(e, 6) for e in range(6)] == [8, 8, 12, 16, 16, 16]
  whole_run = ProgressiveResizing((8, 16), (), 4)
  assert [whole_run.size_at(e, 4) for e in range(5)] == [8, 8, 12, 16, 16]


def test_stepper_compiles_one_program_per_progressive_resizing_size(config, monkeypatch):
  """The Stepper runs each epoch's steps at that epoch's size, compiling each size once
  (the model sees the resized batches; the data stays at image_size)."""
  import contextlib

  from jax_resnet import parallel
  from jax_resnet.training import build, dispatch

  config.image_size, config.batch_size, config.schedule = 16, 8, 'constant'
  timeline = Timeline(2, 6)  # epochs 0, 1, 2 at 8, 16 (12 rounded up), 16 px
  built = train_setup(config, timeline=timeline)
  seen = []

  def apply_fn(variables, images, **kwargs):
    seen.append(images.shape[1:3])
    return built.model.apply(variables, images, **kwargs)

  state = built.state.replace(apply_fn=apply_fn)
  made = []
  make = dispatch.make_train_step
  monkeypatch.setattr(
    dispatch,
    'make_train_step',
    lambda options, *a, **kw: (
      made.append(options.augment.train_image_size) or make(options, *a, **kw)
    ),
  )
  stepper = Stepper(
    lambda size: build.step_options(config, 10, (127.0,) * 3, (64.0,) * 3, size),
    built.learning_rate_fn,
    built.mesh,
    timeline,
    ProgressiveResizing((8, 16), (0, 2), 8),
    None,
    contextlib.nullcontext,
  )
  rng = np.random.RandomState(0)
  batch = {
    'image': rng.randint(0, 256, (8, 16, 16, 3)).astype(np.uint8),
    'label': rng.randint(0, 10, (8,)).astype(np.int32),
  }
  for step in range(timeline.total_steps):
    state, _ = stepper(state, [parallel.to_global(batch, built.mesh)], step)
  assert made == [8, 16]  # one compilation per size, in the ramp's order
  assert seen == [(8, 8), (16, 16)]  # traced once each, at that size
  assert len(stepper.hlo_texts()) == 2 and int(state.step) == 6


def test_the_host_runs_at_most_the_limit_of_dispatches_ahead():
  """After each dispatch the host waits for the one `limit` back (never the newest), so at
  most `limit` dispatches are in flight; a sync at a log step empties the queue."""
  from jax_resnet.training.dispatch import RunAhead

  waited = []

  class Dispatch:
    def __init__(self, n):
      self.n = n

    def block_until_ready(self):
      waited.append(self.n)
      return self

  run_ahead = RunAhead(limit=3)
  for n in range(6):
    run_ahead.add(Dispatch(n))
  assert waited == [0, 1, 2]  # dispatches 3, 4 and 5 still in flight
  run_ahead.clear()
  run_ahead.add(Dispatch(6))
  assert waited == [0, 1, 2]
