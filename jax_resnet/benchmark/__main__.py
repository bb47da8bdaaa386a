"""Train-step throughput, and the input pipeline against it.

  python -m jax_resnet.benchmark --config=configs/resnet50_imagenet.py \\
      [--config.FIELD=VALUE ...] [--steps=20] [--warmup=3] [--json_out=PATH] \\
      [--compare=OTHER_CONFIG.py [--compare.FIELD=VALUE ...]] [--mode=synthetic|pipeline] \\
      [--profile=DIR]

``--mode=synthetic`` (default): the real train step on synthetic data on the device
(``synthetic.benchmark_step``); one JSON object (``synthetic.FIELDS``). ``--mode=pipeline``:
the config's real input, the step and the whole loop (``pipeline.benchmark_pipeline``),
the only mode that imports TensorFlow. ``--profile=DIR`` also traces a few steps into DIR
and prints the top operations. ``--compare`` runs a second config in the same process and
adds ``ratio``: its images/s over the first's.
"""

import gc
import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jax_resnet.benchmark import measure

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'Config file to benchmark.', lock_config=False
)
_COMPARE = config_flags.DEFINE_config_file(
  'compare',
  None,
  'A second config file run in the same process; the JSON gains '
  '"ratio" (its images/s over --config\'s). Override with --compare.FIELD=VALUE.',
  lock_config=False,
)
flags.DEFINE_enum(
  'mode',
  'synthetic',
  ['synthetic', 'pipeline'],
  'synthetic: the train step on device-resident synthetic data. pipeline: '
  'input alone, step alone and the whole loop on the real data source.',
)
flags.DEFINE_integer('steps', 20, 'Timed train steps (rounded up to whole dispatches).')
flags.DEFINE_integer('warmup', 3, 'Untimed steps after compilation.')
flags.DEFINE_integer('num_batches', 4, 'Synthetic batches on the device, used in turn.')
flags.DEFINE_integer('num_classes', None, 'Head size; default from config.dataset.')
flags.DEFINE_string('json_out', None, 'Also write the JSON object to this file.')
flags.DEFINE_string(
  'profile',
  None,
  'Also trace --profile_steps steps into this directory and print the top operations.',
)
flags.DEFINE_integer('profile_steps', 3, 'Steps traced with --profile.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  kwargs = dict(
    steps=FLAGS.steps,
    warmup=FLAGS.warmup,
    num_batches=FLAGS.num_batches,
    num_classes=FLAGS.num_classes,
  )
  if FLAGS.mode == 'synthetic' and FLAGS.profile:
    kwargs.update(profile_steps=FLAGS.profile_steps)
  elif FLAGS.profile:
    raise app.UsageError('--profile traces the synthetic step: drop --mode=pipeline.')

  def measure_flag(flag, config):
    if FLAGS.profile:  # --compare's trace and table in DIR/compare
      kwargs['profile_dir'] = FLAGS.profile if flag == 'config' else f'{FLAGS.profile}/compare'
    result = measure(config, FLAGS.mode, **kwargs)
    result['config_file'] = config_flags.get_config_filename(FLAGS[flag])
    result['overrides'] = {
      k: str(v) for k, v in config_flags.get_override_values(FLAGS[flag]).items()
    }
    gc.collect()
    return result

  result = measure_flag('config', _CONFIG.value)
  if _COMPARE.value is not None:
    other = measure_flag('compare', _COMPARE.value)
    ratio = other['images_per_s'] / result['images_per_s']
    result = {'mode': FLAGS.mode, 'config': result, 'compare': other, 'ratio': ratio}
    logging.info('ratio (--compare images/s over --config images/s): %.3f', ratio)
    print(f'ratio {ratio:.3f}', file=sys.stderr)
  text = json.dumps(result)
  if FLAGS.json_out:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json_out)), exist_ok=True)
    with open(FLAGS.json_out, 'w') as f:
      f.write(text + '\n')
  print(text, flush=True)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
