"""jax_resnet.models.cpu_conv: routed convolutions equal lax.conv_general_dilated, values and
gradients."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jax_resnet.models import cpu_conv

DN = ('NHWC', 'HWIO', 'NHWC')

# (x shape, kernel shape, strides, padding): one small case per routed class, each with
# the route it must take on CPU.
ROUTED = {
  # 3x3 on a 2x2 map: XLA swaps the operands of the forward and input-gradient convs.
  'swapped_3x3': ((2, 2, 2, 24), (3, 3, 24, 16), (1, 1), ((1, 1), (1, 1))),
  # 3x3 stride 2 from 4x4 to 2x2: the forward is fine, the input gradient is swapped.
  'swapped_dx_3x3_s2': ((2, 4, 4, 16), (3, 3, 16, 24), (2, 2), ((1, 1), (1, 1))),
  # 3x3 on a 1x1 map (2^k inputs at the smallest size).
  'swapped_3x3_1x1': ((3, 1, 1, 8), (3, 3, 8, 8), (1, 1), ((1, 1), (1, 1))),
  # The ImageNet stem on a tiny image (49 > 4x4 outputs).
  'swapped_7x7_s2': ((1, 8, 8, 3), (7, 7, 3, 8), (2, 2), ((3, 3), (3, 3))),
  # 1x1 convs: matmuls, strided ones after a strided slice.
  'pointwise': ((2, 5, 5, 24), (1, 1, 24, 40), (1, 1), ((0, 0), (0, 0))),
  'pointwise_s2': ((2, 6, 6, 24), (1, 1, 24, 40), (2, 2), ((0, 0), (0, 0))),
  'pointwise_s2_odd': ((2, 7, 7, 16), (1, 1, 16, 8), (2, 2), ((0, 0), (0, 0))),
}
# Shapes that keep the plain op on CPU.
PLAIN = {
  'conv_3x3_8x8': ((2, 8, 8, 16), (3, 3, 16, 16), (1, 1), ((1, 1), (1, 1))),
  'conv_3x3_s2_16x16': ((2, 16, 16, 8), (3, 3, 8, 16), (2, 2), ((1, 1), (1, 1))),
  'stem_7x7_s2_32x32': ((2, 32, 32, 3), (7, 7, 3, 16), (2, 2), ((3, 3), (3, 3))),
}


def _inputs(x_shape, w_shape, dtype, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal(x_shape, np.float32), dtype)
  w = jnp.asarray(rng.standard_normal(w_shape, np.float32) / np.sqrt(np.prod(w_shape[:3])), dtype)
  return x, w


def _value_and_grads(f, x, w):
  """f(x, w) and the gradients of <f(x, w), g> for a fixed random cotangent g."""
  y, vjp = jax.vjp(f, x, w)
  g = jnp.asarray(np.random.default_rng(1).standard_normal(y.shape, np.float32), y.dtype)
  return (y, *vjp(g))


def _check(case, dtype, rtol):
  x_shape, w_shape, strides, padding = case
  x, w = _inputs(x_shape, w_shape, dtype)
  routed = functools.partial(
    cpu_conv.routed_conv, window_strides=strides, padding=padding, dimension_numbers=DN
  )
  plain = functools.partial(
    lax.conv_general_dilated, window_strides=strides, padding=padding, dimension_numbers=DN
  )
  got = jax.jit(lambda x, w: _value_and_grads(routed, x, w))(x, w)
  want = jax.jit(lambda x, w: _value_and_grads(plain, x, w))(x, w)
  for name, a, b in zip(('forward', 'input grad', 'kernel grad'), got, want):
    assert a.dtype == b.dtype and a.shape == b.shape, name
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max(), err_msg=name)


def _compiled_ops(f, *args, platform='cpu'):
  """The StableHLO op names in f's lowering for ``platform`` (lowering needs no device)."""
  text = jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()
  return {op for op in ('convolution', 'dot_general') if f'stablehlo.{op}' in text}


@pytest.mark.parametrize('name', sorted(ROUTED))
def test_routed_shapes_take_their_route(name):
  x_shape, w_shape, strides, padding = ROUTED[name]
  assert cpu_conv.route(x_shape, w_shape, strides, padding) is not None


