"""Checkpoints: an incompatible checkpoint is refused and left alone; only a damaged one
is set aside, renamed and never deleted."""

import os

import jax
import numpy as np
import pytest
from helpers import train_setup

from jax_resnet.runs.checkpointing import Checkpoints, IncompatibleCheckpointError, failure_reason


def _state(config, model_name):
  config.model = model_name
  return train_setup(config, image_shape=(8, 8, 1)).state


@pytest.fixture(scope='module')
def states():
  from configs import default

  config = default.get_config()
  config.image_size = 8
  return _state(config, 'resnet20'), _state(config.copy_and_resolve_references(), 'resnet32')


def _saved(tmp_path, state, step=5):
  checkpoints = Checkpoints(str(tmp_path))
  checkpoints.save(step, state, {'step': step})
  checkpoints.wait()
  return checkpoints


def _listing(path):
  return sorted(
    os.path.relpath(os.path.join(root, f), path) for root, _, files in os.walk(path) for f in files
  )


def test_restore_round_trip(tmp_path, states):
  checkpoints = _saved(tmp_path, states[0])
  restored, meta = checkpoints.restore('latest', lambda meta: states[0])
  assert meta == {'step': 5}
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(states[0])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_best_is_the_highest_eval_top1_not_the_newest(tmp_path, states):
  """checkpoints_best/ keeps the step with the highest eval top-1, also when newer ones
  score lower, and also across a restart (a resumed run's manager reads the saved
  scores), and restore('best') returns that step."""
  checkpoints = Checkpoints(str(tmp_path))
  for step, top1 in ((3, 0.5), (5, 0.9), (8, 0.7)):
    checkpoints.save_best(step, states[0], {'step': step}, top1)
  checkpoints.wait()
  checkpoints.close()
  resumed = Checkpoints(str(tmp_path))
  resumed.save_best(9, states[0], {'step': 9}, 0.8)
  resumed.wait()
  assert resumed.best_step() == 5
  assert os.listdir(tmp_path / 'checkpoints_best') == ['5']
  resumed.close()
  reader = Checkpoints(str(tmp_path), read_only=True)
  assert reader.restore('best', lambda meta: states[0])[1] == {'step': 5}
  reader.close()


def test_incompatible_checkpoint_is_reported_and_left_as_it_is(tmp_path, states):
  checkpoints = _saved(tmp_path, states[0])
  before = _listing(tmp_path)
  with pytest.raises(IncompatibleCheckpointError) as error:
    checkpoints.restore('latest', lambda meta: states[1])  # resnet32 into resnet20's
  message = str(error.value)
  assert 'does not fit the model' in message and 'It is intact and left as it is' in message
  assert 'stage1_block4' in message and 'found nothing' in message
  assert _listing(tmp_path) == before  # nothing renamed or deleted
  checkpoints.close()


