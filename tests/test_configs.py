"""Every config in configs/ loads and passes the trainer's checks; the configs that
between them use every model, every value of every choice and every field that any config
sets build their model and run two train steps on random data of their data set's shape
(small images for speed). test_preflight.py traces and lowers every config's step.

Which configs train: a greedy cover (``trained_configs``) of each config's features, a
feature being a string or boolean field's value (``model=resnet50``, ``optimizer=lamb``)
or a numeric field changed from the default (``mixup_alpha changed``); a config whose
features are all in configs already chosen adds no program the steps have not run. A new
config with a new model, choice or field is therefore trained without a change here.

The steps run in two worker processes (one per core of a small CI machine) with XLA's
cheaper compile settings: compiling ResNet-110's and ResNet-50's training steps
dominates, and two steps need no optimised code.
"""

import glob
import importlib
import json
import os
import subprocess
import sys
import time
import traceback

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
CONFIGS = sorted(
  os.path.basename(p)[:-3]
  for p in glob.glob(os.path.join(ROOT, 'configs', '*.py'))
  if not p.endswith('__init__.py')
)
# (channels, classes) of each data set the configs use.
DATASETS = {
  'digits': (1, 10),
  'cifar10': (3, 10),
  'cifar100': (3, 100),
  'imagenet2012': (3, 1000),
  'folder': (3, 200),  # Tiny ImageNet's 200 classes
}
MAX_TEST_IMAGE = 32  # ImageNet's 224 shrinks to 32, still enough for its 5 halvings
BATCH = 4
FAST_COMPILE = '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'
WORKERS = 2


def load(name):
  return importlib.import_module(f'configs.{name}').get_config()


def small(config):
  """The config at test sizes: small images and batch, Cutout no larger than half."""
  config.image_size = min(config.image_size, MAX_TEST_IMAGE)
  config.cutout_size = min(config.cutout_size, config.image_size // 2)
  config.batch_size = BATCH
  return config


def features(config) -> set[str]:
  """What a config asks of the trainer beyond the defaults (see the module docstring)."""
  from flax import traverse_util

  from jax_resnet.configuration import defaults

  flat = lambda c: traverse_util.flatten_dict(json.loads(small(c).to_json()), sep='.')
  default = flat(defaults.get_config())
  found = set()
  for field, value in flat(config).items():
    if value is None or isinstance(value, str | bool):
      found.add(f'{field}={value}')
    elif value != default.get(field):
      found.add(f'{field} changed')
  return found


def trained_configs() -> list[str]:
  """A greedy cover of all configs' features: the config adding the most features not
  yet covered (the first by name on a tie), until none adds one."""
  left = {name: features(load(name)) for name in CONFIGS}
  covered, chosen = set(), []
  while left:
    name = max(left, key=lambda n: (len(left[n] - covered), -CONFIGS.index(n)))
    if not left[name] - covered:
      break
    chosen.append(name)
    covered |= left.pop(name)
  return sorted(chosen)


TRAINED = trained_configs()


def two_steps(name) -> dict:
  """Builds the config's model and runs two train steps; returns what they gave."""
  import jax
  import numpy as np
  from helpers import train_setup

  from jax_resnet.training.timeline import Timeline

  config = small(load(name))
  channels, num_classes = DATASETS[config.dataset]
  size = config.image_size
  built = train_setup(
    config,
    num_classes,
    image_shape=(size, size, channels),
    timeline=Timeline.from_config(config, 10 * BATCH),
    mean=(127.0,) * channels,
    std=(64.0,) * channels,
  )
  state, train_fn, model = built.state, built.train_fn, built.model
  rng = np.random.RandomState(0)
  batch = {
    'image': rng.randint(0, 256, (BATCH, size, size, channels)).astype(np.uint8),
    'label': rng.randint(0, num_classes, (BATCH,)).astype(np.int32),
  }
  before = jax.tree.map(np.asarray, state.params)
  losses = []
  for _ in range(2):
    state, metrics = train_fn(state, batch)
    losses.append(float(metrics.compute()['train_loss']))
  moved = max(
    float(np.abs(np.asarray(a) - b).max())
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(before))
  )
  logits = jax.eval_shape(
    lambda v, x: model.apply(v, x, train=False),
    {'params': state.params, 'batch_stats': state.batch_stats},
    batch['image'].astype(np.float32),
  )
  return {
    'step': int(state.step),
    'losses': losses,
    'moved': moved,
    'logits_shape': list(logits.shape),
    'num_classes': num_classes,
  }


