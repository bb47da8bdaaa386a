"""The throughput harness runs and reports every field; multi-step dispatch is exact.

No timing is asserted: only that the numbers exist and have the right types.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import ROOT, train_setup

TINY = [
  '--config.image_size=8',
  '--config.batch_size=8',
  '--warmup=2',
  '--steps=3',
  '--num_batches=2',
]


def _check_fields(result):
  from jax_resnet.benchmark import synthetic

  for field, kind in synthetic.FIELDS.items():
    assert field in result, field
    assert isinstance(result[field], kind), (field, result[field])
  assert result['global_batch'] == 8 and result['image_size'] == 8
  assert result['model'] == 'resnet20'
  assert result['step_s_median'] > 0 and result['step_s_p90'] >= result['step_s_median']
  assert result['images_per_s'] > 0 and result['compile_s'] > 0
  assert result['dataset'] == 'cifar10'
  assert result['epoch_s'] == pytest.approx(50_000 / result['images_per_s'])
  assert result['temp_memory_bytes'] is None or result['temp_memory_bytes'] > 0
  assert result['flops_per_image'] and result['flops_per_image'] > 0
  if result['platform'] == 'cpu':
    assert result['peak_bf16_tflops_per_device'] is None and result['mfu'] is None
  assert np.isfinite(result['train_loss'])


# Runs the benchmark's CLI with TensorFlow, its datasets, TensorBoard and dm-pix made
# unimportable, as on the GPU image, which lacks them: synthetic mode must need none.
WITHOUT_TENSORFLOW = """
import runpy, sys
class NoTensorFlow:
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in ('tensorflow', 'tensorflow_datasets', 'tensorboard', 'dm_pix'):
      raise ImportError(f'{name} is not installed here (blocked by the test)')
