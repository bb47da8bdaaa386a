import os
import sys
import tempfile

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
# about 350, configs 200, distributed 150, steps 120, main 90, benchmark 80, warm start
# 60, models 50; the other files 5-40 each). pytest-xdist's `--dist loadfile` hands
# whole files to its two workers in this order, so no large file starts last and the
# workers finish together (pyproject.toml's addopts).
SLOWEST_FIRST = (
  'test_resume.py',
  'test_configs.py',
  'test_distributed.py',
  'test_steps.py',
  'test_main.py',
  'test_benchmark.py',
  'test_warm_start.py',
  'test_models.py',
)


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within files


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


def photo_folder(root, per_class=(5, 4, 4), size=(96, 72), seed=0, extras=True):
  """Class folders of JPEG crops of scikit-learn's two sample photographs.

  With ``extras``, the first class also gets a grayscale PNG, a CMYK JPEG and an RGBA
  PNG, and the second a corrupt .jpg. Returns the number of decodable files.
  """
  from PIL import Image
  from sklearn.datasets import load_sample_images

  photos = load_sample_images().images
  rng = np.random.RandomState(seed)
  count = 0
  for c, n in enumerate(per_class):
    folder = root / f'class_{c}'
    folder.mkdir(parents=True)
    for i in range(n):
      photo = photos[(c + i) % 2]
      y, x = rng.randint(0, 100), rng.randint(0, 200)
      crop = Image.fromarray(photo[y : y + 300, x : x + 400]).resize(size)
      crop.save(folder / f'{i}.JPEG', quality=90)
      count += 1
  if extras:
    base = Image.fromarray(photos[0][:200, :300])
    base.convert('L').save(root / 'class_0' / 'gray.png')
    base.convert('CMYK').save(root / 'class_0' / 'cmyk.jpg')
    base.convert('RGBA').save(root / 'class_0' / 'rgba.png')
    count += 3
    (root / 'class_1' / 'corrupt.jpg').write_bytes(b'\xff\xd8\xff\xe0 not really a jpeg')
  return count


def folder_config(config, tmp_path):
  train_n = photo_folder(tmp_path / 'train')
  eval_n = photo_folder(tmp_path / 'eval', per_class=(3, 2, 2), seed=1, extras=False)
  config.dataset = 'folder'
  config.train_dir = str(tmp_path / 'train')
  config.eval_dir = str(tmp_path / 'eval')
  config.image_size = 32
  config.random_crop_pad = 0
  config.random_flip = True
  return train_n, eval_n


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
