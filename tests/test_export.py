"""Export: each format reads back bit for bit with complete inference metadata, the weights
are the checkpoint's (trained, not a fresh init), torchvision's layout is torchvision's,
and a bad path or format is one clear error with the checkpoint untouched.

The digits run is test_predict.py's, trained once per session in this process; the
ResNet-18 checkpoint that torchvision's format needs is written directly
(``write_checkpoint``) rather than trained.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization, traverse_util
from test_predict import digits_config, train_digits
from test_torchvision_weights import torchvision_state_dict_shapes

from jax_resnet import export, runs, sharding, steps
from jax_resnet import torchvision_weights as tw
from jax_resnet.checkpointing import Checkpoints
from jax_resnet.data.common import DatasetInfo, imagenet_stats
from jax_resnet.errors import ConfigError, NotFoundError, UserError
from jax_resnet.predict import Predictor

METADATA_FIELDS = {
  'format_version',
  'export_format',
  'model',
  'model_options',
  'num_classes',
  'image_shape',
  'mean',
  'std',
  'class_names',
  'crop_style',
  'eval_crop_fraction',
  'resize_antialias',
  'step',
  'config',
  'weights',  # 'raw', or 'ema' for the weight average
}
PHOTO_CLASSES = ('cat', 'dog', 'fox')


def small_config(**fields):
  from configs import default

  config = default.get_config()
  config.update(fields)
  return config


@pytest.fixture(scope='module')
def digits_run(tmp_path_factory):
  """(workdir, config) of the session's small digits run (shared with test_predict.py)."""
  return train_digits(tmp_path_factory), digits_config()


def write_checkpoint(workdir: str, config, info: DatasetInfo, step: int = 7) -> dict:
  """A checkpoint as training writes one (state and meta) but of random numbers, not
  trained ones: nothing to compile, and a swapped or mistransposed tensor cannot pass.
  Returns its variables."""
  _, abstract = runs.abstract_state(config, info, sharding.create_mesh())
  rng = np.random.RandomState(0)
  state = jax.tree.map(
    lambda leaf: jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape).astype(leaf.dtype)), abstract
  )
  meta = {'step': step, 'config': json.loads(config.to_json_best_effort()), 'data': info.to_json()}
  checkpoints = Checkpoints(workdir)
  checkpoints.save(step, state, meta)
  checkpoints.wait()
  checkpoints.close()
  return jax.tree.map(np.asarray, {'params': state.params, 'batch_stats': state.batch_stats})


@pytest.fixture(scope='module')
def resnet18_run(tmp_path_factory):
  """(workdir, variables) of a ResNet-18 checkpoint of 3 photo classes (ImageNet-style)."""
  config = small_config(model='resnet18', image_size=32, dataset='folder', batch_size=32)
  mean, std = imagenet_stats(3)
  info = DatasetInfo(
    num_classes=len(PHOTO_CLASSES),
    num_train=64,
    num_eval=16,
    image_shape=(32, 32, 3),
    mean=mean,
    std=std,
    class_names=PHOTO_CLASSES,
    crop_style='random_resized',
    eval_crop_fraction=0.875,
  )
  workdir = str(tmp_path_factory.mktemp('resnet18_run'))
  return workdir, write_checkpoint(workdir, config, info)


def flat(variables) -> dict:
  return traverse_util.flatten_dict(variables, sep='/')


def assert_identical(found, expected) -> None:
  """Same keys, dtypes, shapes and bits."""
  found, expected = flat(found), flat(expected)
  assert sorted(found) == sorted(expected)
  for key, value in expected.items():
    assert found[key].dtype == value.dtype and found[key].shape == value.shape, key
    np.testing.assert_array_equal(found[key], value, err_msg=key)


def snapshot(folder: str) -> dict:
  return {
    os.path.relpath(os.path.join(dirpath, name), folder): os.stat(os.path.join(dirpath, name))[6:9]
    for dirpath, _, names in os.walk(folder)
    for name in names
  }


@pytest.mark.parametrize('export_format', ['msgpack', 'safetensors'])
def test_export_reads_back_bit_for_bit_with_complete_metadata(digits_run, tmp_path, export_format):
  workdir, config = digits_run
  path = str(tmp_path / 'out' / f'digits.{export_format}')
  assert export.export_checkpoint(workdir, path, 'latest', export_format) == path
  variables, metadata = export.read_export(path)

  saved = runs.load(workdir, 'latest')
  assert_identical(variables, jax.tree.map(np.asarray, saved.variables))
  # The trained weights, not those the run started from.
  model = steps.create_model(config, 10)
  shape = (config.image_size, config.image_size, 1)
  fresh = steps.create_train_state(
    jax.random.PRNGKey(config.seed), config, model, shape, lambda step: 0.1
  )
  for key, value in flat(jax.tree.map(np.asarray, fresh.params)).items():
    assert not np.array_equal(flat(variables['params'])[key], value), key

  assert set(metadata) == METADATA_FIELDS
  assert metadata['format_version'] == export.FORMAT_VERSION
  assert metadata['export_format'] == export_format
  assert metadata['model'] == 'resnet20' and metadata['step'] == saved.step > 0
  assert metadata['num_classes'] == 10 and metadata['image_shape'] == list(shape)
  assert metadata['class_names'] == [str(d) for d in range(10)]
  assert metadata['mean'] == list(saved.info.mean) and metadata['std'] == list(saved.info.std)
  assert metadata['crop_style'] == 'pad' and metadata['eval_crop_fraction'] == 0.875
  assert metadata['resize_antialias'] is False  # digits are upsampled without it
  assert metadata['model_options'] == {
    'kernel_init': 'he_normal',  # config.model_options, its None stem dropped
    'dropout_rate': 0.0,
    'bn_momentum': config.bn_momentum,
    'bn_epsilon': 1e-5,
    'zero_init_residual': True,
    'remat': False,
    'frozen_batchnorm': False,
    'stochastic_depth_rate': 0.0,
  }
  assert metadata['config'] == json.loads(config.to_json_best_effort())
  if export_format == 'msgpack':
    # The file alone is what earlier exports were; the metadata sits beside it.
    assert export.sidecar_path(path) == path + '.json'
    with open(path, 'rb') as f:
      assert_identical(serialization.msgpack_restore(f.read()), variables)
    with open(path + '.json') as f:
      assert json.load(f) == metadata
  else:
    assert 'params/stage1_block1/Conv_0/kernel' in tw.load_safetensors(path)[0]


