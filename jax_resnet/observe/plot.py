"""Training curves: loss, top-1 and top-5 error and learning rate against epoch.

  python -m jax_resnet.observe.plot RUN_DIR [RUN_DIR ...] --out curves.png

Each RUN_DIR holds the ``metrics.jsonl`` a training run writes; several runs are
overlaid, each in its own colour and labelled with its directory's name (training
curves solid, evaluation dashed). The x axis is the epoch when the run recorded its
``steps_per_epoch`` in ``RUN_DIR/run.json`` (see ``write_run_info``), else the step.
Uses matplotlib's Agg backend: no display is needed.
"""

import json
import os
import sys
from collections.abc import Sequence

from absl import app, flags

RUN_INFO = 'run.json'
PANELS = (  # (title, [(metric, transform, line style, legend suffix)])
  ('loss', [('train_loss', None, '-', 'train'), ('eval_loss', None, '--', 'eval')]),
  (
    'top-1 error (%)',
    [('train_top1', 'error', '-', 'train'), ('eval_top1', 'error', '--', 'eval')],
  ),
  ('top-5 error (%)', [('eval_top5', 'error', '--', 'eval')]),
  ('learning rate', [('learning_rate', None, '-', '')]),
)


def write_run_info(workdir: str, steps_per_epoch: int, **extra) -> str:
  """Writes ``workdir/run.json`` so plots can use epochs; ``extra``: config name etc."""
  path = os.path.join(workdir, RUN_INFO)
  with open(path, 'w') as f:
    json.dump({'steps_per_epoch': int(steps_per_epoch), **extra}, f, indent=1)
  return path


def read_run(workdir: str) -> dict:
  """A run's curves: {'label', 'steps_per_epoch' (or None), 'series': {metric: (x, y)}}.

  A resumed run may log a step twice; the later record wins.
  """
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: is {workdir} a training run directory?')
  info = {}
  if os.path.exists(os.path.join(workdir, RUN_INFO)):
    with open(os.path.join(workdir, RUN_INFO)) as f:
      info = json.load(f)
  steps_per_epoch = info.get('steps_per_epoch') or None
  by_metric: dict[str, dict[int, float]] = {}
  with open(path) as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:  # a line cut short by a crash
        continue
      step = int(record.pop('step'))
      for name, value in record.items():
        if isinstance(value, (int, float)):
          by_metric.setdefault(name, {})[step] = float(value)
  series = {}
  for name, points in by_metric.items():
    steps = sorted(points)
    x = [s / steps_per_epoch for s in steps] if steps_per_epoch else steps
    series[name] = (x, [points[s] for s in steps])
  label = os.path.basename(os.path.normpath(workdir))
  return {
    'label': label,
    'steps_per_epoch': steps_per_epoch,
    'series': series,
  }


def plot_runs(
  workdirs: Sequence[str], out: str, title: str | None = None, labels: Sequence[str] | None = None
) -> str:
  """Draws the runs' curves into one PNG at ``out``; returns ``out``."""
  import matplotlib

  matplotlib.use('Agg')
  from matplotlib import pyplot as plt

  runs = [read_run(w) for w in workdirs]
  if labels:
    for run, label in zip(runs, labels):
      run['label'] = label
  by_epoch = all(r['steps_per_epoch'] for r in runs)
  fig, axes = plt.subplots(2, 2, figsize=(12, 8))
  colours = plt.rcParams['axes.prop_cycle'].by_key()['color']
  for ax, (panel_title, curves) in zip(axes.flat, PANELS):
    drawn = False
    for i, run in enumerate(runs):
      for metric, transform, style, suffix in curves:
        if metric not in run['series']:
          continue
        x, y = run['series'][metric]
        if not by_epoch and run['steps_per_epoch']:  # mixed runs: all in steps
          x = [v * run['steps_per_epoch'] for v in x]
        if transform == 'error':
          y = [100.0 * (1.0 - v) for v in y]
        label = f'{run["label"]} {suffix}'.strip()
        ax.plot(
          x,
          y,
          style,
          color=colours[i % len(colours)],
          label=label,
          marker='o' if len(x) == 1 else None,
          linewidth=1.5,
        )
        drawn = True
    ax.set_title(panel_title)
    ax.set_xlabel('epoch' if by_epoch else 'step')
    ax.grid(True, alpha=0.3)
    if drawn:
      if panel_title == 'loss' or panel_title == 'learning rate':
        positive = all(v > 0 for line in ax.get_lines() for v in line.get_ydata())
        if positive:
          ax.set_yscale('log')
      ax.legend(fontsize='small')
    else:
      ax.text(0.5, 0.5, 'not recorded', ha='center', va='center', transform=ax.transAxes)
  fig.suptitle(title or ', '.join(r['label'] for r in runs))
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  partial = f'{out}.partial-{os.getpid()}.png'  # renamed when whole: never a cut image
  fig.savefig(partial, dpi=100)
  plt.close(fig)
  os.replace(partial, out)
  return out


def save_curves(workdir: str, filename: str = 'curves.png') -> str | None:
  """End-of-training hook: ``workdir/curves.png``; None (and a warning) if it fails."""
  from absl import logging

  try:
    path = plot_runs([workdir], os.path.join(workdir, filename))
  except ImportError:
    logging.warning('matplotlib is not installed: no %s (pip install matplotlib).', filename)
    return None
  except Exception as e:  # a plot must never fail a finished training run
    logging.warning('Could not draw %s: %s', filename, e)
    return None
  logging.info('Training curves: %s', path)
  return path


def _define_flags():
  flags.DEFINE_string('out', 'curves.png', 'PNG to write.')
  flags.DEFINE_string('title', None, 'Figure title.')
  flags.DEFINE_list('labels', None, 'Labels, one per run (default: directory names).')


def main(argv) -> int:
  runs, FLAGS = argv[1:], flags.FLAGS
  if not runs:
    raise app.UsageError('Give one or more RUN_DIRs (directories holding metrics.jsonl).')
  if FLAGS.labels and len(FLAGS.labels) != len(runs):
    raise app.UsageError(f'--labels has {len(FLAGS.labels)} names for {len(runs)} runs.')
  try:
    out = plot_runs(runs, FLAGS.out, FLAGS.title, FLAGS.labels)
  except FileNotFoundError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  except ImportError:
    print('error: matplotlib is needed: pip install matplotlib', file=sys.stderr)
    return 2
  print(out)
  return 0


if __name__ == '__main__':
  _define_flags()
  app.run(main)
