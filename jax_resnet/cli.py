"""The command line: trains, evaluates, exports or predicts with a ResNet.

  jax-resnet --config=configs/default.py --workdir=DIR [--config.FIELD=VALUE ...]
  jax-resnet --workdir=DIR --mode=eval [--checkpoint=best|latest|STEP]
  jax-resnet --workdir=DIR --mode=export [--export_format=msgpack|safetensors|torchvision|onnx]
      [--export_path=FILE]
  jax-resnet --workdir=DIR --mode=predict --predict_input=FILE|DIR|GLOB [...]
      [--predict_output=predictions.csv] [--top_k=5] [--predict_flip]
  jax-resnet --mode=predict --predict_from=EXPORT --predict_input=... [...]
  jax-resnet --workdir=DIR --mode=average --average_last=K [--export_format=...]
  jax-resnet --workdir=DIR --mode=embed --predict_input=... [--embed_output=embeddings.npy]
  jax-resnet --workdir=DIR --mode=knn --knn_train=DIR --knn_eval=DIR [--knn_k=20]
  jax-resnet --config=... --mode=check [--check_devices=8] [--check_platforms=cuda,tpu]

``jax-resnet``, ``python -m jax_resnet`` and ``python main.py`` (in a checkout) are the
same command. Without ``--config`` the defaults (``configuration/defaults.py``) apply:
eval, export and predict of a workdir need none, since the run's own config is in its
checkpoint. Rerunning a training command resumes from the newest checkpoint in
DIR/checkpoints. Several processes (hosts): see --coordinator_address; SLURM and TPU pods
are detected.
"""

import time  # noqa: I001

STARTED_AT = time.perf_counter()  # a run's wall time (WORKDIR/timing.json) counts from here

# Before anything slow: a SIGTERM or Ctrl-C while starting up is remembered, not fatal.
from jax_resnet.training import preemption  # noqa: E402, I001  (imports nothing heavy)

preemption.catch_early()

import difflib  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

# TensorFlow's C++ start-up notices (oneDNN, absl::InitializeLog) say nothing to a user.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

