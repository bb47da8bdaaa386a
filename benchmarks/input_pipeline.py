"""Input-pipeline throughput: the ImageNet train pipeline on real JPEGs vs a Pillow loop,
and device-resident CIFAR batches vs the tf.data path.

  python benchmarks/input_pipeline.py [--images=2000] [--files=64] [--cifar_steps=200]

1. Builds a folder data set of ``--files`` distinct JPEGs at ImageNet-like sizes (about
   500x375, quality 90) from real photographs that installed packages ship: scikit-learn's
   sample images, plus scikit-image's bundled ones when it is installed, randomly
   cropped and rescaled. Then decodes ``--images`` train examples at 224x224 with
   (a) ``data.batching.train_batches`` (fused decode-and-RandomResizedCrop, flip) and
   (b) a plain Pillow loop doing the same work: open, decode, RandomResizedCrop, flip,
   bilinear resize to 224, to a numpy array.
   Both report images/s of wall time and images per CPU-second of the process (user +
   system time over all threads), i.e. images/s per busy core.
2. CIFAR-shaped data (random uint8, 50000x32x32x3, pad 4, flip, batch 256): batches/s of
   ``data.on_device`` vs tf.data ``train_batches`` + ``parallel.prefetch_to_device``.
"""

import os
import platform
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def source_photos():
  """Real colour photographs from installed packages, as uint8 RGB arrays."""
  from sklearn.datasets import load_sample_images

  photos = list(load_sample_images().images)
  try:
    import skimage.data

    for name in (
      'astronaut',
      'coffee',
      'chelsea',
      'rocket',
      'hubble_deep_field',
      'immunohistochemistry',
      'motorcycle_left',
      'camera',
      'coins',
      'moon',
    ):
      try:
        image = np.asarray(getattr(skimage.data, name)())
      except Exception:  # some need a download: skip them
        continue
      if image.ndim == 2:
        image = np.repeat(image[..., None], 3, -1)
      photos.append(image[..., :3].astype(np.uint8))
  except ImportError:
    pass
  return photos


def build_folder(root: str, num_files: int, seed: int = 0) -> int:
  """``num_files`` distinct JPEGs of about 500x375 (or 375x500) in 8 class folders."""
  from PIL import Image

  rng = np.random.RandomState(seed)
  photos = source_photos()
  for i in range(num_files):
    photo = photos[i % len(photos)]
    h, w = photo.shape[:2]
    frac = rng.uniform(0.6, 1.0)
    ch, cw = int(h * frac), int(w * frac)
    y, x = rng.randint(0, h - ch + 1), rng.randint(0, w - cw + 1)
    size = (500, 375) if rng.rand() < 0.75 else (375, 500)
    size = tuple(int(s * rng.uniform(0.85, 1.15)) for s in size)
    image = Image.fromarray(photo[y : y + ch, x : x + cw]).resize(size, Image.BICUBIC)
    if rng.rand() < 0.5:
      image = image.transpose(Image.FLIP_LEFT_RIGHT)
    folder = os.path.join(root, f'class_{i % 8}')
    os.makedirs(folder, exist_ok=True)
    image.save(os.path.join(folder, f'{i:04d}.JPEG'), quality=90)
  return len(photos)


def cpu_seconds() -> float:
  t = os.times()
  return t.user + t.system


