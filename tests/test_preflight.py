"""--mode=check: every shipped config lowers for 8 GPUs and TPUs; a config that cannot run
is one failing line and exit 1; the checks it makes can fail; its memory estimate is
near what XLA plans."""

import glob
import json
import os
import subprocess
import sys

import pytest
from helpers import ROOT, run_main

EIGHT_DEVICES = {'XLA_FLAGS': '--xla_force_host_platform_device_count=8', 'JAX_PLATFORMS': 'cpu'}
CONFIGS = sorted(
  os.path.basename(p)[:-3]
  for p in glob.glob(os.path.join(ROOT, 'configs', '*.py'))
  if not p.endswith('__init__.py')
)
# Every shipped config, in two processes (the test machine has two cores), each forcing
# eight CPU devices to stand in for the GPUs and TPUs.
SCRIPT = """
import importlib, json, sys
from jax_resnet.training import preflight
for name in sys.argv[1:]:
  config = importlib.import_module(f'configs.{name}').get_config()
  findings = preflight.check(config, 8, ('cuda', 'tpu'))
  print(json.dumps({'name': name, 'findings': [[f.ok, f.text] for f in findings]}), flush=True)
"""


@pytest.fixture(scope='module')
def every_config():
  env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL='2', **EIGHT_DEVICES)
  shards = [CONFIGS[i::2] for i in range(2)]
  procs = [
    subprocess.Popen(
      [sys.executable, '-c', SCRIPT, *shard],
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for shard in shards
  ]
  results = {}
  for proc in procs:
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    for line in out.splitlines():
      if line.startswith('{'):
        record = json.loads(line)
        results[record['name']] = record['findings']
  return results


@pytest.mark.parametrize('name', CONFIGS)
def test_every_config_passes_the_preflight_for_eight_gpus_and_tpus(every_config, name):
  findings = every_config[name]
  failed = [text for ok, text in findings if not ok]
  assert not failed, failed
  texts = ' | '.join(text for _, text in findings)
  for platform in ('cuda', 'tpu'):
    assert f'{platform}: train step' in texts and f'{platform}: eval step' in texts
  assert 'memory per device' in texts


def test_a_config_that_cannot_run_is_one_failing_line_and_exit_1(tmp_path):
  result = run_main(
    ['--mode=check', '--check_devices=8', '--config.batch_size=30'],
    env=EIGHT_DEVICES,
    cwd=str(tmp_path),
  )
  assert result.returncode == 1
  failing = [line for line in result.stdout.splitlines() if line.startswith('FAIL')]
  assert len(failing) == 1
  assert 'config.batch_size=30 must be a positive multiple of the device count 8' in failing[0]


def test_the_default_config_passes_from_any_directory(tmp_path):
  result = run_main(
    ['--mode=check', '--check_devices=2', '--check_platforms=cpu,cuda'],
    env={'XLA_FLAGS': None},
    cwd=str(tmp_path),
  )
  assert result.returncode == 0, result.stdout + result.stderr[-3000:]
  lines = result.stdout.splitlines()
  assert all(line.startswith('ok') for line in lines if line[:4] in ('ok  ', 'FAIL'))
  assert any(line.startswith('ok   cpu: train step') for line in lines)
  assert any(line.startswith('ok   cuda: eval step') for line in lines)


def test_the_lowering_checks_can_fail(config):
  """A CPU program of a model with routed convolutions carries the CPU-only routes (the
  finding a GPU or TPU program must not have), and a bf16 config's GPU convolutions are
  bf16 where an fp32 one's are fp32."""
  from jax_resnet.models import cpu_conv
  from jax_resnet.training import preflight

  config.model, config.image_size = 'resnet18', 32  # 1x1 shortcuts and 2x2 maps: routed
  programs = preflight._Programs(config, preflight.data_shape(config), _mesh())
  cpu_text = _lowered_text(programs, 'cpu')
  assert cpu_conv.CPU_ONLY_SCOPE in cpu_text
  assert cpu_conv.CPU_ONLY_SCOPE not in _lowered_text(programs, 'cuda')
  assert all(f.ok and 'all f32' in f.text for f in programs.lowered_findings(('cuda',)))
  config.half_precision = True
  half = preflight._Programs(config, preflight.data_shape(config), _mesh())
  assert all(f.ok and 'all bf16' in f.text for f in half.lowered_findings(('cuda',)))


def _mesh():
  from jax_resnet import parallel

  return parallel.create_mesh()


def _lowered_text(programs, platform) -> str:
  from jax_resnet.training.step_functions import make_train_step

  fn = make_train_step(programs.options_at(0), programs.learning_rate_fn, programs.mesh)
  args = (programs.state, programs._batch(programs.image_shape))
  return fn.trace(*args).lower(lowering_platforms=(platform,)).as_text(debug_info=True)


def test_the_activation_estimate_is_near_what_xla_plans(config):
  """The preflight's activation estimate for ResNet-20 at 64 images against XLA:CPU's
  planned scratch memory for the compiled train step (no allocator reports a peak on the
  CPU): within a factor of two."""
  from helpers import train_setup

  from jax_resnet.training import preflight

  config.image_size, config.batch_size = 32, 64
  built = train_setup(config)
  estimate = preflight.activation_bytes(built.model, (32, 32, 3), 64)
  batch = {
    'image': jax_shape((64, 32, 32, 3), 'uint8'),
    'label': jax_shape((64,), 'int32'),
  }
  compiled = built.train_fn.lower(built.state, batch).compile()
  planned = compiled.memory_analysis().temp_size_in_bytes
  assert 0.5 < estimate / planned < 2.0, (estimate, planned)


def jax_shape(shape, dtype):
  import jax

  return jax.ShapeDtypeStruct(shape, dtype)