def test_damaged_checkpoint_is_renamed_not_deleted_and_readers_only_skip(tmp_path, states):
  checkpoints = _saved(tmp_path, states[0])
  checkpoints.close()
  state_dir = tmp_path / 'checkpoints' / '5' / 'state'
  files = [os.path.join(root, f) for root, _, names in os.walk(state_dir) for f in names]
  for path in files:
    if '/d/' in path:  # the array data, not the tree's metadata
      os.truncate(path, os.path.getsize(path) // 3)
  before = _listing(tmp_path / 'checkpoints' / '5')

  reader = Checkpoints(str(tmp_path), read_only=True)
  assert reader.restore('latest', lambda meta: states[0]) == (None, None)
  assert (tmp_path / 'checkpoints' / '5').is_dir()  # a reader renames nothing
  reader.close()

  writer = Checkpoints(str(tmp_path))
  assert writer.restore('latest', lambda meta: states[0]) == (None, None)
  assert not (tmp_path / 'checkpoints' / '5').exists()
  assert _listing(tmp_path / 'checkpoints' / '5.corrupt-0') == before  # every file kept
  assert writer.set_aside() == [str(tmp_path / 'checkpoints' / '5.corrupt-0')]
  writer.close()


def test_failure_reason_names_the_os_error_in_a_few_words():
  orbax_like = ValueError(
    'RESOURCE_EXHAUSTED: Error writing "x/0" in OCDBT database at local file "/a/very/long/'
    'path": Failed to write 566124 bytes to file 5: No space left on device '
    "[os_error_code='28']"
  )
  assert failure_reason(orbax_like) == 'No space left on device'
  wrapped = RuntimeError('save failed')
  wrapped.__cause__ = PermissionError(13, 'Permission denied', '/ro/checkpoints/3')
  assert failure_reason(wrapped) == 'Permission denied: /ro/checkpoints/3'
  assert failure_reason(KeyError('odd')) == "KeyError: 'odd'"


def test_a_checkpoint_from_before_a_state_field_existed_restores(tmp_path, states):
  """A state saved without a field added since (the weight EMA, left None when unused)
  restores into today's state: the saved tree's own layout is the restore target."""
  import flax

  state = states[0]
  assert state.ema is None
  older = {k: v for k, v in flax.serialization.to_state_dict(state).items() if k != 'ema'}
  checkpoints = _saved(tmp_path, older)
  restored, _ = checkpoints.restore('latest', lambda meta: state)
  assert type(restored) is type(state) and restored.ema is None
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  checkpoints.close()


# A run written by the code of 2026-12-04 (commit 1d012be, before the package moved into
# subpackages): ResNet-20 on digits 0-3, 4 steps, weight EMA, progressive resizing.
BEFORE_LAYOUT = os.path.join(os.path.dirname(__file__), 'fixtures', 'run_before_layout')
BEFORE_LAYOUT_FLAGS = [
  '--config.num_train_steps=6',
  '--config.batch_size=32',
  '--config.ema_decay=0.9',
  '--config.progressive_resizing_sizes=(8,16)',
  '--config.progressive_resizing_epochs=(0,1)',
  '--config.progressive_resizing_multiple=8',
  '--config.keep_checkpoints=1',
  '--config.digits_classes=0123',
]


def _before_layout_copy(tmp_path) -> str:
  import shutil

  workdir = str(tmp_path / 'run')
  shutil.copytree(BEFORE_LAYOUT, workdir)
  return workdir


def _recorded_eval(workdir) -> dict:
  import json

  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [r for r in map(json.loads, f) if 'eval_top1' in r][-1]


def test_a_checkpoint_from_before_the_layout_change_evaluates_as_it_did(tmp_path):
  """Today's code restores the old checkpoint into the state it builds, raw and EMA
  weights alike: both evaluate to what the run recorded when it wrote them."""
  from jax_resnet.training import evaluation

  workdir = _before_layout_copy(tmp_path)
  recorded = _recorded_eval(workdir)
  for weights, suffix in (('raw', ''), ('ema', '_ema')):
    metrics = evaluation.evaluate_checkpoint(workdir, 'latest', weights=weights)
    assert metrics['step'] == 4
    for name in ('eval_loss', 'eval_top1', 'eval_top5'):
      assert metrics[name] == pytest.approx(recorded[name + suffix], abs=1e-5), (weights, name)


def test_a_checkpoint_from_before_the_layout_change_resumes(tmp_path):
  """Training resumes from the old checkpoint at its step (its config, saved with the
  field names of the time, is compatible with today's) and runs to the new end; its lost
  metrics.jsonl is one warning."""
  import json

  from helpers import run_main

  workdir = _before_layout_copy(tmp_path)
  os.remove(os.path.join(workdir, 'metrics.jsonl'))  # a lost history: said in one warning
  result = run_main(['--config=configs/default.py', f'--workdir={workdir}', *BEFORE_LAYOUT_FLAGS])
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'at step 4 (epoch 0, batch 4)' in result.stderr
  assert 'metrics.jsonl is missing although the run resumes at step 4' in result.stderr
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    steps_written = [json.loads(line)['step'] for line in f]
  assert steps_written[-1] == 6
