"""The model zoo by name: each name is a ``ResNet`` architecture (depth, block, widths,
stem, shortcut); ``create_model`` builds one.
"""

import re

from jax_resnet.models.blocks import BasicBlock, Bottleneck, PreActBasicBlock, PreActBottleneck
from jax_resnet.models.resnet import KERNEL_INITS, ResNet

# The stems that divide the resolution by 4 before the first stage.
_DOWNSAMPLING_STEMS = ('imagenet', 'deep')

_IMAGENET_DEPTHS = {
  18: ((2, 2, 2, 2), 'basic'),
  34: ((3, 4, 6, 3), 'basic'),
  50: ((3, 4, 6, 3), 'bottleneck'),
  101: ((3, 4, 23, 3), 'bottleneck'),
  152: ((3, 8, 36, 3), 'bottleneck'),
}
_CIFAR_DEPTHS = (20, 32, 44, 56, 110)
# ResNet-26/34/50-style CIFAR nets for a study that reports 4.2-4.8 M parameters but not its
# widths: 3x3 stem, no max-pool, four stages, projection shortcuts. Widths are ours: the
# first three stages are always 32, 64, 128, and the last stage narrows as depth grows, to
# stay in budget (10 classes): 4,643,114 / 4,593,578 / 4,382,250 parameters.
_SMALL_CIFAR = {
  26: ((2, 3, 4, 3), 'basic', (32, 64, 128, 256)),
  34: ((3, 4, 6, 3), 'basic', (32, 64, 128, 224)),
  50: ((3, 4, 6, 3), 'bottleneck', (32, 64, 128, 192)),
}
# SENet's reduction (Hu et al. 2018), as timm's seresnet* (rounded by se_channels).
SE_RATIO = 1 / 16
_BLOCKS = {
  ('basic', False): BasicBlock,
  ('bottleneck', False): Bottleneck,
  ('basic', True): PreActBasicBlock,
  ('bottleneck', True): PreActBottleneck,
}


def _architecture(depth: int, preact: bool, residual: bool) -> dict:
  if depth in _IMAGENET_DEPTHS:
    stages, block = _IMAGENET_DEPTHS[depth]
    return dict(
      stage_sizes=stages,
      block_cls=_BLOCKS[block, preact],
      preact=preact,
      residual=residual,
      widths=(64, 128, 256, 512),
      stem='imagenet',
      shortcut='projection',
    )
  n = (depth - 2) // 6
  return dict(
    stage_sizes=(n, n, n),
    block_cls=_BLOCKS['basic', preact],
    preact=preact,
    residual=residual,
    widths=(16, 32, 64),
    stem='cifar',
    shortcut='pad',
  )


def _small_cifar(depth: int) -> dict:
  stages, block, widths = _SMALL_CIFAR[depth]
  return dict(
    stage_sizes=stages,
    block_cls=_BLOCKS[block, False],
    preact=False,
    residual=True,
    widths=widths,
    stem='cifar',
    shortcut='projection',
  )


def _registry() -> dict:
  names = {}
  for depth in list(_IMAGENET_DEPTHS) + list(_CIFAR_DEPTHS):
    names[f'resnet{depth}'] = _architecture(depth, preact=False, residual=True)
    names[f'preact_resnet{depth}'] = _architecture(depth, preact=True, residual=True)
    names[f'plain{depth}'] = _architecture(depth, preact=False, residual=False)
  for depth in _IMAGENET_DEPTHS:
    base = _architecture(depth, preact=False, residual=True)
    names[f'seresnet{depth}'] = {**base, 'se_ratio': SE_RATIO}
    names[f'resnet{depth}d'] = {**base, 'stem': 'deep', 'shortcut': 'avg_projection'}
  for depth in _SMALL_CIFAR:
    names[f'resnet{depth}_small'] = _small_cifar(depth)
  return names


def _name_order(name: str):
  """Family, then variant, then depth: resnet18 ... resnet152, resnet26_small ..., resnet18d."""
  family, depth, variant = re.fullmatch(r'(\D+)(\d+)(.*)', name).groups()
  return family, variant, int(depth)


MODELS = _registry()
MODEL_NAMES = tuple(sorted(MODELS, key=_name_order))


def create_model(name: str, num_classes: int, **options) -> ResNet:
  """Builds a model by name; ``options`` are any ``ResNet`` fields (dtype, stem, ...).

  ``stem='cifar'`` on an ImageNet-family depth gives the common CIFAR variant of
  ResNet-18/50 (3x3 stem, no max-pool) used by the Cutout paper. ``se_ratio`` and
  ``stochastic_depth_rate`` work on every family (stochastic depth not on plain nets).
  """
  if name not in MODELS:
    raise ValueError(f'Unknown model {name!r}. Valid names: {", ".join(MODEL_NAMES)}.')
  if num_classes < 1:
    raise ValueError(f'num_classes must be positive, got {num_classes}.')
  unknown = set(options) - set(ResNet.__dataclass_fields__) - {'num_classes'}
  if unknown:
    raise ValueError(f'Unknown model options {sorted(unknown)}.')
  if options.get('kernel_init', 'he_normal') not in KERNEL_INITS:
    raise ValueError(
      f'Unknown kernel_init {options["kernel_init"]!r}. Valid: {", ".join(KERNEL_INITS)}.'
    )
  return ResNet(num_classes=num_classes, **{**MODELS[name], **options})


def min_image_size(name: str, **options) -> int:
  """The smallest square input that still leaves at least 1x1 after every downsampling."""
  arch = {**MODELS[name], **options}
  downsamplings = len(arch['stage_sizes']) - 1 + (2 if arch['stem'] in _DOWNSAMPLING_STEMS else 0)
  return 2**downsamplings
