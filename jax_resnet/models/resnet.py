"""ResNet families as Flax modules: ImageNet (He et al. 2015), CIFAR (Section 4.2),
pre-activation (He et al. 2016) and "plain" twins without skip connections, plus the
additions today's best ResNet results use: squeeze-and-excitation (SE-ResNet, Hu et al.
2018), ResNet-D (He et al. 2019: deep stem, average-pool shortcut), stochastic depth
(Huang et al. 2016) and small custom-width CIFAR ResNets.

All models take NHWC images and are called as ``model.apply(variables, x, train=...)``.
Parameters are always float32; ``dtype`` sets the compute precision (bf16 for mixed
precision). BatchNorm statistics are reduced in float32 whatever the compute dtype.
"""

import functools
import re
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax_resnet.models import cpu_conv as conv_ops

ModuleDef = Any

# He-normal (Kaiming) init with fan-out, as torchvision's ResNets use.
he_normal = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')

KERNEL_INITS = {
  'he_normal': he_normal,
  'he_uniform': nn.initializers.variance_scaling(2.0, 'fan_out', 'uniform'),
  'lecun_normal': nn.initializers.lecun_normal(),
}


# 'imagenet': 7x7/2 conv + 3x3/2 max-pool; 'cifar': one 3x3 conv, no pooling; 'deep':
# ResNet-D's three 3x3 convs (the first strided) + 3x3/2 max-pool.
STEMS = ('imagenet', 'cifar', 'deep')
# The stems that divide the resolution by 4 before the first stage.
_DOWNSAMPLING_STEMS = ('imagenet', 'deep')
# timm rounds SE widths to multiples of 8 (and at least 8): friendlier to the hardware.
SE_DIVISOR = 8


def _pad(k: int):
  """Symmetric padding as torchvision uses, so strided convs see the same pixels."""
  return ((k // 2, k // 2), (k // 2, k // 2))


class _Block(nn.Module):
  """What every block takes; ``residual=False`` drops the skip connection (plain nets)."""

  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  residual: bool = True
  # 'projection': strided 1x1 conv + BN; 'pad': He et al. 2015 option A (CIFAR);
  # 'avg_projection': 2x2 average pool, then a stride-1 1x1 conv + BN (ResNet-D).
  shortcut: str = 'projection'
  zero_init_last: bool = True
  se_ratio: float = 0.0  # squeeze-and-excitation on the branch's output; 0: none
  drop_path_rate: float = 0.0  # probability of dropping the residual branch per example
  deterministic: bool = True  # no branch dropping (evaluation)


class BasicBlock(_Block):
  """Two 3x3 convs."""

  expansion = 1

  @nn.compact
  def __call__(self, x):
    y = self.conv(self.filters, (3, 3), self.strides, padding=_pad(3))(x)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.filters, (3, 3), padding=_pad(3))(y)
    y = self.norm(scale_init=_last_scale_init(self.zero_init_last, self.residual))(y)
    y = _branch_output(self, y)
    if self.residual:
      y = y + _shortcut(x, y.shape[-1], self.strides, self.conv, self.norm, self.shortcut)
    return nn.relu(y)


class Bottleneck(_Block):
  """1x1 reduce, 3x3 (strided, as torchvision's v1.5), 1x1 expand by 4."""

  expansion = 4

  @nn.compact
  def __call__(self, x):
    y = nn.relu(self.norm()(self.conv(self.filters, (1, 1))(x)))
    y = self.conv(self.filters, (3, 3), self.strides, padding=_pad(3))(y)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.filters * 4, (1, 1))(y)
    y = self.norm(scale_init=_last_scale_init(self.zero_init_last, self.residual))(y)
    y = _branch_output(self, y)
    if self.residual:
      y = y + _shortcut(x, y.shape[-1], self.strides, self.conv, self.norm, self.shortcut)
    return nn.relu(y)


class PreActBasicBlock(_Block):
  """BN-ReLU-conv ordering with a clean identity path (He et al. 2016); always residual.

  SE and stochastic depth act on the branch's last conv output (there is no last BN), so
  the identity path stays clean.
  """

  expansion = 1

  @nn.compact
  def __call__(self, x):
    pre = nn.relu(self.norm()(x))
    y = self.conv(self.filters, (3, 3), self.strides, padding=_pad(3))(pre)
    y = nn.relu(self.norm()(y))
    y = _branch_output(self, self.conv(self.filters, (3, 3), padding=_pad(3))(y))
    return y + _preact_shortcut(x, pre, y.shape[-1], self.strides, self.conv, self.shortcut)


class PreActBottleneck(_Block):
  """The pre-activation bottleneck; like PreActBasicBlock, always residual."""

  expansion = 4

  @nn.compact
  def __call__(self, x):
    pre = nn.relu(self.norm()(x))
    y = self.conv(self.filters, (1, 1))(pre)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.filters, (3, 3), self.strides, padding=_pad(3))(y)
    y = nn.relu(self.norm()(y))
    y = _branch_output(self, self.conv(self.filters * 4, (1, 1))(y))
    return y + _preact_shortcut(x, pre, y.shape[-1], self.strides, self.conv, self.shortcut)


