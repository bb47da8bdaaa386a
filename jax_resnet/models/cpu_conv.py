"""Faster XLA:CPU formulations of the convolutions (and the max-pool) the ResNets use.

Drop-in replacements, chosen at trace time by shape and lowered only for CPU (through
``lax.platform_dependent``: a GPU or TPU lowering of the same code gets the plain op)::

  conv = functools.partial(nn.Conv, ..., conv_general_dilated=cpu_conv.routed_conv)
  x = cpu_conv.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

Parameter names and shapes do not change; values and gradients equal the plain ops' to
float rounding (tests/test_cpu_conv.py). What each route gains, per conv and per model,
with the commands that measure it: benchmarks/RESULTS.md, "Convolutions on CPU".

Routing (CPU; NHWC input, HWIO kernel, no dilation, no groups; anything else is plain):

* **Kernel window larger than the output map** (``kh * kw > Ho * Wo``: 3x3 convs on 2x2
  or 1x1 maps, a strided 3x3 from 4x4 to 2x2, the 7x7 stem on images under 14x14) ->
  im2col: the kh * kw shifted strided slices concatenated on the channel axis, one
  matmul; jax differentiates that into two more matmuls and pads. Why: XLA's
  ConvOperandSwapper swaps the operands of a conv whose window outnumbers its input map
  (the forward conv when kh * kw > H * W; the input-gradient conv, whose input is the
  Ho x Wo cotangent, when kh * kw > Ho * Wo), giving ``dim_labels=01fb_o01i->f01b`` with
  a reversed window, which XLA:CPU runs as a generic loop, two orders of magnitude below
  its other convs (benchmarks/repro_swapped_conv.py shows it with jax and numpy only).
* **1x1 convs** (strided: a strided slice first) -> one 2D matmul. Why: with the
  default flags XLA:CPU gives a 1x1 conv's kernel gradient to YNNPACK, which runs it far
  below the same ``x^T g`` as a matmul. With YNNPACK's convs off
  (``CPU_COMPILER_OPTIONS``) Eigen's 1x1 convs come close to the matmuls, so the route
  wins with the default flags and costs nothing without them.
* Everything else (3x3 and 7x7 convs on maps at least as large as the window): the plain
  op. There im2col is slower in the forward and the kernel gradient (the patches are 9x
  or 49x the input, and memory bandwidth is the limit).

``max_pool``: ``flax.linen.max_pool`` (reduce-window) when not differentiated; under
differentiation the max of the kh * kw shifted strided slices, and the plain op's
gradient (the cotangent goes to each window's first maximum) as elementwise ops: for
each window offset, the cotangent where that offset holds the first maximum, padded back
with interior padding, all summed. XLA:CPU expands the plain gradient
(select-and-scatter) into a scatter with index arrays as large as the input
(benchmarks/repro_maxpool_grad.py).

``CPU_COMPILER_OPTIONS``: XLA options for the jitted train step on CPU (``jax.jit(...,
compiler_options=...)``), the same as
``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution``: YNNPACK
keeps dots and reductions, convolutions go to Eigen, whose kernel-gradient convs are
faster than YNNPACK's (benchmarks/repro_ynn_conv_grad.py).
"""

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

CPU_ONLY_SCOPE = 'cpu_only_route'  # the name scope of every CPU-only formulation
CPU_COMPILER_OPTIONS = {
  'xla_cpu_experimental_ynn_fusion_type': (
    'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE'
  )
}

# Formulations of a forward conv and of its two gradients.
CONV = 'conv'  # lax.conv_general_dilated; jax's transposes of it for the gradients
MATMUL = 'matmul'  # patches (shifted strided slices, concatenated) times the kernel matrix

_NHWC = lax.ConvDimensionNumbers(
  lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2)
)


def _out_size(size, k, stride, lo, hi):
  return (size + lo + hi - k) // stride + 1


def _windows(xp, window, strides, out):
  """The kh * kw strided slices of a padded NHWC array, one per window offset."""
  n, _, _, c = xp.shape
  (kh, kw), (sh, sw), (ho, wo) = window, strides, out
  return [
    lax.slice(
      xp, (0, i, j, 0), (n, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c), (1, sh, sw, 1)
    )
    for i in range(kh)
    for j in range(kw)
  ]


