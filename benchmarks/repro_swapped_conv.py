"""XLA:CPU: a conv whose kernel window is larger than its input map runs 30-100x slower.

Standalone (jax + numpy only):  python repro_swapped_conv.py

Stage 4 of an ImageNet ResNet at 64x64 input has 3x3 convs, 512 channels, on a 2x2 map.
XLA's ConvOperandSwapper (in the simplifier) swaps a conv's operands when the kernel's
spatial product exceeds the input's (here 3x3 = 9 > 2x2 = 4): the result has
``dim_labels=01fb_o01i->f01b`` and ``rhs_reversal``, which XLA:CPU's Eigen and YNNPACK
paths do not take, so it runs as a generic loop at 1-3 GFLOP/s. The input gradient of a
stride-2 3x3 conv from 4x4 to 2x2 is swapped the same way (its input is the 2x2 cotangent),
although that conv's forward is not.

The same convs as im2col (shifted strided slices concatenated on the channel axis, one
matmul; jax differentiates it into matmuls and pads) give equal results 20-100x faster.

Prints, for each case, the forward and the input/kernel gradients timed alone (median of
``--repeats``), the dim_labels XLA chose, and the max difference between the two.
"""

import argparse
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

DN = ('NHWC', 'HWIO', 'NHWC')
# (name, x shape NHWC, kernel HWIO, stride): batch 16, as in the ResNet-18/50 step.
CASES = (
  ('3x3 s1, 2x2 map, 512 ch', (16, 2, 2, 512), (3, 3, 512, 512), 1),
  ('3x3 s2, 4x4 -> 2x2, 256 -> 512 ch', (16, 4, 4, 256), (3, 3, 256, 512), 2),
)


def conv(x, w, stride):
  return lax.conv_general_dilated(x, w, (stride, stride), ((1, 1), (1, 1)), dimension_numbers=DN)


def im2col_conv(x, w, stride):
  n, h, wd, c = x.shape
  kh, kw, _, o = w.shape
  ho, wo = (h + 2 - kh) // stride + 1, (wd + 2 - kw) // stride + 1
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  cols = [
    xp[:, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride, :]
    for i in range(kh)
    for j in range(kw)
  ]
  return jnp.concatenate(cols, axis=-1).reshape(n, ho, wo, kh * kw * c) @ w.reshape(-1, o)


def programs(f, stride):
  fwd = jax.jit(lambda x, w, g: f(x, w, stride))
  dx = jax.jit(lambda x, w, g: jax.vjp(lambda x: f(x, w, stride), x)[1](g)[0])
  dw = jax.jit(lambda x, w, g: jax.vjp(lambda w: f(x, w, stride), w)[1](g)[0])
  return {'forward': fwd, 'input grad': dx, 'kernel grad': dw}


def median_ms(fn, args, repeats):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def dim_labels(fn, args):
  text = fn.lower(*args).compile().as_text()
  return sorted(set(re.findall(r'dim_labels=([\w>-]+)', text)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--repeats', type=int, default=5)
  args = parser.parse_args()
  print(f'jax {jax.__version__}, {jax.devices()[0].device_kind}, fp32')
  rng = np.random.default_rng(0)
  for name, x_shape, w_shape, stride in CASES:
    x = jnp.asarray(rng.standard_normal(x_shape, np.float32))
    w = jnp.asarray(rng.standard_normal(w_shape, np.float32) / np.sqrt(np.prod(w_shape[:3])))
    y = conv(x, w, stride)
    g = jnp.asarray(rng.standard_normal(y.shape, np.float32))
    gflop = 2 * y.size * np.prod(w_shape[:3]) / 1e9
    print(f'\n{name}: x {x_shape}, kernel {w_shape}, {gflop:.3f} GFLOP per op')
    slow, fast = programs(conv, stride), programs(im2col_conv, stride)
    for op in slow:
      a = median_ms(slow[op], (x, w, g), args.repeats)
      b = median_ms(fast[op], (x, w, g), args.repeats)
      diff = float(jnp.max(jnp.abs(slow[op](x, w, g) - fast[op](x, w, g))))
      print(
        f'  {op:11s}: lax.conv {a:8.2f} ms ({gflop / a * 1e3:6.1f} GFLOP/s), '
        f'im2col+matmul {b:6.2f} ms ({gflop / b * 1e3:6.1f} GFLOP/s): {a / b:5.1f}x; '
        f'max |diff| {diff:.1e}; conv dim_labels {dim_labels(slow[op], (x, w, g))}'
      )


if __name__ == '__main__':
  main()
