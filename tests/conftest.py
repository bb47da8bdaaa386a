import os
import sys
import tempfile

import pytest
from helpers import ROOT, digits_config

sys.path.insert(0, ROOT)

# Many tests start main.py with the same small model: a persistent XLA compilation cache
# shared by this session's processes (pytest-xdist's workers and the main.py runs they
# start) compiles each train/eval step once, not per process.
_RUN_ID = os.environ.get('PYTEST_XDIST_TESTRUNUID')  # the same in every worker of a run
if _RUN_ID:
  _CACHE = os.path.join(tempfile.gettempdir(), f'jax_resnet_tests_xla_cache_{_RUN_ID}')
  os.makedirs(_CACHE, exist_ok=True)
else:
  _CACHE = tempfile.mkdtemp(prefix='jax_resnet_tests_xla_cache_')
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', _CACHE)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')


# The slowest test files first (seconds of a serial run on a 2-core CI machine: resume
# about 350, configs 200, preflight 75, parallel 150, step functions 120, cli 90,
# benchmark 80, warm start 60, models 50; the other files 5-40 each). pytest-xdist's
# `--dist loadfile` hands whole files to its two workers in this order, so no large file
# starts last and the workers finish together (pyproject.toml's addopts).
SLOWEST_FIRST = (
  'test_resume.py',
  'test_configs.py',
  'test_preflight.py',
  'test_parallel.py',
  'test_step_functions.py',
  'test_cli.py',
  'test_benchmark.py',
  'test_warm_start.py',
  'test_models.py',
  'test_data_sources.py',
)


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within files


@pytest.fixture
def config():
  """The default config, unlocked, with small sizes for CPU tests."""
  from jax_resnet.configuration import defaults

  cfg = defaults.get_config()
  cfg.batch_size = 32
  cfg.eval_batch_size = 64
  cfg.image_size = 8
  return cfg


@pytest.fixture(scope='session')
def digits_run(tmp_path_factory) -> str:
  """The workdir of a 2-epoch digits run (``helpers.digits_config``; about 60% top-1,
  accuracy is not the point), trained once per test run: pytest-xdist's workers share it
  through a file lock. Tests only read it."""
  from filelock import FileLock

  from jax_resnet.training import loop

  base = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    base = base.parent  # this run's folder, above each worker's own
  workdir = base / 'digits_run'
  with FileLock(str(base / 'digits_run.lock')):
    if not (workdir / 'trained').exists():
      loop.train_and_evaluate(digits_config(), str(workdir))
      (workdir / 'trained').write_text('')
  return str(workdir)


@pytest.fixture
def read_only_mount(tmp_path):
  """read_only_mount(source) -> a read-only bind mount of ``source`` (unmounted after the
  test); the test is skipped where bind mounts are not permitted (they need root, and
  root is also who chmod cannot stop)."""
  import subprocess

  mounts = []

  def mount(source):
    target = tmp_path / f'read_only_{len(mounts)}'
    target.mkdir()
    done = subprocess.run(['mount', '--bind', str(source), str(target)], capture_output=True)
    if done.returncode:
      pytest.skip('a read-only bind mount needs root: ' + done.stderr.decode()[:200])
    mounts.append(target)
    subprocess.run(['mount', '-o', 'remount,bind,ro', str(target)], check=True)
    return str(target)

  yield mount
  for target in mounts:
    subprocess.run(['umount', str(target)])
