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
# ResNet-26/34/50-style CIFAR nets with the parameter counts a study reports (4,196,906 /
# 4,348,082 / 4,815,794 at 10 classes) but not its widths: 3x3 stem, no max-pool, four
# stages, projection shortcuts. Widths from benchmarks/seed002_search.py: ResNet-34 and
# ResNet-50 meet their counts exactly with one width set, (40, 80, 144, 176), so it is
# likely the study's; ResNet-26's count is met by (32, 44, 180, 188), one of few exact
# solutions of a grid search, not evidence of the study's widths.
_SMALL_CIFAR = {
  26: ((2, 3, 4, 3), 'basic', (32, 44, 180, 188)),
  34: ((3, 4, 6, 3), 'basic', (40, 80, 144, 176)),
  50: ((3, 4, 6, 3), 'bottleneck', (40, 80, 144, 176)),
}
# torchvision's wider and grouped bottlenecks on the ImageNet depths: (depth, groups,
# width per group); the 3x3 convolution is blocks.bottleneck_width wide.
_WIDE_AND_GROUPED = {
  'wide_resnet50_2': (50, 1, 128),
  'wide_resnet101_2': (101, 1, 128),
  'resnext50_32x4d': (50, 32, 4),
  'resnext101_32x8d': (101, 32, 8),
  'resnext101_64x4d': (101, 64, 4),
}
# Wide ResNets for CIFAR, WRN-d-k (Zagoruyko & Komodakis 2016): a 16-wide 3x3 stem, three
# stages of (d - 4) / 6 pre-activation basic blocks 16k, 32k and 64k wide, 1x1 projection
# shortcuts where the width or size changes; dropout between the convolutions is
# config.block_dropout_rate (0.3 in some of the paper's runs).
_WIDE_CIFAR = {'wrn16_8': (16, 8), 'wrn28_10': (28, 10), 'wrn40_4': (40, 4)}
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


def _wide_cifar(depth: int, k: int) -> dict:
  n = (depth - 4) // 6
  return dict(
    stage_sizes=(n, n, n),
    block_cls=PreActBasicBlock,
    preact=True,
    residual=True,
    widths=(16 * k, 32 * k, 64 * k),
    stem_width=16,
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
  for name, (depth, groups, base_width) in _WIDE_AND_GROUPED.items():
    base = _architecture(depth, preact=False, residual=True)
    names[name] = {**base, 'groups': groups, 'base_width': base_width}
  for name, (depth, k) in _WIDE_CIFAR.items():
    names[name] = _wide_cifar(depth, k)
  return names


def _name_order(name: str):
  """Family, then variant, then depth: resnet18 ... resnet152, resnet26_small ..., resnet18d,
  ..., wrn16_8, wrn28_10."""
  family, depth, variant = re.fullmatch(r'(\D+)(\d+)(.*)', name).groups()
  if re.fullmatch(r'_\d+', variant):  # a widening factor (wrn28_10): by depth, then width
    return family, '', int(depth), int(variant[1:])
  return family, variant, int(depth), 0


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
