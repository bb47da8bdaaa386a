"""The data sources: digits, tensorflow-datasets (mocked) and class folders."""

import os
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds
from helpers import folder_config, input_options, photo_folder

from jax_resnet.data import batching, folder, sources
from jax_resnet.data.common import CLASS_INDEX_FILE


def test_digits_split_is_fixed_and_complete(config):
  ds = sources.load_dataset(config)
  info = ds.info
  assert info.num_train + info.num_eval == 1797
  assert abs(info.num_eval / 1797 - 0.2) < 0.01
  assert info.image_shape == (8, 8, 1) and info.num_classes == 10
  again = sources.load_dataset(config)
  a = next(iter(tfds.as_numpy(ds.eval.batch(400))))
  b = next(iter(tfds.as_numpy(again.eval.batch(400))))
  np.testing.assert_array_equal(a['image'], b['image'])


def test_digits_upsampled(config):
  config.image_size = 16
  ds = sources.load_dataset(config)
  batch = next(batching.train_batches(ds, input_options(config), 32, 10))
  assert batch['image'].shape == (32, 16, 16, 1) and batch['image'].dtype == np.uint8
  assert batch['label'].dtype == np.int32


def test_cifar10_through_mock_data(config):
  config.dataset = 'cifar10'
  config.image_size = 32
  config.random_crop_pad = 4
  config.random_flip = True
  with tfds.testing.mock_data(num_examples=70):
    ds = sources.load_dataset(config)
    assert ds.info.num_classes == 10 and ds.info.image_shape == (32, 32, 3)
    assert ds.info.num_train == 70
    batch = next(batching.train_batches(ds, input_options(config), 16, 4))
    assert batch['image'].shape == (16, 32, 32, 3) and batch['image'].dtype == np.uint8
    assert batch['label'].min() >= 0 and batch['label'].max() < 10
    steps = batching.num_eval_steps(ds.info, 32)
    assert sum(b['mask'].sum() for b in batching.eval_batches(ds, 32, steps)) == 70
  np.testing.assert_allclose(ds.info.mean[0], 0.4914 * 255)


def test_missing_dataset_says_how_to_prepare(config, tmp_path):
  config.dataset = 'cifar10'
  config.data_dir = str(tmp_path)
  with pytest.raises(FileNotFoundError, match='tfds build cifar10'):
    sources.load_dataset(config)


def test_folder_dataset_converts_modes_and_skips_corrupt_files(
  config, tmp_path, caplog, monkeypatch
):
  import json

  train_n, eval_n = folder_config(config, tmp_path)
  workdir = tmp_path / 'work'
  ds = sources.load_dataset(config, str(workdir))
  assert ds.info.num_train == train_n == 16 and ds.info.num_eval == eval_n == 7
  assert ds.info.num_classes == 3 and ds.info.image_shape == (32, 32, 3)
  assert ds.num_skipped == {'train': 1, 'eval': 0}
  assert 'corrupt.jpg' in caplog.text
  # Loading writes no class index: training writes it once a checkpoint accepted the
  # classes (tests/test_resume.py renames a class folder under a run).
  assert not (workdir / CLASS_INDEX_FILE).exists()
  folder.write_class_index(str(workdir), ds.info.class_names)
  with open(workdir / CLASS_INDEX_FILE) as f:
    assert json.load(f) == {'class_0': 0, 'class_1': 1, 'class_2': 2}
  assert [p.name for p in workdir.iterdir() if 'partial' in p.name] == []
  # A restart reuses the verdicts recorded in the workdir instead of reading every file.
  monkeypatch.setattr(folder, '_check_image', lambda path: pytest.fail(path))
  caplog.clear()
  again = sources.load_dataset(config, str(workdir))
  assert again.num_skipped == {'train': 1, 'eval': 0} and 'corrupt.jpg' in caplog.text
  # Two epochs of train batches, all decoded (grey, CMYK, RGBA included) to RGB uint8.
  batches = [b for _, b in zip(range(4), batching.train_batches(ds, input_options(config), 8, 2))]
  for b in batches:
    assert b['image'].shape == (8, 32, 32, 3) and b['image'].dtype == np.uint8
    assert b['image'].std() > 5  # real photographs, not blank
  labels = np.concatenate([b['label'] for b in batches[:2]])
  assert set(labels.tolist()) <= {0, 1, 2}
  # Eval: 7 examples in batches of 4, each counted exactly once, centre-cropped.
  steps = batching.num_eval_steps(ds.info, 4)
  evals = list(batching.eval_batches(ds, 4, steps))
  assert steps == 2 and sum(b['mask'].sum() for b in evals) == 7
  np.testing.assert_array_equal(
    np.sort(np.concatenate([b['label'][b['mask'] > 0] for b in evals])), [0, 0, 0, 1, 1, 2, 2]
  )