def bench_tf(root: str, num_images: int, batch: int = 64, antialias: bool = False) -> dict:
  from configs import default
  from jax_resnet.configuration.typed_options import from_config
  from jax_resnet.data import batching, sources
  from jax_resnet.data.common import InputOptions

  config = default.get_config()
  config.dataset = 'folder'
  config.train_dir = config.eval_dir = root
  config.image_size = 224
  config.random_crop_pad = 0
  config.random_flip = True
  config.deterministic_input = False
  config.cache = True  # like the Pillow loop after its first pass: files in page cache
  config.resize_antialias = antialias
  dataset = sources.load_dataset(config, splits=('train',))
  steps = max(1, num_images // batch)
  # One long epoch, as on ImageNet: the few files wrap around (train_batches repeats a
  # short shard) instead of a new tf.data graph being started every batch.
  batches = batching.train_batches(dataset, from_config(InputOptions, config), batch, steps + 10)
  for _ in range(5):  # warm-up: graph building, autotune, cache fill
    next(batches)
  wall, cpu = time.perf_counter(), cpu_seconds()
  for _ in range(steps):
    out = next(batches)
    assert out['image'].shape == (batch, 224, 224, 3)
  wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
  n = steps * batch
  return {
    'images': n,
    'images_per_s': n / wall,
    'images_per_cpu_s': n / cpu,
    'cores_busy': cpu / wall,
  }


def pillow_random_resized_crop(
  rng, width, height, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), attempts=10
):
  """torchvision.transforms.RandomResizedCrop.get_params, in numpy: (x, y, w, h)."""
  area = width * height
  for _ in range(attempts):
    target = area * rng.uniform(*scale)
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
    w = int(round(np.sqrt(target * aspect)))
    h = int(round(np.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return rng.randint(0, width - w + 1), rng.randint(0, height - h + 1), w, h
  in_ratio = width / height
  w, h = width, height
  if in_ratio < ratio[0]:
    h = int(round(w / ratio[0]))
  elif in_ratio > ratio[1]:
    w = int(round(h * ratio[1]))
  return (width - w) // 2, (height - h) // 2, w, h


def bench_pillow(root: str, num_images: int) -> dict:
  from PIL import Image

  paths = sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files)
  rng = np.random.RandomState(0)

  def one(path):
    with Image.open(path) as image:
      image = image.convert('RGB')
      x, y, w, h = pillow_random_resized_crop(rng, *image.size)
      image = image.crop((x, y, x + w, y + h))
      if rng.rand() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
      return np.asarray(image.resize((224, 224), Image.BILINEAR))

  for path in paths[:8]:  # warm-up
    one(path)
  wall, cpu = time.perf_counter(), cpu_seconds()
  for i in range(num_images):
    out = one(paths[i % len(paths)])
  assert out.shape == (224, 224, 3)
  wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
  return {
    'images': num_images,
    'images_per_s': num_images / wall,
    'images_per_cpu_s': num_images / cpu,
    'cores_busy': cpu / wall,
  }


def bench_cifar(steps: int, batch: int = 256) -> dict:
  import jax
  import tensorflow as tf

  from configs import default
  from jax_resnet import parallel
  from jax_resnet.configuration.typed_options import from_config
  from jax_resnet.data import batching, on_device, transforms
  from jax_resnet.data.common import DatasetInfo, InputOptions
  from jax_resnet.data.sources import Dataset

  config = default.get_config()
  config.batch_size = batch
  config.image_size = 32
  config.random_crop_pad = 4
  config.random_flip = True
  rng = np.random.RandomState(0)
  images = rng.randint(0, 256, (50_000, 32, 32, 3)).astype(np.uint8)
  labels = rng.randint(0, 10, 50_000).astype(np.int32)
  mesh = parallel.create_mesh()
  steps_per_epoch = 50_000 // batch
  results = {}

  def timed(name, batches):
    for _ in range(5):
      jax.block_until_ready(next(batches))
    wall, cpu = time.perf_counter(), cpu_seconds()
    for _ in range(steps):
      out = next(batches)
    jax.block_until_ready(out)
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    results[name] = {
      'batches_per_s': steps / wall,
      'images_per_s': steps * batch / wall,
      'host_cpu_s_per_batch': cpu / steps,
    }

  options = from_config(InputOptions, config)
  info = DatasetInfo(10, 50_000, 0, (32, 32, 3), (0.0,) * 3, (1.0,) * 3)
  dataset = Dataset(
    info,
    train=tf.data.Dataset.from_tensor_slices({'image': images, 'label': labels}),
    eval=None,
    train_transform=transforms.pad_transform(transforms.transform_options(config)),
  )
  timed(
    'tf_data',
    parallel.prefetch_to_device(
      batching.train_batches(dataset, options, batch, steps_per_epoch), mesh
    ),
  )
  timed('device_data', on_device.device_batches(images, labels, mesh, options, steps_per_epoch))
  results['speedup'] = results['device_data']['batches_per_s'] / results['tf_data']['batches_per_s']
  return results


IMAGES = flags.DEFINE_integer('images', 2000, 'images decoded per folder benchmark')
FILES = flags.DEFINE_integer('files', 64, 'JPEG files in the folder')
CIFAR_STEPS = flags.DEFINE_integer('cifar_steps', 200, 'CIFAR-shaped batches timed')
SKIP_CIFAR = flags.DEFINE_bool('skip_cifar', False, 'skip the CIFAR-shaped comparison')


def main(argv):
  del argv
  import jax

  model = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      model = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
  except (OSError, StopIteration):
    pass
  print(
    f'machine: {model}, {os.cpu_count()} CPU '
    f'cores, {platform.system()} {platform.release()}, Python {platform.python_version()}'
    f', jax {jax.__version__} ({jax.devices()[0].platform})'
  )
  with tempfile.TemporaryDirectory() as root:
    sources = build_folder(root, FILES.value)
    sizes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)
    print(
      f'folder: {FILES.value} JPEGs from {sources} photographs, '
      f'{sizes / FILES.value / 1024:.0f} KiB each on average'
    )
    pil = bench_pillow(root, IMAGES.value)
    tfd = bench_tf(root, IMAGES.value)
    tfd_aa = bench_tf(root, IMAGES.value, antialias=True)
  for name, r in (('Pillow loop', pil), ('tf.data (default)', tfd), ('tf.data antialias', tfd_aa)):
    print(
      f'{name:>17}: {r["images_per_s"]:7.1f} images/s wall, '
      f'{r["images_per_cpu_s"]:7.1f} images/s per CPU core '
      f'({r["cores_busy"]:.2f} cores busy, {r["images"]} images)'
    )
  print(
    f'per-core ratio tf.data / Pillow: '
    f'{tfd["images_per_cpu_s"] / pil["images_per_cpu_s"]:.2f}x; wall ratio: '
    f'{tfd["images_per_s"] / pil["images_per_s"]:.2f}x; per-core ratio with '
    f'resize_antialias=True: {tfd_aa["images_per_cpu_s"] / pil["images_per_cpu_s"]:.2f}x'
  )
  if not SKIP_CIFAR.value:
    cifar = bench_cifar(CIFAR_STEPS.value)
    for name in ('tf_data', 'device_data'):
      r = cifar[name]
      print(
        f'CIFAR-shaped {name:>11}: {r["batches_per_s"]:7.1f} batches/s of 256 '
        f'({r["images_per_s"]:.0f} images/s), host CPU {1e3 * r["host_cpu_s_per_batch"]:.1f}'
        f' ms per batch'
      )
    print(f'device_data / tf.data: {cifar["speedup"]:.2f}x batches/s')


if __name__ == '__main__':
  app.run(main)