FLAGS = flags.FLAGS
# The defaults as a config file, found wherever the package is installed, so that any
# directory works and --config.FIELD overrides apply without a --config.
DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), 'configuration', 'defaults.py')
COMPILATION_CACHE_MAX_BYTES = 2 << 30  # 2 GiB: a ResNet-50 train step's entry is ~20 MB
flags.DEFINE_string(
  'workdir',
  None,
  'Directory for checkpoints and metrics (not needed for --mode=predict with --predict_from).',
)
flags.DEFINE_enum(
  'mode',
  'train',
  ['train', 'eval', 'export', 'predict', 'check', 'average', 'embed', 'knn'],
  'What to do. check: will the config run on --check_devices devices of each of '
  '--check_platforms? Answered here, without them, before an allocation. average: the '
  'mean of the last --average_last checkpoints, written as an export.',
)
flags.DEFINE_string(
  'embed_output',
  'embeddings.npy',
  "For embed: the .npy of the images' pooled features (N x D); the paths, in the same "
  'order, go to the same name with .csv.',
)
flags.DEFINE_string('knn_train', None, 'For knn: a folder of class folders to vote with.')
flags.DEFINE_string('knn_eval', None, 'For knn: a folder of class folders to classify.')
flags.DEFINE_integer(
  'knn_k', 20, 'For knn: neighbours per vote (cosine similarity).', lower_bound=1
)
flags.DEFINE_integer(
  'average_last',
  None,
  'For average: how many of the newest kept checkpoints to average (at most '
  'config.keep_checkpoints).',
  lower_bound=1,
)
flags.DEFINE_integer(
  'check_devices', 8, 'For check: the devices to check the config for.', lower_bound=1
)
flags.DEFINE_list(
  'check_platforms',
  ['cuda', 'tpu'],
  'For check: the platforms to lower the steps for (any of cpu, cuda, rocm, tpu).',
)
flags.DEFINE_string(
  'checkpoint',
  None,
  "For eval/export/predict: 'best', 'latest' or a step (default: best for eval and predict, "
  'latest for export).',
)
flags.DEFINE_enum(
  'export_format',
  'msgpack',
  ['msgpack', 'safetensors', 'torchvision', 'onnx'],
  'For export: msgpack (metadata beside it in FILE.json), safetensors (Flax variable names), '
  "torchvision (torchvision's ResNet state_dict; resnet18 ... resnet152) or onnx (the "
  'inference function, for onnxruntime and other runtimes; needs jax_resnet[onnx]). Each '
  'carries the model, classes and preprocessing that inference needs.',
)
# A string checked against saved_run.WEIGHTS after parsing (_flags_problem), not an enum: an
# enum's values are needed here, at import, and importing runs (jax, orbax) would add
# 1.4 s to --help.
flags.DEFINE_string(
  'weights',
  'raw',
  "For eval/export/predict: 'raw', the trained weights, or 'ema', their average (a run "
  'trained with --config.ema_decay).',
)
flags.DEFINE_string(
  'export_path',
  None,
  'For export: output file (default: WORKDIR/export/variables.msgpack, model.safetensors, '
  'model_torchvision.safetensors or model.onnx).',
)
flags.DEFINE_string(
  'predict_from',
  None,
  'For predict: an export (--mode=export, any --export_format) to predict with, instead '
  "of --workdir's checkpoint; --workdir is then not needed.",
)
flags.DEFINE_multi_string(
  'predict_input',
  None,
  'For predict: image files, folders (searched recursively for JPEG/PNG) or glob patterns; '
  'repeat the flag for several.',
)
flags.DEFINE_string(
  'predict_output',
  'predictions.csv',
  'For predict: the CSV to write: path, then class_i and prob_i for i in 1..top_k.',
)
flags.DEFINE_integer('top_k', 5, 'For predict: classes per image in the CSV.', lower_bound=1)
flags.DEFINE_bool(
  'predict_flip', False, 'For predict: average with the mirror image (test-time augmentation).'
)
flags.register_validator(
  'predict_input',
  lambda inputs: bool(inputs) or FLAGS.mode not in ('predict', 'embed'),
  '--mode=predict and --mode=embed need --predict_input: image files, folders or glob patterns.',
)
flags.DEFINE_enum(
  'resume_from',
  'latest',
  ['latest', 'best'],
  'For training: resume from the newest checkpoint, or from checkpoints_best/ when every '
  'latest checkpoint is lost.',
)
flags.DEFINE_bool(
  'start_over',
  False,
  'For training: move an earlier run in --workdir (checkpoints, metrics, curves) to '
  'WORKDIR/previous-N/ and start at step 0.',
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
flags.DEFINE_string(
  'compilation_cache_dir',
  os.path.join(os.path.expanduser('~'), '.cache', 'jax_resnet', 'xla'),
  "XLA's persistent compilation cache: a rerun, resume or eval of the same model and "
  "batch shapes loads its compiled steps instead of compiling them. '' turns it off; the "
  'JAX_COMPILATION_CACHE_DIR variable, when set, wins.',
)
try:  # config_flags reads --config.FIELD overrides from sys.argv right here
  config_flags.DEFINE_config_file(
    'config',
    DEFAULT_CONFIG,
    'Training configuration: a Python file with get_config() (default: the defaults).',
    lock_config=True,
  )
except Exception as e:  # an unknown field, or an error in the config file
  _CONFIG_ERROR = e
else:
  _CONFIG_ERROR = None


EXPORT_NAMES = {
  'msgpack': 'variables.msgpack',
  'safetensors': 'model.safetensors',
  'torchvision': 'model_torchvision.safetensors',
  'onnx': 'model.onnx',
}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if FLAGS.mode == 'check':  # before JAX starts: CPU devices stand in for the checked ones
    _stand_in_devices(FLAGS.check_devices)
  from jax_resnet.observe import logs  # after flag parsing: keeps --help fast

  logs.setup_console()
  logging.set_verbosity(logging.INFO)
  if FLAGS.mode != 'train':
    preemption.release_early()
  from jax_resnet.errors import UserError

  try:
    logs.attach_file(_log_dir())
    _use_compilation_cache(FLAGS.compilation_cache_dir)
    from jax_resnet import parallel

    parallel.initialize_distributed(
      FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id
    )
    _say_which_devices()
    metrics = _run_mode()
  except UserError as e:  # what the user can fix: one line, the detail in the log file
    print(f'error: {e} (log: {logs.log_path()})', file=logs.console())
    logs.to_file(e)
    sys.exit(1)
  except Exception as e:  # a bug: its traceback, on the console and in the log
    logs.report_bug(e)
    sys.exit(1)
  if metrics is None:
    return
  if 'stopped_at_step' in metrics:
    step = metrics['stopped_at_step']
    where = 'while starting' if step is None else f'at step {step}'
    _say(f'stopped {where}; rerun the same command to resume')
    return
  _say('final ' + '  '.join(f'{k} {v:.4f}' for k, v in sorted(metrics.items())))


def _say(text: str) -> None:
  """A result line on stdout; a closed stdout (a pipe into ``head``, the parent shell gone)
  does not turn a finished run into a traceback."""
  try:
    print(text, flush=True)
  except BrokenPipeError:
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing flushes later


def _say_which_devices() -> None:
  """One warning when an accelerator plugin is installed but JAX fell back to the CPU (a
  driver too old for jax[cuda13], say). Training logs its devices when it starts."""
  from jax_resnet import parallel

  unused = parallel.unused_accelerator_plugins()
  if unused and FLAGS.mode != 'check':  # check runs on CPU devices on purpose
    logging.warning(
      'JAX runs on the CPU although the %s plugin is installed: check the driver '
      '(jax[cuda13] needs driver 580 or newer; install jax_resnet[cuda12] for older ones) '
      "and that python -c 'import jax; print(jax.devices())' lists the accelerators.",
      ' and '.join(unused),
    )


def _use_compilation_cache(directory: str) -> None:
  """Turns on XLA's persistent compilation cache (size-capped, least recently used out).

  Compiling the steps is a fixed cost of every process: with a warm cache, the default
  digits job's compile time drops from about 2 s to under 1 s (benchmarks/RESULTS.md).
  """
  if os.environ.get('JAX_COMPILATION_CACHE_DIR') or not directory:
    return
  import jax

  jax.config.update('jax_compilation_cache_dir', directory)
  jax.config.update('jax_compilation_cache_max_size', COMPILATION_CACHE_MAX_BYTES)


def _run_mode():
  # Each mode imports what it uses: training and evaluation bring TensorFlow (seconds),
  # which export and predict do without.
  if FLAGS.mode == 'train':
    from jax_resnet.training import loop

    return loop.train_and_evaluate(
      FLAGS.config, FLAGS.workdir, FLAGS.resume_from, FLAGS.start_over, STARTED_AT
    )
  if FLAGS.mode == 'eval':
    from jax_resnet.training import evaluation

    overrides = config_flags.get_override_values(FLAGS['config'])
    return evaluation.evaluate_checkpoint(
      FLAGS.workdir, _which(FLAGS.checkpoint or 'best'), overrides, FLAGS.weights
    )
  if FLAGS.mode == 'predict':
    return _predict()
  if FLAGS.mode in ('embed', 'knn'):
    return _embed_or_knn()
  if FLAGS.mode == 'check':
    return _check()
  from jax_resnet.inference import export

  name = EXPORT_NAMES[FLAGS.export_format]
  if FLAGS.mode == 'average':
    name = f'average_last{FLAGS.average_last}_{name}'
    path = FLAGS.export_path or os.path.join(FLAGS.workdir, 'export', name)
    export.average_checkpoints(
      FLAGS.workdir, path, FLAGS.average_last, FLAGS.export_format, FLAGS.weights
    )
    _say(f'exported the mean of the last {FLAGS.average_last} checkpoints to {path}')
    return None
  path = FLAGS.export_path or os.path.join(FLAGS.workdir, 'export', name)
  export.export_checkpoint(
    FLAGS.workdir, path, _which(FLAGS.checkpoint or 'latest'), FLAGS.export_format, FLAGS.weights
  )
  _say(f'exported {path}')
  return None


def _predictor():
  """--predict_from's export, or --workdir's checkpoint (only read)."""
  from jax_resnet.inference import predict

  if FLAGS.predict_from:
    return predict.Predictor.from_export(FLAGS.predict_from)
  return predict.Predictor.from_workdir(
    FLAGS.workdir, _which(FLAGS.checkpoint or 'best'), weights=FLAGS.weights
  )


def _embed_or_knn():
  """--mode=embed: the embeddings of --predict_input into --embed_output; --mode=knn:
  the kNN top-1 of --knn_eval's class folders against --knn_train's."""
  from jax_resnet.inference import embed

  predictor = _predictor()
  if FLAGS.mode == 'embed':
    summary = embed.embed_files(predictor, FLAGS.predict_input, FLAGS.embed_output)
    _say(
      f'embedded {summary["num_images"]} images into {summary["output_npy"]} '
      f'{tuple(summary["shape"])}, their paths in {summary["paths_csv"]}'
    )
    return None
  result = embed.knn_evaluate(predictor, FLAGS.knn_train, FLAGS.knn_eval, FLAGS.knn_k)
  _say(
    f'knn_top1 {result["knn_top1"]:.4f} (k {result["k"]}, cosine; {result["num_eval"]} '
    f'images against {result["num_train"]})'
  )
  return None


def _predict():
  """The CSV of the top-k classes of every --predict_input image, from --predict_from's
  export or --workdir's checkpoint; the workdir is only read."""
  from jax_resnet.inference import predict

  predictor = _predictor()
  summary = predict.predict_files(
    predictor, FLAGS.predict_input, FLAGS.predict_output, FLAGS.top_k, flip=FLAGS.predict_flip
  )
  skipped = summary['num_skipped']
  note = f'; skipped {skipped} that cannot be decoded (named above)' if skipped else ''
  _say(f'predicted {summary["num_images"]} images into {summary["output_csv"]}{note}')
  return None


def _stand_in_devices(count: int) -> None:
  """``count`` CPU devices for --mode=check to lower for the checked platforms with (the
  accelerators themselves are not needed, nor used if present)."""
  flag = f'--xla_force_host_platform_device_count={count}'
  os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} {flag}'.strip()
  os.environ['JAX_PLATFORMS'] = 'cpu'


