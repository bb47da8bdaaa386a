"""ResNet families as Flax modules: ImageNet (He et al. 2015), CIFAR (Section 4.2),
pre-activation (He et al. 2016) and "plain" twins without skip connections.

All models take NHWC images and are called as ``model.apply(variables, x, train=...)``.
Parameters are always float32; ``dtype`` sets the compute precision (bf16 for mixed
precision). BatchNorm statistics are reduced in float32 whatever the compute dtype.
"""

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

ModuleDef = Any

# He-normal (Kaiming) init with fan-out, as torchvision's ResNets use.
he_normal = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')

KERNEL_INITS = {
  'he_normal': he_normal,
  'he_uniform': nn.initializers.variance_scaling(2.0, 'fan_out', 'uniform'),
  'lecun_normal': nn.initializers.lecun_normal(),
}


# 'imagenet': 7x7/2 conv + 3x3/2 max-pool; 'cifar': one 3x3 conv, no pooling.
STEMS = ('imagenet', 'cifar')


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
  shortcut: str = 'projection'  # or 'pad' (He et al. 2015 option A, CIFAR)
  zero_init_last: bool = True


class BasicBlock(_Block):
  """Two 3x3 convs."""

  expansion = 1

  @nn.compact
  def __call__(self, x):
    y = self.conv(self.filters, (3, 3), self.strides, padding=_pad(3))(x)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.filters, (3, 3), padding=_pad(3))(y)
    y = self.norm(scale_init=_last_scale_init(self.zero_init_last, self.residual))(y)
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
    if self.residual:
      y = y + _shortcut(x, y.shape[-1], self.strides, self.conv, self.norm, self.shortcut)
    return nn.relu(y)


class PreActBasicBlock(_Block):
  """BN-ReLU-conv ordering with a clean identity path (He et al. 2016); always residual."""

  expansion = 1

  @nn.compact
  def __call__(self, x):
    pre = nn.relu(self.norm()(x))
    y = self.conv(self.filters, (3, 3), self.strides, padding=_pad(3))(pre)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.filters, (3, 3), padding=_pad(3))(y)
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
    y = self.conv(self.filters * 4, (1, 1))(y)
    return y + _preact_shortcut(x, pre, y.shape[-1], self.strides, self.conv, self.shortcut)


def _last_scale_init(zero_init_last: bool, residual: bool):
  # Zero-initialising the branch's last BN makes each block start as the identity
  # (Goyal et al. 2017). A plain net has no identity to fall back on, so not there.
  return nn.initializers.zeros if (zero_init_last and residual) else nn.initializers.ones


def _shortcut(x, filters, strides, conv, norm, kind):
  if x.shape[-1] == filters and strides == 1:
    return x
  if kind == 'pad':
    return _pad_shortcut(x, filters, strides)
  x = conv(filters, (1, 1), strides, name='proj_conv')(x)
  return norm(name='proj_bn')(x)


def _preact_shortcut(x, pre, filters, strides, conv, kind):
  if x.shape[-1] == filters and strides == 1:
    return x
  if kind == 'pad':
    return _pad_shortcut(x, filters, strides)
  return conv(filters, (1, 1), strides, name='proj_conv')(pre)


def _pad_shortcut(x, filters, strides):
  """Parameter-free option A of He et al. 2015: subsample and zero-pad channels."""
  x = x[:, ::strides, ::strides, :]
  extra = filters - x.shape[-1]
  return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))


class ResNet(nn.Module):
  """A ResNet: stem, stages of blocks, global average pool, dropout, linear head."""

  stage_sizes: Sequence[int]
  block_cls: ModuleDef
  num_classes: int
  widths: Sequence[int] = (64, 128, 256, 512)
  stem: str = 'imagenet'  # 7x7/2 conv + 3x3/2 max-pool; 'cifar': one 3x3 conv
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

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = functools.partial(
      nn.Conv,
      use_bias=False,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      kernel_init=KERNEL_INITS[self.kernel_init],
    )
    norm = functools.partial(
      nn.BatchNorm,
      use_running_average=not train,
      momentum=self.bn_momentum,
      epsilon=self.bn_epsilon,
      dtype=self.dtype,
      param_dtype=jnp.float32,
    )
    x = x.astype(self.dtype)
    if self.stem == 'imagenet':
      x = conv(self.widths[0], (7, 7), (2, 2), padding=_pad(7), name='stem_conv')(x)
      x = nn.relu(norm(name='stem_bn')(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=_pad(3))
    else:
      x = conv(self.widths[0], (3, 3), padding=_pad(3), name='stem_conv')(x)
      if not self.preact:  # a pre-activation block normalises its own input
        x = nn.relu(norm(name='stem_bn')(x))
    block_cls = nn.remat(self.block_cls) if self.remat else self.block_cls
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


def _registry() -> dict:
  names = {}
  for depth in list(_IMAGENET_DEPTHS) + list(_CIFAR_DEPTHS):
    names[f'resnet{depth}'] = _architecture(depth, preact=False, residual=True)
    names[f'preact_resnet{depth}'] = _architecture(depth, preact=True, residual=True)
    names[f'plain{depth}'] = _architecture(depth, preact=False, residual=False)
  return names


MODELS = _registry()
MODEL_NAMES = tuple(
  sorted(MODELS, key=lambda n: (n.rstrip('0123456789'), int(n[len(n.rstrip('0123456789')) :])))
)


def create_model(name: str, num_classes: int, **options) -> ResNet:
  """Builds a model by name; ``options`` are any ``ResNet`` fields (dtype, stem, ...).

  ``stem='cifar'`` on an ImageNet-family depth gives the common CIFAR variant of
  ResNet-18/50 (3x3 stem, no max-pool) used by the Cutout paper.
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
  downsamplings = len(arch['stage_sizes']) - 1 + (2 if arch['stem'] == 'imagenet' else 0)
  return 2**downsamplings
