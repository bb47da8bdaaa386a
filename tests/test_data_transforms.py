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


def _photo(height=24, width=32):
  """A small crop of one of scikit-learn's sample photographs, uint8 HWC."""
  from sklearn.datasets import load_sample_images

  return load_sample_images().images[0][100 : 100 + 4 * height : 4, 150 : 150 + 4 * width : 4]


def test_color_jitter_is_seeded_clipped_and_off_at_zero():
  import tensorflow as tf

  photo = _photo()
  image = tf.constant(photo)
  seed = lambda s: tf.constant([3, s], tf.int64)
  assert transforms.color_jitter(image, seed(0)) is image  # every strength zero: off
  assert transforms.color_jitter(image, seed(0), brightness=0.4, prob=0.0) is image
  strengths = dict(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1)
  out = transforms.color_jitter(image, seed(0), **strengths).numpy()
  assert out.dtype == np.uint8 and out.shape == photo.shape
  np.testing.assert_array_equal(out, transforms.color_jitter(image, seed(0), **strengths).numpy())
  assert not np.array_equal(out, transforms.color_jitter(image, seed(1), **strengths).numpy())
  for name, strength in strengths.items():  # each one alone changes the image
    alone = transforms.color_jitter(image, seed(0), **{name: strength}).numpy()
    assert np.abs(alone.astype(int) - photo).mean() > 0.5, name
  # Brightness alone multiplies by one factor in [0.6, 1.4]; values past 255 are clipped,
  # never wrapped around.
  bright = tf.constant(np.full((4, 4, 3), 250, np.uint8))
  outs = [transforms.color_jitter(bright, seed(s), brightness=0.4).numpy() for s in range(12)]
  assert all(o.min() == o.max() and 0.6 * 250 - 1 <= o.min() for o in outs)
  assert any(o.min() == 255 for o in outs) and any(o.min() < 250 for o in outs)
  # prob: applied to some images of a batch, not to others.
  changed = [
    not np.array_equal(
      transforms.color_jitter(image, seed(s), brightness=0.4, prob=0.5).numpy(), photo
    )
    for s in range(16)
  ]
  assert 2 <= sum(changed) <= 14


def test_inception_color_is_seeded_and_clipped():
  import tensorflow as tf

  photo = _photo()
  image = tf.constant(photo)
  seed = lambda s: tf.constant([5, s], tf.int64)
  out = transforms.inception_color(image, seed(0)).numpy()
  assert out.dtype == np.uint8 and out.shape == photo.shape
  np.testing.assert_array_equal(out, transforms.inception_color(image, seed(0)).numpy())
  assert not np.array_equal(out, transforms.inception_color(image, seed(1)).numpy())
  assert np.abs(out.astype(int) - photo).mean() > 1
  # A flat grey keeps its saturation, hue and contrast; brightness moves it by up to 32,
  # clipped at 255 (a wrap-around would land near 0).
  grey = tf.constant(np.full((4, 4, 3), 240, np.uint8))
  outs = [transforms.inception_color(grey, seed(s)).numpy() for s in range(12)]
  assert all(240 - 33 <= o.min() and o.min() == o.max() for o in outs)
  assert any(o.min() == 255 for o in outs)


def test_train_transform_colour_is_off_by_default_and_changes_the_image_when_on(config):
  """random_resized_transform with colour jitter and Inception colour off is decode-crop-
  resize-flip exactly; each turned on changes the result, the same for the same seed."""
  import tensorflow as tf

  config.image_size, config.random_flip, config.color_jitter_prob = 24, True, 1.0
  example = {'image': tf.io.encode_jpeg(_photo(48, 64)), 'label': 3}
  seed = tf.constant([2, 9], tf.int64)
  plain = transforms.random_resized_transform(transforms.transform_options(config), 3)(
    example, seed
  )
  window = lambda shape: transforms.random_resized_crop_window(shape, seed)
  by_hand = tf.image.stateless_random_flip_left_right(
    transforms.decode_and_crop(example['image'], window, 24),
    tf.random.experimental.stateless_fold_in(seed, 1),
  )
  np.testing.assert_array_equal(plain['image'].numpy(), by_hand.numpy())
  assert int(plain['label']) == 3
  for field, value in (('inception_color', True), ('color_jitter_brightness', 0.4)):
    config[field] = value
    on = transforms.random_resized_transform(transforms.transform_options(config), 3)
    out = on(example, seed)['image'].numpy()
    assert out.shape == (24, 24, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, on(example, seed)['image'].numpy())
    assert not np.array_equal(out, plain['image'].numpy()), field
    config[field] = type(value)(0)


def test_resize_if_needed_is_identity_at_size_and_antialiased_otherwise():
  import tensorflow as tf

  rng = np.random.RandomState(0)
  image = tf.constant(rng.randint(0, 256, (16, 16, 3)).astype(np.uint8))
  assert transforms.resize_if_needed(image, 16) is image
  small = transforms.resize_if_needed(image, 8).numpy()
  assert small.shape == (8, 8, 3) and small.dtype == np.uint8
  # Halving with antialiasing weighs 4 input pixels per axis by (1, 3, 3, 1) / 8 (a plain
  # bilinear resize would average 2); checked away from the border.
  weights = np.outer([1, 3, 3, 1], [1, 3, 3, 1]) / 64
  x = image.numpy().astype(np.float64)
  expected = np.array(
    [
      [
        np.einsum('ij,ijc->c', weights, x[2 * i - 1 : 2 * i + 3, 2 * j - 1 : 2 * j + 3])
        for j in range(1, 7)
      ]
      for i in range(1, 7)
    ]
  )
  np.testing.assert_allclose(small[1:7, 1:7], np.round(expected), atol=1)
  flat = tf.constant(np.full((5, 7, 1), 200, np.uint8))  # upsampled, a flat image stays flat
  np.testing.assert_array_equal(transforms.resize_if_needed(flat, 12).numpy(), 200)


def test_eval_transform_decodes_at_eval_image_size(config):
  """eval_image_size set: the eval transform's images have that size (train low, test
  high), while the train transform keeps image_size."""
  import tensorflow as tf

  config.image_size, config.eval_image_size = 24, 40
  example = {'image': tf.io.encode_jpeg(_photo(48, 64)), 'label': 1}
  evaluated = transforms.eval_transform(transforms.transform_options(config), 3)(example)[
    'image'
  ].numpy()
  trained = transforms.random_resized_transform(transforms.transform_options(config), 3)(
    example, tf.constant([0, 1], tf.int64)
  )
  assert evaluated.shape == (40, 40, 3) and trained['image'].shape == (24, 24, 3)
  window = lambda shape: transforms.center_crop_window(shape, config.eval_crop_fraction)
  np.testing.assert_array_equal(
    evaluated, transforms.decode_and_crop(example['image'], window, 40).numpy()
  )
  config.eval_image_size = 0  # off: image_size
  assert transforms.eval_transform(transforms.transform_options(config), 3)(example)[
    'image'
  ].shape == (24, 24, 3)
