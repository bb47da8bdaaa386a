"""XLA:CPU: YNNPACK runs kernel-gradient convs 2-3x (3x3) and 3-10x (1x1) slower than Eigen.

Standalone (jax + numpy only):  python repro_ynn_conv_grad.py

jax 0.10.2's XLA:CPU hands convolutions to YNNPACK by default
(``--xla_cpu_experimental_ynn_fusion_type`` includes ``individual_convolution``). For the
kernel-gradient convs a ResNet's backward pass emits (input and cotangent transposed so
that the batch becomes the contraction and the 3x3 or 1x1 window the output), YNNPACK is
much slower than the Eigen convolution XLA uses without it, and a 1x1 kernel gradient is
slower still than the plain matmul ``x^T @ g`` it is.

Each program is compiled twice in this one process, with the default options and with
YNNPACK limited to dots and reductions (``compiler_options``; the same as
``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution``), and timed in
interleaved rounds (best of ``--rounds``, robust to other load). Also printed: the
forward conv the same way, and for 1x1 convs the kernel gradient as one matmul.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

DN = ('NHWC', 'HWIO', 'NHWC')
NO_YNN_CONV = {
  'xla_cpu_experimental_ynn_fusion_type': (
    'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE'
  )
}
# (x shape NHWC, kernel size, Cout): ResNet-20 CIFAR batch 128 and ResNet-50 224 batch 8.
CASES = (
  ((128, 32, 32, 16), 3, 16),
  ((128, 8, 8, 64), 3, 64),
  ((8, 56, 56, 64), 3, 64),
  ((8, 28, 28, 128), 3, 128),
  ((8, 56, 56, 64), 1, 256),
  ((8, 28, 28, 512), 1, 128),
)


def conv(x, w):
  p = w.shape[0] // 2
  return lax.conv_general_dilated(x, w, (1, 1), ((p, p), (p, p)), dimension_numbers=DN)


def kernel_grad(x, w, g):
  return jax.vjp(lambda w: conv(x, w), w)[1](g)[0]


def pointwise_kernel_grad(x, w, g):
  return lax.dot_general(x, g, (((0, 1, 2), (0, 1, 2)), ((), ()))).reshape(w.shape)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--rounds', type=int, default=7)
  args = parser.parse_args()
  print(f'jax {jax.__version__}, {jax.devices()[0].device_kind}, fp32; ms, best of rounds')
  rng = np.random.default_rng(0)
  for x_shape, k, cout in CASES:
    x = jnp.asarray(rng.standard_normal(x_shape, np.float32))
    w = jnp.asarray(rng.standard_normal((k, k, x_shape[3], cout), np.float32) * 0.05)
    g = jnp.asarray(rng.standard_normal((*x_shape[:3], cout), np.float32))
    gflop = 2 * np.prod(x_shape) * k * k * cout / 1e9
    fns = {'fwd': lambda x, w, g: conv(x, w), 'kernel grad': kernel_grad}
    if k == 1:
      fns['kernel grad as x^T g'] = pointwise_kernel_grad
    progs = {}
    for name, fn in fns.items():
      lowered = jax.jit(fn).lower(x, w, g)
      progs[name, 'default'] = lowered.compile()
      progs[name, 'no ynn conv'] = lowered.compile(compiler_options=NO_YNN_CONV)
    ref = progs['kernel grad', 'no ynn conv'](x, w, g)
    for p in progs.values():
      jax.block_until_ready(p(x, w, g))
    best = {key: float('inf') for key in progs}
    for _ in range(args.rounds):
      for key, p in progs.items():
        start = time.perf_counter()
        jax.block_until_ready(p(x, w, g))
        best[key] = min(best[key], time.perf_counter() - start)
    print(f'\nx {x_shape}, {k}x{k} conv to {cout} channels, {gflop:.3f} GFLOP per op:')
    for name in fns:
      a, b = best[name, 'default'], best[name, 'no ynn conv']
      line = (
        f'  {name:21s}: default {a * 1e3:7.2f} ms ({gflop / a:5.0f} GFLOP/s), '
        f'no YNNPACK conv {b * 1e3:7.2f} ms ({gflop / b:5.0f} GFLOP/s): {a / b:4.1f}x'
      )
      if name != 'fwd':
        diff = float(jnp.max(jnp.abs(progs[name, 'default'](x, w, g) - ref)))
        line += f'; max |diff| {diff:.1e} (|dw| max {float(jnp.max(jnp.abs(ref))):.0f})'
      print(line, flush=True)


if __name__ == '__main__':
  main()