def test_folder_errors_are_clear(config, tmp_path):
  folder_config(config, tmp_path)
  (tmp_path / 'eval' / 'class_9').mkdir()
  (tmp_path / 'eval' / 'class_9' / 'x.jpg').write_bytes(
    (tmp_path / 'train' / 'class_0' / '0.JPEG').read_bytes()
  )
  with pytest.raises(ValueError, match='absent from config.train_dir.*class_9'):
    sources.load_dataset(config)
  (tmp_path / 'empty' / 'class_0').mkdir(parents=True)
  config.train_dir = str(tmp_path / 'empty')
  with pytest.raises(ValueError, match='no JPEG or PNG images'):
    sources.load_dataset(config)
  config.train_dir = ''
  with pytest.raises(ValueError, match='needs config.train_dir'):
    sources.load_dataset(config)


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
    ds = sources.load_dataset(config)
    assert ds.decodes and ds.info.num_classes == 1000
    assert ds.info.image_shape == (24, 24, 3) and ds.info.num_train == 37
    assert ds.train.element_spec['image'].dtype.name == 'string'  # undecoded JPEG bytes
    first = [b for _, b in zip(range(6), batching.train_batches(ds, input_options(config), 8, 4))]
    for b in first:
      assert b['image'].shape == (8, 24, 24, 3) and b['image'].dtype == np.uint8
      assert b['label'].min() >= 0 and b['label'].max() < 1000
    resumed = [
      b
      for _, b in zip(
        range(3), batching.train_batches(ds, input_options(config), 8, 4, start_step=3)
      )
    ]
    for a, b in zip(first[3:], resumed):
      np.testing.assert_array_equal(a['image'], b['image'])
      np.testing.assert_array_equal(a['label'], b['label'])
    steps = batching.num_eval_steps(ds.info, 16)
    evals = list(batching.eval_batches(ds, 16, steps))
    assert steps == 3 and sum(b['mask'].sum() for b in evals) == 37
    with pytest.raises(ValueError, match='data_on_device'):
      batching.train_arrays(ds)


def test_cifar100_through_mock_data_and_in_memory_arrays(config):
  config.dataset = 'cifar100'
  config.image_size = 32
  config.random_crop_pad = 4
  with tfds.testing.mock_data(num_examples=45):
    ds = sources.load_dataset(config)
    assert not ds.decodes and ds.info.num_classes == 100
    batch = next(batching.train_batches(ds, input_options(config), 16, 2))
    assert batch['image'].shape == (16, 32, 32, 3)
    images, labels, info = batching.load_arrays(config)
  assert images.shape == (45, 32, 32, 3) and images.dtype == np.uint8
  assert labels.shape == (45,) and labels.dtype == np.int32 and info.num_train == 45
  np.testing.assert_allclose(info.mean[0], 0.5071 * 255)


def test_digits_arrays_match_the_tf_data_source(config):
  images, labels, info = batching.load_arrays(config)
  ds = sources.load_dataset(config)
  source = next(iter(tfds.as_numpy(ds.train.batch(10_000))))
  np.testing.assert_array_equal(images, source['image'])
  np.testing.assert_array_equal(labels, source['label'])
  assert len(labels) == info.num_train


