"""The parts ResNets are built of: basic and bottleneck blocks (post- and pre-activation),
their shortcuts, squeeze-and-excitation, stochastic depth (drop path) and ResNet-D's stem.
Bottlenecks widen and group their 3x3 convolution as torchvision's for Wide ResNets and
ResNeXts; basic blocks may drop out between their convolutions, as Wide ResNets do.

Each block takes its convolution and normalisation as partials from ``ResNet``, so the
compute dtype, kernel init and BatchNorm settings are decided once, there.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax_resnet.models import cpu_conv

ModuleDef = Any

# timm rounds SE widths to multiples of 8 (and at least 8): friendlier to the hardware.
SE_DIVISOR = 8


def pad(k: int):
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
  # Bottlenecks: the 3x3 convolution's groups (ResNeXt's cardinality) and width per group
  # per 64 filters (torchvision's width_per_group: 128 in wide_resnet*_2).
  groups: int = 1
  base_width: int = 64
  dropout_rate: float = 0.0  # basic blocks: dropout between the convolutions (WRN)


class BasicBlock(_Block):
  """Two 3x3 convs."""

  expansion = 1

  @nn.compact
  def __call__(self, x):
    y = self.conv(self.filters, (3, 3), self.strides, padding=pad(3))(x)
    y = _between_convs(self, nn.relu(self.norm()(y)))
    y = self.conv(self.filters, (3, 3), padding=pad(3))(y)
    y = self.norm(scale_init=_last_scale_init(self.zero_init_last, self.residual))(y)
    y = _branch_output(self, y)
    if self.residual:
      y = y + _shortcut(x, y.shape[-1], self.strides, self.conv, self.norm, self.shortcut)
    return nn.relu(y)


class Bottleneck(_Block):
  """1x1 reduce, 3x3 (strided, as torchvision's v1.5; grouped in ResNeXts), 1x1 expand to
  4 x filters."""

  expansion = 4

  @nn.compact
  def __call__(self, x):
    width = bottleneck_width(self.filters, self.groups, self.base_width)
    y = nn.relu(self.norm()(self.conv(width, (1, 1))(x)))
    y = self.conv(width, (3, 3), self.strides, padding=pad(3), feature_group_count=self.groups)(y)
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
    y = self.conv(self.filters, (3, 3), self.strides, padding=pad(3))(pre)
    y = _between_convs(self, nn.relu(self.norm()(y)))
    y = _branch_output(self, self.conv(self.filters, (3, 3), padding=pad(3))(y))
    return y + _preact_shortcut(x, pre, y.shape[-1], self.strides, self.conv, self.shortcut)


class PreActBottleneck(_Block):
  """The pre-activation bottleneck; like PreActBasicBlock, always residual."""

  expansion = 4

  @nn.compact
  def __call__(self, x):
    pre = nn.relu(self.norm()(x))
    width = bottleneck_width(self.filters, self.groups, self.base_width)
    y = self.conv(width, (1, 1))(pre)
    y = nn.relu(self.norm()(y))
    y = self.conv(width, (3, 3), self.strides, padding=pad(3), feature_group_count=self.groups)(y)
    y = nn.relu(self.norm()(y))
    y = _branch_output(self, self.conv(self.filters * 4, (1, 1))(y))
    return y + _preact_shortcut(x, pre, y.shape[-1], self.strides, self.conv, self.shortcut)


def bottleneck_width(filters: int, groups: int, base_width: int) -> int:
  """torchvision's ``int(planes * base_width / 64) * groups``: the bottleneck's inner width
  (filters for ResNet-50, 2 x filters for wide_resnet50_2 and resnext50_32x4d)."""
  return int(filters * base_width / 64) * groups


def _between_convs(block, y):
  """Dropout between a basic block's convolutions (Zagoruyko & Komodakis's WRN)."""
  if block.dropout_rate > 0:
    y = nn.Dropout(block.dropout_rate, deterministic=block.deterministic)(y)
  return y


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
  # lax.slice, not x[:, ::s, ::s]: jnp writes that as a gather when the batch is symbolic
  # (onnx_graph traces so), and a strided slice is what it means on every backend.
  x = jax.lax.slice(x, (0,) * x.ndim, x.shape, (1, strides, strides, 1))
  extra = filters - x.shape[-1]
  return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))


def deep_stem(x, width, conv, norm):
  """ResNet-D's stem (He et al. 2019): three 3x3 convs of width / 2, width / 2 and width
  (32, 32, 64 for ImageNet widths, as timm's resnet*d), the first strided. They see more
  of the image than the 7x7 conv (11 pixels), through two more non-linearities, for a few
  percent more FLOPs."""
  for k, (features, strides) in enumerate(((width // 2, 2), (width // 2, 1), (width, 1))):
    x = conv(features, (3, 3), strides, padding=pad(3), name=f'stem_conv{k + 1}')(x)
    x = nn.relu(norm(name=f'stem_bn{k + 1}')(x))
  return cpu_conv.max_pool(x, (3, 3), strides=(2, 2), padding=pad(3))


def drop_path_rates(rate: float, stage_sizes: Sequence[int]) -> list[float]:
  """Per-block drop probabilities, linear in the block's index from 0 (the first block) to
  ``rate`` (the last), as timm's ``drop_path_rate``: deeper blocks refine more and are
  safer to skip. Huang et al. use (b + 1) / B (the first block is dropped a little too)."""
  total = sum(stage_sizes)
  return [rate * b / max(total - 1, 1) for b in range(total)]


class BatchNorm(nn.Module):
  """BatchNorm whose batch statistics are each group's own (named as ``nn.BatchNorm``, so
  that its modules' automatic names, ``BatchNorm_0``, ..., are too): with the global batch split
  over the devices and one group per device, every device normalises by its own share's
  statistics (torchvision's and timm's default without SyncBatchNorm), so the forward and
  backward passes need no cross-device reduction. The running statistics, one replicated
  set, move by the mean of the groups' statistics. Its variables are ``nn.BatchNorm``'s
  (``scale``, ``bias``; ``mean``, ``var``), so checkpoints and exports do not change, and in
  inference it is ``nn.BatchNorm``. Statistics in float32, the variance as E[x^2] - E[x]^2,
  as flax computes them.
  """

  groups: int
  use_running_average: bool = False
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32
  scale_init: Any = nn.initializers.ones
  bias_init: Any = nn.initializers.zeros

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    scale = self.param('scale', self.scale_init, (channels,), self.param_dtype)
    bias = self.param('bias', self.bias_init, (channels,), self.param_dtype)
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((channels,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((channels,), jnp.float32))
    x32 = x.astype(jnp.float32)
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
      shaped = x32
    else:
      shaped = x32.reshape(self.groups, x.shape[0] // self.groups, *x.shape[1:])
      axes = tuple(range(1, shaped.ndim - 1))
      mean = jnp.mean(shaped, axis=axes, keepdims=True)
      var = jnp.maximum(jnp.mean(jnp.square(shaped), axis=axes, keepdims=True) - mean**2, 0)
      if not self.is_initializing():
        group_mean = lambda s: jnp.mean(s.reshape(self.groups, channels), axis=0)
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * group_mean(mean)
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * group_mean(var)
    y = (shaped - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale.astype(jnp.float32))
    y = (y + bias.astype(jnp.float32)).reshape(x.shape)
    return y.astype(self.dtype or x.dtype)
