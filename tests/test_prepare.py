"""Preparing a run: the data it resumes on must be the data its checkpoint was trained on."""

import pytest

from jax_resnet.data.common import DatasetInfo
from jax_resnet.errors import TrainingError
from jax_resnet.training.prepare import check_same_data, epoch_origin


def _info(classes, num_train=100):
  return DatasetInfo(len(classes), num_train, 10, (8, 8, 3), (0.0,) * 3, (1.0,) * 3, classes)


def test_other_classes_are_refused_naming_both_lists():
  with pytest.raises(TrainingError) as error:
    check_same_data(_info(('cat', 'dog', 'eel', 'fox')), _info(('dog', 'eel', 'fox', 'zebra')))
  message = str(error.value)
  assert '4 classes (cat, dog, eel, fox)' in message and '(dog, eel, fox, zebra)' in message
  with pytest.raises(TrainingError, match='3 classes'):  # one removed
    check_same_data(_info(('cat', 'dog', 'eel', 'fox')), _info(('cat', 'dog', 'eel')))


def _meta(step, epoch, batch, num_train=100, **extra):
  info = _info(('cat', 'dog'), num_train)
  return {'step': step, 'epoch': epoch, 'batch_in_epoch': batch, 'data': info.to_json(), **extra}


def test_a_changed_example_count_starts_a_new_epoch_in_one_warning(caplog):
  now = _info(('cat', 'dog'), 221)
  assert epoch_origin(_meta(30, 3, 0, num_train=221), now) == (0, 0)  # unchanged
  assert epoch_origin(_meta(30, 3, 0, 221, epoch_origin=[12, 2]), now) == (12, 2)  # kept
  assert 'examples' not in caplog.text
  # Mid-epoch (epoch 3's batch 4): the cut epoch counts as done, epoch 4 starts here.
  assert epoch_origin(_meta(34, 3, 4), now) == (34, 4)
  (line,) = [r.getMessage() for r in caplog.records]
  assert 'had 100 examples when the checkpoint at step 34' in line and 'has 221 now' in line
  assert epoch_origin(_meta(30, 3, 0), now) == (30, 3)  # at an epoch's start: that epoch
