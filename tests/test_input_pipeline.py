import numpy as np
import pytest
import tensorflow_datasets as tfds

from jax_resnet import input_pipeline


def test_digits_split_is_fixed_and_complete(config):
  ds = input_pipeline.load_dataset(config)
  info = ds.info
  assert info.num_train + info.num_eval == 1797
  assert abs(info.num_eval / 1797 - 0.2) < 0.01
  assert info.image_shape == (8, 8, 1) and info.num_classes == 10
  again = input_pipeline.load_dataset(config)
  a = next(iter(tfds.as_numpy(ds.eval.batch(400))))
  b = next(iter(tfds.as_numpy(again.eval.batch(400))))
  np.testing.assert_array_equal(a['image'], b['image'])


def test_digits_upsampled(config):
  config.image_size = 16
  ds = input_pipeline.load_dataset(config)
  batch = next(input_pipeline.train_batches(ds, config, 32, 10))
  assert batch['image'].shape == (32, 16, 16, 1) and batch['image'].dtype == np.uint8
  assert batch['label'].dtype == np.int32


def test_train_batches_are_deterministic_and_resume_mid_epoch(config):
  ds = input_pipeline.load_dataset(config)
  steps = ds.info.num_train // 32
  first = [b for _, b in zip(range(steps + 3), input_pipeline.train_batches(ds, config, 32, steps))]
  resumed = [
    b
    for _, b in zip(
      range(5), input_pipeline.train_batches(ds, config, 32, steps, start_step=steps - 2)
    )
  ]
  for a, b in zip(first[steps - 2 :], resumed):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  # A new epoch is a new shuffle.
  assert not np.array_equal(first[0]['label'], first[steps]['label'])


def test_eval_counts_every_example_exactly_once(config):
  ds = input_pipeline.load_dataset(config)
  n = ds.info.num_eval
  local = 64
  assert n % local  # the interesting case: a ragged tail
  steps = input_pipeline.num_eval_steps(ds.info, local)
  batches = list(input_pipeline.eval_batches(ds, local, steps))
  assert len(batches) == steps
  assert all(b['image'].shape[0] == local for b in batches)
  assert sum(b['mask'].sum() for b in batches) == n
  labels = np.concatenate([b['label'][b['mask'] > 0] for b in batches])
  assert np.bincount(labels, minlength=10).sum() == n


def test_cifar10_through_mock_data(config):
  config.dataset = 'cifar10'
  config.image_size = 32
  config.random_crop_pad = 4
  config.random_flip = True
  with tfds.testing.mock_data(num_examples=70):
    ds = input_pipeline.load_dataset(config)
    assert ds.info.num_classes == 10 and ds.info.image_shape == (32, 32, 3)
    assert ds.info.num_train == 70
    batch = next(input_pipeline.train_batches(ds, config, 16, 4))
    assert batch['image'].shape == (16, 32, 32, 3) and batch['image'].dtype == np.uint8
    assert batch['label'].min() >= 0 and batch['label'].max() < 10
    steps = input_pipeline.num_eval_steps(ds.info, 32)
    assert sum(b['mask'].sum() for b in input_pipeline.eval_batches(ds, 32, steps)) == 70
  np.testing.assert_allclose(ds.info.mean[0], 0.4914 * 255)


def test_unknown_dataset_lists_valid_names(config):
  config.dataset = 'cifar11'
  with pytest.raises(ValueError, match='Valid: digits'):
    input_pipeline.load_dataset(config)


def test_missing_dataset_says_how_to_prepare(config, tmp_path):
  config.dataset = 'cifar10'
  config.data_dir = str(tmp_path)
  with pytest.raises(FileNotFoundError, match='tfds build cifar10'):
    input_pipeline.load_dataset(config)


def test_crop_and_flip_keep_shape_and_content(config):
  import tensorflow as tf

  image = tf.constant(np.arange(4 * 4 * 1, dtype=np.uint8).reshape(4, 4, 1))
  seed = tf.constant([1, 2], tf.int64)
  out = input_pipeline.crop_and_flip(image, seed, pad=0, flip=False).numpy()
  np.testing.assert_array_equal(out, image.numpy())
  outs = {
    input_pipeline.crop_and_flip(image, tf.constant([s, 0], tf.int64), 1, True).numpy().tobytes()
    for s in range(20)
  }
  assert len(outs) > 3


# ---------------------------------------------------------------- ImageNet-scale input