@pytest.mark.parametrize('name', sorted(PLAIN))
def test_other_shapes_keep_the_plain_op(name):
  x_shape, w_shape, strides, padding = PLAIN[name]
  assert cpu_conv.route(x_shape, w_shape, strides, padding) is None
  x, w = _inputs(x_shape, w_shape, jnp.float32)
  f = lambda x, w: cpu_conv.routed_conv(x, w, strides, padding, dimension_numbers=DN)
  g = lambda x, w: jax.grad(lambda x, w: jnp.sum(f(x, w) ** 2), (0, 1))(x, w)
  assert _compiled_ops(f, x, w) == {'convolution'}
  assert _compiled_ops(g, x, w) == {'convolution'}


@pytest.mark.parametrize('name', sorted(ROUTED))
def test_float32_values_and_gradients(name):
  _check(ROUTED[name], jnp.float32, rtol=1e-4)


@pytest.mark.parametrize('name', sorted(ROUTED))
def test_bfloat16_values_and_gradients(name):
  # bf16 keeps 8 bits of mantissa; the two formulations sum in different orders.
  _check(ROUTED[name], jnp.bfloat16, rtol=3e-2)


@pytest.mark.parametrize('name', sorted(ROUTED))
def test_routed_on_cpu_only(name):
  x_shape, w_shape, strides, padding = ROUTED[name]
  x, w = _inputs(x_shape, w_shape, jnp.float32)
  f = lambda x, w: cpu_conv.routed_conv(x, w, strides, padding, dimension_numbers=DN)
  g = lambda x, w: jax.grad(lambda x, w: jnp.sum(f(x, w) ** 2), (0, 1))(x, w)
  assert 'dot_general' in _compiled_ops(f, x, w)
  assert 'dot_general' in _compiled_ops(g, x, w)
  for platform in ('cuda', 'rocm', 'tpu'):
    assert _compiled_ops(f, x, w, platform=platform) == {'convolution'}, platform
    assert _compiled_ops(g, x, w, platform=platform) == {'convolution'}, platform


@pytest.mark.parametrize(
  'modes',
  [
    (cpu_conv.CONV, cpu_conv.MATMUL, cpu_conv.CONV),
    (cpu_conv.MATMUL, cpu_conv.CONV, cpu_conv.MATMUL),
  ],
)
def test_mixed_formulations(modes):
  """make_conv's custom_vjp (a forward, input gradient and kernel gradient each its own
  formulation) equals the plain op: for trying other routes."""
  x, w = _inputs((2, 6, 6, 8), (3, 3, 8, 4), jnp.float32)
  strides, padding = (2, 2), ((1, 1), (1, 1))
  mixed = cpu_conv.make_conv(strides, padding, *modes)
  plain = lambda x, w: lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=DN)
  got = jax.jit(lambda x, w: _value_and_grads(mixed, x, w))(x, w)
  want = jax.jit(lambda x, w: _value_and_grads(plain, x, w))(x, w)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())


def test_unsupported_arguments_use_the_plain_op():
  x, w = _inputs((2, 2, 2, 8), (3, 3, 8, 8), jnp.float32)
  cases = [
    (
      x.transpose(0, 3, 1, 2),
      w.transpose(3, 2, 0, 1),
      dict(dimension_numbers=('NCHW', 'OIHW', 'NCHW')),
    ),
    (x, w, dict(dimension_numbers=DN, rhs_dilation=(2, 2))),
    (x, w, dict(dimension_numbers=DN, lhs_dilation=(2, 2))),
    (x, w[:, :, :4], dict(dimension_numbers=DN, feature_group_count=2)),
  ]
  pad = ((1, 1), (1, 1))
  for lhs, rhs, kwargs in cases:
    f = lambda x, w, kwargs=kwargs: cpu_conv.routed_conv(x, w, (1, 1), pad, **kwargs)
    assert _compiled_ops(f, lhs, rhs) == {'convolution'}, kwargs
    want = lax.conv_general_dilated(lhs, rhs, (1, 1), pad, **kwargs)
    np.testing.assert_array_equal(f(lhs, rhs), want)


