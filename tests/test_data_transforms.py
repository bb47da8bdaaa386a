"""The host-side tf.data transforms: crops, flips, decoding."""

import numpy as np

from jax_resnet.data import transforms


def test_crop_and_flip_keep_shape_and_content(config):
  import tensorflow as tf

  image = tf.constant(np.arange(4 * 4 * 1, dtype=np.uint8).reshape(4, 4, 1))
  seed = tf.constant([1, 2], tf.int64)
  out = transforms.crop_and_flip(image, seed, pad=0, flip=False).numpy()
  np.testing.assert_array_equal(out, image.numpy())
  outs = {
    transforms.crop_and_flip(image, tf.constant([s, 0], tf.int64), 1, True).numpy().tobytes()
    for s in range(20)
  }
  assert len(outs) > 3


def test_folder_grayscale_and_cmyk_decode_to_rgb():
  import io

  import tensorflow as tf
  from PIL import Image
  from sklearn.datasets import load_sample_images

  photo = load_sample_images().images[1][:120, :160]
  window = lambda shape: transforms.center_crop_window(shape, 1.0)
  for mode, fmt in (('L', 'PNG'), ('CMYK', 'JPEG'), ('RGBA', 'PNG'), ('RGB', 'JPEG')):
    buffer = io.BytesIO()
    Image.fromarray(photo).convert(mode).save(buffer, fmt)
    out = transforms.decode_and_crop(tf.constant(buffer.getvalue()), window, 48).numpy()
    assert out.shape == (48, 48, 3), mode
    reference = np.asarray(
      Image.fromarray(photo)
      .convert(mode)
      .convert('RGB')
      .crop((20, 0, 140, 120))
      .resize((48, 48), Image.BILINEAR),
      np.float32,
    )
    assert np.abs(out - reference).mean() < 12, mode


def test_random_resized_crop_statistics():
  import tensorflow as tf

  shape = tf.constant([375, 500, 3])
  windows = np.stack(
    [
      transforms.random_resized_crop_window(shape, tf.constant([7, s], tf.int64)).numpy()
      for s in range(400)
    ]
  )
  y, x, h, w = windows.T
  assert (y >= 0).all() and (x >= 0).all() and (y + h <= 375).all() and (x + w <= 500).all()
  area = h * w / (375 * 500)
  assert area.min() >= 0.08 * 0.97 and area.max() <= 1.0
  assert area.min() < 0.15 and area.max() > 0.8  # the range is actually used
  assert 0.35 < area.mean() < 0.7  # uniform in (0.08, 1) bar rejected draws: ~0.5
  aspect = w / h
  assert aspect.min() >= 0.75 * 0.97 and aspect.max() <= 4 / 3 * 1.03
  assert len({(a, b) for a, b in zip(y, x)}) > 300
  # A 10x1000 strip fits no candidate: centre crop at the widest allowed ratio.
  fallback = transforms.random_resized_crop_window(
    tf.constant([10, 1000, 3]), tf.constant([1, 2], tf.int64)
  )
  np.testing.assert_array_equal(fallback.numpy(), [0, (1000 - 13) // 2, 10, 13])
  # And the decode-and-crop path yields image_size squares from real JPEG bytes.
  from sklearn.datasets import load_sample_images

  jpeg = tf.io.encode_jpeg(load_sample_images().images[0])
  out = transforms.decode_and_crop(
    jpeg, lambda s: transforms.random_resized_crop_window(s, tf.constant([0, 1], tf.int64)), 40
  )
  assert out.shape == (40, 40, 3) and out.dtype == tf.uint8
