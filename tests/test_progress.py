import io

from jax_resnet.observe import progress


class Clock:
  def __init__(self):
    self.t = 100.0

  def __call__(self):
    return self.t


def test_plain_lines_when_not_a_terminal():
  lines, clock = [], Clock()
  p = progress.Progress(
    100,
    10,
    32,
    stream=io.StringIO(),
    is_tty=False,
    clock=clock,
    log_fn=lambda fmt, *args: lines.append(fmt % args),
  )
  for step in range(1, 21):
    clock.t += 0.5
    p.tick(step)
    if step % 10 == 0:
      p.log(step, {'train_loss': 1.25, 'train_top1': 0.5, 'learning_rate': 0.1})
  p.close()
  assert len(lines) == 2
  assert lines[1].startswith('step 20/100  epoch 2.00  loss 1.2500  top1 0.5000  lr 0.1')
  assert '64 img/s' in lines[1] and 'ETA 0:00:40' in lines[1]


def test_bar_redraws_in_place_on_a_terminal():
  out, clock = io.StringIO(), Clock()
  p = progress.Progress(100, 10, 32, stream=out, is_tty=True, clock=clock, min_interval=1.0)
  try:
    for step in range(1, 31):
      clock.t += 0.25
      p.tick(step)
    p.log(30, {'train_loss': 0.75})
    line = p.line(width=120)
  finally:
    p.close()
  text = out.getvalue()
  assert '\n' not in text.rstrip('\n') and text.endswith('\n')
  assert 0 < text.count('\r') <= 10  # rate-limited redraws
  assert 'epoch 3/10' in line and 'step 30/100' in line and 'loss 0.7500' in line
  assert '128 img/s' in line and 'ETA 0:00:17' in line and line.startswith('[')
