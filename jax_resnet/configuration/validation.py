"""Every check of a config, in one place, before any data is read or anything compiled.

``validate`` rejects names that do not exist, sizes and rates outside their range and
schedule shapes that cannot work, each with one ``ConfigError`` naming the field, its
value and what is allowed. ``RESUME_SAFE_FIELDS`` and ``check_resumable`` decide which
fields a resumed run may change. No TensorFlow: a tensorflow-datasets name is looked up
only when the config names one.
"""

import json
from collections.abc import Mapping

import ml_collections

from jax_resnet import loss_functions, models, parallel
from jax_resnet.augment import randaugment
from jax_resnet.configuration import defaults
from jax_resnet.data import common as data_common
from jax_resnet.errors import ConfigError, TrainingError
from jax_resnet.training import build, optimizers, schedules

# Fields a resumed run may change: they touch neither the train state nor what it means
# (durations, periodic actions, where the data lives, input and memory performance).
RESUME_SAFE_FIELDS = frozenset(
  {
    'num_epochs',
    'num_train_steps',
    'log_every_steps',
    'eval_every_epochs',
    'checkpoint_every_epochs',
    'checkpoint_every_steps',
    'keep_checkpoints',
    'eval_batch_size',
    'data_dir',
    'deterministic_input',
    'input_threads',
    'train_dir',
    'eval_dir',
    'eval_split',
    'shuffle_buffer',
    'steps_per_dispatch',
    'grad_accum_steps',
    'data_on_device',
    'cache',
    'remat',
    'bn_sync',
    'profile_steps',
    'profile_first_step',
    'wandb_project',
    'wandb_entity',
    'wandb_run_name',
    'mlflow_tracking_uri',
    'mlflow_experiment',
    # Applied only at step 0: a run with its own checkpoint resumes that, whatever it was
    # initialised from.
    'init_from',
  }
)

POSITIVE = (
  'batch_size',
  'eval_batch_size',
  'image_size',
  'num_epochs',
  'log_every_steps',
  'learning_rate',
  'keep_checkpoints',
  'steps_per_dispatch',
  'grad_accum_steps',
)
NON_NEGATIVE = (
  'input_threads',
  'num_train_steps',
  'checkpoint_every_steps',
  'checkpoint_every_epochs',
  'random_crop_pad',
  'label_smoothing',
  'weight_decay',
  'dropout_rate',
  'eval_every_epochs',
  'grad_clip_norm',
  'agc_clip',
)


def _fail(config, field: str, message: str):
  raise ConfigError(f'config.{field}={_value(config, field)!r}: {message}')


def _value(config, field: str):
  value = config
  for part in field.split('.'):
    value = value[part]
  return value


def _choice(config, field: str, valid, what: str = '') -> None:
  if _value(config, field) not in valid:
    _fail(config, field, f'unknown {what or field}. Valid: {", ".join(valid)}.')


def validate(config: ml_collections.ConfigDict, device_count: int | None = None) -> None:
  """Raises ConfigError for the first field that cannot work; ``device_count``, when
  given, also checks that the global batches split evenly over the devices."""
  if config.model not in models.MODELS:
    _fail(config, 'model', f'unknown model. Valid names: {", ".join(models.MODEL_NAMES)}.')
  _choice(config, 'optimizer', optimizers.OPTIMIZERS, 'optimizer')
  _choice(config, 'half_precision_dtype', tuple(build.HALF_PRECISION_DTYPES))
  _choice(config, 'schedule', schedules.SCHEDULES, 'schedule')
  _choice(config, 'model_options.kernel_init', tuple(models.KERNEL_INITS), 'kernel_init')
  if config.model_options.stem:
    _choice(config, 'model_options.stem', models.STEMS, 'stem')
  _choice(config, 'train_crop', data_common.CROP_STYLES, 'crop style')
  check_dataset_name(config.dataset)
  for field in POSITIVE:
    if not config[field] > 0:
      _fail(config, field, 'must be positive.')
  for field in NON_NEGATIVE:
    if config[field] < 0:
      _fail(config, field, 'must be zero or positive.')
  for field in ('dropout_rate', 'block_dropout_rate'):
    if not 0 <= config[field] < 1:
      _fail(config, field, 'must be in [0, 1).')
  if not 0 <= config.label_smoothing < 1:
    _fail(config, 'label_smoothing', 'must be in [0, 1).')
  for field in ('momentum', 'adam_b1', 'adam_b2'):
    if not 0 <= config[field] < 1:
      _fail(config, field, 'must be in [0, 1): a decay rate (0.9 is usual).')
  _check_sizes(config)
  _check_schedule(config)
  _check_fine_tuning(config)
  _check_digits_classes(config)
  _check_recipe(config)
  _check_accumulation(config)
  if device_count is not None:
    # Eval batches are rounded up to a multiple instead (training.evaluation).
    parallel.check_divisible(config.batch_size, device_count, 'batch_size')
    if config.batch_size % (device_count * config.grad_accum_steps):
      _fail(
        config,
        'batch_size',
        f'must split into grad_accum_steps={config.grad_accum_steps} micro-batches of a '
        f'multiple of the device count {device_count}: a multiple of '
        f'{device_count * config.grad_accum_steps}.',
      )


