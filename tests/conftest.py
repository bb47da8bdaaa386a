import os
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Many tests start main.py with the same small model: a persistent XLA compilation cache
# shared by this session's processes compiles each train/eval step once, not per process.
os.environ.setdefault(
  'JAX_COMPILATION_CACHE_DIR', tempfile.mkdtemp(prefix='jax_resnet_tests_xla_cache_')
)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')


@pytest.fixture
def config():
  """The default config, unlocked, with small sizes for CPU tests."""
  from configs import default

  cfg = default.get_config()
  cfg.batch_size = 32
  cfg.eval_batch_size = 64
  cfg.image_size = 8
  return cfg


def run_main(args, env=None, timeout=600):
  """Runs main.py in a subprocess and returns the CompletedProcess.

  ``env`` adds variables; a None value removes one.
  """
  import subprocess

  full_env = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
  full_env.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  return subprocess.run(
    [sys.executable, os.path.join(ROOT, 'main.py'), *args],
    cwd=ROOT,
    env=full_env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )
