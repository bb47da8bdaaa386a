"""The training loop's pieces: dispatch sizes, periodic decisions."""

from jax_resnet.training import dispatch_size


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
  from jax_resnet.training import train_image_size

  assert train_image_size(config, 3) is None  # off
  config.image_size, config.num_epochs = 192, 16
  config.progressive_resizing = (128, 192, 2, 10)
  sizes = [train_image_size(config, epoch) for epoch in range(16)]
  assert sizes[:3] == [128, 128, 128] and sizes[10:] == [192] * 6
  assert set(sizes) == {128, 160, 192} and sizes == sorted(sizes)
  config.progressive_resizing, config.progressive_resizing_multiple = (8, 16, 0, 4), 4
  assert [train_image_size(config, e) for e in range(6)] == [8, 8, 12, 16, 16, 16]