def _check():
  """--mode=check: one line per finding on stdout; exit 1 on any failure."""
  from jax_resnet.training import preflight

  findings = preflight.check(FLAGS.config, FLAGS.check_devices, FLAGS.check_platforms)
  text, passed = preflight.report(findings)
  _say(text)
  if not passed:
    sys.exit(1)
  return None


def _log_dir() -> str | None:
  """The log file's folder: the workdir, except for predict, which writes only its CSV,
  and where the workdir is read-only (then the temp directory)."""
  if FLAGS.mode == 'train':
    return FLAGS.workdir
  if FLAGS.mode == 'check' or FLAGS.workdir is None:  # predict from an export: no workdir
    return None
  return _writable(FLAGS.workdir)


def _writable(workdir: str) -> str | None:
  """``workdir`` when a log file can go there (a finished run may be on a read-only
  mount: eval and export then log to the temp directory)."""
  return workdir if os.access(workdir, os.W_OK) else None


def _parse_flags(argv):
  """absl's flag parsing, with a bad flag or config (an unknown field, a missing or
  broken config file) reported in one line instead of a traceback."""
  try:
    if _CONFIG_ERROR is not None:
      raise _CONFIG_ERROR
    _importable_config_folder(argv)
    try:
      remaining = FLAGS(argv)
    except SystemExit as e:  # absl prints --help/--helpfull, then exits 1: asked for, 0
      sys.exit(0 if _asks_for_help(argv) else e.code)
    problem = _flags_problem()
    if problem:
      _usage_error(problem)
    FLAGS.config.keys()  # loads the config file now, so its errors land here
    return remaining
  except flags.Error as e:
    _usage_error(str(e))
  except Exception as e:
    _usage_error(_config_problem(e, argv))


