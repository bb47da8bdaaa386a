"""Is a 3x3 kernel gradient cheaper as nine shifted matmuls than as XLA:CPU's conv?

    python benchmarks/kernel_grad_taps.py [--rounds=7]

XLA:CPU computes a 3x3 conv's kernel gradient as an Eigen convolution over activations
it first copies to ``[C, H, W, N]``; in a ResNet-20 step those copies are most of the op
time (benchmarks/RESULTS.md). This times that gradient against one that needs no such
copy: for each of the nine window offsets, the strided shifted slice of the padded input
as an ``(N*Ho*Wo, Cin)`` matrix, contracted with the ``(N*Ho*Wo, Cout)`` cotangent. Both
are compiled with the train step's CPU options (``cpu_conv.CPU_COMPILER_OPTIONS``) and timed
in interleaved rounds (the best of each), on ResNet-20's and some ImageNet ResNets' 3x3
shapes. The values agree to fp32 rounding (printed). A third column times the two layout
copies alone (the activations to ``[C, H, W, N]``, the cotangent to ``[H, W, N, C]``, as
XLA's optimised HLO of the gradient has them): what is left of the conv's time is the
Eigen convolution itself, whose window is the whole feature map.
"""

import functools
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from jax import lax

from jax_resnet.models import cpu_conv

ROUNDS = flags.DEFINE_integer('rounds', 7, 'interleaved timing rounds per shape')

# (batch, height, width, in channels, out channels, stride): ResNet-20 at 32x32 and
# 3x3 convs of ResNet-18/50 at 224 (batch 8) and 64 (batch 16).
SHAPES = (
  (128, 32, 32, 16, 16, 1),
  (128, 32, 32, 16, 32, 2),
  (128, 16, 16, 32, 32, 1),
  (128, 16, 16, 32, 64, 2),
  (128, 8, 8, 64, 64, 1),
  (8, 56, 56, 64, 64, 1),
  (8, 28, 28, 128, 128, 1),
  (16, 16, 16, 128, 128, 1),
)


def conv_kernel_grad(x, w, g, stride):
  """XLA's own: the vjp of the conv with respect to the kernel."""

  def forward(w):
    return lax.conv_general_dilated(
      x, w, (stride, stride), ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC')
    )

  return jax.vjp(forward, w)[1](g)[0]


def taps_kernel_grad(x, w, g, stride):
  """dW[dy, dx] = sum over n, ho, wo of xpad[n, s*ho + dy, s*wo + dx]^T g[n, ho, wo]."""
  del w
  n, _, _, c_in = x.shape
  _, h_out, w_out, c_out = g.shape
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  g_matrix = g.reshape(-1, c_out)
  rows = []
  for dy in range(3):
    taps = []
    for dx in range(3):
      limit = (n, dy + stride * (h_out - 1) + 1, dx + stride * (w_out - 1) + 1, c_in)
      shifted = lax.slice(padded, (0, dy, dx, 0), limit, (1, stride, stride, 1))
      taps.append(shifted.reshape(-1, c_in).T @ g_matrix)
    rows.append(jnp.stack(taps))
  return jnp.stack(rows)


def layout_copies(x, w, g, stride):
  """The two copies XLA:CPU makes before the kernel-gradient convolution."""
  del w, stride
  return jnp.transpose(x, (3, 1, 2, 0)), jnp.transpose(g, (1, 2, 0, 3))


def seconds(fn, *args):
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def main(argv):
  del argv
  print(
    '| shape (N x H x W x Cin -> Cout / stride) | conv (ms) | nine taps (ms) | conv/taps '
    '| its layout copies (ms) |'
  )
  print('|---|---:|---:|---:|---:|')
  for n, h, w, c_in, c_out, stride in SHAPES:
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    h_out = (h - 1) // stride + 1
    x = jax.random.normal(keys[0], (n, h, w, c_in))
    kernel = 0.1 * jax.random.normal(keys[1], (3, 3, c_in, c_out))
    g = jax.random.normal(keys[2], (n, h_out, h_out, c_out))
    fns = [
      jax.jit(functools.partial(f, stride=stride), compiler_options=cpu_conv.CPU_COMPILER_OPTIONS)
      for f in (conv_kernel_grad, taps_kernel_grad, layout_copies)
    ]
    reference, taps = (f(x, kernel, g) for f in fns[:2])
    error = float(jnp.max(jnp.abs(reference - taps)) / jnp.max(jnp.abs(reference)))
    times = [[], [], []]
    for _ in range(ROUNDS.value):
      for i, f in enumerate(fns):
        times[i].append(seconds(f, x, kernel, g))
    plain, shifted, copies = (min(t) for t in times)
    print(
      f'| {n}x{h}x{w}x{c_in} -> {c_out} / {stride} | {1e3 * plain:.1f} | '
      f'{1e3 * shifted:.1f} | {plain / shifted:.2f} (max rel. diff {error:.0e}) | '
      f'{1e3 * copies:.1f} |'
    )


if __name__ == '__main__':
  app.run(main)
