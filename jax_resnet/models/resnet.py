"""ResNet families as Flax modules: ImageNet (He et al. 2015), CIFAR (Section 4.2),
pre-activation (He et al. 2016) and "plain" twins without skip connections, plus the
additions today's best ResNet results use: squeeze-and-excitation (SE-ResNet, Hu et al.
2018), ResNet-D (He et al. 2019: deep stem, average-pool shortcut), stochastic depth
(Huang et al. 2016), small custom-width CIFAR ResNets, and the wider and grouped
bottlenecks of Wide ResNets and ResNeXts (Zagoruyko & Komodakis 2016, Xie et al. 2017).

All models take NHWC images and are called as ``model.apply(variables, x, train=...)``.
Parameters are always float32; ``dtype`` sets the compute precision (bf16 for mixed
precision). BatchNorm statistics are reduced in float32 whatever the compute dtype.
"""

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jax_resnet.models import blocks, cpu_conv
from jax_resnet.models.blocks import deep_stem, drop_path_rates, pad

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


def _check_options(
  residual: bool, se_ratio: float, stochastic_depth_rate: float, block_dropout_rate: float
):
  if not 0 <= block_dropout_rate < 1:
    raise ValueError(f'block_dropout_rate must be in [0, 1), got {block_dropout_rate}.')
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
  # Groups of the batch, each normalised by its own statistics in training (one per device
  # for per-device BatchNorm, config.bn_sync=False); 1: the whole batch's (synchronised).
  bn_groups: int = 1
  # Bottlenecks' 3x3 convolution: groups and width per group (see blocks.bottleneck_width).
  groups: int = 1
  base_width: int = 64
  # Dropout between each basic block's convolutions (Wide ResNets); 'dropout' PRNG stream.
  block_dropout_rate: float = 0.0
  stem_width: int = 0  # the stem's output channels; 0: the first stage's width

  def __post_init__(self):
    _check_options(
      self.residual, self.se_ratio, self.stochastic_depth_rate, self.block_dropout_rate
    )
    super().__post_init__()

  @nn.compact
  def __call__(self, x, train: bool = True, features: bool = False):
    """Logits; with ``features``, the pooled features the head would read (embeddings)."""
    conv = functools.partial(
      nn.Conv,
      use_bias=False,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      kernel_init=KERNEL_INITS[self.kernel_init],
      # The same convolution, written as matrix products for the shapes XLA:CPU runs far
      # below its rate (cpu_conv.py; 1x1 convs and kernels larger than their map); plain
      # everywhere else and on every other platform.
      conv_general_dilated=cpu_conv.routed_conv,
    )
    norm = functools.partial(
      nn.BatchNorm if self.bn_groups == 1 else functools.partial(blocks.BatchNorm, self.bn_groups),
      use_running_average=not train or self.frozen_batchnorm,
      momentum=self.bn_momentum,
      epsilon=self.bn_epsilon,
      dtype=self.dtype,
      param_dtype=jnp.float32,
    )
    x = x.astype(self.dtype)
    stem_width = self.stem_width or self.widths[0]
    if self.stem == 'imagenet':
      x = conv(stem_width, (7, 7), (2, 2), padding=pad(7), name='stem_conv')(x)
      x = nn.relu(norm(name='stem_bn')(x))
      x = cpu_conv.max_pool(x, (3, 3), strides=(2, 2), padding=pad(3))
    elif self.stem == 'deep':
      x = deep_stem(x, stem_width, conv, norm)
    else:
      x = conv(stem_width, (3, 3), padding=pad(3), name='stem_conv')(x)
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
          groups=self.groups,
          base_width=self.base_width,
          dropout_rate=self.block_dropout_rate,
          name=f'stage{i + 1}_block{j + 1}',
        )(x)
    if self.preact:
      x = nn.relu(norm(name='final_bn')(x))
    x = jnp.mean(x, axis=(1, 2))
    if features:
      return x.astype(jnp.float32)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, name='head')(x)
    return x.astype(jnp.float32)
