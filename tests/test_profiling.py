"""Traces, the top-operations table, and a training run's wall time by part."""

import json

import jax
import jax.numpy as jnp
import pytest
from jax import lax

from jax_resnet.observe import profiling


def _conv_grad():
  def loss(x, w):
    y = lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return jnp.sum(jax.nn.relu(y) ** 2)

  x, w = jnp.ones((4, 6, 6, 8)), jnp.ones((3, 3, 8, 16))
  return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).compile(), (x, w)


def test_top_ops_names_shapes_of_a_traced_program(tmp_path):
  compiled, args = _conv_grad()
  jax.block_until_ready(compiled(*args))
  with profiling.trace(str(tmp_path)):
    for _ in range(3):
      jax.block_until_ready(compiled(*args))
  table = profiling.write_top_ops(str(tmp_path), [compiled.as_text()], steps=3)
  assert (tmp_path / profiling.TOP_OPS_FILE).read_text() == table + '\n'
  rows = profiling.top_ops(profiling.latest_xplane(str(tmp_path)), [compiled.as_text()])
  assert rows == sorted(rows, key=lambda r: r.total_ms, reverse=True)
  assert sum(r.share for r in rows) == pytest.approx(1.0) or len(rows) == 20
  # Forward, input-gradient and kernel-gradient convolutions, three calls each.
  convs = [r for r in rows if r.shapes.startswith('convolution')]
  assert len(convs) == 3 and all(r.count == 3 for r in convs), rows
  shapes = ' '.join(r.shapes for r in convs)
  assert 'f32[4,6,6,16]' in shapes and 'f32[3,3,8,16]' in shapes
  assert convs[0].name in table


def test_hlo_shapes_reads_operands_and_fused_convolutions():
  text = """HloModule m

%fused (p0: f32[2,4,4,3], p1: f32[3,3,3,5]) -> f32[2,4,4,5] {
  %p0 = f32[2,4,4,3]{3,2,1,0} parameter(0)
  %p1 = f32[3,3,3,5]{3,2,1,0} parameter(1)
  ROOT %convolution.1 = f32[2,4,4,5]{3,2,1,0} convolution(%p0, %p1), window={size=3x3 pad=1_1x1_1}
}

ENTRY %main (a: f32[2,4,4,3], b: f32[3,3,3,5]) -> f32[2,4,4,5] {
  %a = f32[2,4,4,3]{3,2,1,0} parameter(0)
  %b = f32[3,3,3,5]{3,2,1,0} parameter(1)
  ROOT %my_fusion = f32[2,4,4,5]{3,2,1,0} fusion(%a, %b), kind=kOutput, calls=%fused
}
"""
  shapes = profiling.hlo_shapes([text])
  assert shapes['my_fusion'] == 'convolution 3x3 f32[2,4,4,5] <- f32[2,4,4,3], f32[3,3,3,5]'
  assert shapes['a'].startswith('parameter f32[2,4,4,3]')


def test_run_clock_parts_nest_without_double_counting(monkeypatch):
  now = [100.0]
  monkeypatch.setattr(profiling.time, 'perf_counter', lambda: now[0])
  clock = profiling.RunClock(started_at=97.0)  # 3 s of start-up before training began
  with clock.part('steps'):
    now[0] += 1
    with clock.part('compile'):
      now[0] += 5
    now[0] += 2
  now[0] += 0.5  # outside any part
  with clock.part('eval'):
    now[0] += 4
  summary = clock.summary()
  assert summary['startup_s'] == 3 and summary['steps_s'] == 3 and summary['compile_s'] == 5
  assert summary['eval_s'] == 4 and summary['wall_s'] == 15.5
  assert summary['unaccounted_s'] == pytest.approx(0.5)


def test_training_profiles_steps_and_writes_its_wall_time_by_part(config, tmp_path):
  from jax_resnet.training import loop

  config.num_train_steps, config.log_every_steps = 8, 4
  config.profile_first_step, config.profile_steps = 2, 3
  config.steps_per_dispatch = 2  # dispatches of 2: the trace covers steps 3-6
  workdir = tmp_path / 'run'
  loop.train_and_evaluate(config, str(workdir))

  profile = workdir / 'profile'
  assert list(profile.glob('plugins/profile/*/*.xplane.pb'))
  table = (profile / profiling.TOP_OPS_FILE).read_text()
  # The step's convolutions rank among its top ops, as XLA convolutions or as the matrix
  # products models/cpu_conv.py writes some of them as (which of the two comes first varies
  # from run to run on a loaded CPU).
  assert 'convolution' in table or '[dot ' in table, table

  timing = json.loads((workdir / loop.TIMING_FILE).read_text())
  parts = [f'{p}_s' for p in profiling.RunClock.PARTS]
  assert set(timing) == {'wall_s', 'unaccounted_s', 'start_step', *parts}
  assert all(timing[p] >= 0 for p in parts)
  for busy in ('setup_s', 'compile_s', 'steps_s', 'eval_s', 'checkpoint_s'):
    assert timing[busy] > 0, busy
  assert sum(timing[p] for p in parts) == pytest.approx(timing['wall_s'], rel=0.05)


def test_step_profiler_traces_from_first_step_for_num_steps(monkeypatch, tmp_path):
  calls = []
  monkeypatch.setattr(jax.profiler, 'start_trace', lambda *a, **k: calls.append('start'))
  monkeypatch.setattr(jax.profiler, 'stop_trace', lambda: calls.append('stop'))
  monkeypatch.setattr(profiling, 'write_top_ops', lambda *a, **k: calls.append(a[2]) or '')
  profiler = profiling.StepProfiler(str(tmp_path), first_step=3, num_steps=2)
  for step in range(8):  # one step per dispatch: `step` done before it, step + 1 after
    profiler.before(step, None)
    calls.append(step + 1)
    profiler.after(step + 1, None)
  # Steps 3 and 4 (counted from 1) inside the trace, the table over 2 steps, once.
  assert calls == [1, 2, 'start', 3, 4, 'stop', 2, 5, 6, 7, 8]
