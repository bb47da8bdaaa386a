"""Predict: a trained digits run classifies its own test split, saved as 8x8 PNG files, as
well as its eval did, from the workdir and from an export, without TensorFlow or the
training data, in a read-only workdir; bad files are named and skipped.

One small run is trained in this process (image_size 12, so the predictor has to upsample
the 8x8 files as ``data/digits.py`` did; random flips, so flip TTA is meaningful) and
shared with test_export.py.
"""

import csv
import io
import json
import os
import shutil

import numpy as np
import pytest
from helpers import ROOT, digits_config, run_python

from jax_resnet.errors import NotFoundError, UserError
from jax_resnet.inference import export, image_prep, predict
from jax_resnet.inference.predict import Predictor

IMAGE_SIZE = 12
TOP_K = 3
ONE_IMAGE = 1.5 / 359  # of the digits test split, in accuracy


@pytest.fixture(scope='module')
def predictor(digits_run):
  """The run's best checkpoint, shared: each predictor compiles its forward pass, once per
  batch shape (one here: the whole test split fits a batch)."""
  return Predictor.from_workdir(digits_run, batch_size=512)


@pytest.fixture(scope='module')
def digits_test_split():
  """The digits test split as the 8x8 originals: (uint8 [N, 8, 8], labels)."""
  from jax_resnet.data import digits

  _, _, images, labels, _ = digits.arrays(digits_config(image_size=8))
  return images[..., 0], labels


@pytest.fixture(scope='module')
def digit_pngs(tmp_path_factory, digits_test_split):
  """The test split as PNG files in one folder per class: ROOT/<label>/<index>.png."""
  from PIL import Image

  root = tmp_path_factory.mktemp('digit_pngs')
  for i, (image, label) in enumerate(zip(*digits_test_split)):
    (root / str(label)).mkdir(exist_ok=True)
    Image.fromarray(image).save(root / str(label) / f'{i}.png')
  return str(root)


def eval_top1(workdir: str, step: int) -> float:
  """The run's own eval top-1 at ``step``, from metrics.jsonl."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f if line.strip()]
  return [r['eval_top1'] for r in records if r['step'] == step and 'eval_top1' in r][-1]


def read_csv(path) -> list[dict]:
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


def csv_accuracy(rows: list[dict]) -> float:
  """Top-1 of a predictions CSV whose files sit in folders named by their class."""
  return np.mean([row['class_1'] == os.path.basename(os.path.dirname(row['path'])) for row in rows])


def check_csv(rows: list[dict], num_images: int, k: int, class_names) -> None:
  assert len(rows) == num_images
  assert list(rows[0]) == ['path'] + [
    f'{f}_{i}' for i in range(1, k + 1) for f in ('class', 'prob')
  ]
  for row in rows:
    probabilities = [float(row[f'prob_{i}']) for i in range(1, k + 1)]
    assert all(row[f'class_{i}'] in class_names for i in range(1, k + 1))
    assert len({row[f'class_{i}'] for i in range(1, k + 1)}) == k
    assert probabilities == sorted(probabilities, reverse=True)
    assert min(probabilities) >= 0 and sum(probabilities) <= 1 + 1e-5


def test_predict_files_from_the_workdir_reaches_the_eval_accuracy(
  predictor, digits_run, digit_pngs, digits_test_split, tmp_path
):
  output = tmp_path / 'predictions.csv'
  summary = predict.predict_files(predictor, [digit_pngs], str(output), top_k=TOP_K)
  assert summary['num_images'] == len(digits_test_split[1]) and summary['num_skipped'] == 0
  rows = read_csv(output)
  check_csv(rows, len(digits_test_split[1]), TOP_K, predictor.class_names)
  # The same inputs as eval; a different batch may change the last float bit of a logit.
  expected = eval_top1(digits_run, predictor.metadata['step'])
  assert csv_accuracy(rows) == pytest.approx(expected, abs=ONE_IMAGE)


def test_prepare_upsamples_like_the_digits_source(predictor, digits_test_split):
  """The predictor's bilinear resize of an 8x8 file is what ``data/digits.py`` trained on."""
  from jax_resnet.data import digits

  _, _, upsampled, _, _ = digits.arrays(digits_config())
  prepared = np.stack([predictor.prepare(image) for image in digits_test_split[0]])
  assert prepared.shape == upsampled.shape == (len(upsampled), IMAGE_SIZE, IMAGE_SIZE, 1)
  # Identical here; 1 apart allowed for a TensorFlow build whose float arithmetic fuses.
  difference = np.abs(prepared.astype(int) - upsampled.astype(int))
  assert difference.max() <= 1 and np.mean(difference > 0) < 1e-4


