"""The ResNet families as Flax modules, the model zoo by name, and what moves their weights
in and out: a summary, the CPU convolution routing, the torchvision layout.

- ``blocks``: basic and bottleneck blocks, shortcuts, squeeze-and-excitation, drop path.
- ``resnet``: the ``ResNet`` module (stem, stages, head).
- ``registry``: every model name (``MODEL_NAMES``) and ``create_model``.
- ``cpu_conv``: faster XLA:CPU forms of the convolutions and max-pool, CPU only.
- ``model_summary``: shapes, parameters and training FLOPs per stage.
- ``torchvision_layout``: weights to and from torchvision's ResNet ``state_dict``.
"""

from jax_resnet.models.registry import (
  MODEL_NAMES,
  MODELS,
  SE_RATIO,
  create_model,
  min_image_size,
)
from jax_resnet.models.resnet import KERNEL_INITS, STEMS, ResNet

__all__ = [
  'KERNEL_INITS',
  'MODELS',
  'MODEL_NAMES',
  'SE_RATIO',
  'STEMS',
  'ResNet',
  'create_model',
  'min_image_size',
]