def _check_accumulation(config) -> None:
  k = config.grad_accum_steps
  if config.batch_size % k:
    _fail(config, 'grad_accum_steps', f'must divide batch_size={config.batch_size}.')
  if k > 1 and config.half_precision and config.half_precision_dtype == 'float16':
    _fail(config, 'grad_accum_steps', 'is not combined with float16 loss scaling; use bfloat16.')


def _check_sizes(config) -> None:
  min_size = models.min_image_size(config.model, **build.model_options(config))
  if config.image_size < min_size:
    _fail(
      config,
      'image_size',
      f'is too small for {config.model}: its downsamplings need at least '
      f'{min_size}x{min_size} images; use --config.image_size={min_size} or more.',
    )
  if config.cutout_size < 0 or config.cutout_size > config.image_size:
    _fail(
      config,
      'cutout_size',
      f'must be between 0 (off) and config.image_size={config.image_size}.',
    )


def _check_schedule(config) -> None:
  if config.schedule == 'onecycle':
    if not 0 < config.onecycle_pct_start < 1:
      _fail(
        config,
        'onecycle_pct_start',
        'must be in (0, 1): the fraction of training spent warming up.',
      )
    for field in ('onecycle_div_factor', 'onecycle_final_div_factor'):
      if not config[field] > 0:
        _fail(config, field, 'must be positive.')
    if config.warmup_epochs:
      _fail(
        config,
        'warmup_epochs',
        'the onecycle schedule warms up over its first onecycle_pct_start of training and '
        'has no separate warm-up: set --config.warmup_epochs=0, or set '
        '--config.onecycle_pct_start, or use --config.schedule=cosine.',
      )
  if config.warmup_epochs < 0 or (
    config.schedule != 'onecycle' and config.warmup_epochs >= config.num_epochs
  ):
    _fail(config, 'warmup_epochs', f'must be in [0, num_epochs={config.num_epochs}).')
  if config.schedule == 'multistep':
    at = list(config.decay_at)
    if not all(0 < a < 1 for a in at) or at != sorted(at):
      _fail(config, 'decay_at', 'must be increasing fractions of training in (0, 1).')
  if not 0 <= config.final_learning_rate_fraction <= 1:
    _fail(config, 'final_learning_rate_fraction', 'must be in [0, 1].')


def _check_fine_tuning(config) -> None:
  groups = optimizers.frozen_groups(config.freeze)
  arch = models.MODELS[config.model]
  known = ['backbone', 'head', 'stem', 'final_bn']
  known += [f'stage{i + 1}' for i in range(len(arch['stage_sizes']))]
  unknown = [g for g in groups if g not in known]
  if unknown:
    _fail(config, 'freeze', f'unknown group(s) {", ".join(unknown)}. Valid: {", ".join(known)}.')
  if not config.head_learning_rate_multiplier > 0:
    _fail(config, 'head_learning_rate_multiplier', 'must be positive.')


