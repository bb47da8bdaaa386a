"""Embeddings: the network as a feature extractor (the pooled features before the head,
timm's ``forward_features`` pooled, its ``num_classes=0``), for retrieval, clustering,
deduplication or a linear probe; and a k-nearest-neighbour top-1 of them on a labelled
class folder, in the spirit of big_vision's representation evaluators: a quick measure of
how well the features transfer.
"""

import concurrent.futures
import csv
import functools
import os

import numpy as np
from absl import logging

from jax_resnet.errors import DataError, OutputError
from jax_resnet.inference import predict
from jax_resnet.runs.workdirs import ensure_writable

KNN_NEIGHBOURS = 20


def embed_paths(predictor: predict.Predictor, paths: list[str], batch_size: int | None = None):
  """(embeddings [N, D] float32, the N paths embedded); files that do not decode are named
  in a warning and skipped."""
  batch_size = batch_size or predictor.batch_size
  kept, chunks = [], []
  with concurrent.futures.ThreadPoolExecutor(predict.DECODE_THREADS) as pool:
    for start in range(0, len(paths), batch_size):
      chunk = paths[start : start + batch_size]
      prepared = list(pool.map(functools.partial(predict.prepare_file, predictor), chunk))
      good = [(p, image) for p, image in zip(chunk, prepared) if image is not None]
      if good:
        kept += [p for p, _ in good]
        chunks.append(predictor.embed_prepared(np.stack([image for _, image in good])))
  if len(kept) < len(paths):
    logging.warning(
      'Skipped %d of %d files that cannot be decoded.', len(paths) - len(kept), len(paths)
    )
  dimension = predictor.embedding_size
  return (np.concatenate(chunks) if chunks else np.zeros((0, dimension), np.float32)), kept


def embed_files(predictor: predict.Predictor, inputs, output_npy: str, batch_size=None) -> dict:
  """Writes the embeddings of the images ``inputs`` names (files, folders, globs) to
  ``output_npy`` and their paths, in the same order, to ``output_npy`` with ``.csv`` in
  place of ``.npy``; both written beside and renamed when complete."""
  paths = predict.find_images([inputs] if isinstance(inputs, str) else inputs)
  if not output_npy.endswith('.npy'):
    raise OutputError(f"--embed_output={output_npy}: must end in .npy (numpy.save's format).")
  paths_csv = output_npy[: -len('.npy')] + '.csv'
  targets = {os.path.realpath(output_npy), os.path.realpath(paths_csv)}
  if any(os.path.realpath(p) in targets for p in paths):
    raise OutputError(
      f'--embed_output={output_npy} is one of the input images: choose another path.'
    )
  ensure_writable(output_npy, 'the embeddings')
  embeddings, kept = embed_paths(predictor, paths, batch_size)
  suffix = f'.partial-{os.getpid()}'
  try:
    with open(output_npy + suffix, 'wb') as f:
      np.save(f, embeddings)
    with open(paths_csv + suffix, 'w', newline='') as f:
      csv.writer(f).writerows([['path'], *([p] for p in kept)])
    os.replace(paths_csv + suffix, paths_csv)
    os.replace(output_npy + suffix, output_npy)
  except OSError as e:
    raise OutputError(f'Cannot write the embeddings to {output_npy}: {e.strerror or e}.') from None
  finally:
    for leftover in (output_npy + suffix, paths_csv + suffix):
      if os.path.exists(leftover):
        os.remove(leftover)
  logging.info('Wrote %s embeddings of %d images to %s.', embeddings.shape, len(kept), output_npy)
  return {
    'output_npy': output_npy,
    'paths_csv': paths_csv,
    'num_images': len(kept),
    'shape': embeddings.shape,
  }


def labelled_folder(root: str) -> tuple[list[str], np.ndarray, tuple[str, ...]]:
  """(image paths, their class indices, the class names) of ``root``/CLASS/... images."""
  if not os.path.isdir(root):
    raise DataError(f'{root} is not a folder of class folders (ROOT/CLASS/image.jpg).')
  classes = tuple(sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))))
  paths, labels = [], []
  for index, name in enumerate(classes):
    found = predict.images_under(os.path.join(root, name))
    paths += found
    labels += [index] * len(found)
  if not paths:
    raise DataError(f'{root} has no images in class folders (ROOT/CLASS/image.jpg).')
  return paths, np.asarray(labels), classes


def knn_top1(train, train_labels, queries, query_labels, k: int = KNN_NEIGHBOURS) -> float:
  """The fraction of ``queries`` whose class wins the vote of their ``k`` most cosine-
  similar ``train`` embeddings, each neighbour voting with its similarity (ties between
  classes go to the more similar)."""
  normalise = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  similarity = normalise(queries) @ normalise(train).T
  k = min(k, len(train))
  nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
  votes = np.zeros((len(queries), int(train_labels.max()) + 1))
  rows = np.arange(len(queries))[:, None]
  np.add.at(
    votes, (np.broadcast_to(rows, nearest.shape), train_labels[nearest]), similarity[rows, nearest]
  )
  return float(np.mean(votes.argmax(axis=1) == query_labels))


def _embedded_with_labels(predictor, paths, labels):
  """The embeddings of ``paths`` and the labels of those that decoded."""
  embeddings, kept = embed_paths(predictor, paths)
  position = {path: i for i, path in enumerate(paths)}
  return embeddings, labels[[position[path] for path in kept]]


def knn_evaluate(
  predictor: predict.Predictor, train_dir: str, eval_dir: str, k=KNN_NEIGHBOURS
) -> dict:
  """kNN top-1 of ``eval_dir``'s images against ``train_dir``'s, by class name."""
  train_paths, train_labels, train_classes = labelled_folder(train_dir)
  eval_paths, eval_labels, eval_classes = labelled_folder(eval_dir)
  unknown = sorted(set(eval_classes) - set(train_classes))
  if unknown:
    raise DataError(
      f'--knn_eval={eval_dir} has classes --knn_train={train_dir} lacks: {", ".join(unknown[:5])}.'
    )
  to_train = {name: i for i, name in enumerate(train_classes)}
  eval_labels = np.asarray([to_train[eval_classes[i]] for i in eval_labels])
  train, train_labels = _embedded_with_labels(predictor, train_paths, train_labels)
  queries, eval_labels = _embedded_with_labels(predictor, eval_paths, eval_labels)
  if not len(train) or not len(queries):
    raise DataError(f'No image in {train_dir if not len(train) else eval_dir} could be decoded.')
  top1 = knn_top1(train, train_labels, queries, eval_labels, k)
  return {
    'knn_top1': top1,
    'k': min(k, len(train)),
    'num_train': len(train),
    'num_eval': len(queries),
  }
