"""Paths, shapes and differences of nested trees: Flax variables, state dicts and a
checkpoint's saved tree, on ``flax.traverse_util``.

One place for what checkpoints, warm starts, exports and the torchvision layout all do:
flatten a tree to 'params/stage1_block1/Conv_0/kernel' paths, compare two trees' shapes,
and list how they differ in one format.
"""

from collections.abc import Mapping
from typing import Any

from flax import traverse_util

SEPARATOR = '/'
WEIGHT_COLLECTIONS = ('params', 'batch_stats')  # what a model's weights are; not 'intermediates'


def flatten(tree, sep: str = SEPARATOR) -> dict[str, Any]:
  """{'opt_state/0/trace/head/bias': leaf, ...}: a nested tree of dicts, lists and tuples
  (items keyed by their index) as one level; empty dicts and lists leave nothing."""
  return traverse_util.flatten_dict(_as_dicts(tree), sep=sep)


def unflatten(flat: Mapping[str, Any], sep: str = SEPARATOR) -> dict:
  """The nested dicts ``flatten`` came from (lists come back as index-keyed dicts)."""
  return traverse_util.unflatten_dict(dict(flat), sep=sep)


def _as_dicts(tree):
  if isinstance(tree, Mapping):
    return {str(key): _as_dicts(value) for key, value in tree.items()}
  if isinstance(tree, (list, tuple)):
    return {str(i): _as_dicts(value) for i, value in enumerate(tree)}
  return tree


def shapes(tree) -> dict[str, tuple[int, ...]]:
  """{path: shape} of the array leaves of a nested tree."""
  return {
    path: tuple(leaf.shape)
    for path, leaf in flatten(tree).items()
    if getattr(leaf, 'shape', None) is not None
  }


def weights_only(variables: Mapping) -> dict:
  """The weight collections of Flax variables (params, BatchNorm statistics)."""
  return {name: variables[name] for name in WEIGHT_COLLECTIONS if name in variables}


def differences(expected: Mapping[str, tuple], found: Mapping[str, tuple]) -> list[str]:
  """How ``found``'s keys and shapes differ from ``expected``'s: 'key: expected S, found S2'
  (or 'found nothing') in ``expected``'s order, then 'key: unexpected, shape S' for keys
  only ``found`` has. Empty when they agree."""
  lines = [
    f'{key}: expected {tuple(shape)}, found '
    + (str(tuple(found[key])) if key in found else 'nothing')
    for key, shape in expected.items()
    if key not in found or tuple(found[key]) != tuple(shape)
  ]
  return lines + [
    f'{key}: unexpected, shape {tuple(shape)}'
    for key, shape in found.items()
    if key not in expected
  ]
