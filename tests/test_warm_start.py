"""Weights in (config.init_from) and the fine-tuning controls: freezing, the head's
learning-rate multiplier, BatchNorm in inference mode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import digits_config, fixed_batch, train_setup

from jax_resnet.errors import ConfigError
from jax_resnet.inference import export
from jax_resnet.models import torchvision_layout as tw
from jax_resnet.training import warm_start


def fresh_state(config, num_classes=10, image_shape=(12, 12, 1), seed=1):
  config = config.copy_and_resolve_references()
  config.seed = seed
  return train_setup(config, num_classes, image_shape).state


@pytest.fixture
def info_logs(caplog):
  """caplog with absl's INFO records (absl keeps WARNING until an app sets otherwise)."""
  from absl import logging

  previous = logging.get_verbosity()
  logging.set_verbosity(logging.INFO)
  yield caplog
  logging.set_verbosity(previous)


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def assert_same(a, b):
  for x, y in zip(leaves(a), leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope='module')
def run_variables(digits_run):
  from jax_resnet.runs import saved_run

  return jax.tree.map(np.asarray, saved_run.load_run(digits_run, 'best').variables)


@pytest.mark.parametrize('export_format', ['workdir', 'msgpack', 'safetensors'])
def test_init_from_a_run_or_its_export_loads_exactly_its_weights(
  digits_run, run_variables, tmp_path, export_format
):
  if export_format == 'workdir':
    source = digits_run
  else:
    source = str(tmp_path / f'model.{export_format}')
    export.export_checkpoint(digits_run, source, 'best', export_format)
  loaded = warm_start.load_source(source, 'resnet20')
  assert_same(loaded.variables, run_variables)  # export then import is the identity
  assert loaded.class_names == tuple('0123456789')
  state = warm_start.apply(fresh_state(digits_config()), loaded, loaded.class_names)
  assert_same({'params': state.params, 'batch_stats': state.batch_stats}, run_variables)
  assert int(state.step) == 0


def test_init_from_workdir_step_and_latest(digits_run):
  """PATH:STEP and PATH:latest load that checkpoint's weights (the run's first and last
  differ, so loading the wrong one cannot pass)."""
  import os

  from jax_resnet.runs import saved_run

  steps_saved = sorted(int(s) for s in os.listdir(os.path.join(digits_run, 'checkpoints')))
  assert len(steps_saved) >= 2
  expected = {
    suffix: jax.tree.map(np.asarray, saved_run.load_run(digits_run, which).variables)
    for suffix, which in (('latest', steps_saved[-1]), (str(steps_saved[0]), steps_saved[0]))
  }
  first, last = (leaves(expected[k]) for k in (str(steps_saved[0]), 'latest'))
  assert any(not np.array_equal(a, b) for a, b in zip(first, last))
  for suffix, variables in expected.items():
    loaded = warm_start.load_source(f'{digits_run}:{suffix}', 'resnet20')
    assert f'{suffix} checkpoint' in loaded.description
    assert_same(loaded.variables, variables)


@pytest.fixture(scope='module')
def resnet18_state():
  """A fresh ResNet-18 train state (1000 classes): the target of torchvision weights."""
  from configs import default

  config = default.get_config()
  config.model, config.image_size = 'resnet18', 32
  return fresh_state(config, 1000, (32, 32, 3), seed=3)


def save_torchvision(path, variables, model_name, drop=()) -> str:
  """``variables`` as a plain torchvision-layout safetensors file (no metadata), as
  torchvision or timm save them, less the keys that start with ``drop``."""
  tensors = tw.to_torchvision(variables, model_name)
  tw.save_safetensors(str(path), {k: v for k, v in tensors.items() if not k.startswith(drop)})
  return str(path)


def test_torchvision_layout_round_trip_through_a_plain_safetensors_file(resnet18_state, tmp_path):
  """timm's or torchvision's own weights: a safetensors file without this project's
  metadata, read as torchvision's layout for the configured model."""
  state = resnet18_state
  variables = jax.tree.map(np.asarray, {'params': state.params, 'batch_stats': state.batch_stats})
  path = save_torchvision(tmp_path / 'resnet18.safetensors', variables, 'resnet18')
  loaded = warm_start.load_source(path, 'resnet18')
  assert 'torchvision layout' in loaded.description and loaded.class_names == ()
  assert_same(loaded.variables, variables)


