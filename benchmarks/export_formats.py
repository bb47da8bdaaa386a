"""Size and load time of each export format for ResNet-50 (1,000 classes, random weights
at init's shapes): the file each --export_format writes, and read_export's time to load
it back (median of 5, after one warm-up read).

    python benchmarks/export_formats.py [DIR]
"""

import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from jax_resnet import models
from jax_resnet.inference import export


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
    'step': 0,
  }
  for export_format in export.EXPORT_FORMATS:
    path = os.path.join(directory, f'resnet50.{export_format}')
    export.WRITERS[export_format](variables, path, {**metadata, 'export_format': export_format})
    size = os.path.getsize(path) + (
      os.path.getsize(export.sidecar_path(path)) if export_format == 'msgpack' else 0
    )
    export.read_export(path)  # warm-up: the page cache holds the file from here on
    times = []
    for _ in range(5):
      start = time.perf_counter()
      export.read_export(path)
      times.append(time.perf_counter() - start)
    milliseconds = 1000 * statistics.median(times)
    print(f'{export_format}: {size / 2**20:.1f} MiB, read_export {milliseconds:.0f} ms')


if __name__ == '__main__':
  main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