def _importable_config_folder(argv) -> None:
  """Experiment configs import their base (``from configs import default``): the folder
  above a --config file's is put on the import path, so a checkout's configs load from
  any directory."""
  path = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  if path:
    above = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    if above not in sys.path:
      sys.path.append(above)


HELP_FLAGS = ('--help', '-h', '-?', '--helpshort', '--helpfull', '--helpxml')


def _asks_for_help(argv) -> bool:
  return any(arg.split('=')[0] in HELP_FLAGS for arg in argv[1:])


def _flags_problem() -> str | None:
  """What is wrong with the flags together, in one line, or None. Checked after parsing
  (absl's validators would prefix every flag's value), so --help imports nothing."""
  if FLAGS.mode == 'knn' and not (FLAGS.knn_train and FLAGS.knn_eval):
    return '--mode=knn needs --knn_train=DIR and --knn_eval=DIR (folders of class folders).'
  if FLAGS.predict_from is not None:
    if FLAGS.mode not in ('predict', 'embed', 'knn'):
      return '--predict_from is for --mode=predict, embed or knn (eval and export read --workdir).'
    if FLAGS.checkpoint is not None or FLAGS.weights != 'raw':
      return (
        '--predict_from predicts with the weights the export holds: drop --checkpoint and '
        '--weights, which chose them when it was exported.'
      )
  elif FLAGS.workdir is None and FLAGS.mode != 'check':
    return (
      '--workdir is required: the run directory (--mode=predict can read an export with '
      '--predict_from=FILE instead).'
    )
  if (FLAGS.mode == 'average') != (FLAGS.average_last is not None):
    return '--average_last=K goes with --mode=average (the mean of the last K checkpoints).'
  if FLAGS.mode == 'average' and FLAGS.checkpoint is not None:
    return '--mode=average averages the last --average_last checkpoints: drop --checkpoint.'
  if FLAGS.checkpoint is not None and not (
    FLAGS.checkpoint in ('best', 'latest') or FLAGS.checkpoint.isdigit()
  ):
    return f'--checkpoint={FLAGS.checkpoint}: must be best, latest or a step number.'
  from jax_resnet.runs import saved_run  # only here, after parsing: keeps --help fast

  if FLAGS.weights not in saved_run.WEIGHTS:
    return f'--weights={FLAGS.weights}: must be one of {", ".join(saved_run.WEIGHTS)}.'
  return None


