"""Export: each format reads back bit for bit with complete inference metadata, the weights
are the checkpoint's (trained, not a fresh init), torchvision's layout is torchvision's,
and a bad path or format is one clear error with the checkpoint untouched.

The digits run is test_predict.py's, trained once per session in this process; the
ResNet-18 checkpoint that torchvision's format needs is written directly
(``write_checkpoint``) rather than trained.
"""

import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization, traverse_util
from helpers import digits_config, torchvision_state_dict_shapes, train_setup

from jax_resnet import parallel
from jax_resnet.augment.pipeline import resize_images
from jax_resnet.data.common import DatasetInfo, imagenet_stats
from jax_resnet.errors import ConfigError, DataError, NotFoundError, UserError
from jax_resnet.inference import export
from jax_resnet.inference.predict import Predictor
from jax_resnet.models import torchvision_layout as tw
from jax_resnet.runs import saved_run
from jax_resnet.runs.checkpointing import Checkpoints

METADATA_FIELDS = {
  'format_version',
  'export_format',
  'model',
  'model_options',
  'num_classes',
  'image_shape',  # eval's size, what inference feeds the model
  'train_image_shape',
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


def write_checkpoint(workdir: str, config, info: DatasetInfo, step: int = 7, fill=None) -> dict:
  """A checkpoint as training writes one (state and meta) but of random numbers, not
  trained ones: nothing to compile, and a swapped or mistransposed tensor cannot pass.
  ``fill(rng, path, leaf)`` makes each array (default: uniform in [0.5, 1.5)). Returns its
  variables."""
  _, abstract = saved_run.abstract_state(config, info, parallel.create_mesh())
  rng = np.random.RandomState(0)
  fill = fill or (lambda rng, path, leaf: rng.uniform(0.5, 1.5, leaf.shape))
  state = jax.tree_util.tree_map_with_path(
    lambda path, leaf: jnp.asarray(np.asarray(fill(rng, path, leaf)).astype(leaf.dtype)), abstract
  )
  meta = {'step': step, 'config': json.loads(config.to_json_best_effort()), 'data': info.to_json()}
  checkpoints = Checkpoints(workdir)
  checkpoints.save(step, state, meta)
  checkpoints.wait()
  checkpoints.close()
  return jax.tree.map(np.asarray, {'params': state.params, 'batch_stats': state.batch_stats})


def photo_info(**changes) -> DatasetInfo:
  """The data description of a 32x32 ImageNet-style folder set of the photo classes."""
  mean, std = imagenet_stats(3)
  fields = dict(
    num_classes=len(PHOTO_CLASSES),
    num_train=64,
    num_eval=16,
    image_shape=(32, 32, 3),
    mean=mean,
    std=std,
    class_names=PHOTO_CLASSES,
    crop_style='random_resized',
  )
  return DatasetInfo(**{**fields, **changes})


@pytest.fixture(scope='module')
def resnet18_run(tmp_path_factory):
  """(workdir, variables) of a ResNet-18 checkpoint of 3 photo classes (ImageNet-style)."""
  config = small_config(model='resnet18', image_size=32, dataset='folder', batch_size=32)
  info = photo_info()
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
  workdir, config = digits_run, digits_config()
  path = str(tmp_path / 'out' / f'digits.{export_format}')
  assert export.export_checkpoint(workdir, path, 'latest', export_format) == path
  variables, metadata = export.read_export(path)

  saved = saved_run.load_run(workdir, 'latest')
  assert_identical(variables, jax.tree.map(np.asarray, saved.variables))
  # The trained weights, not those the run started from.
  shape = (config.image_size, config.image_size, 1)
  fresh = train_setup(config, image_shape=shape).state
  for key, value in flat(jax.tree.map(np.asarray, fresh.params)).items():
    assert not np.array_equal(flat(variables['params'])[key], value), key

  assert set(metadata) == METADATA_FIELDS
  assert metadata['format_version'] == export.FORMAT_VERSION
  assert metadata['export_format'] == export_format
  assert metadata['model'] == 'resnet20' and metadata['step'] == saved.step > 0
  assert metadata['num_classes'] == 10 and metadata['image_shape'] == list(shape)
  assert metadata['train_image_shape'] == list(shape)  # no eval_image_size: the same
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
    'block_dropout_rate': 0.0,
  }
  assert metadata['config'] == json.loads(config.to_json_best_effort())
  if export_format == 'msgpack':
    # The file alone is what earlier exports were; the metadata sits beside it.
    assert export.sidecar_path(path) == path + '.json'
    with open(path, 'rb') as f:
      assert_identical(serialization.msgpack_restore(f.read()), variables)
    with open(path + '.json') as f:
      sidecar = json.load(f)
    # The sidecar names the weights it describes, so a pair from two exports is refused.
    with open(path, 'rb') as f:
      assert sidecar.pop('weights_sha256') == hashlib.sha256(f.read()).hexdigest()
    assert sidecar == metadata
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
  workdir = digits_run
  path = tmp_path / 'digits.safetensors'
  with pytest.raises(ConfigError, match="'resnet20'.*torchvision has no layout"):
    export.export_checkpoint(workdir, str(path), 'latest', 'torchvision')
  assert not path.exists()
  with pytest.raises(ConfigError, match='Unknown export format'):
    export.export_checkpoint(workdir, str(path), 'latest', 'tflite')


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


