"""torchvision state_dict conversion: keys and shapes as torchvision has them, bit-exact round
trips through safetensors, the same logits as torchvision's forward pass, and clear errors.

torchvision is not installed, so its architecture is written out here from its documented
definition (torchvision/models/resnet.py), independently of the module under test.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
from flax import traverse_util
from helpers import TORCHVISION_RESNETS, random_variables, torchvision_state_dict_shapes

from jax_resnet import models
from jax_resnet.models import torchvision_layout as tw

SUPPORTED = (
  'resnet18, resnet34, resnet50, resnet101, resnet152, resnext50_32x4d, resnext101_32x8d, '
  'resnext101_64x4d, wide_resnet50_2, wide_resnet101_2'
)


def _flat(variables):
  return traverse_util.flatten_dict(variables)


def _assert_bit_identical(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  flat_actual = _flat(actual)
  for path, value in _flat(expected).items():
    got = flat_actual[path]
    assert type(got) is np.ndarray and got.dtype == np.float32, path
    assert np.array_equal(got.view(np.uint32), value.view(np.uint32)), path


@pytest.mark.parametrize(
  'model_name', ['resnet18', 'resnet34', 'resnet50', 'resnext50_32x4d', 'wide_resnet50_2']
)
def test_keys_and_shapes_are_torchvisions(model_name):
  state_dict = tw.to_torchvision(random_variables(model_name), model_name)
  expected = torchvision_state_dict_shapes(model_name)
  assert list(state_dict) == list(expected)  # the same keys, in state_dict() order
  assert {k: v.shape for k, v in state_dict.items()} == expected
  for key, value in state_dict.items():
    assert value.flags.c_contiguous, key
    if key.endswith('num_batches_tracked'):
      assert value.dtype == np.int64 and value == 0, key
    else:
      assert value.dtype == np.float32, key


def test_counts_match_torchvisions_published_ones():
  """Entries: state_dict(), without counters, and parameters(); and the parameter total."""
  for model_name, (entries, without_counters, parameters, total) in {
    'resnet18': (122, 102, 62, 11_689_512),
    'resnet34': (218, 182, 110, 21_797_672),
    'resnet50': (320, 267, 161, 25_557_032),
  }.items():
    state_dict = tw.to_torchvision(random_variables(model_name), model_name)
    learnable = [v for k, v in state_dict.items() if 'running_' not in k and 'num_batches' not in k]
    assert len(state_dict) == entries
    assert sum('num_batches_tracked' not in k for k in state_dict) == without_counters
    assert len(learnable) == parameters
    assert sum(v.size for v in learnable) == total


def test_wide_and_grouped_models_have_torchvisions_parameter_counts():
  """torchvision's published counts (its model docs' num_params), and the file's model is
  told apart from resnet50's, whose keys it shares."""
  for model_name, total in {
    'wide_resnet50_2': 68_883_240,
    'wide_resnet101_2': 126_886_696,
    'resnext50_32x4d': 25_028_904,
    'resnext101_32x8d': 88_791_336,
    'resnext101_64x4d': 83_455_272,
  }.items():
    shapes = torchvision_state_dict_shapes(model_name)
    learnable = [s for k, s in shapes.items() if 'running_' not in k and 'num_batches' not in k]
    assert sum(int(np.prod(s)) for s in learnable) == total
    if model_name.startswith(('resnext101', 'wide_resnet101')):
      continue  # their 50-layer twins check the layout (and tests/test_models.py the counts)
    state_dict = tw.to_torchvision(random_variables(model_name), model_name)
    assert {k: v.shape for k, v in state_dict.items()} == shapes
    assert tw.matching_model(state_dict) == model_name


def test_layouts_transpose_convs_and_head():
  variables = random_variables('resnet18')
  state_dict = tw.to_torchvision(variables, 'resnet18')
  params, stats = variables['params'], variables['batch_stats']
  hwio = params['stage2_block1']['Conv_0']['kernel']
  np.testing.assert_array_equal(state_dict['layer2.0.conv1.weight'][5, 7, 2, 1], hwio[2, 1, 7, 5])
  np.testing.assert_array_equal(state_dict['fc.weight'], params['head']['kernel'].T)
  np.testing.assert_array_equal(
    state_dict['layer2.0.downsample.1.running_var'], stats['stage2_block1']['proj_bn']['var']
  )
  np.testing.assert_array_equal(state_dict['bn1.weight'], params['stem_bn']['scale'])


