"""Every config mistake fails before compilation, naming the field and what is allowed."""

import pytest

from jax_resnet.configuration import validation
from jax_resnet.errors import ConfigError

CASES = [
  ('model', 'resnet51', "config.model='resnet51': unknown model. Valid names: .*resnet56"),
  ('optimizer', 'rmsprop', 'config.optimizer.*Valid: sgd, adamw, adam, lars, lamb'),
  ('schedule', 'linear', 'config.schedule.*Valid: onecycle'),
  ('dataset', 'cifar11', "Unknown dataset 'cifar11'. Valid: digits"),
  ('half_precision_dtype', 'float8', 'config.half_precision_dtype.*Valid: bfloat16, float16'),
  ('batch_size', 0, 'config.batch_size=0: must be positive'),
  ('eval_batch_size', -8, 'config.eval_batch_size=-8: must be positive'),
  ('image_size', 0, 'config.image_size=0: must be positive'),
  ('num_epochs', 0, 'config.num_epochs=0: must be positive'),
  ('learning_rate', 0.0, 'config.learning_rate=0.0: must be positive'),
  ('log_every_steps', 0, 'config.log_every_steps=0: must be positive'),
  ('steps_per_dispatch', 0, 'config.steps_per_dispatch=0: must be positive'),
  ('checkpoint_every_steps', -1, 'config.checkpoint_every_steps=-1: must be zero or positive'),
  ('random_crop_pad', -2, 'config.random_crop_pad=-2: must be zero or positive'),
  ('dropout_rate', 1.0, r'config.dropout_rate=1.0: must be in \[0, 1\)'),
  ('label_smoothing', 1.5, r'config.label_smoothing=1.5: must be in \[0, 1\)'),
  ('cutout_size', 17, 'config.cutout_size=17: must be between 0 .off. and config.image_size=16'),
  ('onecycle_pct_start', 1.0, r'config.onecycle_pct_start=1.0: must be in \(0, 1\)'),
  ('onecycle_div_factor', 0.0, 'config.onecycle_div_factor=0.0: must be positive'),
  ('final_learning_rate_fraction', 2.0, r'must be in \[0, 1\]'),
  ('grad_accum_steps', 0, 'config.grad_accum_steps=0: must be positive'),
  ('grad_accum_steps', 3, 'config.grad_accum_steps=3: must divide batch_size=128'),
  ('grad_clip_norm', -1.0, 'config.grad_clip_norm=-1.0: must be zero or positive'),
  ('agc_clip', -0.01, 'config.agc_clip=-0.01: must be zero or positive'),
  ('block_dropout_rate', 1.0, r'config.block_dropout_rate=1.0: must be in \[0, 1\)'),
  (
    'autoaugment_policy',
    'mnist',
    "config.autoaugment_policy='mnist': unknown policy. Valid: imagenet",
  ),
]


@pytest.mark.parametrize('field,value,message', CASES, ids=[f'{c[0]}={c[1]}' for c in CASES])
def test_each_bad_value_is_named(field, value, message):
  from configs import default

  config = default.get_config()
  config[field] = value
  with pytest.raises(ValueError, match=message):
    validation.validate(config)


def test_image_too_small_for_the_model_suggests_a_size():
  from configs import default

  config = default.get_config()
  config.model = 'resnet50'
  config.image_size = 16
  with pytest.raises(ValueError, match='too small for resnet50.*--config.image_size=32'):
    validation.validate(config)
  config.model_options.stem = 'cifar'
  validation.validate(config)  # the CIFAR stem downsamples less: 16 is fine


@pytest.mark.parametrize(
  'schedule,field,value,message',
  [
    (
      'cosine',
      'warmup_epochs',
      20.0,
      r'config.warmup_epochs=20.0: must be in \[0, num_epochs=20\)',
    ),
    ('multistep', 'decay_at', (0.75, 0.5), 'config.decay_at.*increasing fractions'),
    ('multistep', 'decay_at', (0.5, 1.2), 'config.decay_at.*increasing fractions'),
  ],
)
def test_impossible_schedule_shapes(schedule, field, value, message):
  from configs import default

  config = default.get_config()
  config.schedule = schedule
  config[field] = value
  with pytest.raises(ValueError, match=message):
    validation.validate(config)


def test_every_shipped_config_is_valid():
  import importlib
  import os

  root = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'configs')
  for name in sorted(os.listdir(root)):
    if name.endswith('.py') and name != '__init__.py':
      validation.validate(importlib.import_module(f'configs.{name[:-3]}').get_config())


def test_unknown_dataset_lists_valid_names():
  with pytest.raises(ValueError, match='Valid: digits'):
    validation.check_dataset_name('cifar11')


