"""Class folders of images: ``ROOT/<class name>/**/*.{jpg,jpeg,png}`` (Kaggle layout; also
Tiny ImageNet's, whose ``val/`` holds ``images/`` and ``val_annotations.txt``).

Class names are sorted and label i is the i-th; the mapping goes to
``WORKDIR/class_index.json``, where an eval-only load (eval, predict) finds it again
when the training folders are gone. Files that do not decode are named, skipped and
counted at start (``config.verify_images``), so a bad file never stops an epoch; the
verdicts are recorded in the workdir so a resumed run does not read every file again.
Each process keeps every ``process_count``-th file of each split.
"""

import concurrent.futures
import io
import json
import os
from collections.abc import Sequence

import jax
import numpy as np
from absl import logging

from jax_resnet.data.common import CLASS_INDEX_FILE, DatasetInfo, imagenet_stats
from jax_resnet.data.sources import Dataset
from jax_resnet.data.tf_cpu import tf
from jax_resnet.data.transforms import eval_transform, random_resized_transform, transform_options
from jax_resnet.errors import DataError, NotFoundError

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
TINY_IMAGENET_ANNOTATIONS = 'val_annotations.txt'  # the eval layout of Tiny ImageNet


def list_class_folders(root: str, field: str) -> tuple[list[str], list[str], list[int]]:
  """(class names sorted, file paths, labels) of ``root``/<class>/**.{jpg,jpeg,png}."""
  if not root:
    raise DataError(
      f"config.dataset='folder' needs config.{field}: a folder with one "
      'sub-folder of JPEG/PNG images per class.'
    )
  if not tf.io.gfile.isdir(root):
    raise NotFoundError(f'config.{field}={root!r} is not a directory.')
  classes = sorted(
    name.rstrip('/')
    for name in tf.io.gfile.listdir(root)
    if tf.io.gfile.isdir(os.path.join(root, name))
  )
  if not classes:
    raise DataError(
      f'config.{field}={root!r} has no class sub-folders; expected {root}/<class name>/<image>.jpg.'
    )
  paths, labels, empty = [], [], []
  class_dirs = [os.path.join(root, name) for name in classes]
  for label, name in enumerate(classes):
    found = _image_files(class_dirs[label], [root] + class_dirs)
    if not found:
      empty.append(name)
    paths += sorted(found)
    labels += [label] * len(found)
  if not paths:
    raise DataError(
      f'config.{field}={root!r} holds no JPEG or PNG images '
      f'({", ".join(IMAGE_EXTENSIONS)}) in its class sub-folders.'
    )
  if empty:
    raise DataError(
      f'config.{field}={root!r}: class folder(s) with no JPEG or PNG '
      f'images: {", ".join(empty[:10])}{" ..." if len(empty) > 10 else ""}.'
    )
  if field == 'train_dir' and len(classes) < 2:
    raise DataError(
      f'config.{field}={root!r} has one class sub-folder ({classes[0]}): a classifier needs '
      'at least two classes (one folder per class).'
    )
  return classes, paths, labels


def _image_files(class_dir: str, data_set_dirs: Sequence[str]) -> list[str]:
  """The JPEG/PNG files under ``class_dir``, recursively.

  Directory symlinks are followed (a class folder may gather images kept elsewhere),
  but never into a directory already walked or into the data set's root or another
  class folder: a symlink loop (``train/cat/loop -> train``) is skipped with a warning
  instead of repeating, and mislabelling, every image under it.
  """
  if '://' in class_dir:  # a remote file system (gs://, ...): no symlinks
    return [
      os.path.join(d, f)
      for d, _, files in tf.io.gfile.walk(class_dir)
      for f in files
      if f.lower().endswith(IMAGE_EXTENSIONS)
    ]
  forbidden = {os.path.realpath(d) for d in data_set_dirs} - {os.path.realpath(class_dir)}
  seen, found = set(), []
  for dirpath, dirnames, files in os.walk(class_dir, followlinks=True):
    real = os.path.realpath(dirpath)
    if real in seen or real in forbidden:
      logging.warning(
        'Not following %s: it leads back to %s (a symlink loop, or another class folder).',
        dirpath,
        real,
      )
      dirnames[:] = []
      continue
    seen.add(real)
    found += [
      os.path.join(dirpath, f)
      for f in files
      if f.lower().endswith(IMAGE_EXTENSIONS) and _regular(os.path.join(dirpath, f), dirpath)
    ]
  return found


def _regular(path: str, folder: str) -> bool:
  """Whether ``path`` is a regular file (through symlinks): a FIFO, socket or device named
  like an image would block the reader, so it is skipped with a warning."""
  if os.path.isfile(path):
    return True
  logging.warning('Skipping %s: not a regular file (a pipe, socket or device?).', path)
  return False


