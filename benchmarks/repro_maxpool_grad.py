"""XLA:CPU: the gradient of a 3x3/2 max-pool (select-and-scatter) is 5-8x slower than needed.

Standalone (jax + numpy only):  python repro_maxpool_grad.py

``lax.reduce_window(max)``'s gradient is a select-and-scatter, which XLA:CPU's
SelectAndScatterExpander turns into a scatter with index arrays as large as the padded
input (s32[N, H+2, W+2, C] iotas, then a concatenated [elements, 4] index array). For the
ImageNet ResNet stem's max-pool that costs more than the pool's convolution neighbours.

The same gradient written with elementwise ops (for each of the 9 window offsets: the
cotangent where that offset holds the window's first maximum, padded back to the input
with interior padding, all summed) gives equal values (the first maximum in row-major
order gets the cotangent, as with select-and-scatter's >=) and fuses into loops.

Prints, median of ``--repeats``, the forward alone and the forward plus gradient (one
program, as in a train step) for the stem's pool at 64x64, 128x128 (batch 16) and
224x224 (batch 8) inputs, and the max difference between the two gradients.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

SHAPES = ((16, 32, 32, 64), (16, 64, 64, 64), (8, 112, 112, 64))  # the pool's input


def plain_pool(x):
  return lax.reduce_window(
    x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
  )


def _windows(x):
  n, h, w, c = x.shape
  ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  return [
    lax.slice(xp, (0, i, j, 0), (n, i + 2 * ho - 1, j + 2 * wo - 1, c), (1, 2, 2, 1))
    for i in range(3)
    for j in range(3)
  ]


@jax.custom_vjp
def fast_pool(x):
  return plain_pool(x)  # not differentiated: the plain op


def _fast_pool_fwd(x):
  # Differentiated: the max of the 9 shifted slices, which XLA fuses with the backward's.
  cols = _windows(x)
  y = cols[0]
  for col in cols[1:]:
    y = jnp.maximum(y, col)
  return y, (x, y)


def _fast_pool_bwd(res, g):
  x, y = res
  n, h, w, c = x.shape
  ho, wo = y.shape[1:3]
  taken = jnp.zeros(y.shape, bool)
  dxp = jnp.zeros((n, h + 2, w + 2, c), g.dtype)
  for k, col in enumerate(_windows(x)):
    i, j = divmod(k, 3)
    first = (col == y) & ~taken
    taken = taken | first
    pads = (
      (0, 0, 0),
      (i, h + 1 - i - 2 * (ho - 1), 1),
      (j, w + 1 - j - 2 * (wo - 1), 1),
      (0, 0, 0),
    )
    dxp = dxp + lax.pad(jnp.where(first, g, 0.0), 0.0, pads)
  return (dxp[:, 1 : h + 1, 1 : w + 1, :],)


fast_pool.defvjp(_fast_pool_fwd, _fast_pool_bwd)


def median_ms(fn, args, repeats):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--repeats', type=int, default=5)
  args = parser.parse_args()
  print(f'jax {jax.__version__}, {jax.devices()[0].device_kind}, fp32')
  rng = np.random.default_rng(0)
  for shape in SHAPES:
    x = jnp.asarray(np.maximum(rng.standard_normal(shape, np.float32), 0))  # after ReLU
    g = jnp.asarray(rng.standard_normal(plain_pool(x).shape, np.float32))
    fwd = median_ms(jax.jit(plain_pool), (x,), args.repeats)
    results = {}
    for name, pool in (('select-and-scatter', plain_pool), ('masked pads', fast_pool)):
      grad = jax.jit(lambda x, g, pool=pool: jax.vjp(pool, x)[1](g)[0])
      results[name] = (median_ms(grad, (x, g), args.repeats), grad(x, g))
    (b0, d0), (b1, d1) = results.values()
    diff = float(jnp.max(jnp.abs(d0 - d1)))
    print(
      f'{shape}: forward {fwd:5.1f} ms; forward + gradient: select-and-scatter {b0:6.1f} ms, '
      f'slices and masked pads {b1:5.1f} ms ({b0 / b1:.1f}x); max |diff| {diff:.1e}'
    )


if __name__ == '__main__':
  main()
