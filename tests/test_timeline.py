"""Timeline: every duration in steps, and the one helper for periodic decisions."""

import pytest

from jax_resnet.errors import ConfigError
from jax_resnet.training.timeline import Every, Timeline


def test_from_config_epochs_or_steps(config):
  config.batch_size, config.num_epochs = 32, 3
  timeline = Timeline.from_config(config, num_train=100)
  assert timeline == Timeline(steps_per_epoch=3, total_steps=9)  # the ragged tail is dropped
  config.num_train_steps = 7
  assert Timeline.from_config(config, 100).total_steps == 7
  config.batch_size = 128
  with pytest.raises(ConfigError, match='batch_size=128 is larger than the 100 training'):
    Timeline.from_config(config, 100)


def test_conversions():
  timeline = Timeline(steps_per_epoch=10, total_steps=50)
  assert timeline.steps(2.5) == 25 and timeline.steps(0.04) == 0
  assert timeline.fraction(0.5) == 25 and timeline.fraction(0.75) == 37
  assert timeline.epoch_and_batch(23) == (2, 3)


def test_epochs_count_from_the_origin(config):
  """A run resumed at step 34 (as epoch 4) after its set grew to 7 steps per epoch."""
  config.batch_size, config.num_epochs = 32, 6
  timeline = Timeline.from_config(config, num_train=7 * 32, epoch_origin=(34, 4))
  assert timeline.total_steps == 34 + 2 * 7 and timeline.num_epochs == 6
  assert timeline.epoch_and_batch(34) == (4, 0) and timeline.epoch_and_batch(43) == (5, 2)
  each_epoch = timeline.every(epochs=1)
  assert [s for s in range(34, 49) if each_epoch(s)] == [34, 41, 48]
  assert each_epoch.steps_to_next(36) == [5]
  config.num_epochs = 4  # already reached: nothing left to train
  assert Timeline.from_config(config, 7 * 32, (34, 4)).total_steps == 34


def test_every_steps_or_epochs():
  timeline = Timeline(steps_per_epoch=10, total_steps=50)
  assert timeline.every() == Every(()) and not any(Every(())(s) for s in range(1, 51))
  both = timeline.every(steps=4, epochs=1)
  assert both.periods == (4, 10)
  assert [s for s in range(1, 25) if both(s)] == [4, 8, 10, 12, 16, 20, 24]
  assert timeline.every(epochs=0.5).periods == (5,)
  assert timeline.every(epochs=0.01).periods == (1,)  # never shorter than one step
  assert timeline.every(steps=0, epochs=0).periods == ()
