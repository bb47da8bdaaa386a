"""Trains a ResNet: python main.py --config=configs/default.py --workdir=DIR.

Any config field can be overridden: --config.model=resnet56 --config.batch_size=256.
Rerunning the same command resumes from the newest checkpoint in DIR/checkpoints.
"""

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.')
flags.mark_flags_as_required(['workdir'])
config_flags.DEFINE_config_file('config', 'configs/default.py',
                                'Training configuration (a Python file).',
                                lock_config=True)


class _QuietLibraries:
  """Drops the INFO chatter of orbax's checkpoint writes; warnings still pass."""

  def filter(self, record):
    return record.levelno >= 30 or '/orbax/' not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from jax_resnet import trainer  # after flag parsing: keeps --help fast
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  metrics = trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  logging.info('Final eval: %s', metrics)
  print('final ' + '  '.join(f'{k} {v:.4f}' for k, v in sorted(metrics.items())))


if __name__ == '__main__':
  app.run(main)