def test_folder_trains_through_main(tmp_path):
  from helpers import run_main

  photo_folder(tmp_path / 'train')
  photo_folder(tmp_path / 'eval', per_class=(3, 2, 2), seed=1, extras=False)
  workdir = tmp_path / 'run'
  args = [
    '--config=configs/default.py',
    f'--workdir={workdir}',
    '--config.dataset=folder',
    f'--config.train_dir={tmp_path / "train"}',
    f'--config.eval_dir={tmp_path / "eval"}',
    '--config.model=resnet20',  # the cheapest to compile: this test trains four times
    '--config.image_size=32',
    '--config.random_crop_pad=0',
    '--config.batch_size=8',
    '--config.eval_batch_size=4',
    '--config.log_every_steps=1',
  ]
  result = run_main([*args, '--config.num_train_steps=3'])
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'corrupt.jpg' in result.stderr
  assert (workdir / CLASS_INDEX_FILE).exists()
  import json

  with open(workdir / 'metrics.jsonl') as f:
    records = [json.loads(line) for line in f]
  assert max(r['step'] for r in records) == 3
  assert any('eval_top1' in r for r in records)

  # A class folder renamed under the run: resuming would relabel every example after it
  # (class_1 -> zebra moves classes 1 and 2 down), so it is refused and nothing rewritten.
  index_before = (workdir / CLASS_INDEX_FILE).read_text()
  for split in ('train', 'eval'):
    (tmp_path / split / 'class_1').rename(tmp_path / split / 'zebra')
  renamed = run_main([*args, '--config.num_train_steps=6'])
  lines = [line for line in renamed.stderr.splitlines() if line.startswith('error:')]
  assert renamed.returncode == 1 and len(lines) == 1, renamed.stderr[-3000:]
  assert "classes are not the checkpoint's" in lines[0]
  assert '(class_0, class_1, class_2)' in lines[0] and '(class_0, class_2, zebra)' in lines[0]
  assert (workdir / CLASS_INDEX_FILE).read_text() == index_before
  for split in ('train', 'eval'):
    (tmp_path / split / 'zebra').rename(tmp_path / split / 'class_1')

  # Eight more training images (16 -> 24: 2 -> 3 steps per epoch) under the checkpoint
  # at step 3, which is epoch 1's batch 1: one warning naming both counts, and epoch 2
  # starts at step 3 with the new size (the cut epoch counts as done), so num_epochs=3
  # ends at step 6 (not 9), and the checkpoint there is epoch 3's start (not 2's), with
  # the origin that later resumes keep (test_prepare).
  photo_folder(tmp_path / 'more', per_class=(8,), seed=3, extras=False)
  for image in (tmp_path / 'more' / 'class_0').iterdir():
    image.rename(tmp_path / 'train' / 'class_0' / f'more_{image.name}')
  grown = run_main([*args, '--config.num_epochs=3'])
  assert grown.returncode == 0, grown.stderr[-3000:]
  (warning,) = [line for line in grown.stderr.splitlines() if 'examples when' in line]
  assert 'had 16 examples when the checkpoint at step 3' in warning
  assert 'has 24 now: epoch 2 starts at that step' in warning
  with open(workdir / 'metrics.jsonl') as f:
    records = [json.loads(line) for line in f]
  assert max(r['step'] for r in records) == 6
  with open(workdir / 'checkpoints' / '6' / 'meta' / 'metadata') as f:
    meta = json.load(f)
  assert (meta['epoch'], meta['batch_in_epoch'], meta['epoch_origin']) == (3, 0, [3, 2])

  # The README's evaluation on a folder of your own, the run's images gone: the classes
  # come from the run, not a train_dir, and the folder may hold a subset of them.
  shutil.rmtree(tmp_path / 'train')
  shutil.rmtree(tmp_path / 'eval')
  mine = tmp_path / 'mine'
  photo_folder(mine, per_class=(2, 3), seed=2, extras=False)
  (mine / 'class_1').rename(mine / 'class_2')  # classes 0 and 2 of the 3
  evaluated = run_main(
    [
      f'--workdir={workdir}',
      '--mode=eval',
      '--config.dataset=folder',
      f'--config.eval_dir={mine}',
    ]
  )
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  reported = dict(zip(*[iter(evaluated.stdout.split('final ')[-1].split())] * 2))
  with open(workdir / 'metrics.jsonl') as f:  # the training history: untouched
    assert [json.loads(line) for line in f] == records
  with open(workdir / 'evals.jsonl') as f:  # eval mode's own record, naming the data
    (record,) = [json.loads(line) for line in f]
  best = [int(name) for name in os.listdir(workdir / 'checkpoints_best') if name.isdigit()]
  assert [record['step']] == best and record['data']['eval_dir'] == str(mine)
  top1 = record['eval_top1']
  assert float(reported['eval_top1']) == pytest.approx(top1, abs=1e-4)
  assert round(top1 * 5, 4) == round(top1 * 5)  # a fraction of the 5 images of `mine`
  assert {'eval_loss', 'eval_top5'} <= set(record)

  # Export needs nothing but the checkpoint: the model and its classes come from the
  # checkpoint's own config and data description.
  exported = run_main(
    [
      '--config=configs/default.py',
      f'--workdir={workdir}',
      '--mode=export',
      f'--export_path={tmp_path / "model.msgpack"}',
    ]
  )
  assert exported.returncode == 0, exported.stderr[-3000:]
  from flax import serialization

  variables = serialization.msgpack_restore((tmp_path / 'model.msgpack').read_bytes())
  assert variables['params']['head']['kernel'].shape == (64, 3)  # resnet20, 3 classes


