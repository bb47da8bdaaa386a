"""scikit-learn's bundled handwritten digits: 1,797 8x8 grey images, no download.

Split 80/20 with a fixed seed (the split never changes), upsampled to
``config.image_size``, normalised with the training split's own mean and std.
"""

import jax
import ml_collections
import numpy as np

from jax_resnet.data.common import DatasetInfo
from jax_resnet.data.sources import Dataset
from jax_resnet.data.tf_cpu import tf
from jax_resnet.data.transforms import pad_transform, transform_options

SPLIT_SEED = 0  # fixed: the digits train/test split never changes
TEST_FRACTION = 0.2
CLASS_NAMES = tuple(str(d) for d in range(10))


def arrays(config: ml_collections.ConfigDict):
  """(train images, train labels, test images, test labels, DatasetInfo) as numpy."""
  from sklearn import datasets as sk_datasets

  digits = sk_datasets.load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int32)
  order = np.random.RandomState(SPLIT_SEED).permutation(len(labels))
  num_test = int(round(len(labels) * TEST_FRACTION))
  test, train = order[:num_test], order[num_test:]
  class_names = CLASS_NAMES
  if config.digits_classes:  # a subset, labels renumbered 0..k-1 in digit order
    class_names = tuple(sorted(set(config.digits_classes)))
    keep = np.isin(labels, [int(c) for c in class_names])
    test, train = test[keep[test]], train[keep[train]]
    labels = np.searchsorted(np.array([int(c) for c in class_names]), labels).astype(np.int32)
  size = config.image_size
  if size != images.shape[1]:
    images = tf.cast(
      tf.round(tf.clip_by_value(tf.image.resize(images, (size, size), method='bilinear'), 0, 255)),
      tf.uint8,
    ).numpy()
  x_train = images[train]
  info = DatasetInfo(
    num_classes=len(class_names),
    num_train=len(train),
    num_eval=len(test),
    image_shape=(size, size, 1),
    mean=tuple(float(m) for m in x_train.reshape(-1, 1).mean(0)),
    std=tuple(float(s) for s in x_train.reshape(-1, 1).std(0)),
    class_names=class_names,
  )
  return x_train, labels[train], images[test], labels[test], info


def load(config, workdir, splits, class_names) -> Dataset:
  del workdir, class_names  # nothing to describe: the classes are the ten digits
  x_train, y_train, x_test, y_test, info = arrays(config)
  index, count = jax.process_index(), jax.process_count()
  train = eval_ = None
  if 'train' in splits:
    train = tf.data.Dataset.from_tensor_slices({'image': x_train, 'label': y_train})
  if 'eval' in splits:
    eval_ = tf.data.Dataset.from_tensor_slices(
      {'image': x_test[index::count], 'label': y_test[index::count]}
    )
  return Dataset(
    info,
    train=train,
    eval=eval_,
    train_transform=pad_transform(transform_options(config)),
    replicated_train=True,
  )