def _parse(config_file, *overrides):
  """The config as main.py's flag parsing builds it (locked, as main.py locks it)."""
  import os

  from absl import flags
  from ml_collections import config_flags

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  argv = ['prog', f'--config={os.path.join(root, "configs", config_file)}', *overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', flag_values=values, lock_config=True, sys_argv=argv)
  values(argv)
  return values.config


def _config_files():
  import os

  root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')
  return sorted(n for n in os.listdir(root) if n.endswith('.py') and n != '__init__.py')


def _fields(config, prefix=''):
  """Every field name of a config, nested ones dotted (model_options.stem)."""
  names = set()
  for key, value in config.items():
    names.add(prefix + key)
    if hasattr(value, 'items'):
      names |= _fields(value, f'{prefix}{key}.')
  return names


@pytest.mark.parametrize('config_file', _config_files())
def test_every_config_has_every_field(config_file):
  """Each experiment config has exactly the fields of the default one, so any
  --config.FIELD=VALUE that works on one config works on all (the plateau_* fields once
  existed in one config only)."""
  import importlib

  from configs import default

  config = importlib.import_module(f'configs.{config_file[:-3]}').get_config()
  assert _fields(config) == _fields(default.get_config())
  validation.validate(config)


@pytest.mark.parametrize('config_file', _config_files())
def test_plateau_and_stem_overrides_parse_on_every_config(config_file):
  config = _parse(config_file, '--config.plateau_patience=5', '--config.model_options.stem=cifar')
  assert config.plateau_patience == 5 and config.model_options.stem == 'cifar'
  validation.validate(config)


def test_misspelt_field_is_refused_at_parse():
  with pytest.raises(Exception, match='learnng_rate'):
    _parse('default.py', '--config.learnng_rate=0.1')


@pytest.mark.parametrize(
  'field,value,message',
  [
    ('momentum', 1.5, r'config.momentum=1.5: must be in \[0, 1\)'),
    ('adam_b2', 1.0, r'config.adam_b2=1.0: must be in \[0, 1\)'),
    ('warmup_epochs', 2.0, 'onecycle schedule warms up over its first onecycle_pct_start'),
  ],
)
def test_values_that_would_be_silently_wrong_are_refused(field, value, message):
  """momentum 1.5 diverges; warmup_epochs did nothing under onecycle: both now refused."""
  from configs import default

  config = default.get_config()
  assert config.schedule == 'onecycle'
  config[field] = value
  with pytest.raises(ValueError, match=message):
    validation.validate(config)


def test_off_is_the_field_types_zero_in_every_default(config):
  """Off, or not set, is written one way: 0, '' or (); no None and no -1 in the defaults."""
  from jax_resnet.configuration import defaults

  def leaves(tree, prefix=''):
    for key, value in tree.items():
      if hasattr(value, 'items'):
        yield from leaves(value, f'{prefix}{key}.')
      else:
        yield prefix + key, value

  values = dict(leaves(defaults.get_config()))
  assert not [name for name, value in values.items() if value is None]
  assert not [name for name, value in values.items() if isinstance(value, int) and value < 0]


def test_progressive_resizing_fields_are_checked_by_their_new_names(config):
  config.progressive_resizing_sizes = (8, 16, 0, 4)  # the old four-number form
  with pytest.raises(ConfigError, match=r'config.progressive_resizing_sizes=.*start_size, end'):
    validation.validate(config)
  config.progressive_resizing_sizes, config.progressive_resizing_epochs = (8, 8), (3, 1)
  with pytest.raises(ConfigError, match='config.progressive_resizing_epochs='):
    validation.validate(config)
  config.progressive_resizing_sizes, config.progressive_resizing_epochs = (8, 4), ()
  with pytest.raises(ConfigError, match='progressive_resizing_sizes=.*must grow'):
    validation.validate(config)
  config.progressive_resizing_sizes, config.progressive_resizing_epochs = (), (0, 1)
  with pytest.raises(ConfigError, match='progressive_resizing_epochs.*needs progressive_resizing'):
    validation.validate(config)


def test_a_config_saved_with_the_old_names_and_off_values_reads_as_today(config):
  """progressive_resizing (sizes and epochs in one tuple), num_train_steps=-1 and a None
  stem, as checkpoints before the rename recorded them, become today's fields; such a
  checkpoint resumes under today's config (tests/test_checkpointing.py restores one)."""
  import json

  from jax_resnet.configuration import defaults

  saved = json.loads(config.to_json_best_effort())
  for name in ('progressive_resizing_sizes', 'progressive_resizing_epochs'):
    del saved[name]
  saved.update(progressive_resizing=[8, 16, 0, 2], num_train_steps=-1)
  saved['model_options']['stem'] = None
  merged = defaults.merged_with_defaults(saved)
  assert merged.progressive_resizing_sizes == (8, 16)
  assert merged.progressive_resizing_epochs == (0, 2)
  assert merged.num_train_steps == 0 and merged.model_options.stem == ''
  assert 'progressive_resizing' not in merged
  config.progressive_resizing_sizes, config.progressive_resizing_epochs = (8, 16), (0, 2)
  validation.check_resumable(saved, config)  # no difference left to refuse


def test_accumulation_and_augmentation_combinations(config):
  """Micro-batches split evenly over the devices; fp16 loss scaling is not accumulated;
  AutoAugment is an alternative to RandAugment."""
  config.batch_size, config.grad_accum_steps = 32, 8
  validation.validate(config, device_count=4)  # 8 micro-batches of 4: one example a device
  with pytest.raises(ConfigError, match='micro-batches of a multiple of the device count 8'):
    validation.validate(config, device_count=8)
  config.half_precision, config.half_precision_dtype = True, 'float16'
  with pytest.raises(ConfigError, match='grad_accum_steps=8: is not combined with float16'):
    validation.validate(config)
  config.half_precision, config.grad_accum_steps = False, 1
  config.autoaugment_policy, config.randaugment_layers = 'cifar10', 2
  with pytest.raises(ConfigError, match='autoaugment_policy.*set randaugment_layers=0'):
    validation.validate(config)