def _photo_folder(root, per_class=(5, 4, 4), size=(96, 72), seed=0, extras=True):
  """Class folders of JPEG crops of scikit-learn's two sample photographs.

  With ``extras``, the first class also gets a grayscale PNG, a CMYK JPEG and an RGBA
  PNG, and the second a corrupt .jpg. Returns the number of decodable files.
  """
  from PIL import Image
  from sklearn.datasets import load_sample_images

  photos = load_sample_images().images
  rng = np.random.RandomState(seed)
  count = 0
  for c, n in enumerate(per_class):
    folder = root / f'class_{c}'
    folder.mkdir(parents=True)
    for i in range(n):
      photo = photos[(c + i) % 2]
      y, x = rng.randint(0, 100), rng.randint(0, 200)
      crop = Image.fromarray(photo[y : y + 300, x : x + 400]).resize(size)
      crop.save(folder / f'{i}.JPEG', quality=90)
      count += 1
  if extras:
    base = Image.fromarray(photos[0][:200, :300])
    base.convert('L').save(root / 'class_0' / 'gray.png')
    base.convert('CMYK').save(root / 'class_0' / 'cmyk.jpg')
    base.convert('RGBA').save(root / 'class_0' / 'rgba.png')
    count += 3
    (root / 'class_1' / 'corrupt.jpg').write_bytes(b'\xff\xd8\xff\xe0 not really a jpeg')
  return count


def _folder_config(config, tmp_path):
  train_n = _photo_folder(tmp_path / 'train')
  eval_n = _photo_folder(tmp_path / 'eval', per_class=(3, 2, 2), seed=1, extras=False)
  config.dataset = 'folder'
  config.train_dir = str(tmp_path / 'train')
  config.eval_dir = str(tmp_path / 'eval')
  config.image_size = 32
  config.random_crop_pad = 0
  config.random_flip = True
  return train_n, eval_n


def test_folder_dataset_converts_modes_and_skips_corrupt_files(
  config, tmp_path, caplog, monkeypatch
):
  import json

  train_n, eval_n = _folder_config(config, tmp_path)
  workdir = tmp_path / 'work'
  ds = input_pipeline.load_dataset(config, str(workdir))
  assert ds.info.num_train == train_n == 16 and ds.info.num_eval == eval_n == 7
  assert ds.info.num_classes == 3 and ds.info.image_shape == (32, 32, 3)
  assert ds.num_skipped == {'train': 1, 'eval': 0}
  assert 'corrupt.jpg' in caplog.text
  with open(workdir / input_pipeline.CLASS_INDEX_FILE) as f:
    assert json.load(f) == {'class_0': 0, 'class_1': 1, 'class_2': 2}
  # A restart reuses the verdicts recorded in the workdir instead of reading every file.
  monkeypatch.setattr(input_pipeline, '_check_image', lambda path: pytest.fail(path))
  caplog.clear()
  again = input_pipeline.load_dataset(config, str(workdir))
  assert again.num_skipped == {'train': 1, 'eval': 0} and 'corrupt.jpg' in caplog.text
  # Two epochs of train batches, all decoded (grey, CMYK, RGBA included) to RGB uint8.
  batches = [b for _, b in zip(range(4), input_pipeline.train_batches(ds, config, 8, 2))]
  for b in batches:
    assert b['image'].shape == (8, 32, 32, 3) and b['image'].dtype == np.uint8
    assert b['image'].std() > 5  # real photographs, not blank
  labels = np.concatenate([b['label'] for b in batches[:2]])
  assert set(labels.tolist()) <= {0, 1, 2}
  # Eval: 7 examples in batches of 4, each counted exactly once, centre-cropped.
  steps = input_pipeline.num_eval_steps(ds.info, 4)
  evals = list(input_pipeline.eval_batches(ds, 4, steps))
  assert steps == 2 and sum(b['mask'].sum() for b in evals) == 7
  np.testing.assert_array_equal(
    np.sort(np.concatenate([b['label'][b['mask'] > 0] for b in evals])), [0, 0, 0, 1, 1, 2, 2]
  )


def test_folder_grayscale_and_cmyk_decode_to_rgb():
  import io

  import tensorflow as tf
  from PIL import Image
  from sklearn.datasets import load_sample_images

  photo = load_sample_images().images[1][:120, :160]
  window = lambda shape: input_pipeline.center_crop_window(shape, 1.0)
  for mode, fmt in (('L', 'PNG'), ('CMYK', 'JPEG'), ('RGBA', 'PNG'), ('RGB', 'JPEG')):
    buffer = io.BytesIO()
    Image.fromarray(photo).convert(mode).save(buffer, fmt)
    out = input_pipeline.decode_and_crop(tf.constant(buffer.getvalue()), window, 48).numpy()
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


def test_folder_errors_are_clear(config, tmp_path):
  _folder_config(config, tmp_path)
  (tmp_path / 'eval' / 'class_9').mkdir()
  (tmp_path / 'eval' / 'class_9' / 'x.jpg').write_bytes(
    (tmp_path / 'train' / 'class_0' / '0.JPEG').read_bytes()
  )
  with pytest.raises(ValueError, match='absent from config.train_dir.*class_9'):
    input_pipeline.load_dataset(config)
  (tmp_path / 'empty' / 'class_0').mkdir(parents=True)
  config.train_dir = str(tmp_path / 'empty')
  with pytest.raises(ValueError, match='no JPEG or PNG images'):
    input_pipeline.load_dataset(config)
  config.train_dir = ''
  with pytest.raises(ValueError, match='needs config.train_dir'):
    input_pipeline.load_dataset(config)