def patches(x, window, strides, padding):
  """im2col of NHWC x: (N, Ho, Wo, kh * kw * C), features in (i, j, c) order (HWIO's)."""
  (kh, kw), (sh, sw), ((pt, pb), (pl, pr)) = window, strides, padding
  out = (_out_size(x.shape[1], kh, sh, pt, pb), _out_size(x.shape[2], kw, sw, pl, pr))
  xp = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)))
  cols = _windows(xp, window, strides, out)
  return cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)


def matmul_conv(x, w, strides, padding, precision=None, preferred_element_type=None):
  """NHWC x HWIO conv as im2col and one matmul (for a 1x1 kernel: a slice, no copy).

  The matmul is 2D, (N * Ho * Wo, kh * kw * C) @ (kh * kw * C, O): its transpose for the
  kernel gradient is then a dot contracting the rows of both operands, which XLA:CPU
  runs as is. Written on the 4D patches instead, the same gradient gets a transposed copy
  of its cotangent first (``copy_bitcast_fusion f32[O, N * Ho * Wo]``), several times
  slower (benchmarks/RESULTS.md).
  """
  kh, kw, c, o = w.shape
  p = patches(x, (kh, kw), strides, padding)
  n, ho, wo, k = p.shape
  y = lax.dot_general(
    p.reshape(n * ho * wo, k),
    w.reshape(k, o),
    (((1,), (0,)), ((), ())),
    precision=precision,
    preferred_element_type=preferred_element_type,
  )
  return y.reshape(n, ho, wo, o)


def plain_conv(x, w, strides, padding, precision=None, preferred_element_type=None):
  return lax.conv_general_dilated(
    x,
    w,
    strides,
    padding,
    dimension_numbers=_NHWC,
    precision=precision,
    preferred_element_type=preferred_element_type,
  )


_IMPLS = {CONV: plain_conv, MATMUL: matmul_conv}


@functools.cache
def make_conv(strides, padding, fwd, dx, dw, precision=None, preferred_element_type=None):
  """conv(x, w) whose forward, input gradient and kernel gradient each use a formulation.

  One formulation for all three is plain function composition (jax differentiates it);
  a mix is a ``jax.custom_vjp`` keeping (x, w) for the backward pass.
  """
  kw = dict(strides=strides, padding=padding, precision=precision)
  kw['preferred_element_type'] = preferred_element_type
  if fwd == dx == dw:
    return functools.partial(_IMPLS[fwd], **kw)

  @jax.custom_vjp
  def conv(x, w):
    return _IMPLS[fwd](x, w, **kw)

  def conv_fwd(x, w):
    return conv(x, w), (x, w)

  def conv_bwd(res, g):
    x, w = res
    dx_ = jax.vjp(lambda x: _IMPLS[dx](x, w, **kw), x)[1](g)[0]
    dw_ = jax.vjp(lambda w: _IMPLS[dw](x, w, **kw), w)[1](g)[0]
    return dx_, dw_

  conv.defvjp(conv_fwd, conv_bwd)
  return conv


def route(x_shape, w_shape, strides, padding):
  """(fwd, dx, dw) formulations for an NHWC x HWIO conv on CPU, or None for the plain op.

  ``padding``: ((top, bottom), (left, right)). The rule and its numbers: module docstring.
  """
  kh, kw = w_shape[:2]
  (sh, sw), ((pt, pb), (pl, pr)) = strides, padding
  ho, wo = _out_size(x_shape[1], kh, sh, pt, pb), _out_size(x_shape[2], kw, sw, pl, pr)
  if kh * kw > ho * wo or kh == kw == 1:
    return (MATMUL, MATMUL, MATMUL)
  return None


def _routable(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, groups):
  return (
    lhs.ndim == 4
    and rhs.ndim == 4
    and groups == (1, 1)
    and all(d == 1 for d in (lhs_dilation or (1, 1)))
    and all(d == 1 for d in (rhs_dilation or (1, 1)))
    and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == _NHWC
  )