def _worker(names):
  for name in names:
    start = time.time()
    try:
      result = {
        'name': name,
        'ok': True,
        **two_steps(name),
        'seconds': round(time.time() - start, 1),
      }
    except Exception:
      result = {'name': name, 'ok': False, 'error': traceback.format_exc()}
    print('RESULT ' + json.dumps(result), flush=True)


@pytest.fixture(scope='module')
def results():
  """Runs the trained configs' two steps in worker processes, once per module."""
  names = TRAINED
  shards = [names[i::WORKERS] for i in range(WORKERS)]
  env = dict(
    os.environ,
    TF_CPP_MIN_LOG_LEVEL='2',
    XLA_FLAGS=(os.environ.get('XLA_FLAGS', '') + ' ' + FAST_COMPILE).strip(),
  )
  procs = [
    subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), *shard],
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for shard in shards
    if shard
  ]
  out = {}
  for proc in procs:
    stdout, stderr = proc.communicate(timeout=1200)
    for line in stdout.splitlines():
      if line.startswith('RESULT '):
        record = json.loads(line[len('RESULT ') :])
        out[record['name']] = record
    if proc.returncode:
      out.setdefault('_crashes', []).append(stderr[-3000:])
  return out


def test_all_experiment_configs_exist():
  expected = {
    'resnet50_imagenet_rsb_a3',
    'resnet50_imagenet_ffcv',
    'resnet18_cutout_cifar10_sam',
    'resnet20_cifar10_distill',
    'resnet26_small_cifar10',
    'resnet34_small_cifar10',
    'resnet50_small_cifar10',
    'resnet18_tinyimagenet',
    'resnet50_imagenet',
    'resnet18_imagenet',
    'resnet18_cutout_imagenet',
    'plain18_imagenet',
    'resnet50_imagenet_cosine',
    'resnet20_cifar10',
    'resnet56_cifar10',
    'resnet110_cifar10',
    'plain20_cifar10',
    'plain56_cifar10',
    'resnet18_cutout_cifar10',
    'resnet50_cifar10',
    'resnet18_cutout_cifar100',
  }
  assert expected <= set(CONFIGS)


@pytest.mark.parametrize('name', CONFIGS)
def test_config_loads_and_passes_checks(name):
  from jax_resnet.configuration import validation

  config = load(name)
  validation.validate(config)  # the real run's checks, at the config's real sizes
  assert config.dataset in DATASETS, f'{name}: add {config.dataset!r} to DATASETS'


def test_the_trained_configs_cover_every_feature_and_fewer_configs():
  every = set().union(*(features(load(name)) for name in CONFIGS))
  assert set().union(*(features(load(name)) for name in TRAINED)) == every
  assert 'model=resnet50' in every and 'optimizer=lamb' in every  # features are seen
  assert len(TRAINED) < len(CONFIGS)  # several ResNet-50 and ResNet-18 recipes share one


@pytest.mark.parametrize('name', TRAINED)
def test_config_builds_and_trains_two_steps(name, results):
  assert name in results, f'{name}: no result from the workers. {results.get("_crashes")}'
  result = results[name]
  assert result['ok'], f'{name} failed:\n{result["error"]}'
  assert result['step'] == 2
  assert all(loss == loss and loss < 1e4 for loss in result['losses']), result
  assert result['moved'] > 0, f'{name}: two steps left the parameters unchanged'
  assert result['logits_shape'] == [BATCH, result['num_classes']]


if __name__ == '__main__':
  _worker(sys.argv[1:])