def test_torchvision_weights_of_another_model_are_one_error_listing_keys(resnet18_state, tmp_path):
  """ResNet-34 weights into a ResNet-18 run, ResNet-18 weights into a CIFAR ResNet-20 (no
  torchvision layout), a state dict of unknown keys: one ConfigError each, not a bug."""
  from helpers import random_variables

  resnet34 = save_torchvision(
    tmp_path / 'r34.safetensors', random_variables('resnet34'), 'resnet34'
  )
  with pytest.raises(ConfigError) as error:
    warm_start.apply(resnet18_state, warm_start.load_source(resnet34, 'resnet18'))
  message = str(error.value)
  assert f'the weights of {resnet34} (torchvision layout, resnet34) do not fit' in message
  assert 'batch_stats/stage1_block3/BatchNorm_0/mean: unexpected, shape' in message
  assert '--config.model=resnet34' in message

  resnet18 = save_torchvision(
    tmp_path / 'r18.safetensors', random_variables('resnet18'), 'resnet18'
  )
  with pytest.raises(ConfigError) as error:
    warm_start.apply(fresh_state(digits_config()), warm_start.load_source(resnet18, 'resnet20'))
  message = str(error.value)
  assert 'keys differ' in message and '--config.model=resnet18' in message
  assert 'batch_stats/stage1_block1/BatchNorm_0/mean: expected (16,), found (64,)' in message

  prefixed = tmp_path / 'prefixed.safetensors'
  tensors = tw.load_safetensors(resnet18)[0]
  tw.save_safetensors(str(prefixed), {f'module.{k}': v for k, v in tensors.items()})
  for model in ('resnet18', 'resnet20'):  # with a layout, and without one
    with pytest.raises(ConfigError, match=f"config.init_from='{prefixed}'.*config.model='{model}'"):
      warm_start.load_source(str(prefixed), model)


def test_headless_torchvision_weights_keep_the_fresh_head(resnet18_state, tmp_path, info_logs):
  """timm's num_classes=0 models save no fc: the backbone loads, the head stays fresh."""
  from helpers import random_variables

  variables = random_variables('resnet18')
  path = save_torchvision(tmp_path / 'headless.safetensors', variables, 'resnet18', ('fc.',))
  state = warm_start.apply(resnet18_state, warm_start.load_source(path, 'resnet18'))
  for key in ('kernel', 'bias'):
    np.testing.assert_array_equal(state.params['head'][key], resnet18_state.params['head'][key])
  body = lambda params: {k: v for k, v in params.items() if k != 'head'}
  assert_same(body(state.params), body(variables['params']))
  assert_same(state.batch_stats, variables['batch_stats'])
  assert (
    'the classifier head has no weights in the source (a headless model, as timm saves '
    'num_classes=0): re-initialised params/head/bias, params/head/kernel' in info_logs.text
  )


def test_the_weight_ema_starts_from_the_loaded_weights(run_variables):
  config = digits_config()
  config.ema_decay = 0.99
  state = warm_start.apply(fresh_state(config), warm_start.Source(run_variables, 'the digits run'))
  assert_same(state.ema, run_variables)
  assert_same({'params': state.params, 'batch_stats': state.batch_stats}, run_variables)
  # Arrays of its own: the train step donates the state, and XLA refuses one array twice.
  trained = {id(x) for x in jax.tree.leaves((state.params, state.batch_stats))}
  assert not {id(x) for x in jax.tree.leaves(state.ema)} & trained


def test_another_class_count_reinitialises_only_the_head(run_variables, info_logs):
  config = digits_config()
  fresh = fresh_state(config, num_classes=5)
  state = warm_start.apply(fresh, warm_start.Source(run_variables, 'the digits run'))
  for key in ('kernel', 'bias'):  # the head keeps its fresh, 5-class initialisation
    np.testing.assert_array_equal(state.params['head'][key], fresh.params['head'][key])
  body = lambda v: {k: v for k, v in v['params'].items() if k != 'head'}
  assert_same(body({'params': state.params}), body(run_variables))
  assert_same(state.batch_stats, run_variables['batch_stats'])
  assert 'another class count (10 classes in the weights, 5 here)' in info_logs.text