@pytest.mark.parametrize('padding', ['SAME', 'VALID', ((1, 1), (1, 1)), [(0, 1), (1, 0)]])
def test_padding_forms(padding):
  x, w = _inputs((2, 3, 3, 8), (3, 3, 8, 4), jnp.float32)
  got = cpu_conv.routed_conv(x, w, (1, 1), padding, dimension_numbers=DN)
  want = lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=DN)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_flax_conv_drop_in():
  """Same parameter tree, same outputs and gradients as a plain nn.Conv."""
  x, _ = _inputs((2, 2, 2, 16), (1, 1, 1, 1), jnp.float32)
  kwargs = dict(features=8, kernel_size=(3, 3), padding=((1, 1), (1, 1)), use_bias=False)
  plain = nn.Conv(**kwargs)
  routed = nn.Conv(**kwargs, conv_general_dilated=cpu_conv.routed_conv)
  params = plain.init(jax.random.PRNGKey(0), x)
  assert jax.tree.structure(routed.init(jax.random.PRNGKey(0), x)) == jax.tree.structure(params)
  loss = lambda m: lambda p, x: jnp.sum(jnp.tanh(m.apply(p, x)))
  got = jax.jit(jax.value_and_grad(loss(routed), (0, 1)))(params, x)
  want = jax.jit(jax.value_and_grad(loss(plain), (0, 1)))(params, x)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


POOLS = {
  'imagenet_stem': ((2, 9, 8, 5), (3, 3), (2, 2), ((1, 1), (1, 1))),
  'same': ((2, 7, 7, 3), (3, 3), (2, 2), 'SAME'),
  'valid_2x2': ((2, 6, 6, 3), (2, 2), (2, 2), 'VALID'),
  'stride_1': ((1, 5, 5, 2), (3, 3), (1, 1), ((1, 1), (1, 1))),
}


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('name', sorted(POOLS))
def test_max_pool_values_and_gradients(name, dtype):
  shape, window, strides, padding = POOLS[name]
  rng = np.random.default_rng(0)
  # Few distinct values (ReLU zeros among them): many ties, where the gradient must go
  # to the first maximum of each window, as lax.reduce_window's does.
  x = jnp.asarray(np.maximum(rng.integers(-2, 3, shape), 0), dtype)
  fast = lambda x: cpu_conv.max_pool(x, window, strides=strides, padding=padding)
  plain = lambda x: nn.max_pool(x, window, strides=strides, padding=padding)
  got, want = jax.jit(fast)(x), jax.jit(plain)(x)
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
  g = jnp.asarray(rng.standard_normal(want.shape), dtype)
  # Differentiated, the forward is computed another way (shifted slices): same values.
  y, dx = jax.jit(lambda x, g: (lambda y, vjp: (y, vjp(g)[0]))(*jax.vjp(fast, x)))(x, g)
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(want, np.float32))
  dx_want = jax.jit(lambda x, g: jax.vjp(plain, x)[1](g)[0])(x, g)
  tol = 1e-6 if dtype == jnp.float32 else 1e-2  # overlapping windows: sums in another order
  np.testing.assert_allclose(
    np.asarray(dx, np.float32), np.asarray(dx_want, np.float32), rtol=tol, atol=tol
  )


def test_max_pool_on_cpu_only():
  x = jnp.ones((2, 8, 8, 4))
  f = lambda x: cpu_conv.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
  g = jax.grad(lambda x: jnp.sum(f(x) ** 2))

  def ops(fn, platform):
    text = jax.jit(fn).trace(x).lower(lowering_platforms=(platform,)).as_text()
    return {op for op in ('reduce_window', 'select_and_scatter') if f'stablehlo.{op}' in text}

  assert ops(f, 'cpu') == ops(f, 'cuda') == {'reduce_window'}  # no gradient: the plain op
  assert ops(g, 'cpu') == set()
  assert ops(g, 'cuda') == {'reduce_window', 'select_and_scatter'}