@pytest.mark.parametrize('model_name', ['resnet18', 'resnet50'])
def test_round_trip_through_safetensors_is_bit_identical(model_name, tmp_path):
  variables = random_variables(model_name, num_classes=1000, seed=1)
  # Values a lossy path would change: -0, a NaN payload, inf, the smallest subnormal.
  specials = np.array([0x80000000, 0x7FC12345, 0x7F800000, 0x00000001], np.uint32)
  variables['params']['head']['bias'][:4] = specials.view(np.float32)
  path = str(tmp_path / 'weights.safetensors')
  metadata = {'model': model_name, 'num_classes': 1000, 'note': 'round trip'}
  state_dict = tw.to_torchvision(variables, model_name)
  tw.save_safetensors(path, state_dict, metadata)

  tensors, loaded_metadata = tw.load_safetensors(path)
  assert loaded_metadata == metadata
  assert tensors.keys() == state_dict.keys()
  for key, value in state_dict.items():  # shapes too: num_batches_tracked stays 0-d
    assert (tensors[key].shape, tensors[key].dtype) == (value.shape, value.dtype), key
    assert tensors[key].tobytes() == value.tobytes(), key
  _assert_bit_identical(tw.from_torchvision(tensors, model_name), variables)
  with safetensors.safe_open(path, framework='np') as file:  # a str -> str header
    assert set(file.metadata()) == {tw.METADATA_KEY}


def test_safetensors_without_metadata(tmp_path):
  path = str(tmp_path / 'plain.safetensors')
  tw.save_safetensors(path, {'a': np.arange(6, dtype=np.float32).reshape(2, 3)})
  tensors, metadata = tw.load_safetensors(path)
  assert metadata is None
  np.testing.assert_array_equal(tensors['a'], np.arange(6).reshape(2, 3))


# torchvision's forward pass, written against the state_dict alone (NCHW, OIHW, eval mode).


def _conv(x, weight, stride: int, padding: int):
  return jax.lax.conv_general_dilated(
    x,
    weight,
    (stride, stride),
    [(padding, padding)] * 2,
    dimension_numbers=('NCHW', 'OIHW', 'NCHW'),
    feature_group_count=x.shape[1] // weight.shape[1],  # ResNeXt's grouped conv2
    precision=jax.lax.Precision.HIGHEST,
  )


def _batch_norm(x, state_dict, name: str, eps: float = 1e-5):
  weight, bias = state_dict[f'{name}.weight'], state_dict[f'{name}.bias']
  mean, var = state_dict[f'{name}.running_mean'], state_dict[f'{name}.running_var']
  channel = lambda v: v[None, :, None, None]
  return (x - channel(mean)) * channel(weight / jnp.sqrt(var + eps)) + channel(bias)


def _basic_block(x, sd, block: str, stride: int):
  out = jax.nn.relu(
    _batch_norm(_conv(x, sd[f'{block}.conv1.weight'], stride, 1), sd, f'{block}.bn1')
  )
  return _batch_norm(_conv(out, sd[f'{block}.conv2.weight'], 1, 1), sd, f'{block}.bn2')


def _bottleneck(x, sd, block: str, stride: int):
  out = jax.nn.relu(_batch_norm(_conv(x, sd[f'{block}.conv1.weight'], 1, 0), sd, f'{block}.bn1'))
  out = jax.nn.relu(
    _batch_norm(_conv(out, sd[f'{block}.conv2.weight'], stride, 1), sd, f'{block}.bn2')
  )
  return _batch_norm(_conv(out, sd[f'{block}.conv3.weight'], 1, 0), sd, f'{block}.bn3')


def torchvision_forward(state_dict, x, model_name: str):
  layers, bottleneck, _, _ = TORCHVISION_RESNETS[model_name]
  residual_branch = _bottleneck if bottleneck else _basic_block
  sd = state_dict
  x = jax.nn.relu(_batch_norm(_conv(x, sd['conv1.weight'], 2, 3), sd, 'bn1'))
  window, strides, pad = (1, 1, 3, 3), (1, 1, 2, 2), ((0, 0), (0, 0), (1, 1), (1, 1))
  x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, window, strides, pad)
  for layer, num_blocks in enumerate(layers, start=1):
    for j in range(num_blocks):
      block, stride = f'layer{layer}.{j}', 2 if layer > 1 and j == 0 else 1
      identity = x
      if f'{block}.downsample.0.weight' in sd:
        identity = _conv(x, sd[f'{block}.downsample.0.weight'], stride, 0)
        identity = _batch_norm(identity, sd, f'{block}.downsample.1')
      x = jax.nn.relu(residual_branch(x, sd, block, stride) + identity)
  x = jnp.mean(x, axis=(2, 3))
  return jnp.dot(x, sd['fc.weight'].T, precision=jax.lax.Precision.HIGHEST) + sd['fc.bias']