def _check_recipe(config) -> None:
  """The training techniques of the modern recipes: ranges and combinations."""
  _choice(config, 'loss', loss_functions.LOSSES, 'loss')
  for field in (
    'mixup_alpha',
    'cutmix_alpha',
    'sam_rho',
    'randaugment_layers',
    'randaugment_magnitude_std',
    'eval_image_size',
    'lars_trust_coefficient',
  ):
    if config[field] < 0:
      _fail(config, field, 'must be zero or positive.')
  for field in ('mix_prob', 'mix_switch_prob', 'random_erasing_prob', 'distill_weight'):
    if not 0 <= config[field] <= 1:
      _fail(config, field, 'must be in [0, 1].')
  for field in ('ema_decay', 'stochastic_depth_rate'):
    if not 0 <= config[field] < 1:
      _fail(config, field, 'must be in [0, 1).')
  if config.stochastic_depth_rate and not models.MODELS[config.model]['residual']:
    _fail(config, 'stochastic_depth_rate', f'needs skip connections; {config.model} has none.')
  if not 0 <= config.randaugment_magnitude <= config.randaugment_bins - 1:
    _fail(
      config,
      'randaugment_magnitude',
      f'must be in [0, randaugment_bins - 1 = {config.randaugment_bins - 1}].',
    )
  if config.randaugment_layers and config.trivial_augment:
    _fail(config, 'trivial_augment', "is RandAugment's alternative: set randaugment_layers=0.")
  if config.autoaugment_policy:
    _choice(config, 'autoaugment_policy', tuple(randaugment.AUTOAUGMENT_POLICIES), 'policy')
    if config.randaugment_layers or config.trivial_augment:
      _fail(
        config,
        'autoaugment_policy',
        'is an alternative to RandAugment and TrivialAugment: set randaugment_layers=0 '
        'and trivial_augment=False.',
      )
  if config.sam_rho and config.half_precision and config.half_precision_dtype == 'float16':
    _fail(config, 'sam_rho', 'is not combined with float16 loss scaling; use bfloat16.')
  if config.distill_from and not config.distill_temperature > 0:
    _fail(config, 'distill_temperature', 'must be positive.')
  _check_progressive_resizing(config)
  min_size = models.min_image_size(config.model, **build.model_options(config))
  if config.eval_image_size and config.eval_image_size < min_size:
    _fail(config, 'eval_image_size', f'must be 0 (image_size) or at least {min_size}.')


def _check_progressive_resizing(config) -> None:
  sizes, epochs = config.progressive_resizing_sizes, config.progressive_resizing_epochs
  if not sizes:
    if epochs:
      _fail(config, 'progressive_resizing_epochs', 'needs progressive_resizing_sizes.')
    return
  if len(sizes) != 2:
    _fail(config, 'progressive_resizing_sizes', 'is (start_size, end_size), or () for off.')
  if sizes[0] > sizes[1]:
    _fail(
      config,
      'progressive_resizing_sizes',
      'must grow: (start_size, end_size) with start_size <= end_size (FFCV ramps it up).',
    )
  min_size = models.min_image_size(config.model, **build.model_options(config))
  if not all(min_size <= size <= config.image_size for size in sizes):
    _fail(
      config,
      'progressive_resizing_sizes',
      f'must be in [{min_size}, image_size={config.image_size}] (the data is made at '
      'image_size, then resized down).',
    )
  if epochs and (len(epochs) != 2 or not 0 <= epochs[0] <= epochs[1] <= config.num_epochs):
    _fail(
      config,
      'progressive_resizing_epochs',
      f'is (start_epoch, end_epoch) with 0 <= start <= end <= num_epochs={config.num_epochs}, '
      'or () for the whole run.',
    )
  if config.progressive_resizing_multiple <= 0:
    _fail(config, 'progressive_resizing_multiple', 'must be positive.')


def _check_digits_classes(config) -> None:
  if not config.digits_classes:
    return
  chosen = config.digits_classes
  if config.dataset != 'digits' or not set(chosen) <= set('0123456789') or len(set(chosen)) < 2:
    _fail(
      config,
      'digits_classes',
      "keeps a subset of the digits data set's classes: two or more of 0-9, e.g. '01234', "
      "with config.dataset='digits'.",
    )


def check_dataset_name(name: str) -> None:
  if name in data_common.EMBEDDED_DATASETS or name == data_common.FOLDER:
    return
  import tensorflow_datasets as tfds  # only for a tfds name

  try:
    tfds.builder_cls(name)
  except Exception:  # tfds raises DatasetNotFoundError with a long list
    raise ConfigError(
      f'Unknown dataset {name!r}. Valid: {", ".join(data_common.EMBEDDED_DATASETS)}, '
      f'{data_common.FOLDER} (class sub-folders of JPEG/PNG images in config.train_dir/'
      'config.eval_dir), or any tensorflow-datasets name such as cifar10, cifar100, '
      'imagenet2012.'
    ) from None


def check_resumable(saved: Mapping, config: ml_collections.ConfigDict) -> None:
  """Refuses to resume under a config that changes the model, optimizer or data."""
  saved = defaults.migrated(saved)
  current = json.loads(config.to_json_best_effort())
  # Fields only one side knows (added or retired by a newer version) are not compared.
  differing = sorted(
    k for k in set(saved) & set(current) if k not in RESUME_SAFE_FIELDS and saved[k] != current[k]
  )
  if differing:
    details = '; '.join(f'{k}: checkpoint {saved[k]!r}, now {current[k]!r}' for k in differing)
    raise TrainingError(
      f'The checkpoint was written with a different config ({details}). These fields '
      'change the model, optimizer or data and cannot change on resume; use a new '
      f'--workdir, or restore them. Safe to change: {", ".join(sorted(RESUME_SAFE_FIELDS))}.'
    )
