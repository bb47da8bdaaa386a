"""Learning-rate schedules: their shapes at the steps the config names."""

import pytest

from jax_resnet.training import schedules
from jax_resnet.training.timeline import Timeline


def test_onecycle_start_peak_end(config):
  config.learning_rate = 0.4
  total = 1000
  fn = schedules.create_learning_rate_fn(config, Timeline(100, total))
  peak_step = int(config.onecycle_pct_start * total)
  assert float(fn(0)) == pytest.approx(0.4 / config.onecycle_div_factor)
  assert float(fn(peak_step)) == pytest.approx(0.4)
  assert float(fn(total)) == pytest.approx(
    0.4 / config.onecycle_div_factor / config.onecycle_final_div_factor, rel=1e-3
  )
  assert float(fn(peak_step // 2)) < 0.4 and float(fn(peak_step + 10)) < 0.4


def test_cosine_warmup_end_and_final(config):
  config.schedule = 'cosine'
  config.learning_rate = 0.1
  config.warmup_epochs = 2
  config.final_learning_rate_fraction = 0.01
  fn = schedules.create_learning_rate_fn(config, Timeline(50, 1000))
  assert float(fn(0)) == 0.0
  assert float(fn(50)) == pytest.approx(0.05)
  assert float(fn(100)) == pytest.approx(0.1)
  assert float(fn(1000)) == pytest.approx(0.001)


def test_multistep_decays_at_fractions(config):
  config.schedule = 'multistep'
  config.learning_rate = 0.1
  fn = schedules.create_learning_rate_fn(config, Timeline(10, 100))
  assert float(fn(49)) == pytest.approx(0.1)
  assert float(fn(51)) == pytest.approx(0.01)
  assert float(fn(80)) == pytest.approx(0.001)


def test_linear_scaling_rule(config):
  config.scale_learning_rate = True
  config.learning_rate = 0.1
  config.batch_size = 1024
  config.base_batch_size = 256
  assert schedules.peak_learning_rate(config) == pytest.approx(0.4)