def _check_image(path: str) -> str | None:
  """None if ``path`` decodes as a JPEG or PNG, else why not (fast: JPEGs at 1/8 scale)."""
  from PIL import Image

  try:
    with tf.io.gfile.GFile(path, 'rb') as f:
      data = f.read()
    with Image.open(io.BytesIO(data)) as image:
      if image.format not in ('JPEG', 'PNG'):
        return f'{image.format} is not JPEG or PNG'
      if image.format == 'JPEG':
        image.draft('RGB', (max(1, image.size[0] // 8), max(1, image.size[1] // 8)))
      image.load()
  except Exception as e:  # anything Pillow cannot read, tf.data would fail on
    return f'{type(e).__name__}: {e}'
  return None


def _drop_undecodable(
  paths: Sequence[str], labels: Sequence[int], what: str, record: str | None = None
):
  """Drops (and names) the files that do not decode.

  ``record`` (a file in the workdir) keeps each file's verdict with its size and
  modification time, so a resumed run reads again only the files that changed: one
  corrupted in place after the first run is checked again, and named.
  """
  pool = concurrent.futures.ThreadPoolExecutor(max(4, os.cpu_count() or 1))
  try:
    stats = list(pool.map(_stat, paths))
    saved = _read_record(record)
    problems = [None] * len(paths)
    todo = []
    for i, (path, stat) in enumerate(zip(paths, stats)):
      previous = saved.get(path)
      if stat is None:
        problems[i] = 'it cannot be read'
      elif previous is not None and previous[:2] == list(stat):
        problems[i] = previous[2]
      else:
        todo.append(i)
    for i, why in zip(todo, pool.map(_check_image, [paths[i] for i in todo])):
      problems[i] = why
  except BaseException:  # a stop signal while starting (or a failure): drop what is queued
    pool.shutdown(wait=False, cancel_futures=True)
    raise
  pool.shutdown()
  if record and todo:
    tf.io.gfile.makedirs(os.path.dirname(record))
    with tf.io.gfile.GFile(record, 'w') as f:
      json.dump(
        {p: [*stat, why] for p, stat, why in zip(paths, stats, problems) if stat is not None}, f
      )
  bad = [(p, why) for p, why in zip(paths, problems) if why]
  for path, why in bad:
    logging.warning('Skipping %s: it cannot be decoded (%s).', path, why)
  if bad:
    logging.warning(
      'Skipped %d of %d %s files on this process that cannot be decoded.',
      len(bad),
      len(paths),
      what,
    )
  keep = [i for i, why in enumerate(problems) if not why]
  return [paths[i] for i in keep], [labels[i] for i in keep], len(bad)


def _stat(path: str) -> tuple[int, int] | None:
  """(size, modification time in ns) of a file, or None when it cannot be read."""
  try:
    if '://' in path:
      stat = tf.io.gfile.stat(path)
      return int(stat.length), int(stat.mtime_nsec)
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns
  except (OSError, tf.errors.OpError):
    return None


def _read_record(record: str | None) -> dict:
  """{path: [size, mtime_ns, problem or None]} of an earlier verification, if any."""
  if not record or not tf.io.gfile.exists(record):
    return {}
  try:
    with tf.io.gfile.GFile(record) as f:
      saved = json.load(f)
    return saved if isinstance(saved, dict) and 'digest' not in saved else {}
  except (ValueError, tf.errors.OpError):
    return {}


def _global_sum(n: int) -> int:
  if jax.process_count() == 1:
    return n
  from jax.experimental import multihost_utils

  return int(np.sum(multihost_utils.process_allgather(np.asarray(n, np.int64))))


def _read(example):
  """The file's bytes, keeping its path to name it if it does not decode."""
  return {**example, 'image': tf.io.read_file(example['path'])}


def load(config, workdir, splits, class_names) -> Dataset:
  found = {}
  if 'train' in splits:
    classes, *found['train'] = list_class_folders(config.train_dir, 'train_dir')
  else:
    classes = list(class_names) or read_class_index(workdir)
  if 'eval' in splits:
    found['eval'] = _eval_files(config, classes)
  # class_index.json is written by the training run once the checkpoint it resumes (if
  # any) has accepted these classes (training.prepare), never before.

  index, count = jax.process_index(), jax.process_count()
  skipped = {'train': 0, 'eval': 0}
  shards = {}
  for what, (paths, labels) in found.items():
    paths, labels = paths[index::count], labels[index::count]  # this process's shard
    if config.verify_images:
      record = workdir and os.path.join(workdir, f'verified_{what}_files.{index}.json')
      paths, labels, bad = _drop_undecodable(paths, labels, what, record)
      skipped[what] = _global_sum(bad)
    shards[what] = (paths, labels)
  num = {what: _global_sum(len(paths)) for what, (paths, _) in shards.items()}
  if 'train' in splits and num['train'] == 0:
    raise DataError(f'No decodable images in config.train_dir={config.train_dir!r}.')
  size = config.image_size
  mean, std = imagenet_stats(3)
  info = DatasetInfo(
    num_classes=len(classes),
    num_train=num.get('train', 0),
    num_eval=num.get('eval', 0),
    image_shape=(size, size, 3),
    mean=mean,
    std=std,
    class_names=tuple(classes),
    crop_style='random_resized',
    eval_crop_fraction=config.eval_crop_fraction,
    resize_antialias=config.resize_antialias,
  )
  source = lambda paths, labels: tf.data.Dataset.from_tensor_slices(
    {'path': tf.constant(paths, tf.string), 'label': tf.constant(labels, tf.int32)}
  )
  train = eval_ = None
  if 'train' in shards:
    train = source(*shards['train'])
    if config.cache:  # the encoded bytes, read once
      train = train.map(_read, tf.data.AUTOTUNE).cache()
  if 'eval' in shards:
    eval_ = source(*shards['eval']).map(_read, tf.data.AUTOTUNE)
    if config.cache:
      eval_ = eval_.cache()
    eval_ = eval_.map(eval_transform(transform_options(config), 3), tf.data.AUTOTUNE).ignore_errors(
      log_warning=True
    )
  return Dataset(
    info,
    train=train,
    eval=eval_,
    train_transform=random_resized_transform(transform_options(config), 3),
    decodes=True,
    num_skipped=skipped,
  )


def _eval_files(config, classes: Sequence[str]) -> tuple[list[str], list[int]]:
  """The eval folder's files with the training classes' labels (a subset is fine)."""
  annotations = os.path.join(config.eval_dir or '', TINY_IMAGENET_ANNOTATIONS)
  if config.eval_dir and tf.io.gfile.exists(annotations):
    return _annotated_files(config.eval_dir, annotations, classes)
  eval_classes, paths, eval_labels = list_class_folders(config.eval_dir, 'eval_dir')
  unknown = sorted(set(eval_classes) - set(classes))
  if unknown:
    raise DataError(
      f'config.eval_dir={config.eval_dir!r} has classes absent from '
      f'config.train_dir={config.train_dir!r}: {", ".join(unknown[:10])}'
      f'{" ..." if len(unknown) > 10 else ""}.'
    )
  to_train_label = [list(classes).index(name) for name in eval_classes]
  return paths, [to_train_label[i] for i in eval_labels]


def _annotated_files(eval_dir: str, annotations: str, classes: Sequence[str]):
  """Tiny ImageNet's validation layout: ``val/images/*.JPEG`` with the class of each in
  ``val/val_annotations.txt`` (file name, class, then the box, tab-separated)."""
  index = {name: i for i, name in enumerate(classes)}
  paths, labels, unknown = [], [], set()
  with tf.io.gfile.GFile(annotations) as f:
    for line in f:
      fields = line.strip().split('\t')
      if len(fields) < 2:
        continue
      if fields[1] not in index:
        unknown.add(fields[1])
        continue
      paths.append(os.path.join(eval_dir, 'images', fields[0]))
      labels.append(index[fields[1]])
  if unknown:
    raise DataError(
      f'{annotations} names classes absent from config.train_dir: '
      f'{", ".join(sorted(unknown)[:10])}{" ..." if len(unknown) > 10 else ""}.'
    )
  if not paths:
    raise DataError(f'{annotations} lists no images.')
  return paths, labels


def write_class_index(workdir: str, classes: Sequence[str]) -> None:
  """``WORKDIR/class_index.json``, written beside and renamed: never a cut file."""
  tf.io.gfile.makedirs(workdir)
  path = os.path.join(workdir, CLASS_INDEX_FILE)
  partial = f'{path}.partial-{os.getpid()}'
  with tf.io.gfile.GFile(partial, 'w') as f:
    json.dump({name: i for i, name in enumerate(classes)}, f, indent=0)
  tf.io.gfile.rename(partial, path, overwrite=True)


def read_class_index(workdir: str | None) -> list[str]:
  """The class names a training run recorded in ``workdir``, in label order."""
  path = workdir and os.path.join(workdir, CLASS_INDEX_FILE)
  if not path or not tf.io.gfile.exists(path):
    raise NotFoundError(
      "config.dataset='folder' without its training split needs the class names: "
      f'set config.train_dir, or keep the {CLASS_INDEX_FILE} the training run wrote in '
      f'its workdir{f" ({workdir})" if workdir else ""}.'
    )
  with tf.io.gfile.GFile(path) as f:
    index = json.load(f)
  return sorted(index, key=index.get)