# Prediction where TensorFlow, tensorflow-datasets and scikit-learn (the digits) cannot be
# imported: the export and the image files are all it has.
WITHOUT_TENSORFLOW = """
import sys
class Blocked:
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in ('tensorflow', 'tensorflow_datasets', 'sklearn'):
      raise ImportError(f'{name} is not installed here (blocked by the test)')
sys.meta_path.insert(0, Blocked())
from jax_resnet.inference import predict
predictor = predict.Predictor.from_export(sys.argv[1], batch_size=512)
predict.predict_files(predictor, [sys.argv[2]], sys.argv[3], top_k=int(sys.argv[4]))
"""
# `python main.py ARGS`, then whether TensorFlow was imported. (Not blocked as above:
# orbax's etils paths probe importlib.util.find_spec('tensorflow'), which a block breaks.)
MAIN_REPORTING_TENSORFLOW = """
import atexit, runpy, sys
atexit.register(lambda: print('tensorflow imported:', 'tensorflow' in sys.modules, flush=True))
sys.argv = ['main.py'] + sys.argv[1:]
runpy.run_path('main.py', run_name='__main__')
"""


def test_predict_from_an_export_without_tensorflow_or_training_data(
  digits_run, digit_pngs, digits_test_split, tmp_path
):
  path = export.export_checkpoint(
    digits_run, str(tmp_path / 'digits.safetensors'), 'best', 'safetensors'
  )
  output = tmp_path / 'predictions.csv'
  result = run_python(WITHOUT_TENSORFLOW, path, digit_pngs, str(output), str(TOP_K))
  assert result.returncode == 0, result.stderr[-3000:]
  rows = read_csv(output)
  check_csv(rows, len(digits_test_split[1]), TOP_K, [str(d) for d in range(10)])
  step = export.read_export(path)[1]['step']
  assert csv_accuracy(rows) == pytest.approx(eval_top1(digits_run, step), abs=ONE_IMAGE)


def test_main_predicts_from_a_workdir_and_from_an_export(
  digits_run, digit_pngs, digits_test_split, tmp_path
):
  """``python main.py --mode=predict``, from --workdir's best checkpoint and from an export
  with --predict_from (no --workdir): the same CSV, at the run's eval accuracy, without
  importing TensorFlow."""
  path = export.export_checkpoint(digits_run, str(tmp_path / 'digits.msgpack'), 'best')
  onnx_path = export.export_checkpoint(digits_run, str(tmp_path / 'digits.onnx'), 'best', 'onnx')
  step = export.read_export(path)[1]['step']
  num_images = len(digits_test_split[1])
  rows = {}
  for source, flag in (
    ('workdir', f'--workdir={digits_run}'),
    ('export', f'--predict_from={path}'),
    ('onnx', f'--predict_from={onnx_path}'),  # onnxruntime, through the same CSV writer
  ):
    output = tmp_path / f'{source}.csv'
    args = ['--mode=predict', flag, f'--predict_input={digit_pngs}', f'--predict_output={output}']
    result = run_python(MAIN_REPORTING_TENSORFLOW, *args, f'--top_k={TOP_K}')
    assert result.returncode == 0, result.stderr[-3000:]
    assert f'predicted {num_images} images into {output}' in result.stdout
    assert 'tensorflow imported: False' in result.stdout
    rows[source] = read_csv(output)
    check_csv(rows[source], num_images, TOP_K, [str(d) for d in range(10)])
    assert csv_accuracy(rows[source]) == pytest.approx(eval_top1(digits_run, step), abs=ONE_IMAGE)
  assert rows['export'] == rows['workdir']
  for onnx_row, row in zip(rows['onnx'], rows['workdir'], strict=True):
    assert (onnx_row['path'], onnx_row['class_1']) == (row['path'], row['class_1'])
    assert float(onnx_row['prob_1']) == pytest.approx(float(row['prob_1']), abs=1e-4)
  # The log of a predict from a writable workdir is the workdir's (it went to a temp file).
  with open(os.path.join(digits_run, 'jax_resnet.log')) as f:
    assert f'--predict_output={tmp_path / "workdir.csv"}' in f.read()


