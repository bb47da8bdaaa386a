"""jax_resnet: a high-throughput ResNet trainer in JAX/Flax.

The public Python API, importable from here whatever the module layout (``from
jax_resnet import create_model, Predictor``). Each name is imported on first use, so
``import jax_resnet`` stays instant and brings no TensorFlow.
"""

import importlib

# name -> (module, attribute)
_PUBLIC = {
  'create_model': ('jax_resnet.models', 'create_model'),
  'MODEL_NAMES': ('jax_resnet.models', 'MODEL_NAMES'),
  'get_config': ('jax_resnet.configuration.defaults', 'get_config'),
  'train_and_evaluate': ('jax_resnet.training.loop', 'train_and_evaluate'),
  'evaluate_checkpoint': ('jax_resnet.training.evaluation', 'evaluate_checkpoint'),
  'load_run': ('jax_resnet.runs.saved_run', 'load_run'),
  'export_checkpoint': ('jax_resnet.inference.export', 'export_checkpoint'),
  'read_export': ('jax_resnet.inference.export', 'read_export'),
  'Predictor': ('jax_resnet.inference.predict', 'Predictor'),
  'predict_files': ('jax_resnet.inference.predict', 'predict_files'),
  'to_torchvision': ('jax_resnet.models.torchvision_layout', 'to_torchvision'),
  'from_torchvision': ('jax_resnet.models.torchvision_layout', 'from_torchvision'),
  'UserError': ('jax_resnet.errors', 'UserError'),
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
  if name not in _PUBLIC:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  module, attribute = _PUBLIC[name]
  value = getattr(importlib.import_module(module), attribute)
  globals()[name] = value  # once: later lookups do not come here
  return value


def __dir__():
  return sorted(list(globals()) + __all__)