def test_folder_symlink_loop_is_not_followed(config, tmp_path, caplog):
  """train/class_0/loop -> train once turned 16 images into hundreds, mislabelled."""
  train_n, _ = folder_config(config, tmp_path)
  os.symlink(tmp_path / 'train', tmp_path / 'train' / 'class_0' / 'loop')
  elsewhere = tmp_path / 'more'  # a directory symlink to images kept elsewhere is followed
  elsewhere.mkdir()
  shutil.copy(tmp_path / 'train' / 'class_1' / '0.JPEG', elsewhere / 'extra.jpg')
  os.symlink(elsewhere, tmp_path / 'train' / 'class_1' / 'more')
  ds = sources.load_dataset(config)
  assert ds.info.num_train == train_n + 1
  assert 'Not following' in caplog.text and 'loop' in caplog.text


def test_folder_with_one_class_is_refused(config, tmp_path):
  folder_config(config, tmp_path)
  shutil.rmtree(tmp_path / 'train' / 'class_1')
  shutil.rmtree(tmp_path / 'train' / 'class_2')
  with pytest.raises(ValueError, match='one class sub-folder .class_0.: a classifier needs'):
    sources.load_dataset(config)


def test_file_corrupted_after_the_first_run_is_named(config, tmp_path, caplog):
  """The verdicts are keyed on each file's size and modification time, not the list."""
  folder_config(config, tmp_path)
  workdir = str(tmp_path / 'work')
  assert sources.load_dataset(config, workdir).num_skipped['train'] == 1
  victim = tmp_path / 'train' / 'class_2' / '1.JPEG'
  victim.write_bytes(victim.read_bytes()[:200])  # truncated in place
  caplog.clear()
  again = sources.load_dataset(config, workdir)
  assert again.num_skipped['train'] == 2
  assert '1.JPEG' in caplog.text and 'corrupt.jpg' in caplog.text


def test_undecodable_file_is_named_without_verification(config, tmp_path, caplog):
  config.verify_images = False
  train_n, _ = folder_config(config, tmp_path)
  ds = sources.load_dataset(config)
  assert ds.info.num_train == train_n + 1  # not checked at start: corrupt.jpg is listed
  batches = [b for _, b in zip(range(3), batching.train_batches(ds, input_options(config), 8, 2))]
  assert all(b['image'].shape == (8, 32, 32, 3) for b in batches)
  assert 'Skipping' in caplog.text and 'corrupt.jpg' in caplog.text


def test_each_process_reads_a_disjoint_share_of_the_files(config, tmp_path, monkeypatch):
  """Two processes on a folder set: their shares do not overlap and together hold every
  decodable file (the share is decided before any file is read)."""
  import jax

  from jax_resnet import parallel

  folder_config(config, tmp_path)
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(folder, '_global_sum', lambda n: n)
  monkeypatch.setattr(parallel, 'processes_on_this_host', lambda: 2)  # no collective here
  shares = []
  for index in range(2):
    monkeypatch.setattr(jax, 'process_index', lambda index=index: index)
    ds = sources.load_dataset(config)
    for split in (ds.train, ds.eval):
      assert split is not None
    paths = [p.decode() for p in tfds.as_numpy(ds.train.map(lambda x: x['path']))]
    shares.append(set(paths))
  everything = {
    str(p) for p in (tmp_path / 'train').rglob('*') if p.is_file() and p.name != 'corrupt.jpg'
  }
  assert shares[0] and shares[1] and not shares[0] & shares[1]
  assert shares[0] | shares[1] == everything