def test_other_class_names_reinitialise_the_head(run_variables, info_logs):
  """Digits 0-4 into a 5-9 run: the same count, other classes: a fresh head."""
  fresh = fresh_state(digits_config(), num_classes=10)
  source = warm_start.Source(run_variables, 'the digits run', tuple('0123456789'))
  kept = warm_start.apply(fresh, source, tuple('0123456789'))
  np.testing.assert_array_equal(
    kept.params['head']['kernel'], run_variables['params']['head']['kernel']
  )
  renamed = warm_start.apply(fresh, source, tuple('abcdefghij'))
  np.testing.assert_array_equal(renamed.params['head']['kernel'], fresh.params['head']['kernel'])
  assert (
    'the classifier head has other classes (0, 1, 2, 3, ... (10) in the weights, '
    'a, b, c, d, ... (10) here)' in info_logs.text
  )


def test_another_model_is_one_error_listing_keys(run_variables):
  config = digits_config()
  config.model = 'resnet32'
  with pytest.raises(ConfigError) as error:
    warm_start.apply(fresh_state(config), warm_start.Source(run_variables, 'the digits run'))
  message = str(error.value)
  assert 'do not fit this model' in message and 'stage1_block4' in message
  assert 'keys differ' in message


def test_a_grayscale_run_starts_an_rgb_one_through_an_adapted_stem(run_variables, info_logs):
  """The digits run (one channel) into an RGB model: the stem kernel is repeated over
  three channels and scaled by 1/3 (timm's adapt_input_conv), so an RGB image whose
  channels are equal gives the logits the gray image gave; back to one channel sums it.
  Another difference of the same model names the shapes, not the model."""
  config = digits_config()
  rgb = warm_start.apply(
    fresh_state(config, image_shape=(12, 12, 3)),
    warm_start.Source(run_variables, 'the digits run', model='resnet20'),
  )
  assert 'params/stem_conv/kernel adapted from 1 input channels to 3' in info_logs.text
  model = train_setup(config, 10, (12, 12, 1)).model
  gray = fixed_batch(4, 12)['image'][..., :1].astype(np.float32) / 255
  expected = model.apply(run_variables, gray, train=False)
  variables = {'params': rgb.params, 'batch_stats': rgb.batch_stats}
  got = model.apply(variables, np.repeat(gray, 3, axis=-1), train=False)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  kernel = run_variables['params']['stem_conv']['kernel']
  back = warm_start.adapt_input_channels(warm_start.adapt_input_channels(kernel, 3), 1)
  np.testing.assert_allclose(back, kernel, rtol=1e-6)

  config.model_options.stem = 'imagenet'  # resnet20 still, another stem: named by its shapes
  with pytest.raises(ConfigError) as error:
    warm_start.apply(
      fresh_state(config, image_shape=(12, 12, 3)),
      warm_start.Source(run_variables, 'the digits run', model='resnet20'),
      model_name='resnet20',
    )
  assert 'stem_conv/kernel' in str(error.value) and 'Both are resnet20' in str(error.value)


def _train(config, num_steps=3, num_classes=10):
  """``num_steps`` train steps on one fixed batch: (params and BN statistics before, after)."""
  state = fresh_state(config, num_classes, (8, 8, 3))
  before = jax.tree.map(np.array, (state.params, state.batch_stats))  # copies: donated
  train_fn = train_setup(config, num_classes, (8, 8, 3)).train_fn
  for _ in range(num_steps):
    state, _ = train_fn(state, fixed_batch())
  return before, (state.params, state.batch_stats)


def _changed(before, after):
  return {
    name: not all(
      np.array_equal(a, np.asarray(b))
      for a, b in zip(jax.tree.leaves(before[name]), jax.tree.leaves(after[name]))
    )
    for name in before
  }


@pytest.mark.parametrize('freeze', ['backbone', 'stem,stage1'])
def test_frozen_parameters_get_exactly_zero_updates(config, freeze):
  config.image_size, config.freeze, config.weight_decay = 8, freeze, 1e-2
  (params, _), (new_params, _) = _train(config)
  changed = _changed(params, new_params)
  if freeze == 'backbone':
    assert changed == {name: name == 'head' for name in params}
  else:
    assert all(not changed[n] for n in params if n.startswith(('stem', 'stage1_')))
    assert all(changed[n] for n in params if n.startswith(('stage2_', 'stage3_', 'head')))