def test_torchvision_export_has_torchvisions_keys_and_reads_back(resnet18_run, tmp_path):
  workdir, expected = resnet18_run
  path = str(tmp_path / 'r18.safetensors')
  export.export_checkpoint(workdir, path, 'latest', 'torchvision')
  tensors, header = tw.load_safetensors(path)
  # What resnet18(num_classes=3).state_dict() holds, key for key and shape for shape.
  shapes = torchvision_state_dict_shapes('resnet18', num_classes=len(PHOTO_CLASSES))
  assert {key: value.shape for key, value in tensors.items()} == shapes
  assert {str(v.dtype) for k, v in tensors.items() if 'num_batches_tracked' not in k} == {'float32'}
  np.testing.assert_array_equal(tensors['fc.weight'], expected['params']['head']['kernel'].T)

  variables, metadata = export.read_export(path)
  assert metadata == header and metadata['export_format'] == 'torchvision'
  assert_identical(variables, expected)
  assert metadata['class_names'] == list(PHOTO_CLASSES)
  assert metadata['crop_style'] == 'random_resized' and metadata['resize_antialias'] is False

  # The same metadata in every format, bar the format's name.
  other = export.export_checkpoint(workdir, str(tmp_path / 'r18.msgpack'), 'latest', 'msgpack')
  other_variables, other_metadata = export.read_export(other)
  assert_identical(other_variables, expected)
  assert {**other_metadata, 'export_format': 'torchvision'} == metadata


def test_predictor_from_any_export_equals_the_workdirs(resnet18_run, tmp_path):
  """Photos of odd sizes, centre-cropped and resized: the same probabilities either way."""
  workdir, _ = resnet18_run
  path = str(tmp_path / 'r18.safetensors')
  export.export_checkpoint(workdir, path, 'latest', 'torchvision')
  rng = np.random.RandomState(0)
  images = [rng.randint(0, 256, shape).astype(np.uint8) for shape in [(40, 70, 3), (90, 33)]]
  from_export = Predictor.from_export(path)
  expected = Predictor.from_workdir(workdir)(images)
  np.testing.assert_array_equal(from_export(images), expected)
  assert from_export.class_names == PHOTO_CLASSES
  assert [best[0][0] for best in from_export.top_k(images, 1)] == [
    PHOTO_CLASSES[i] for i in expected.argmax(1)
  ]


def test_torchvision_format_of_a_cifar_model_is_one_user_error(digits_run, tmp_path):
  workdir, _ = digits_run
  path = tmp_path / 'digits.safetensors'
  with pytest.raises(ConfigError, match="'resnet20'.*torchvision has no layout"):
    export.export_checkpoint(workdir, str(path), 'latest', 'torchvision')
  assert not path.exists()
  with pytest.raises(ConfigError, match='Unknown export format'):
    export.export_checkpoint(workdir, str(path), 'latest', 'onnx')


@pytest.mark.parametrize('export_format', export.EXPORT_FORMATS)
def test_unwritable_export_path_is_one_user_error_naming_it(resnet18_run, tmp_path, export_format):
  workdir, _ = resnet18_run
  before = snapshot(workdir)
  blocker = tmp_path / 'file'
  blocker.write_text('not a directory')
  path = str(blocker / 'export' / 'model.bin')
  with pytest.raises(UserError) as error:
    export.export_checkpoint(workdir, path, 'latest', export_format)
  assert isinstance(error.value, OSError) and path in str(error.value)
  with pytest.raises(UserError, match='is a directory'):
    export.export_checkpoint(workdir, str(tmp_path), 'latest', export_format)
  assert snapshot(workdir) == before


def test_read_export_of_something_else_is_a_user_error(tmp_path):
  with pytest.raises(NotFoundError):
    export.read_export(str(tmp_path / 'absent.safetensors'))
  text = tmp_path / 'notes.txt'
  text.write_text('hello')
  with pytest.raises(UserError, match='neither a safetensors nor a msgpack export'):
    export.read_export(str(text))
  bare = tmp_path / 'bare.msgpack'
  bare.write_bytes(serialization.msgpack_serialize({'params': {'w': np.zeros(2, np.float32)}}))
  with pytest.raises(NotFoundError, match='bare.msgpack.json'):
    export.read_export(str(bare))
  unlabelled = tmp_path / 'plain.safetensors'
  tw.save_safetensors(str(unlabelled), {'w': np.zeros(2, np.float32)})
  with pytest.raises(UserError, match='without'):
    export.read_export(str(unlabelled))
