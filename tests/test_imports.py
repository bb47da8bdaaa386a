"""The import contracts at run time: the TensorFlow-free core imports where TensorFlow
cannot, and the public API is importable from the package (the contracts themselves are
checked statically by `lint-imports`, in CI)."""

import os

import tomllib
from helpers import ROOT, run_python


def _contract(contract_id: str) -> dict:
  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
    contracts = tomllib.load(f)['tool']['importlinter']['contracts']
  return next(c for c in contracts if c['id'] == contract_id)


def test_the_core_imports_with_tensorflow_unimportable():
  """Every module of the 'core-without-tensorflow' contract imports with TensorFlow, its
  data sets and TensorBoard made unimportable, as on the GPU image; the list is the
  contract's own, not a copy."""
  modules = _contract('core-without-tensorflow')['source_modules']
  assert len(modules) > 10
  code = (
    'import sys\n'
    'for name in ("tensorflow", "tensorflow_datasets", "tensorboard", "dm_pix"):\n'
    '  sys.modules[name] = None  # import raises ImportError\n'
    'import importlib, pkgutil\n'
    f'for name in {modules!r}:\n'
    '  module = importlib.import_module(name)\n'
    '  for info in pkgutil.walk_packages(getattr(module, "__path__", []), name + "."):\n'
    '    if not info.name.endswith("__main__"):\n'
    '      importlib.import_module(info.name)\n'
    'print("ok")\n'
  )
  result = run_python(code)
  assert result.returncode == 0 and result.stdout.strip() == 'ok', result.stderr[-3000:]


def test_the_contracts_name_modules_that_exist():
  """A renamed module would make a contract vacuous: each one named is importable."""
  import importlib.util

  for contract_id in ('core-without-tensorflow', 'bottom-floors', 'loop-and-cli-on-top'):
    for name in _contract(contract_id)['source_modules']:
      assert importlib.util.find_spec(name) is not None, (contract_id, name)


def test_the_public_api_is_importable_from_the_package():
  """What the README documents comes from ``jax_resnet`` itself, whatever the layout;
  importing the package alone loads none of it."""
  code = (
    'import sys, jax_resnet\n'
    'assert "jax" not in sys.modules, "import jax_resnet loaded jax"\n'
    'from jax_resnet import create_model, Predictor, read_export, export_checkpoint\n'
    'from jax_resnet import load_run, get_config, MODEL_NAMES, to_torchvision\n'
    'from jax_resnet.models import create_model as direct\n'
    'assert create_model is direct\n'
    'assert create_model("resnet20", 10).num_classes == 10\n'
    'assert set(jax_resnet.__all__) <= set(dir(jax_resnet))\n'
    'print("ok")\n'
  )
  result = run_python(code)
  assert result.returncode == 0 and result.stdout.strip() == 'ok', result.stderr[-3000:]