def _last_scale_init(zero_init_last: bool, residual: bool):
  # Zero-initialising the branch's last BN makes each block start as the identity
  # (Goyal et al. 2017). A plain net has no identity to fall back on, so not there.
  return nn.initializers.zeros if (zero_init_last and residual) else nn.initializers.ones


class SqueezeExcite(nn.Module):
  """Reweights channels by a gate computed from the whole image (Hu et al. 2018).

  Laid out as timm's ``SEModule`` (1x1 convs with bias, named fc1 and fc2) so that its
  weights map one-to-one; the convs take the model's kernel init, as timm's ResNet init
  does for every conv, and zero biases (torch's default bias init is uniform).
  """

  reduced: int
  conv: ModuleDef

  @nn.compact
  def __call__(self, x):
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    s = nn.relu(self.conv(self.reduced, (1, 1), use_bias=True, name='fc1')(s))
    s = self.conv(x.shape[-1], (1, 1), use_bias=True, name='fc2')(s)
    return x * nn.sigmoid(s)


def se_channels(channels: int, se_ratio: float, divisor: int = SE_DIVISOR) -> int:
  """timm's ``make_divisible(channels * se_ratio, divisor, round_limit=0)``: the nearest
  multiple of ``divisor``, at least ``divisor``, so narrow blocks keep a usable gate."""
  return max(divisor, int(channels * se_ratio + divisor / 2) // divisor * divisor)


def drop_path(y, rate: float, rng):
  """Zeroes whole examples with probability ``rate`` and scales the rest by 1 / (1 - rate),
  so that in expectation the branch is what evaluation (which never drops) sees."""
  keep = 1.0 - rate
  mask = jax.random.bernoulli(rng, keep, (y.shape[0],) + (1,) * (y.ndim - 1))
  return jnp.where(mask, y / keep, jnp.zeros_like(y))


def _branch_output(block, y):
  """The residual branch as the shortcut sees it: SE-gated, then dropped in training."""
  if block.se_ratio > 0:
    y = SqueezeExcite(se_channels(y.shape[-1], block.se_ratio), block.conv, name='se')(y)
  if block.drop_path_rate > 0 and not block.deterministic:
    y = drop_path(y, block.drop_path_rate, block.make_rng('dropout'))
  return y


def _shortcut(x, filters, strides, conv, norm, kind):
  if x.shape[-1] == filters and strides == 1:
    return x
  if kind == 'pad':
    return _pad_shortcut(x, filters, strides)
  if kind == 'avg_projection':
    x, strides = _avg_pool_down(x, strides), 1
  x = conv(filters, (1, 1), strides, name='proj_conv')(x)
  return norm(name='proj_bn')(x)


def _preact_shortcut(x, pre, filters, strides, conv, kind):
  if x.shape[-1] == filters and strides == 1:
    return x
  if kind == 'pad':
    return _pad_shortcut(x, filters, strides)
  if kind == 'avg_projection':
    pre, strides = _avg_pool_down(pre, strides), 1
  return conv(filters, (1, 1), strides, name='proj_conv')(pre)


def _avg_pool_down(x, strides):
  """ResNet-D's shortcut pooling: every input pixel counts, where a strided 1x1 conv reads
  only a quarter of them. As timm's ``AvgPool2d(2, 2, ceil_mode=True,
  count_include_pad=False)``: an odd side keeps its last row or column, averaged over the
  pixels that exist, so the output matches the strided 3x3 conv's ceil(size / 2)."""
  if strides == 1:
    return x
  pads = tuple((0, -size % strides) for size in x.shape[1:3])
  return nn.avg_pool(x, (strides, strides), (strides, strides), pads, count_include_pad=False)


def _pad_shortcut(x, filters, strides):
  """Parameter-free option A of He et al. 2015: subsample and zero-pad channels."""
  x = x[:, ::strides, ::strides, :]
  extra = filters - x.shape[-1]
  return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))


