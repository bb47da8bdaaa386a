"""The training loop's pieces: dispatch sizes, periodic decisions."""

from jax_resnet.training.loop import dispatch_size


def test_multi_step_dispatches_end_at_every_log_eval_and_checkpoint_step():
  """steps_per_dispatch=k groups steps (lax.scan; its equality with single steps is in
  test_benchmark.py) but never runs past a step where the loop must look at the state."""

  periods = (4, 6, 11, 11)  # log, eval, checkpoint, epoch
  step, ends = 0, []
  while step < 30:
    k = dispatch_size(step, 5, 30, periods)
    assert 1 <= k <= 5
    step += k
    ends.append(step)
  must_stop = {s for s in range(1, 31) if any(s % p == 0 for p in periods)} | {30}
  assert must_stop <= set(ends)
  assert ends[:4] == [4, 6, 8, 11]
  assert dispatch_size(0, 1, 30, periods) == 1


def test_progressive_resizing_schedule(config):
  """FFCV's rule: linear between the epochs, rounded to the multiple, held outside."""
  from jax_resnet.training.loop import train_image_size

  assert train_image_size(config, 3) is None  # off
  config.image_size, config.num_epochs = 192, 16
  config.progressive_resizing = (128, 192, 2, 10)
  sizes = [train_image_size(config, epoch) for epoch in range(16)]
  assert sizes[:3] == [128, 128, 128] and sizes[10:] == [192] * 6
  assert set(sizes) == {128, 160, 192} and sizes == sorted(sizes)
  config.progressive_resizing, config.progressive_resizing_multiple = (8, 16, 0, 4), 4
  assert [train_image_size(config, e) for e in range(6)] == [8, 8, 12, 16, 16, 16]


def test_stepper_compiles_one_program_per_progressive_resizing_size(config, monkeypatch):
  """The loop's _Stepper runs each epoch's steps at that epoch's size, compiling each size
  once (the model sees the resized batches; the data stays at image_size)."""
  import types

  import jax
  import numpy as np

  from jax_resnet import parallel
  from jax_resnet.observe import profiling
  from jax_resnet.training import loop, optimizers, step_functions
  from jax_resnet.training.timeline import Timeline

  config.image_size, config.batch_size, config.schedule = 16, 8, 'constant'
  config.progressive_resizing, config.progressive_resizing_multiple = (8, 16, 0, 2), 8
  timeline = Timeline(2, 6)  # epochs 0, 1, 2 at 8, 16 (12 rounded up), 16 px
  mesh = parallel.create_mesh()
  lr_fn = optimizers.create_learning_rate_fn(config, timeline)
  model = step_functions.create_model(config, 10)
  state = step_functions.create_train_state(
    jax.random.PRNGKey(0), config, model, (16, 16, 3), lr_fn, mesh
  )
  seen = []

  def apply_fn(variables, images, **kwargs):
    seen.append(images.shape[1:3])
    return model.apply(variables, images, **kwargs)

  state = state.replace(apply_fn=apply_fn)
  made = []
  make = step_functions.make_train_step
  monkeypatch.setattr(
    step_functions,
    'make_train_step',
    lambda *a, **kw: made.append(kw['image_size']) or make(*a, **kw),
  )
  info = types.SimpleNamespace(num_classes=10, mean=(127.0,) * 3, std=(64.0,) * 3)
  run = types.SimpleNamespace(
    config=config,
    learning_rate_fn=lr_fn,
    dataset=types.SimpleNamespace(info=info),
    timeline=timeline,
    mesh=mesh,
    teacher=None,
  )
  stepper = loop._Stepper(run, profiling.RunClock())
  rng = np.random.RandomState(0)
  batch = {
    'image': rng.randint(0, 256, (8, 16, 16, 3)).astype(np.uint8),
    'label': rng.randint(0, 10, (8,)).astype(np.int32),
  }
  for step in range(timeline.total_steps):
    state, _ = stepper(state, [parallel.to_global(batch, mesh)], step)
  assert made == [8, 16]  # one compilation per size, in the ramp's order
  assert seen == [(8, 8), (16, 16)]  # traced once each, at that size
  assert len(stepper.hlo_texts()) == 2 and int(state.step) == 6


def test_checkpoints_follow_checkpoint_every_epochs_and_steps(config):
  """checkpoint_every_epochs=2 saves every second epoch and 0 only at the end (the loop
  used to save at every epoch end whatever the field said)."""
  from jax_resnet.training.loop import _Events
  from jax_resnet.training.timeline import Timeline

  timeline = Timeline(steps_per_epoch=5, total_steps=20)

  def saved(epochs, steps=0):
    config.checkpoint_every_epochs, config.checkpoint_every_steps = epochs, steps
    events = _Events.of(config, timeline)
    return [s for s in range(1, 21) if events.save(s, timeline.total_steps)]

  assert saved(1.0) == [5, 10, 15, 20]
  assert saved(2.0) == [10, 20]
  assert saved(0.0) == [20]
  assert saved(0.5) == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]
  assert saved(0.0, steps=6) == [6, 12, 18, 20]
  assert saved(2.0, steps=4) == [4, 8, 10, 12, 16, 20]
