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