DIGIT_CLASSES = tuple('0123456789')


def usable_weights(rng, path, leaf):
  """Random weights at a scale that keeps a forward pass finite (He-scaled kernels, BN
  scales and variances near 1), so that probabilities can be compared."""
  name = getattr(path[-1], 'key', getattr(path[-1], 'name', ''))
  if name == 'kernel':
    return rng.standard_normal(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
  if name in ('scale', 'var'):
    return rng.uniform(0.5, 1.5, leaf.shape)
  return 0.1 * rng.standard_normal(leaf.shape)


@pytest.fixture(scope='module')
def eval_size_run(tmp_path_factory):
  """(workdir, state) of a digits-like ResNet-20 checkpoint trained at 8x8, evaluated at
  12x12 (config.eval_image_size), with a weight EMA that differs from the raw weights."""
  config = small_config(image_size=8, eval_image_size=12, ema_decay=0.9, batch_size=32)
  info = DatasetInfo(
    num_classes=10,
    num_train=64,
    num_eval=16,
    image_shape=(8, 8, 1),
    mean=(8.0,),
    std=(4.0,),
    class_names=DIGIT_CLASSES,
  )
  workdir = str(tmp_path_factory.mktemp('eval_size_run'))
  write_checkpoint(workdir, config, info, fill=usable_weights)
  return workdir, saved_run.load_run(workdir, 'latest').state


def digit_images(count: int = 6, size: int = 8, seed: int = 0) -> np.ndarray:
  return np.random.RandomState(seed).randint(0, 256, (count, size, size)).astype(np.uint8)


def test_predictor_prepares_images_at_the_eval_size(eval_size_run, tmp_path):
  """Train low, test high: predict feeds the model what eval fed it, at eval_image_size
  (a 'pad' set's stored images, resized on the device as the eval step does)."""
  workdir, _ = eval_size_run
  predictor = Predictor.from_workdir(workdir, 'latest')
  assert predictor.image_shape == (12, 12, 1) and predictor.train_image_shape == (8, 8, 1)
  path = export.export_checkpoint(workdir, str(tmp_path / 'digits.msgpack'), 'latest')
  metadata = export.read_export(path)[1]
  assert metadata['image_shape'] == [12, 12, 1] and metadata['train_image_shape'] == [8, 8, 1]
  images = digit_images()
  prepared = np.stack([predictor.prepare(image) for image in images])
  on_device = np.asarray(resize_images(jnp.asarray(images[..., None]), 12))
  assert prepared.shape == on_device.shape == (len(images), 12, 12, 1)
  difference = np.abs(prepared.astype(int) - on_device.astype(int))
  assert difference.max() <= 1 and np.mean(difference > 0) < 0.01  # rare .5 ties
  probabilities = Predictor.from_export(path)(list(images))
  assert probabilities.shape == (len(images), 10) and np.isfinite(probabilities).all()
  np.testing.assert_allclose(probabilities, predictor.predict_prepared(prepared), atol=1e-6)


def test_predictor_crops_imagenet_style_images_at_the_eval_size(tmp_path):
  """A 'random_resized' run trained at 32 and evaluated at 40: the predictor's crop and
  resize are eval's decode-and-crop at 40 (TensorFlow's, on the same PNG)."""
  pytest.importorskip('tensorflow')
  import io

  from PIL import Image

  from jax_resnet.data import transforms
  from jax_resnet.data.tf_cpu import tf

  config = small_config(model='resnet18', image_size=32, eval_image_size=40, dataset='folder')
  info = photo_info()
  write_checkpoint(str(tmp_path), config, info)
  predictor = Predictor.from_workdir(str(tmp_path), 'latest')
  image = np.random.RandomState(1).randint(0, 256, (57, 83, 3)).astype(np.uint8)
  data = io.BytesIO()
  Image.fromarray(image).save(data, 'PNG')
  example = {'image': tf.constant(data.getvalue()), 'label': tf.constant(0)}
  expected = transforms.eval_transform(transforms.transform_options(config), 3)(example)
  prepared = predictor.prepare(image)
  assert prepared.shape == tuple(expected['image'].shape) == (40, 40, 3)
  difference = np.abs(prepared.astype(int) - expected['image'].numpy().astype(int))
  assert difference.max() <= 1 and np.mean(difference > 0) < 1e-3


def test_predict_and_export_with_the_ema_weights(eval_size_run, tmp_path):
  """weights='ema' predicts with the checkpoint's weight average, from the workdir and
  from an export of it, not with the raw weights."""
  workdir, state = eval_size_run
  images = list(digit_images())
  raw = Predictor.from_workdir(workdir, 'latest')
  ema = Predictor.from_workdir(workdir, 'latest', weights='ema')
  expected = Predictor(state.ema, raw.metadata)(images)
  assert np.isfinite(expected).all()
  np.testing.assert_array_equal(ema(images), expected)
  assert np.abs(raw(images) - expected).max() > 1e-3
  path = export.export_checkpoint(
    workdir, str(tmp_path / 'ema.safetensors'), 'latest', 'safetensors', weights='ema'
  )
  exported = Predictor.from_export(path)
  assert exported.metadata['weights'] == 'ema'
  np.testing.assert_array_equal(exported(images), expected)
  with pytest.raises(ConfigError, match="weights='average'"):
    saved_run.load_run(workdir, 'latest', weights='average')


def test_torchvision_export_whose_tensors_are_another_model_is_a_user_error(tmp_path):
  """A torchvision-format file whose metadata names another model than its tensors."""
  from helpers import random_variables

  path = str(tmp_path / 'mislabelled.safetensors')
  metadata = {'export_format': 'torchvision', 'model': 'resnet34', 'num_classes': 1000}
  tw.save_safetensors(path, tw.to_torchvision(random_variables('resnet18'), 'resnet18'), metadata)
  with pytest.raises(DataError) as error:
    export.read_export(path)
  assert isinstance(error.value, UserError)
  assert 'layer1.2.conv1.weight: expected (64, 64, 3, 3), found nothing' in str(error.value)


def test_a_msgpack_export_and_the_sidecar_of_another_are_refused(tmp_path):
  """The sidecar carries the digest of the weights it describes: a pair left mixed by an
  export cut short between its two files is one error, never read as one export."""
  rng = np.random.default_rng(0)
  paths = []
  for name in ('first', 'second'):
    variables = {'params': {'head': {'kernel': rng.normal(size=(4, 3)).astype(np.float32)}}}
    path = str(tmp_path / f'{name}.msgpack')
    export.write_msgpack(variables, path, {'model': 'resnet20', 'num_classes': 3})
    paths.append(path)
  assert export.read_export(paths[0])[1] == {'model': 'resnet20', 'num_classes': 3}
  os.replace(paths[1], paths[0])  # the second's weights beside the first's sidecar
  with pytest.raises(UserError, match='describes other weights'):
    export.read_export(paths[0])


def test_a_truncated_safetensors_file_is_one_user_error(tmp_path):

  path = tmp_path / 'model.safetensors'
  tw.save_safetensors(str(path), {'w': np.ones((64, 64), np.float32)}, {})
  data = path.read_bytes()
  path.write_bytes(data[: len(data) - 1000])  # cut short in the tensor data
  with pytest.raises(UserError, match='cannot be read as a safetensors file'):
    export.read_export(str(path))


def test_the_mean_of_the_last_checkpoints_is_exported(digits_run, tmp_path):
  """--mode=average: parameters and BatchNorm statistics are the mean of the newest K
  kept checkpoints' (timm's avg_checkpoints.py), the metadata names the steps; asking for
  more than are kept is one error and writes nothing."""
  kept = sorted(int(d) for d in os.listdir(os.path.join(digits_run, 'checkpoints')) if d.isdigit())
  assert len(kept) >= 2
  path = export.average_checkpoints(
    digits_run, str(tmp_path / 'mean.safetensors'), 2, 'safetensors'
  )
  variables, metadata = export.read_export(path)
  assert metadata['averaged_steps'] == kept[-2:] and metadata['step'] == kept[-1]
  first, second = (saved_run.load_run(digits_run, s).variables for s in kept[-2:])
  expected = jax.tree.map(lambda a, b: (np.float64(a) + np.float64(b)) / 2, first, second)
  flat_expected = traverse_util.flatten_dict(expected)
  flat = traverse_util.flatten_dict(variables)
  assert flat.keys() == flat_expected.keys()
  for key, got in flat.items():
    np.testing.assert_allclose(got, flat_expected[key], rtol=1e-6, atol=1e-7, err_msg=str(key))
  assert not np.allclose(first['params']['head']['kernel'], variables['params']['head']['kernel'])

  too_many = str(tmp_path / 'too_many.msgpack')
  with pytest.raises(ConfigError) as error:
    export.average_checkpoints(digits_run, too_many, len(kept) + 1)
  assert f'keeps {len(kept)} checkpoint(s)' in str(error.value)
  assert not os.path.exists(too_many)


def test_onnx_export_predicts_as_the_msgpack_export(digits_run, tmp_path):
  """The digits run as ONNX, run by onnxruntime through ``Predictor.from_export``: the
  msgpack export's probabilities (within 1e-4), flip averages and embeddings, and the same
  metadata; ``read_export`` (warm starts, teachers) refuses it in one line."""
  from jax_resnet.data import digits
  from jax_resnet.inference import onnx_graph

  onnx_path = export.export_checkpoint(digits_run, str(tmp_path / 'd.onnx'), 'best', 'onnx')
  msgpack_path = export.export_checkpoint(digits_run, str(tmp_path / 'd.msgpack'), 'best')
  from_onnx, from_msgpack = Predictor.from_export(onnx_path), Predictor.from_export(msgpack_path)
  assert type(from_onnx).__name__ == 'OnnxPredictor'
  assert {**from_onnx.metadata, 'export_format': 'msgpack'} == from_msgpack.metadata
  _, _, images, _, _ = digits.arrays(digits_config(image_size=8))
  images = list(images[:100])
  for flip in (False, True):
    expected = from_msgpack(images, flip=flip)
    np.testing.assert_allclose(from_onnx(images, batch_size=64, flip=flip), expected, atol=1e-4)
  expected = from_msgpack.embed(images)
  assert from_onnx.embedding_size == expected.shape[1] == 64
  np.testing.assert_allclose(from_onnx.embed(images), expected, atol=1e-4 * np.abs(expected).max())
  with pytest.raises(DataError, match='is an ONNX export'):
    export.read_export(onnx_path)
  assert onnx_graph.METADATA_KEY in from_onnx._session.get_modelmeta().custom_metadata_map
