"""data.on_device: the whole uint8 train set on the device, batches cropped and flipped there."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import ROOT, input_options


def _toy(n=50, size=8):
  """Image i is filled with i + 1 (0 is padding), label i."""
  images = np.broadcast_to(
    (np.arange(n) + 1).astype(np.uint8)[:, None, None, None], (n, size, size, 1)
  ).copy()
  return images, np.arange(n, dtype=np.int32)


def _take(iterator, k):
  return [next(iterator) for _ in range(k)]


@pytest.fixture
def mesh():
  from jax_resnet import parallel

  return parallel.create_mesh()


def test_epoch_is_a_permutation_with_matching_labels(config, mesh):
  from jax_resnet import parallel
  from jax_resnet.data import on_device

  config.batch_size, config.random_crop_pad, config.random_flip = 8, 0, False
  images, labels = _toy(50)
  steps = 50 // 8
  batches = _take(
    on_device.device_batches(images, labels, mesh, input_options(config), steps), 2 * steps
  )
  b = batches[0]
  assert b['image'].shape == (8, 8, 8, 1) and b['image'].dtype == np.uint8
  assert b['label'].dtype == np.int32
  assert b['image'].sharding.spec == parallel.batch_sharded(mesh).spec
  first = np.concatenate([np.asarray(x['label']) for x in batches[:steps]])
  assert len(set(first.tolist())) == steps * 8  # no repeats within an epoch
  for x in batches:  # image content and label stay together
    np.testing.assert_array_equal(np.asarray(x['image'])[:, 3, 3, 0], np.asarray(x['label']) + 1)
  second = np.concatenate([np.asarray(x['label']) for x in batches[steps:]])
  assert not np.array_equal(first, second)  # a new epoch is a new shuffle
  np.testing.assert_array_equal(first, on_device.epoch_permutation(config.seed, 0, 50)[:48])


def test_crop_and_flip_happen_on_device_and_resume_exactly(config, mesh):
  from jax_resnet.data import on_device

  config.batch_size, config.random_crop_pad, config.random_flip = 16, 2, True
  size = 8
  images = np.tile(
    np.arange(size, dtype=np.uint8)[None, None, :, None] + 1, (64, size, 1, 1)
  )  # columns 1..8: a flip reverses them
  labels = np.zeros(64, np.int32)
  steps = 4
  run = _take(
    on_device.device_batches(images, labels, mesh, input_options(config), steps), steps + 3
  )
  out = np.concatenate([np.asarray(b['image']) for b in run])[..., 0]
  zero_rows = (out == 0).all(2).sum(1)
  zero_cols = (out == 0).all(1).sum(1)
  assert zero_rows.max() <= 2 and zero_cols.max() <= 2  # shifted by at most the pad
  assert (zero_rows > 0).mean() > 0.3 and (zero_cols > 0).mean() > 0.3
  middle = out[:, 4, 2:6]
  flipped = (np.diff(middle.astype(int), axis=1) < 0).all(1)
  assert 0.25 < flipped.mean() < 0.75
  resumed = _take(
    on_device.device_batches(
      images, labels, mesh, input_options(config), steps, start_step=steps - 1
    ),
    4,
  )
  for a, b in zip(run[steps - 1 :], resumed):
    np.testing.assert_array_equal(np.asarray(a['image']), np.asarray(b['image']))


def test_rejects_non_uint8(config, mesh):
  from jax_resnet.data import on_device

  with pytest.raises(ValueError, match='uint8 NHWC'):
    on_device.DeviceData(
      np.zeros((4, 8, 8, 3), np.float32), np.zeros(4), mesh, input_options(config)
    )


_SCRIPT = r"""
import json, sys
import numpy as np
import jax
from jax_resnet import parallel
from jax_resnet.configuration import defaults
from jax_resnet.configuration.typed_options import from_config
from jax_resnet.data import on_device
from jax_resnet.data.common import InputOptions
cfg = defaults.get_config()
cfg.batch_size, cfg.random_crop_pad, cfg.random_flip = 16, 3, True
rng = np.random.RandomState(0)
images = rng.randint(0, 256, (40, 8, 8, 3)).astype(np.uint8)
labels = rng.randint(0, 10, 40).astype(np.int32)
options = from_config(InputOptions, cfg)
it = on_device.device_batches(images, labels, parallel.create_mesh(), options, 2)
out = [next(it) for _ in range(3)]
print(json.dumps({'devices': jax.device_count(), 'tf': 'tensorflow' in sys.modules,
                  'shards': len(out[0]['image'].addressable_shards),
                  'images': [np.asarray(b['image']).tolist() for b in out],
                  'labels': [np.asarray(b['label']).tolist() for b in out]}))
"""


def _run(devices):
  env = dict(
    os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}', JAX_PLATFORMS='cpu'
  )
  result = subprocess.run(
    [sys.executable, '-c', _SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_batches_do_not_depend_on_device_count_and_need_no_tensorflow():
  one, four = _run(1), _run(4)
  assert one['devices'] == 1 and four['devices'] == 4 and four['shards'] == 4
  assert not one['tf'] and not four['tf']
  assert one['labels'] == four['labels']
  assert one['images'] == four['images']