def _config_problem(error: Exception, argv) -> str:
  """What is wrong with --config or a --config.FIELD override, in one line."""
  root = error
  while root.__cause__ is not None:
    root = root.__cause__
  if 'get_config' in str(root):
    path = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
    return f'--config={path} has no get_config() function returning the config.'
  if isinstance(root, FileNotFoundError) or 'Failed loading config file' in str(error):
    path = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
    return f'--config={path}: no such config file (a Python file with get_config()).'
  if isinstance(error, (AttributeError, KeyError)):
    from jax_resnet.configuration import defaults

    names = sorted(_field_names(defaults.get_config()))
    overridden = [a[len('--config.') :].split('=')[0] for a in argv if a.startswith('--config.')]
    unknown = [name for name in overridden if name not in names] or ['?']
    close = difflib.get_close_matches(unknown[0], names, n=1)
    hint = f' Did you mean --config.{close[0]}?' if close else ''
    return (
      f'--config.{unknown[0]}: no such config field.{hint} The fields are in '
      'jax_resnet/configuration/defaults.py.'
    )
  return f'--config: {type(root).__name__}: {root}'


def _field_names(config, prefix=''):
  for key, value in config.items():
    yield prefix + key
    if hasattr(value, 'items'):
      yield from _field_names(value, f'{prefix}{key}.')


def _usage_error(message: str):
  print(f'error: {message}', file=sys.stderr)
  sys.exit(1)


def _which(value: str):
  return int(value) if value.isdigit() else value


def run() -> None:
  """The ``jax-resnet`` console command."""
  app.run(main, flags_parser=_parse_flags)


if __name__ == '__main__':
  run()