sys.meta_path.insert(0, NoTensorFlow())
runpy.run_module('jax_resnet.benchmark', run_name='__main__')
"""


def test_cli_json_and_compare_without_tensorflow(tmp_path):
  """One process, two configs: JSON on stdout and in --json_out, a ratio printed."""
  out = tmp_path / 'bench.json'
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
  proc = subprocess.run(
    [
      sys.executable,
      '-c',
      WITHOUT_TENSORFLOW,
      '--config=configs/resnet20_cifar10.py',
      *TINY,
      '--config.half_precision=true',
      '--compare=configs/resnet20_cifar10.py',
      '--compare.image_size=8',
      '--compare.batch_size=8',
      '--compare.steps_per_dispatch=2',
      '--compare.cutout_size=4',
      '--compare.remat=true',
      f'--json_out={out}',
      f'--profile={tmp_path / "profile"}',
      '--profile_steps=2',
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'ratio' in proc.stderr
  printed = json.loads(proc.stdout.strip().splitlines()[-1])
  assert printed == json.loads(out.read_text())
  assert set(printed) >= {'config', 'compare', 'ratio'}
  assert isinstance(printed['ratio'], float) and printed['ratio'] > 0
  _check_fields(printed['config'])
  _check_fields(printed['compare'])
  assert printed['config']['dtype'] == 'bfloat16'
  assert printed['compare']['dtype'] == 'float32'
  assert printed['compare']['steps_per_dispatch'] == 2
  assert printed['compare']['timed_steps'] % 2 == 0
  assert printed['compare']['overrides']['steps_per_dispatch'] == '2'
  assert printed['compare']['remat'] and not printed['config']['remat']
  # --profile: a trace for each config, and its top operations (with shapes) in the JSON,
  # on stderr and in top_ops.txt.
  for result, where in ((printed['config'], ''), (printed['compare'], 'compare')):
    logdir = tmp_path / 'profile' / where
    assert result['profile_dir'] == str(logdir).rstrip('/')
    assert list(logdir.glob('plugins/profile/*/*.xplane.pb'))
    ops = result['top_ops']
    assert ops and all(op['ms_per_step'] > 0 and 0 < op['share'] <= 1 for op in ops)
    assert any(op['shapes'].startswith('convolution') for op in ops), ops
    assert ops[0]['op'] in (logdir / 'top_ops.txt').read_text()
  assert 'Top operations over 2 step(s)' in proc.stderr
  # MFU counts model FLOPs: remat's recomputed forward (+17% here) is left out.
  flops = printed['config']['flops_per_image'], printed['compare']['flops_per_image']
  assert abs(flops[1] / flops[0] - 1) < 0.05, flops


@pytest.mark.parametrize('data_on_device', [False, True])
def test_pipeline_mode_times_input_step_and_loop(config, data_on_device):
  """--mode=pipeline on the real (digits) source: every field, and a named bottleneck."""
  from jax_resnet import benchmark
  from jax_resnet.benchmark import synthetic

  config.data_on_device = data_on_device
  result = benchmark.measure(config, mode='pipeline', steps=2, warmup=1, num_batches=2)
  for field, kind in synthetic.FIELDS.items():
    if field != 'mode':
      assert isinstance(result[field], kind), (field, result[field])
  assert result['mode'] == 'pipeline' and result['dataset'] == 'digits'
  assert result['input_cores'] >= 1
  assert result['input_images_per_s_per_core'] == pytest.approx(
    result['input_images_per_s'] / result['input_cores']
  )
  assert result['input_source'] == ('device_data' if data_on_device else 'tf.data')
  for rate in ('input_images_per_s', 'step_images_per_s', 'loop_images_per_s'):
    assert result[rate] > 0, rate
  assert result['images_per_s'] == result['loop_images_per_s']
  slower = min(('input', 'step'), key=lambda k: result[f'{k}_images_per_s'])
  assert result['bottleneck'] == slower
  assert result['image_size'] == 8 and result['global_batch'] == 32


def test_peak_table():
  from jax_resnet.benchmark import synthetic

  assert synthetic.peak_bf16_tflops('NVIDIA H100 80GB HBM3') == 989.0
  assert synthetic.peak_bf16_tflops('NVIDIA H100 PCIe') == 756.0
  assert synthetic.peak_bf16_tflops('NVIDIA H200') == 989.0
  assert synthetic.peak_bf16_tflops('NVIDIA A100-SXM4-80GB') == 312.0
  assert synthetic.peak_bf16_tflops('cpu') is None


@pytest.mark.parametrize('unroll', [None, False])
def test_multi_step_equals_single_steps(config, unroll):
  """k steps in one lax.scan dispatch == k single steps: same params, same metrics.

  Both forms: the platform's default (unrolled on CPU) and the rolled loop (GPU, TPU).
  """
  import jax

  from jax_resnet.benchmark import synthetic
  from jax_resnet.data.common import imagenet_stats
  from jax_resnet.training.step_functions import make_train_step

  config.image_size, config.batch_size, config.cutout_size = 8, 8, 3
  config.dropout_rate = 0.1  # per-step keys must match too
  mean, std = imagenet_stats(3)
  built = train_setup(config, mean=mean, std=std)
  mesh, lr = built.mesh, built.learning_rate_fn
  batches = synthetic._synthetic_batches(mesh, 3, 8, (8, 8, 3), 10)
  train_fn = built.train_fn
  multi_fn = make_train_step(built.options, lr, mesh, steps_per_dispatch=3, unroll=unroll)

  single = built.state
  totals = None
  for batch in batches:
    single, metrics = train_fn(single, batch)
    totals = metrics if totals is None else totals.merge(metrics)
  multi = train_setup(config, mean=mean, std=std).state
  # One while loop more than a single step has (its RNG's own) iff the scan is rolled;
  # CPU's default unrolls it (XLA:CPU runs the rolled loop body tens of times slower).
  whiles = lambda fn, *args: fn.lower(*args).as_text().count('stablehlo.while')
  extra_loops = whiles(multi_fn, multi, batches) - whiles(train_fn, multi, batches[0])
  assert extra_loops == (1 if unroll is False else 0)
  multi, multi_metrics = multi_fn(multi, batches)

  assert int(multi.step) == int(single.step) == 3
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
    (single.params, single.batch_stats),
    (multi.params, multi.batch_stats),
  )
  expected, got = totals.compute(), multi_metrics.compute()
  for name in expected:
    np.testing.assert_allclose(got[name], expected[name], rtol=1e-4, atol=1e-6)


def _gpu_sh(tmp_path, python: str, stage: str = 'quick'):
  env = dict(os.environ, OUT=str(tmp_path / 'out'), PYTHON=python, SMOKE='1')
  return subprocess.run(
    ['bash', os.path.join(ROOT, 'benchmarks', 'gpu.sh'), stage],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_gpu_script_fails_loudly(tmp_path):
  """benchmarks/gpu.sh stops before any run when the benchmark cannot be imported, and
  exits non-zero, counting them, when runs fail (here every run's process fails)."""
  unimportable = _gpu_sh(tmp_path, 'false')
  assert unimportable.returncode == 1
  assert 'the benchmark cannot be imported' in unimportable.stderr
  assert '== ' not in unimportable.stderr  # no run was started
  failing_runs = tmp_path / 'python'
  failing_runs.write_text(  # imports fine, every benchmark run fails
    f'#!/bin/sh\nif [ "$1" = "-m" ]; then exit 3; fi\nexec {sys.executable} "$@"\n'
  )
  failing_runs.chmod(0o755)
  result = _gpu_sh(tmp_path, str(failing_runs))
  assert result.returncode == 1
  assert result.stderr.count('FAILED') == 2 and '2 run(s) failed' in result.stderr
