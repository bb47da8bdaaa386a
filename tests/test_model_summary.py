import jax
import numpy as np
import pytest
from helpers import train_setup

from jax_resnet import models
from jax_resnet.models import model_summary


def param_count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize(
  'name,size,options',
  [
    ('resnet20', 32, {}),
    ('preact_resnet20', 16, {}),
    ('plain20', 16, {}),
    ('resnet18', 32, {'stem': 'cifar'}),
    ('resnet50', 64, {}),
    ('resnet18d', 32, {}),
    ('seresnet18', 32, {}),
    ('resnet20', 16, {'stem': 'deep'}),
  ],
)
def test_total_equals_the_params_count(name, size, options):
  model = models.create_model(name, 10, **options)
  s = model_summary.summarize(model, (size, size, 3), flops=False)
  variables = jax.eval_shape(
    lambda x: model.init(jax.random.PRNGKey(0), x, train=False),
    np.zeros((1, size, size, 3), np.float32),
  )
  assert s.total_params == param_count(variables['params'])
  assert sum(r.params for r in s.rows) == s.total_params
  assert s.batch_stats == param_count(variables['batch_stats'])
  assert s.rows[-1].output_shape == (10,)


def test_deep_stem_row_has_the_last_stem_convs_channels():
  s = model_summary.summarize(models.create_model('resnet18d', 10), (32, 32, 3), flops=False)
  assert s.rows[0].name == 'stem' and s.rows[0].output_shape == (8, 8, 64)
  assert s.rows[0].params == 28_768  # 3x3 convs of 32, 32, 64 and their BatchNorms


def test_resnet20_stages_shapes_params_and_flops():
  model = models.create_model('resnet20', 10)
  s = model_summary.summarize(model, (32, 32, 3))
  stages = [r for r in s.rows if r.name.startswith('stage')]
  assert [r.output_shape for r in stages] == [(32, 32, 16), (16, 16, 32), (8, 8, 64)]
  assert s.total_params == 269_722  # He et al.: 0.27M
  # ~41M multiply-adds forward (He et al.), two FLOPs each; training about 3x forward.
  assert 70e6 < s.forward_flops < 95e6
  assert 2.5 < s.train_flops / s.forward_flops < 3.5
  text = s.format('resnet20')
  assert 'stage3 (3 blocks)' in text and '8x8x64' in text and '269,722' in text
  assert 'Training FLOPs per image' in text


def test_summary_of_a_config_model_matches_the_train_state(config):
  config.image_size = 16
  built = train_setup(config, image_shape=(16, 16, 1))
  model, state = built.model, built.state
  s = model_summary.summarize(model, (16, 16, 1), flops=False)
  assert s.total_params == param_count(state.params)