def _deep_stem(x, width, conv, norm):
  """ResNet-D's stem (He et al. 2019): three 3x3 convs of width / 2, width / 2 and width
  (32, 32, 64 for ImageNet widths, as timm's resnet*d), the first strided. They see more
  of the image than the 7x7 conv (11 pixels), through two more non-linearities, for 6%
  more FLOPs in ResNet-50 (XLA's count at 224x224)."""
  for k, (features, strides) in enumerate(((width // 2, 2), (width // 2, 1), (width, 1))):
    x = conv(features, (3, 3), strides, padding=_pad(3), name=f'stem_conv{k + 1}')(x)
    x = nn.relu(norm(name=f'stem_bn{k + 1}')(x))
  return conv_ops.max_pool(x, (3, 3), strides=(2, 2), padding=_pad(3))


def drop_path_rates(rate: float, stage_sizes: Sequence[int]) -> list[float]:
  """Per-block drop probabilities, linear in the block's index from 0 (the first block) to
  ``rate`` (the last), as timm's ``drop_path_rate``: deeper blocks refine more and are
  safer to skip. Huang et al. use (b + 1) / B (the first block is dropped a little too)."""
  total = sum(stage_sizes)
  return [rate * b / max(total - 1, 1) for b in range(total)]


def _check_options(residual: bool, se_ratio: float, stochastic_depth_rate: float):
  if se_ratio < 0:
    raise ValueError(f'se_ratio must be zero (off) or positive, got {se_ratio}.')
  if not 0 <= stochastic_depth_rate < 1:
    raise ValueError(f'stochastic_depth_rate must be in [0, 1), got {stochastic_depth_rate}.')
  if stochastic_depth_rate and not residual:
    raise ValueError(
      'stochastic_depth_rate needs residual blocks: a plain net has no identity path to '
      'fall back on when a block is dropped.'
    )


class ResNet(nn.Module):
  """A ResNet: stem, stages of blocks, global average pool, dropout, linear head."""

  stage_sizes: Sequence[int]
  block_cls: ModuleDef
  num_classes: int
  widths: Sequence[int] = (64, 128, 256, 512)
  stem: str = 'imagenet'  # 7x7/2 conv + 3x3/2 max-pool; 'cifar': one 3x3 conv; 'deep'
  residual: bool = True
  preact: bool = False
  shortcut: str = 'projection'
  dtype: Any = jnp.float32
  kernel_init: str = 'he_normal'
  zero_init_residual: bool = True
  dropout_rate: float = 0.0
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  # Keep only each block's input for the backward pass and recompute the rest: more
  # compute (ResNet-20: 17% more FLOPs) for fewer saved activations, so larger batches
  # fit where the compiler turns that into memory (XLA:CPU does not).
  remat: bool = False
  # Squeeze-and-excitation in every block, reducing to about channels * se_ratio (1/16 in
  # SENet); 0: none.
  se_ratio: float = 0.0
  # Drop probability of the last block's residual branch in training, the others' linear
  # in depth from 0 (see drop_path_rates); uses the 'dropout' PRNG stream. 0: none.
  stochastic_depth_rate: float = 0.0
  # BatchNorm normalises with its running statistics in training too and leaves them as
  # they are (fine-tuning with small batches, whose own statistics are too noisy).
  frozen_batchnorm: bool = False

  def __post_init__(self):
    _check_options(self.residual, self.se_ratio, self.stochastic_depth_rate)
    super().__post_init__()

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = functools.partial(
      nn.Conv,
      use_bias=False,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      kernel_init=KERNEL_INITS[self.kernel_init],
      # The same convolution, written as matrix products for the shapes XLA:CPU runs far
      # below its rate (cpu_conv.py; 1x1 convs and kernels larger than their map); plain
      # everywhere else and on every other platform.
      conv_general_dilated=conv_ops.routed_conv,
    )
    norm = functools.partial(
      nn.BatchNorm,
      use_running_average=not train or self.frozen_batchnorm,
      momentum=self.bn_momentum,
      epsilon=self.bn_epsilon,
      dtype=self.dtype,
      param_dtype=jnp.float32,
    )
    x = x.astype(self.dtype)
    if self.stem == 'imagenet':
      x = conv(self.widths[0], (7, 7), (2, 2), padding=_pad(7), name='stem_conv')(x)
      x = nn.relu(norm(name='stem_bn')(x))
      x = conv_ops.max_pool(x, (3, 3), strides=(2, 2), padding=_pad(3))
    elif self.stem == 'deep':
      x = _deep_stem(x, self.widths[0], conv, norm)
    else:
      x = conv(self.widths[0], (3, 3), padding=_pad(3), name='stem_conv')(x)
      if not self.preact:  # a pre-activation block normalises its own input
        x = nn.relu(norm(name='stem_bn')(x))
    block_cls = nn.remat(self.block_cls) if self.remat else self.block_cls
    rates = iter(drop_path_rates(self.stochastic_depth_rate, self.stage_sizes))
    for i, (num_blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
      for j in range(num_blocks):
        x = block_cls(
          filters=width,
          conv=conv,
          norm=norm,
          strides=2 if i > 0 and j == 0 else 1,
          residual=self.residual,
          shortcut=self.shortcut,
          zero_init_last=self.zero_init_residual,
          se_ratio=self.se_ratio,
          drop_path_rate=next(rates),
          deterministic=not train,
          name=f'stage{i + 1}_block{j + 1}',
        )(x)
    if self.preact:
      x = nn.relu(norm(name='final_bn')(x))
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, name='head')(x)
    return x.astype(jnp.float32)


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
