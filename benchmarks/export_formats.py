"""Size and load time of each export format for ResNet-50 (1,000 classes, random weights
at init's shapes): the file each --export_format writes, and read_export's time to load
it back (median of 5, after one warm-up read); for ONNX, which read_export refuses (a
graph for serving), the time to open an onnxruntime session on it, and the time to write
it (the translation from the jaxpr included). Then one forward pass of 8 images at
224x224 (median of 5), by onnxruntime on the ONNX export and by the jitted JAX function
it was translated from.

    python benchmarks/export_formats.py [DIR]
"""

import functools
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from jax_resnet import models
from jax_resnet.inference import export, onnx_graph


def main(directory: str) -> None:
  model = models.create_model('resnet50', 1000)
  variables = jax.jit(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3))))()
  variables = jax.tree.map(np.asarray, dict(variables))
  metadata = {
    'model': 'resnet50',
    'num_classes': 1000,
    'model_options': {},
    'class_names': [],
    'image_shape': [224, 224, 3],
    'mean': [123.7, 116.3, 103.5],
    'std': [58.4, 57.1, 57.4],
    'step': 0,
  }
  for export_format in export.EXPORT_FORMATS:
    path = os.path.join(directory, f'resnet50.{export_format}')
    start = time.perf_counter()
    export.WRITERS[export_format](variables, path, {**metadata, 'export_format': export_format})
    written = time.perf_counter() - start
    size = os.path.getsize(path) + (
      os.path.getsize(export.sidecar_path(path)) if export_format == 'msgpack' else 0
    )
    load, what = export.read_export, 'read_export'
    if export_format == 'onnx':
      load, what = onnx_graph.onnxruntime_session, 'onnxruntime session'
    milliseconds = _median_ms(functools.partial(load, path))  # warmed up: the file is cached
    print(
      f'{export_format}: {size / 2**20:.1f} MiB, {what} {milliseconds:.0f} ms '
      f'(written in {written:.1f} s)'
    )
  session = onnx_graph.onnxruntime_session(os.path.join(directory, 'resnet50.onnx'))
  forward = jax.jit(
    functools.partial(
      onnx_graph.inference_outputs, model, mean=tuple(metadata['mean']), std=tuple(metadata['std'])
    )
  )
  images = np.random.RandomState(0).randint(0, 256, (8, 224, 224, 3)).astype(np.uint8)
  onnx_ms = _median_ms(lambda: session.run(['probabilities'], {'images': images}))
  jax_ms = _median_ms(lambda: jax.block_until_ready(forward(variables, images)))
  print(f'8 images at 224x224: onnxruntime {onnx_ms:.0f} ms, jitted JAX {jax_ms:.0f} ms')


def _median_ms(fn, repeats: int = 5) -> float:
  fn()  # compiles (JAX) or warms up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return 1000 * statistics.median(times)


if __name__ == '__main__':
  main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
