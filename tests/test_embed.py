"""Embeddings (Predictor.embed, --mode=embed) and the kNN evaluator (--mode=knn)."""

import csv
import os

import jax
import numpy as np
import pytest
from PIL import Image

from jax_resnet.errors import DataError, OutputError
from jax_resnet.inference import embed, export
from jax_resnet.inference.predict import Predictor


@pytest.fixture(scope='module')
def predictor(digits_run):
  return Predictor.from_workdir(digits_run)


def _digit_images(n, seed=0):
  from sklearn.datasets import load_digits

  digits = load_digits()
  index = np.random.RandomState(seed).permutation(len(digits.target))[:n]
  images = np.round(digits.images[index] * 255 / 16).astype(np.uint8)
  return images, digits.target[index]


def test_embeddings_are_the_features_the_head_reads(digits_run, predictor, tmp_path):
  """ResNet-20's pooled features, (images, 64) and finite; the head applied to them gives
  the predictor's probabilities; an export embeds as the workdir does."""
  images, _ = _digit_images(5)
  features = predictor.embed(list(images))
  assert features.shape == (5, 64) and features.dtype == np.float32
  assert np.isfinite(features).all() and features.std() > 0
  head = jax.tree.map(np.asarray, predictor._variables['params']['head'])
  logits = features @ head['kernel'] + head['bias']
  np.testing.assert_allclose(jax.nn.softmax(logits), predictor(list(images)), atol=1e-5)
  path = str(tmp_path / 'model.safetensors')
  export.export_checkpoint(digits_run, path, 'best', 'safetensors')
  np.testing.assert_array_equal(Predictor.from_export(path).embed(list(images)), features)
  assert predictor.embed([]).shape == (0, 64)


def _write_pngs(folder, images, labels=None):
  paths = []
  for i, image in enumerate(images):
    target = folder if labels is None else folder / str(labels[i])
    target.mkdir(parents=True, exist_ok=True)
    paths.append(str(target / f'{i:03d}.png'))
    Image.fromarray(image).save(paths[-1])
  return paths


def test_embed_files_writes_the_array_and_its_paths_whole(predictor, tmp_path):
  images, _ = _digit_images(7)
  _write_pngs(tmp_path / 'in', images)
  (tmp_path / 'in' / 'broken.png').write_bytes(b'not an image')
  output = str(tmp_path / 'out' / 'features.npy')
  os.makedirs(os.path.dirname(output))
  summary = embed.embed_files(predictor, [str(tmp_path / 'in')], output)
  array = np.load(output)
  with open(str(tmp_path / 'out' / 'features.csv')) as f:
    rows = list(csv.reader(f))
  assert rows[0] == ['path'] and len(rows) == 8 and summary['num_images'] == 7
  assert array.shape == (7, 64)
  assert not [p for p in rows[1:] if p[0].endswith('broken.png')]
  # Row i is the embedding of the file on line i.
  second = np.asarray(Image.open(rows[2][0]))
  np.testing.assert_allclose(array[1], predictor.embed([second])[0], rtol=1e-5, atol=1e-6)
  assert sorted(os.listdir(tmp_path / 'out')) == ['features.csv', 'features.npy']
  named = tmp_path / 'image.npy'  # a file named on the command line is read whatever its name
  named.write_bytes((tmp_path / 'in' / '000.png').read_bytes())
  with pytest.raises(OutputError, match='one of the input images'):
    embed.embed_files(predictor, [str(named)], str(named))
  assert named.read_bytes() == (tmp_path / 'in' / '000.png').read_bytes()
  with pytest.raises(OutputError, match='must end in .npy'):
    embed.embed_files(predictor, [str(tmp_path / 'in')], str(tmp_path / 'features.txt'))


def test_knn_top1_votes_by_cosine_similarity():
  train = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [0.2, 1.0]], np.float32)
  labels = np.array([0, 0, 1, 1, 1])
  queries = np.array([[5, 0.5], [0, 3], [1, 1.01]], np.float32)  # scale does not matter
  # k=1: each query's nearest. k=5: three of the first query's five neighbours are class 1,
  # but the two of class 0 are far more similar: the weighted vote says 0, a count 1.
  assert embed.knn_top1(train, labels, queries, np.array([0, 1, 1]), k=1) == 1.0
  assert embed.knn_top1(train, labels, queries, np.array([0, 1, 1]), k=5) == 1.0
  assert embed.knn_top1(train, labels, queries, np.array([0, 0, 0]), k=1) == pytest.approx(1 / 3)


def test_knn_evaluates_a_run_on_labelled_folders(predictor, tmp_path):
  images, labels = _digit_images(300)
  _write_pngs(tmp_path / 'train', images[:200], labels[:200])
  _write_pngs(tmp_path / 'eval', images[200:], labels[200:])
  result = embed.knn_evaluate(predictor, str(tmp_path / 'train'), str(tmp_path / 'eval'))
  assert (result['num_train'], result['num_eval'], result['k']) == (200, 100, 20)
  assert 0.3 < result['knn_top1'] <= 1.0  # 10 classes: chance is 0.1
  (tmp_path / 'eval' / 'eleven').mkdir()
  Image.fromarray(images[0]).save(tmp_path / 'eval' / 'eleven' / 'x.png')
  with pytest.raises(DataError, match='classes --knn_train=.* lacks: eleven'):
    embed.knn_evaluate(predictor, str(tmp_path / 'train'), str(tmp_path / 'eval'))


def test_main_embeds_a_folder_and_names_missing_knn_folders(digits_run, tmp_path):
  from helpers import run_main

  images, _ = _digit_images(3)
  _write_pngs(tmp_path / 'in', images)
  output = str(tmp_path / 'features.npy')
  done = run_main(
    [f'--workdir={digits_run}', '--mode=embed', f'--predict_input={tmp_path / "in"}']
    + [f'--embed_output={output}']
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert f'embedded 3 images into {output} (3, 64)' in done.stdout
  assert np.load(output).shape == (3, 64)
  knn = run_main([f'--workdir={digits_run}', '--mode=knn', f'--knn_train={tmp_path}'])
  lines = [line for line in knn.stderr.splitlines() if line.strip()]
  assert knn.returncode == 1 and len(lines) == 1, lines
  assert '--mode=knn needs --knn_train=DIR and --knn_eval=DIR' in lines[0]
