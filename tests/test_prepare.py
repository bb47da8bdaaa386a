"""Preparing a run: the data it resumes on must be the data its checkpoint was trained on."""

import pytest

from jax_resnet.data.common import DatasetInfo
from jax_resnet.errors import TrainingError
from jax_resnet.training.prepare import check_same_data


def _info(classes, num_train=100):
  return DatasetInfo(len(classes), num_train, 10, (8, 8, 3), (0.0,) * 3, (1.0,) * 3, classes)


def test_other_classes_are_refused_naming_both_lists():
  with pytest.raises(TrainingError) as error:
    check_same_data(_info(('cat', 'dog', 'eel', 'fox')), _info(('dog', 'eel', 'fox', 'zebra')))
  message = str(error.value)
  assert '4 classes (cat, dog, eel, fox)' in message and '(dog, eel, fox, zebra)' in message
  with pytest.raises(TrainingError, match='3 classes'):  # one removed
    check_same_data(_info(('cat', 'dog', 'eel', 'fox')), _info(('cat', 'dog', 'eel')))


def test_a_changed_example_count_is_one_warning(caplog):
  check_same_data(_info(('cat', 'dog')), _info(('cat', 'dog')))
  assert 'examples' not in caplog.text
  check_same_data(_info(('cat', 'dog'), 100), _info(('cat', 'dog'), 221))
  (line,) = [r.getMessage() for r in caplog.records]
  assert 'had 100 examples' in line and 'has 221 now' in line