def test_head_learning_rate_multiplier_scales_only_the_head(config):
  config.image_size, config.schedule, config.momentum = 8, 'constant', 0.0
  config.weight_decay = 0.0
  (params, _), (plain, _) = _train(config, num_steps=1)
  config.head_learning_rate_multiplier = 10.0
  _, (boosted, _) = _train(config, num_steps=1)
  delta = lambda new: np.asarray(new['head']['kernel']) - params['head']['kernel']
  np.testing.assert_allclose(delta(boosted), 10 * delta(plain), rtol=1e-4, atol=1e-7)
  for a, b in zip(
    jax.tree.leaves(boosted['stage2_block1']), jax.tree.leaves(plain['stage2_block1'])
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_frozen_batchnorm_keeps_the_running_statistics(config):
  config.image_size, config.frozen_batchnorm = 8, True
  (_, stats), (_, new_stats) = _train(config)
  assert not any(_changed(stats, new_stats).values())
  config.frozen_batchnorm = False
  (_, stats), (_, new_stats) = _train(config)
  assert all(_changed(stats, new_stats).values())


def test_init_from_applies_once_then_the_run_resumes_its_own(digits_run, tmp_path, info_logs):
  from jax_resnet.training import loop

  config = digits_config()
  config.init_from, config.num_train_steps = digits_run, 5
  workdir = str(tmp_path / 'finetune')
  loop.train_and_evaluate(config, workdir)
  assert 'init_from ' in info_logs.text and 'loaded' in info_logs.text
  info_logs.clear()
  config.num_train_steps = 8
  loop.train_and_evaluate(config, workdir)
  assert 'Resumed from' in info_logs.text and 'init_from ' not in info_logs.text


def test_fine_tune_torchvision_weights_on_a_class_folder_then_predict(config, tmp_path, info_logs):
  """The README's fine-tuning workflow: torchvision-layout ResNet-18 weights (1000
  classes), a 3-class image folder, the backbone's first stages frozen, the head
  re-initialised and trained faster; then predict on the folder's images."""
  from helpers import folder_config

  from jax_resnet.inference import predict
  from jax_resnet.training import loop

  folder_config(config, tmp_path)
  config.model, config.batch_size, config.eval_batch_size = 'resnet18', 8, 8
  config.num_train_steps, config.log_every_steps = 4, 2
  imagenet = fresh_state(config, 1000, (32, 32, 3), seed=5)
  weights = jax.tree.map(
    np.asarray, {'params': imagenet.params, 'batch_stats': imagenet.batch_stats}
  )
  source = str(tmp_path / 'resnet18_torchvision.safetensors')
  tw.save_safetensors(source, tw.to_torchvision(weights, 'resnet18'))
  config.init_from, config.freeze = source, 'stem,stage1'
  config.head_learning_rate_multiplier, config.frozen_batchnorm = 10.0, True
  workdir = str(tmp_path / 'pets')
  loop.train_and_evaluate(config, workdir)
  assert 're-initialised params/head/bias, params/head/kernel' in info_logs.text
  from jax_resnet.runs import saved_run

  trained = saved_run.load_run(workdir, 'latest').state.params
  kernel = lambda params, block: np.asarray(params[block]['Conv_0']['kernel'])
  frozen, trainable = 'stage1_block1', 'stage2_block1'
  np.testing.assert_array_equal(kernel(trained, frozen), kernel(weights['params'], frozen))
  assert not np.array_equal(kernel(trained, trainable), kernel(weights['params'], trainable))
  predictor = predict.Predictor.from_workdir(workdir, 'latest')
  output = str(tmp_path / 'predictions.csv')
  summary = predict.predict_files(predictor, [str(tmp_path / 'eval')], output, top_k=2)
  assert summary['num_images'] == 7
  assert tuple(predictor.class_names) == ('class_0', 'class_1', 'class_2')


def test_a_teacher_trained_on_other_images_is_said_in_one_warning(tmp_path, caplog):
  """Distilling from a teacher trained at 16 px into a run at 8 px feeds the teacher 8 px
  images: one warning says so."""
  from jax_resnet import models

  teacher = models.create_model('resnet20', 10)
  variables = jax.eval_shape(lambda: teacher.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1))))
  variables = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), variables)
  path = str(tmp_path / 'teacher.msgpack')
  metadata = {'model': 'resnet20', 'model_options': {}, 'num_classes': 10}
  export.write_msgpack(variables, path, {**metadata, 'train_image_shape': [16, 16, 1]})
  warm_start.load_teacher(path, 10, jnp.float32, (16, 16, 1))
  assert 'trained on' not in caplog.text
  warm_start.load_teacher(path, 10, jnp.float32, (8, 8, 1))
  assert "trained on 16x16x1 images and is fed this run's 8x8x1" in caplog.text