def test_arrays_of_any_size_and_channel_count(predictor, digits_test_split):
  images, _ = digits_test_split
  grey = images[:5]
  probabilities = predictor(list(grey))
  assert probabilities.shape == (5, 10) and probabilities.dtype == np.float32
  np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-5)
  # The same images as RGB (collapsed to grey), as HxWx1, and as one NHWC array.
  rgb = np.repeat(grey[..., None], 3, axis=-1)
  np.testing.assert_allclose(predictor(list(rgb)), probabilities, atol=1e-6)
  np.testing.assert_allclose(predictor(grey[..., None]), probabilities, atol=1e-6)
  # Any sizes in one call; a batch larger than batch_size is split.
  mixed = [images[0], np.zeros((30, 17), np.uint8), np.full((5, 40, 3), 200, np.uint8)] * 2
  mixed += list(grey[:2])
  probabilities_mixed = predictor(mixed, batch_size=4)
  assert probabilities_mixed.shape == (8, 10)
  np.testing.assert_allclose(probabilities_mixed, predictor(mixed), atol=1e-6)
  top = predictor.top_k(grey[..., None], k=2)
  assert [len(best) for best in top] == [2] * 5
  assert [best[0][0] for best in top] == [predictor.class_names[i] for i in probabilities.argmax(1)]
  with pytest.raises(ValueError, match='uint8'):
    predictor([grey[0].astype(np.float32)])


def test_flip_tta_changes_probabilities_and_keeps_the_accuracy(
  predictor, digits_run, digits_test_split
):
  images, labels = digits_test_split
  plain = predictor(list(images))
  flipped = predictor(list(images), flip=True)
  assert np.abs(flipped - plain).max() > 0.01
  np.testing.assert_allclose(flipped.sum(axis=1), 1, atol=1e-5)
  # Mirrored after the resize (mirroring the 8x8 file first may round a .5 tie the other way).
  prepared = np.stack([predictor.prepare(image) for image in images])
  mirrored = predictor.predict_prepared(prepared[:, :, ::-1])
  np.testing.assert_allclose(flipped, (plain + mirrored) / 2, atol=1e-6)
  # Digits are not mirror-symmetric: trained with random flips, TTA keeps about the
  # accuracy (here 61.6% against 63.2% without; the margin allows for other CPUs' floats).
  expected = eval_top1(digits_run, predictor.metadata['step'])
  assert np.mean(flipped.argmax(1) == labels) >= expected - 0.05


def test_undecodable_files_are_named_and_skipped(predictor, digits_test_split, tmp_path, caplog):
  from PIL import Image

  folder = tmp_path / 'mixed'
  folder.mkdir()
  for i in range(2):
    Image.fromarray(digits_test_split[0][i]).save(folder / f'good{i}.png')
  (folder / 'corrupt.jpg').write_bytes(b'\xff\xd8\xff\xe0 not really a jpeg')
  (folder / 'empty.png').write_bytes(b'')
  output = tmp_path / 'out' / 'predictions.csv'
  summary = predict.predict_files(predictor, [str(folder)], str(output), top_k=20)
  assert summary['num_images'] == 2 and summary['num_skipped'] == 2
  assert sorted(map(os.path.basename, summary['skipped'])) == ['corrupt.jpg', 'empty.png']
  warnings = '\n'.join(r.getMessage() for r in caplog.records)
  assert str(folder / 'corrupt.jpg') in warnings and str(folder / 'empty.png') in warnings
  rows = read_csv(output)
  check_csv(rows, 2, 10, predictor.class_names)  # top_k=20 of 10 classes: all 10
  assert sum(float(rows[0][f'prob_{i}']) for i in range(1, 11)) == pytest.approx(1, abs=1e-4)


def test_inputs_files_folders_and_globs(digit_pngs, tmp_path):
  some = sorted(os.listdir(os.path.join(digit_pngs, '3')))[:2]
  files = predict.find_images(
    [
      os.path.join(digit_pngs, '3', some[0]),  # a file
      os.path.join(digit_pngs, '7'),  # a folder
      os.path.join(digit_pngs, '**', some[1]),  # a recursive glob
      os.path.join(digit_pngs, '3', some[0]),  # again: listed once
    ]
  )
  assert files[0].endswith(some[0]) and files[-1].endswith(some[1])
  assert len(files) == len(os.listdir(os.path.join(digit_pngs, '7'))) + 2