def test_imagenet_through_mock_data_decodes_jpeg_bytes_and_resumes(config):
  config.dataset = 'imagenet2012'
  config.eval_split = 'validation'
  config.image_size = 24
  config.random_crop_pad = 0
  config.random_flip = True
  config.color_jitter_brightness = config.color_jitter_saturation = 0.4
  config.color_jitter_prob = 0.5
  config.cache = False
  with tfds.testing.mock_data(num_examples=37):
    ds = input_pipeline.load_dataset(config)
    assert ds.decodes and ds.info.num_classes == 1000
    assert ds.info.image_shape == (24, 24, 3) and ds.info.num_train == 37
    assert ds.train.element_spec['image'].dtype.name == 'string'  # undecoded JPEG bytes
    first = [b for _, b in zip(range(6), input_pipeline.train_batches(ds, config, 8, 4))]
    for b in first:
      assert b['image'].shape == (8, 24, 24, 3) and b['image'].dtype == np.uint8
      assert b['label'].min() >= 0 and b['label'].max() < 1000
    resumed = [
      b for _, b in zip(range(3), input_pipeline.train_batches(ds, config, 8, 4, start_step=3))
    ]
    for a, b in zip(first[3:], resumed):
      np.testing.assert_array_equal(a['image'], b['image'])
      np.testing.assert_array_equal(a['label'], b['label'])
    steps = input_pipeline.num_eval_steps(ds.info, 16)
    evals = list(input_pipeline.eval_batches(ds, 16, steps))
    assert steps == 3 and sum(b['mask'].sum() for b in evals) == 37
    with pytest.raises(ValueError, match='data_on_device'):
      input_pipeline.train_arrays(ds)


def test_cifar100_through_mock_data_and_in_memory_arrays(config):
  config.dataset = 'cifar100'
  config.image_size = 32
  config.random_crop_pad = 4
  with tfds.testing.mock_data(num_examples=45):
    ds = input_pipeline.load_dataset(config)
    assert not ds.decodes and ds.info.num_classes == 100
    batch = next(input_pipeline.train_batches(ds, config, 16, 2))
    assert batch['image'].shape == (16, 32, 32, 3)
    images, labels, info = input_pipeline.load_arrays(config)
  assert images.shape == (45, 32, 32, 3) and images.dtype == np.uint8
  assert labels.shape == (45,) and labels.dtype == np.int32 and info.num_train == 45
  np.testing.assert_allclose(info.mean[0], 0.5071 * 255)


def test_digits_arrays_match_the_tf_data_source(config):
  images, labels, info = input_pipeline.load_arrays(config)
  ds = input_pipeline.load_dataset(config)
  source = next(iter(tfds.as_numpy(ds.train.batch(10_000))))
  np.testing.assert_array_equal(images, source['image'])
  np.testing.assert_array_equal(labels, source['label'])
  assert len(labels) == info.num_train


def test_random_resized_crop_statistics():
  import tensorflow as tf

  shape = tf.constant([375, 500, 3])
  windows = np.stack(
    [
      input_pipeline.random_resized_crop_window(shape, tf.constant([7, s], tf.int64)).numpy()
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
  fallback = input_pipeline.random_resized_crop_window(
    tf.constant([10, 1000, 3]), tf.constant([1, 2], tf.int64)
  )
  np.testing.assert_array_equal(fallback.numpy(), [0, (1000 - 13) // 2, 10, 13])
  # And the decode-and-crop path yields image_size squares from real JPEG bytes.
  from sklearn.datasets import load_sample_images

  jpeg = tf.io.encode_jpeg(load_sample_images().images[0])
  out = input_pipeline.decode_and_crop(
    jpeg, lambda s: input_pipeline.random_resized_crop_window(s, tf.constant([0, 1], tf.int64)), 40
  )
  assert out.shape == (40, 40, 3) and out.dtype == tf.uint8


def test_folder_trains_through_main(tmp_path):
  from conftest import run_main

  _photo_folder(tmp_path / 'train')
  _photo_folder(tmp_path / 'eval', per_class=(3, 2, 2), seed=1, extras=False)
  workdir = tmp_path / 'run'
  result = run_main(
    [
      '--config=configs/default.py',
      f'--workdir={workdir}',
      '--config.dataset=folder',
      f'--config.train_dir={tmp_path / "train"}',
      f'--config.eval_dir={tmp_path / "eval"}',
      '--config.model=resnet18',
      '--config.image_size=32',
      '--config.random_crop_pad=0',
      '--config.batch_size=8',
      '--config.eval_batch_size=4',
      '--config.num_train_steps=3',
      '--config.log_every_steps=1',
    ]
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'corrupt.jpg' in result.stderr
  assert (workdir / input_pipeline.CLASS_INDEX_FILE).exists()
  import json

  with open(workdir / 'metrics.jsonl') as f:
    records = [json.loads(line) for line in f]
  assert max(r['step'] for r in records) == 3
  assert any('eval_top1' in r for r in records)
