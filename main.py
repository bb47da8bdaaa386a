"""Trains, evaluates or exports a ResNet.

  python main.py --config=configs/default.py --workdir=DIR [--config.FIELD=VALUE ...]
  python main.py --config=... --workdir=DIR --mode=eval [--checkpoint=best|latest|STEP]
  python main.py --config=... --workdir=DIR --mode=export [--export_path=FILE]

Rerunning a training command resumes from the newest checkpoint in DIR/checkpoints.
Several processes (hosts): see --coordinator_address; SLURM and TPU pods are detected.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.')
flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'export'], 'What to do.')
flags.DEFINE_string(
  'checkpoint',
  None,
  "For eval/export: 'best', 'latest' or a step (default: best for eval, latest for export).",
)
flags.DEFINE_string(
  'export_path', None, 'For export: output file (default: WORKDIR/export/variables.msgpack).'
)
flags.DEFINE_string(
  'coordinator_address',
  None,
  'host:port of process 0, for a multi-process run (also JAX_COORDINATOR_ADDRESS).',
)
flags.DEFINE_integer(
  'num_processes', None, 'Processes in a multi-process run (also JAX_NUM_PROCESSES).'
)
flags.DEFINE_integer(
  'process_id', None, 'This process in a multi-process run (also JAX_PROCESS_ID).'
)
flags.mark_flags_as_required(['workdir'])
config_flags.DEFINE_config_file(
  'config', 'configs/default.py', 'Training configuration (a Python file).', lock_config=True
)


class _QuietLibraries:
  """Drops the INFO chatter of orbax's checkpoint writes; warnings still pass."""

  def filter(self, record):
    return record.levelno >= 30 or '/orbax/' not in record.pathname


def initialize_distributed():
  """Starts JAX's multi-controller runtime when this is one of several processes.

  Explicit flags or JAX_* variables win; otherwise SLURM jobs with several tasks and
  multi-host TPU pods are detected by jax.distributed itself.
  """
  import jax

  address = FLAGS.coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS')
  num = FLAGS.num_processes or int(os.environ.get('JAX_NUM_PROCESSES', 0)) or None
  pid = (
    FLAGS.process_id
    if FLAGS.process_id is not None
    else (int(os.environ['JAX_PROCESS_ID']) if 'JAX_PROCESS_ID' in os.environ else None)
  )
  slurm = int(os.environ.get('SLURM_NTASKS', '1')) > 1
  tpu_pod = bool(os.environ.get('TPU_WORKER_HOSTNAMES', '').count(','))
  if not (address or slurm or tpu_pod):
    return
  # CPU processes exchange collectives through gloo; GPUs and TPUs ignore this.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if address:
    jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid)
  else:
    jax.distributed.initialize()
  logging.info(
    'Process %d of %d, %d local devices of %d.',
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  initialize_distributed()
  # After flag parsing: keeps --help fast.
  from jax_resnet import evaluation, export, training
  from jax_resnet.errors import UserError

  try:
    if FLAGS.mode == 'train':
      metrics = training.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    elif FLAGS.mode == 'eval':
      overrides = config_flags.get_override_values(FLAGS['config'])
      metrics = evaluation.evaluate_checkpoint(
        FLAGS.workdir, _which(FLAGS.checkpoint or 'best'), overrides
      )
    else:
      path = FLAGS.export_path or os.path.join(FLAGS.workdir, 'export', 'variables.msgpack')
      export.export_checkpoint(FLAGS.workdir, path, _which(FLAGS.checkpoint or 'latest'))
      print(f'exported {path}')
      return
  except UserError as e:  # anything else is a bug and keeps its traceback
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  if 'stopped_at_step' in metrics:
    print(f'stopped at step {metrics["stopped_at_step"]}; rerun the same command to resume')
    return
  print('final ' + '  '.join(f'{k} {v:.4f}' for k, v in sorted(metrics.items())))


def _which(value: str):
  return int(value) if value.isdigit() else value


if __name__ == '__main__':
  app.run(main)