def test_missing_inputs_are_one_user_error(predictor, digit_pngs, tmp_path):
  output = tmp_path / 'predictions.csv'
  missing = [str(tmp_path / 'nothing' / '*.png'), str(tmp_path / 'absent.jpg')]
  with pytest.raises(NotFoundError) as error:
    predict.predict_files(predictor, [digit_pngs, *missing], str(output))
  assert isinstance(error.value, UserError)
  assert all(path in str(error.value) for path in missing)
  assert not output.exists()


def snapshot(folder: str) -> dict:
  """Every file and folder under ``folder``: (size, mtime, mode), to prove nothing changed."""
  found = {}
  for dirpath, dirnames, filenames in os.walk(folder):
    for name in dirnames + filenames:
      path = os.path.join(dirpath, name)
      info = os.stat(path)
      found[os.path.relpath(path, folder)] = (info.st_size, info.st_mtime_ns, info.st_mode)
  return found


def test_predict_changes_nothing_in_the_workdir(digits_run, digit_pngs, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(digits_run, workdir)
  before = snapshot(workdir)
  predictor = Predictor.from_workdir(workdir, 'latest', batch_size=512)
  predict.predict_files(predictor, [digit_pngs], str(tmp_path / 'predictions.csv'))
  assert snapshot(workdir) == before


def test_read_only_workdir(digits_run, digit_pngs, tmp_path, read_only_mount):
  workdir = read_only_mount(digits_run)
  with pytest.raises(OSError):
    open(os.path.join(workdir, 'probe'), 'w')
  predictor = Predictor.from_workdir(workdir, batch_size=512)
  output = tmp_path / 'predictions.csv'
  summary = predict.predict_files(predictor, [digit_pngs], str(output))
  assert summary['num_images'] == len(read_csv(output)) > 0


def test_unwritable_output_is_one_user_error(predictor, digit_pngs, tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('not a directory')
  output = str(blocker / 'predictions.csv')
  with pytest.raises(UserError, match='predictions.csv'):
    predict.predict_files(predictor, [digit_pngs], output)


def test_crop_and_resize_match_tensorflow_eval():
  """'random_resized' eval in numpy: the centre crop and bilinear resize of TensorFlow's
  eval transform, on PNGs of odd sizes, with and without antialiasing, within rounding."""
  pytest.importorskip('tensorflow')
  from PIL import Image

  from jax_resnet.data import transforms
  from jax_resnet.data.tf_cpu import tf

  rng = np.random.RandomState(0)
  differences = []
  for height, width, channels, size in [(37, 53, 3, 16), (120, 75, 3, 24), (9, 300, 1, 8)]:
    image = rng.randint(0, 256, (height, width, channels)).astype(np.uint8)
    data = io.BytesIO()
    Image.fromarray(image.squeeze(-1) if channels == 1 else image).save(data, 'PNG')
    for antialias in (False, True):
      window = lambda shape: transforms.center_crop_window(shape, 0.875)
      expected = transforms.decode_and_crop(
        tf.constant(data.getvalue()), window, size, channels, antialias
      ).numpy()
      found = image_prep.resize_bilinear(
        image_prep.center_crop(image, 0.875), (size, size), antialias
      )
      assert found.shape == expected.shape
      differences.append(np.abs(found.astype(int) - expected.astype(int)).ravel())
  differences = np.concatenate(differences)
  assert differences.max() <= 1 and np.mean(differences > 0) < 1e-4  # identical here


def _readme_python(marker: str) -> str:
  """The README's Python block that contains ``marker``."""
  import re

  with open(os.path.join(ROOT, 'README.md')) as f:
    blocks = re.findall(r'```python\n(.*?)```', f.read(), re.S)
  (block,) = [b for b in blocks if marker in b]
  return block


def test_readme_snippets_reach_the_eval_accuracy(digits_run, digits_test_split, tmp_path):
  """The README snippets, as printed there, on the digits test split: the predictor on
  the 8x8 originals, the raw export and the ONNX export on images at the model's input
  size."""
  from jax_resnet.data import digits

  images, labels = digits_test_split
  code = _readme_python('Predictor.from_workdir').replace(
    "'/tmp/jax_resnet_digits'", repr(digits_run)
  )
  scope = {'images': list(images)}
  exec(code, scope)
  run_step = Predictor.from_workdir(digits_run).metadata['step']
  expected = eval_top1(digits_run, run_step)
  assert np.mean(scope['probabilities'].argmax(axis=1) == labels) >= expected - ONE_IMAGE
  assert set(scope['names']) <= set(scope['predictor'].class_names)

  path = str(tmp_path / 'model.msgpack')
  export.export_checkpoint(digits_run, path, which='best')
  _, _, upsampled, test_labels, _ = digits.arrays(digits_config())  # as training saw them
  code = _readme_python("read_export('model.msgpack')").replace("'model.msgpack'", repr(path))
  scope = {'images': upsampled}
  exec(code, scope)
  logits = np.asarray(scope['logits'])
  assert np.mean(logits.argmax(axis=1) == test_labels) >= expected - ONE_IMAGE

  # The onnxruntime snippet, on the same images (uint8 at the model's size).
  path = export.export_checkpoint(digits_run, str(tmp_path / 'model.onnx'), 'best', 'onnx')
  code = _readme_python('ort.InferenceSession').replace("'model.onnx'", repr(path))
  scope = {'images': upsampled}
  exec(code, scope)
  assert np.mean(scope['probabilities'].argmax(axis=1) == test_labels) >= expected - ONE_IMAGE


def test_predictions_are_written_whole_or_not_at_all(predictor, digit_pngs, tmp_path, monkeypatch):
  """A run that stops part-way (a kill, an error) leaves the earlier predictions as they
  were and nothing half-written at the path; a run that finishes replaces them whole."""
  output = tmp_path / 'predictions.csv'
  output.write_text('earlier predictions\n')
  calls = []
  rows = predict._top_k_rows

  def failing_second_batch(*args):
    calls.append(1)
    if len(calls) == 2:
      raise RuntimeError('stopped part-way')
    return rows(*args)

  monkeypatch.setattr(predict, '_top_k_rows', failing_second_batch)
  with pytest.raises(RuntimeError, match='part-way'):
    predict.predict_files(predictor, [digit_pngs], str(output), batch_size=100)
  assert output.read_text() == 'earlier predictions\n'
  assert [p.name for p in tmp_path.iterdir()] == ['predictions.csv']  # no partial left
  monkeypatch.setattr(predict, '_top_k_rows', rows)
  summary = predict.predict_files(predictor, [digit_pngs], str(output), batch_size=100)
  assert len(read_csv(output)) == summary['num_images'] > 100


def test_an_output_that_is_one_of_the_inputs_is_refused(predictor, digit_pngs, tmp_path):
  image = next(p for p in sorted(os.listdir(os.path.join(digit_pngs, '0'))))
  path = os.path.join(digit_pngs, '0', image)
  before = open(path, 'rb').read()
  with pytest.raises(UserError, match='is one of the input images'):
    predict.predict_files(predictor, [digit_pngs], path)
  assert open(path, 'rb').read() == before


def test_only_regular_files_are_read(predictor, digit_pngs, tmp_path):
  """A FIFO named like an image (reading it would block forever) is passed over."""
  folder = tmp_path / 'images'
  shutil.copytree(os.path.join(digit_pngs, '3'), folder)
  os.mkfifo(folder / 'pipe.png')
  summary = predict.predict_files(predictor, [str(folder)], str(tmp_path / 'out.csv'))
  assert summary['num_images'] == len(os.listdir(os.path.join(digit_pngs, '3')))
  assert all('pipe.png' not in row['path'] for row in read_csv(tmp_path / 'out.csv'))


def test_two_writers_to_one_path_leave_one_whole_file(tmp_path):
  """Two predicts to one CSV at once (each process writes its own PATH.partial-PID):
  whichever finishes last is the file, whole; never a mix of the two."""
  path = str(tmp_path / 'predictions.csv')
  first = predict._CompleteOrNothing(path, f'{path}.partial-1')
  second = predict._CompleteOrNothing(path, f'{path}.partial-2')
  with first as a, second as b:  # interleaved writes, both files open at once
    for i in range(100):
      a.write(f'a,{i}\n')
      b.write(f'b,{i}\n')
  # The second finished first (exits run in reverse), then the first replaced it whole.
  with open(path) as f:
    assert f.read() == ''.join(f'a,{i}\n' for i in range(100))
  assert sorted(os.listdir(tmp_path)) == ['predictions.csv']
