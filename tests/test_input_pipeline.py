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
  resumed = [b for _, b in zip(range(5), input_pipeline.train_batches(ds, config, 32, steps,
                                                                      start_step=steps - 2))]
  for a, b in zip(first[steps - 2:], resumed):
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
  outs = {input_pipeline.crop_and_flip(image, tf.constant([s, 0], tf.int64), 1, True)
          .numpy().tobytes() for s in range(20)}
  assert len(outs) > 3
