"""What a training run's pieces are built from its config: the model, its compute dtype,
the optimizer and schedule, the train state and the step options.

With ``configuration.validation``, the only code below the loop that reads the
``ConfigDict``; what it builds takes typed options. No TensorFlow.
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from jax_resnet import models
from jax_resnet.augment.pipeline import AugmentOptions
from jax_resnet.configuration.typed_options import from_config
from jax_resnet.training import optimizers, schedules
from jax_resnet.training.step_functions import StepOptions
from jax_resnet.training.timeline import Timeline
from jax_resnet.training.train_state import TrainState, create_train_state

HALF_PRECISION_DTYPES = {'bfloat16': jnp.bfloat16, 'float16': jnp.float16}
_MODEL_FIELDS = frozenset(f.name for f in dataclasses.fields(models.ResNet))


def compute_dtype(config: ml_collections.ConfigDict):
  """bf16 (TPUs, Ampere and later GPUs) or fp16 (older GPUs) when half precision is on."""
  if not config.half_precision:
    return jnp.float32
  return HALF_PRECISION_DTYPES[config.half_precision_dtype]


def model_options(config: ml_collections.ConfigDict) -> dict:
  """Every ``models.create_model`` keyword the config sets, except the compute dtype: the
  top-level fields named as ``ResNet``'s, and ``config.model_options`` ('' is the model's
  own). An export records these; inference runs in float32."""
  options = {name: config[name] for name in config if name in _MODEL_FIELDS}
  options.update({k: v for k, v in config.model_options.items() if v != ''})
  return options


def model_from_config(
  config: ml_collections.ConfigDict, num_classes: int, devices: int = 1
) -> models.ResNet:
  """The config's model with a ``num_classes``-way head, in the config's compute dtype;
  trained on ``devices`` devices (with ``config.bn_sync`` off, BatchNorm's statistics are
  then each device's own share's)."""
  groups = 1 if config.bn_sync else devices
  return models.create_model(
    config.model,
    num_classes,
    dtype=compute_dtype(config),
    bn_groups=groups,
    **model_options(config),
  )


def step_options(
  config: ml_collections.ConfigDict, num_classes: int, mean, std, train_image_size: int = 0
) -> StepOptions:
  """The train and eval steps' options; ``train_image_size`` trains at that size
  (progressive resizing; 0: as the data comes)."""
  augment = from_config(
    AugmentOptions,
    config,
    num_classes=num_classes,
    mean=tuple(float(m) for m in mean),
    std=tuple(float(s) for s in std),
    dtype=compute_dtype(config),
    train_image_size=train_image_size,
  )
  return from_config(StepOptions, config, augment=augment)


def train_state_from_config(
  config: ml_collections.ConfigDict,
  model,
  image_shape,
  timeline: Timeline,
  mesh,
  abstract: bool = False,
) -> tuple[TrainState, object]:
  """(the initial train state, the learning-rate schedule) of this config."""
  learning_rate_fn = schedules.create_learning_rate_fn(config, timeline)
  state = create_train_state(
    jax.random.PRNGKey(config.seed),
    model,
    image_shape,
    optimizers.create_optimizer(config, learning_rate_fn),
    mesh,
    ema=bool(config.ema_decay),
    loss_scaling=compute_dtype(config) == jnp.float16,
    abstract=abstract,
  )
  return state, learning_rate_fn