def test_tiny_imagenet_layout(config, tmp_path):
  """train/<wnid>/images/*.JPEG, and val/images/ labelled by val/val_annotations.txt: each
  val image gets the class its line names, whatever the order of the lines and files."""
  from PIL import Image

  photo_folder(tmp_path / 'src', per_class=(3, 3), extras=False)
  wnids = ['n01443537', 'n01629819']
  for wnid, source in zip(wnids, ('class_0', 'class_1')):
    shutil.copytree(tmp_path / 'src' / source, tmp_path / 'train' / wnid / 'images')
  (tmp_path / 'val' / 'images').mkdir(parents=True)
  colours = ((200, 30, 30), (30, 30, 200))  # red images are the first class, blue the second
  classes = [1, 0, 0, 1, 1, 0]  # of val_0 ... val_5: not in file-name order nor grouped
  lines = []
  for i in (3, 0, 5, 1, 4, 2):  # the lines in neither file-name nor class order
    Image.new('RGB', (64, 64), colours[classes[i]]).save(
      tmp_path / 'val' / 'images' / f'val_{i}.JPEG'
    )
    lines.append(f'val_{i}.JPEG\t{wnids[classes[i]]}\t0\t0\t10\t10')
  (tmp_path / 'val' / 'val_annotations.txt').write_text('\n'.join(lines) + '\n')
  config.dataset, config.image_size, config.random_crop_pad = 'folder', 32, 0
  config.train_dir, config.eval_dir = str(tmp_path / 'train'), str(tmp_path / 'val')
  ds = sources.load_dataset(config)
  assert ds.info.class_names == tuple(wnids) and ds.info.num_train == 6 and ds.info.num_eval == 6
  evals = list(batching.eval_batches(ds, 4, batching.num_eval_steps(ds.info, 4)))
  images = np.concatenate([b['image'][b['mask'] > 0] for b in evals]).astype(np.float32)
  labels = np.concatenate([b['label'][b['mask'] > 0] for b in evals])
  red = images[..., 0].mean((1, 2)) > images[..., 2].mean((1, 2)) + 100
  blue = images[..., 2].mean((1, 2)) > images[..., 0].mean((1, 2)) + 100
  assert (red | blue).all() and red.sum() == 3
  np.testing.assert_array_equal(labels, np.where(red, 0, 1))


def test_input_threads_are_this_processs_cores_or_the_configs(config, monkeypatch):
  """tf.data's private pool: config.input_threads, or the process's cores divided by the
  processes on its host; the only process on its host keeps tf.data's shared pool. The
  train and eval pipelines both."""
  from jax_resnet import parallel

  config.input_threads = 3
  ds = sources.load_dataset(config)
  for split in (ds.train, ds.eval):
    assert split.options().threading.private_threadpool_size == 3
  config.input_threads = 0
  ds = sources.load_dataset(config)
  assert sources.default_input_threads() == 0
  assert ds.train.options().threading.private_threadpool_size is None  # tf.data's own
  monkeypatch.setattr(parallel, 'processes_on_this_host', lambda: 2)
  cores = len(os.sched_getaffinity(0))
  assert sources.default_input_threads() == max(1, cores // 2)
  ds = sources.load_dataset(config)
  assert ds.eval.options().threading.private_threadpool_size == max(1, cores // 2)


def test_a_fifo_in_a_class_folder_is_skipped_not_read(config, tmp_path, caplog):
  """A FIFO named pipe.png would block the start-up scan forever: only regular files are
  images."""
  train_n, _ = folder_config(config, tmp_path)
  os.mkfifo(tmp_path / 'train' / 'class_0' / 'pipe.png')
  ds = sources.load_dataset(config)
  assert ds.info.num_train == train_n
  assert 'pipe.png: not a regular file' in caplog.text


SLOW_VERIFICATION = """
import atexit, runpy, sys, time
from jax_resnet.training import preemption
preemption.catch_early()
from jax_resnet.data import folder
checked = []
def slow_check(path):
  checked.append(path)
  if len(checked) == 1:
    print('verifying', flush=True)
  time.sleep(0.05)
folder._check_image = slow_check
atexit.register(lambda: print(f'checked {len(checked)}', flush=True))
sys.argv = ['main.py'] + sys.argv[1:]
runpy.run_path('main.py', run_name='__main__')
"""


def test_a_stop_signal_cuts_the_image_verification_short(tmp_path):
  """SIGTERM while the start-up verification reads 903 images (each check made slow):
  the verification stops there, not at its end, and the run exits cleanly with nothing
  written."""
  import signal
  import subprocess
  import sys

  from helpers import ROOT

  for split, count in (('train', 300), ('eval', 1)):
    for c in range(3):
      (tmp_path / split / f'class_{c}').mkdir(parents=True)
      for i in range(count):
        (tmp_path / split / f'class_{c}' / f'{i}.png').write_bytes(b'not checked')
  workdir = tmp_path / 'run'
  args = [f'--workdir={workdir}', '--config.dataset=folder']
  args += [f'--config.train_dir={tmp_path}/train', f'--config.eval_dir={tmp_path}/eval']
  proc = subprocess.Popen(
    [sys.executable, '-c', SLOW_VERIFICATION, *args],
    cwd=ROOT,
    env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  assert proc.stdout.readline() == 'verifying\n'
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert 'Received SIGTERM before the first step, while starting' in err
  assert 'stopped while starting; rerun the same command to resume' in out
  checked = int(out.split('checked ')[-1])
  assert 0 < checked < 903  # cut short: the verification did not run to its end
  assert not (workdir / 'checkpoints').exists()
  assert not [name for name in os.listdir(workdir) if name.startswith('verified_')]