@pytest.mark.parametrize('model_name', ['resnet18', 'resnet50', 'resnext50_32x4d'])
def test_torchvision_forward_gives_the_same_logits(model_name):
  variables = random_variables(model_name, num_classes=10, seed=2)
  state_dict = tw.to_torchvision(variables, model_name)
  x_nchw = np.random.default_rng(3).standard_normal((2, 3, 64, 64)).astype(np.float32)

  expected = jax.jit(torchvision_forward, static_argnums=2)(state_dict, x_nchw, model_name)
  model = models.create_model(model_name, 10)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))  # faster than op by op
  logits = apply(variables, x_nchw.transpose(0, 2, 3, 1))
  assert np.abs(expected).max() > 0.1  # the comparison is not between near-zero logits
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_another_class_count_is_a_head_mismatch():
  state_dict = tw.to_torchvision(random_variables('resnet18', num_classes=10), 'resnet18')
  variables = tw.from_torchvision(state_dict, 'resnet18')  # the checkpoint's head, as it is
  assert variables['params']['head']['kernel'].shape == (512, 10)

  with pytest.raises(tw.HeadMismatchError) as error:
    tw.from_torchvision(state_dict, 'resnet18', num_classes=1000)
  assert isinstance(error.value, ValueError)
  assert (error.value.expected, error.value.found) == (1000, 10)
  assert tw.from_torchvision(state_dict, 'resnet18', num_classes=10).keys() == variables.keys()


def test_state_dict_without_head_or_counters():
  """timm's ``num_classes=0`` models have no fc; older checkpoints no num_batches_tracked."""
  state_dict = tw.to_torchvision(random_variables('resnet18'), 'resnet18')
  trimmed = {k: v for k, v in state_dict.items() if not k.startswith('fc.')}
  assert 'head' not in tw.from_torchvision(trimmed, 'resnet18')['params']
  with pytest.raises(tw.HeadMismatchError):
    tw.from_torchvision(trimmed, 'resnet18', num_classes=1000)
  no_counters = {k: v for k, v in state_dict.items() if 'num_batches_tracked' not in k}
  _assert_bit_identical(
    tw.from_torchvision(no_counters, 'resnet18'), tw.from_torchvision(state_dict, 'resnet18')
  )


def test_other_model_weights_list_the_differing_keys():
  state_dict = tw.to_torchvision(random_variables('resnet18'), 'resnet18')
  with pytest.raises(ValueError) as error:
    tw.from_torchvision(state_dict, 'resnet34')
  message = str(error.value)
  assert not isinstance(error.value, tw.HeadMismatchError)
  assert 'layer1.2.conv1.weight: expected (64, 64, 3, 3), found nothing' in message
  assert '80 keys differ' in message  # layer1.2, layer2.2-3, layer3.2-5, layer4.2: 8 x 10
  assert "convert them as 'resnet18'" in message


def test_wrong_shape_and_unexpected_keys_are_listed():
  state_dict = tw.to_torchvision(random_variables('resnet18'), 'resnet18')
  state_dict['layer2.0.conv2.weight'] = np.zeros((128, 128, 1, 1), np.float32)
  state_dict['layer5.0.conv1.weight'] = np.zeros((8, 8, 3, 3), np.float32)
  with pytest.raises(ValueError) as error:
    tw.from_torchvision(state_dict, 'resnet18')
  message = str(error.value)
  assert '2 keys differ' in message
  assert 'layer2.0.conv2.weight: expected (128, 128, 3, 3), found (128, 128, 1, 1)' in message
  assert 'layer5.0.conv1.weight: unexpected, shape (8, 8, 3, 3)' in message

  prefixed = {f'module.{k}': v for k, v in state_dict.items()}
  with pytest.raises(ValueError, match="starts with 'module.'"):
    tw.from_torchvision(prefixed, 'resnet18')


def test_variables_of_another_model_are_refused():
  with pytest.raises(ValueError) as error:
    tw.to_torchvision(random_variables('resnet18'), 'resnet34')
  assert 'params/stage1_block3/Conv_0/kernel: expected (3, 3, 64, 64), found nothing' in str(
    error.value
  )


@pytest.mark.parametrize('model_name', ['resnet20', 'resnet110', 'preact_resnet18', 'plain18', 'x'])
def test_models_without_a_torchvision_layout(model_name):
  variables = random_variables('resnet18')
  with pytest.raises(ValueError, match=SUPPORTED):
    tw.to_torchvision(variables, model_name)
  with pytest.raises(ValueError, match=SUPPORTED):
    tw.from_torchvision(tw.to_torchvision(variables, 'resnet18'), model_name)


def test_cifar_stem_has_no_torchvision_layout():
  model = models.create_model('resnet18', 10, stem='cifar')
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  with pytest.raises(ValueError, match=f"stem='cifar'.*{SUPPORTED}"):
    tw.to_torchvision(variables, 'resnet18')


def test_imports_neither_torch_nor_tensorflow():
  code = (
    'import sys, jax_resnet.models.torchvision_layout; '
    "print([m for m in ('torch', 'tensorflow') if m in sys.modules])"
  )
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(
    [sys.executable, '-c', code], cwd=root, capture_output=True, text=True, check=True
  )
  assert result.stdout.strip() == '[]'


@pytest.mark.parametrize('name', ['seresnet50', 'resnet50d'])
def test_variants_outside_torchvision_layout_are_refused(name):
  """Squeeze-and-excitation and ResNet-D have no place in torchvision's state dict."""
  assert tw.SUPPORTED_MODELS == tuple(SUPPORTED.split(', '))
  with pytest.raises(ValueError, match=SUPPORTED):
    tw.from_torchvision({}, name)