def routed_conv(
  lhs,
  rhs,
  window_strides: Sequence[int],
  padding,
  lhs_dilation=None,
  rhs_dilation=None,
  dimension_numbers=None,
  feature_group_count: int = 1,
  batch_group_count: int = 1,
  precision=None,
  preferred_element_type=None,
):
  """``lax.conv_general_dilated`` with the CPU routing of the module docstring.

  Same signature and results; for flax: ``nn.Conv(..., conv_general_dilated=routed_conv)``.
  """
  plain = functools.partial(
    lax.conv_general_dilated,
    window_strides=window_strides,
    padding=padding,
    lhs_dilation=lhs_dilation,
    rhs_dilation=rhs_dilation,
    dimension_numbers=dimension_numbers,
    feature_group_count=feature_group_count,
    batch_group_count=batch_group_count,
    precision=precision,
    preferred_element_type=preferred_element_type,
  )
  groups = (feature_group_count, batch_group_count)
  if not _routable(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, groups):
    return plain(lhs, rhs)
  strides = tuple(window_strides)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  modes = route(lhs.shape, rhs.shape, strides, padding)
  if modes is None:
    return plain(lhs, rhs)
  fast = make_conv(strides, padding, *modes, precision, preferred_element_type)
  return lax.platform_dependent(lhs, rhs, cpu=_cpu_only(fast), default=lambda x, w: plain(x, w))


def _cpu_only(fn):
  """``fn`` under the name scope ``CPU_ONLY_SCOPE``, so that a lowered program shows whether
  a CPU route reached it (``--mode=check`` refuses one in a GPU or TPU program)."""

  @functools.wraps(fn)
  def scoped(*args):
    with jax.named_scope(CPU_ONLY_SCOPE):
      return fn(*args)

  return scoped


def _max_pool_windows(x, window, strides, padding):
  (kh, kw), (sh, sw), ((pt, pb), (pl, pr)) = window, strides, padding
  out = (_out_size(x.shape[1], kh, sh, pt, pb), _out_size(x.shape[2], kw, sw, pl, pr))
  xp = lax.pad(x, jnp.array(-jnp.inf, x.dtype), ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)))
  return _windows(xp, window, strides, out)


@functools.cache
def _make_max_pool(window, strides, padding):
  plain = lambda x: nn.max_pool(x, window, strides=strides, padding=padding)

  @jax.custom_vjp
  def pool(x):
    return plain(x)

  def pool_fwd(x):
    # Under differentiation the forward is the max of the shifted slices: XLA fuses them
    # with the backward pass's (the same slices), 2-3x faster than reduce-window there.
    y = functools.reduce(jnp.maximum, _max_pool_windows(x, window, strides, padding))
    return y, (x, y)

  def pool_bwd(res, g):
    # The cotangent goes to the first maximum of each window in row-major order, as
    # lax.reduce_window's gradient (select-and-scatter with >=) sends it.
    x, y = res
    cols = _max_pool_windows(x, window, strides, padding)
    (_, kw), (sh, sw), ((pt, pb), (pl, pr)) = window, strides, padding
    hp, wp = x.shape[1] + pt + pb, x.shape[2] + pl + pr
    ho, wo = y.shape[1:3]
    zero = jnp.zeros((), g.dtype)
    taken = jnp.zeros(y.shape, bool)
    dxp = None
    for k, col in enumerate(cols):
      i, j = divmod(k, kw)
      first = (col == y) & ~taken
      taken = taken | first
      part = lax.pad(
        jnp.where(first, g, zero),
        zero,
        (
          (0, 0, 0),
          (i, hp - i - sh * (ho - 1) - 1, sh - 1),
          (j, wp - j - sw * (wo - 1) - 1, sw - 1),
          (0, 0, 0),
        ),
      )
      dxp = part if dxp is None else dxp + part
    dx = lax.slice(dxp, (0, pt, pl, 0), (x.shape[0], pt + x.shape[1], pl + x.shape[2], x.shape[3]))
    return (dx,)

  pool.defvjp(pool_fwd, pool_bwd)
  return pool


def max_pool(inputs, window_shape, strides=None, padding='VALID'):
  """``flax.linen.max_pool`` (same arguments and results), faster gradient on CPU."""
  plain = lambda x: nn.max_pool(x, window_shape, strides=strides, padding=padding)
  window = tuple(window_shape)
  strides = tuple(strides or (1,) * len(window))
  if inputs.ndim != 4 or len(window) != 2:
    return plain(inputs)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(inputs.shape[1:3], window, strides, padding)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  fast = _make_max_pool(window, strides, padding)
  return lax.platform_dependent(inputs, cpu=_cpu_only(fast), default=plain)
