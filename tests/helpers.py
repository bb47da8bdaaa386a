"""Helpers the tests share (fixtures are in conftest.py): running the command line,
building a train state and its jitted steps as the trainer does, and image folders."""

import functools
import os
import subprocess
import sys
import types

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEAN, STD = (127.0,) * 3, (64.0,) * 3  # the normalisation the step tests use


def run_main(args, env=None, timeout=600, cwd=ROOT, command=None):
  """Runs main.py (or ``command``, a list) in a subprocess; returns the CompletedProcess.

  ``env`` adds variables; a None value removes one.
  """
  full_env = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
  full_env.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  command = command or [sys.executable, os.path.join(ROOT, 'main.py')]
  return subprocess.run(
    [*command, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
  )


def run_python(script: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
  """``script`` in a fresh Python process at the repository root, with ``args``."""
  return run_main(list(args), command=[sys.executable, '-c', script], **kwargs)


def train_setup(
  config,
  num_classes: int = 10,
  image_shape=None,
  mesh=None,
  timeline=None,
  steps_per_dispatch: int = 1,
  teacher=None,
  train_image_size: int = 0,
  mean=MEAN,
  std=STD,
  bn_devices: int = 0,
):
  """The state and jitted steps of ``config`` as the trainer builds them (``bn_devices``:
  the devices per-device BatchNorm groups by, when not the mesh's): a namespace of
  ``state``, ``train_fn``, ``eval_fn``, ``learning_rate_fn``, ``options``, ``model``,
  ``mesh`` (a 10-step-epoch, 100-step timeline unless given)."""
  from jax_resnet import parallel
  from jax_resnet.training import build
  from jax_resnet.training.step_functions import make_eval_step, make_train_step
  from jax_resnet.training.timeline import Timeline

  mesh = mesh or parallel.create_mesh()
  image_shape = tuple(image_shape or (config.image_size, config.image_size, 3))
  timeline = timeline or Timeline(10, 100)
  model = build.model_from_config(config, num_classes, bn_devices or mesh.devices.size)
  state, learning_rate_fn = build.train_state_from_config(
    config, model, image_shape, timeline, mesh
  )
  options = build.step_options(config, num_classes, mean, std, train_image_size)
  train_fn = make_train_step(
    options, learning_rate_fn, mesh, steps_per_dispatch=steps_per_dispatch, teacher=teacher
  )
  return types.SimpleNamespace(
    state=state,
    train_fn=train_fn,
    eval_fn=make_eval_step(options, mesh),
    learning_rate_fn=learning_rate_fn,
    options=options,
    model=model,
    mesh=mesh,
  )


def fixed_batch(n=32, size=8, num_classes=10):
  """A seeded batch of random uint8 images and int32 labels, as a host batch."""
  rng = np.random.RandomState(0)
  return {
    'image': rng.randint(0, 256, (n, size, size, 3)).astype(np.uint8),
    'label': rng.randint(0, num_classes, (n,)).astype(np.int32),
  }


def digits_config(image_size: int = 12):
  """The config of the session's trained digits run (the ``digits_run`` fixture): 2 epochs
  at 12x12, flips, running statistics that settle within its 90 steps."""
  from jax_resnet.configuration import defaults

  config = defaults.get_config()
  config.image_size = image_size
  config.batch_size = 32
  config.num_epochs = 2
  config.eval_every_epochs = 0  # once, at the end
  config.log_every_steps = 100
  config.random_flip = True
  config.bn_momentum = 0.5
  return config


def input_options(config):
  """The config's ``InputOptions`` (how training batches are drawn)."""
  from jax_resnet.configuration.typed_options import from_config
  from jax_resnet.data.common import InputOptions

  return from_config(InputOptions, config)


def photo_folder(root, per_class=(5, 4, 4), size=(96, 72), seed=0, extras=True):
  """Class folders of JPEG crops of scikit-learn's two sample photographs.

  With ``extras``, the first class also gets a grayscale PNG, a CMYK JPEG and an RGBA
  PNG, and the second a corrupt .jpg. Returns the number of decodable files.
  """
  from PIL import Image
  from sklearn.datasets import load_sample_images

  photos = load_sample_images().images
  rng = np.random.RandomState(seed)
  count = 0
  for c, n in enumerate(per_class):
    folder = root / f'class_{c}'
    folder.mkdir(parents=True)
    for i in range(n):
      photo = photos[(c + i) % 2]
      y, x = rng.randint(0, 100), rng.randint(0, 200)
      crop = Image.fromarray(photo[y : y + 300, x : x + 400]).resize(size)
      crop.save(folder / f'{i}.JPEG', quality=90)
      count += 1
  if extras:
    base = Image.fromarray(photos[0][:200, :300])
    base.convert('L').save(root / 'class_0' / 'gray.png')
    base.convert('CMYK').save(root / 'class_0' / 'cmyk.jpg')
    base.convert('RGBA').save(root / 'class_0' / 'rgba.png')
    count += 3
    (root / 'class_1' / 'corrupt.jpg').write_bytes(b'\xff\xd8\xff\xe0 not really a jpeg')
  return count


def folder_config(config, tmp_path):
  train_n = photo_folder(tmp_path / 'train')
  eval_n = photo_folder(tmp_path / 'eval', per_class=(3, 2, 2), seed=1, extras=False)
  config.dataset = 'folder'
  config.train_dir = str(tmp_path / 'train')
  config.eval_dir = str(tmp_path / 'eval')
  config.image_size = 32
  config.random_crop_pad = 0
  config.random_flip = True
  return train_n, eval_n


# torchvision is not installed: its ResNet layout, written out from its definition
# (torchvision/models/resnet.py), independently of jax_resnet.models.torchvision_layout.
# torchvision's ResNets: blocks per layer, and whether the block is a Bottleneck.
# torchvision's ResNets: (blocks per layer, bottleneck, groups, width_per_group).
TORCHVISION_RESNETS = {
  'resnet18': ((2, 2, 2, 2), False, 1, 64),
  'resnet34': ((3, 4, 6, 3), False, 1, 64),
  'resnet50': ((3, 4, 6, 3), True, 1, 64),
  'resnext50_32x4d': ((3, 4, 6, 3), True, 32, 4),
  'resnext101_32x8d': ((3, 4, 23, 3), True, 32, 8),
  'resnext101_64x4d': ((3, 4, 23, 3), True, 64, 4),
  'wide_resnet50_2': ((3, 4, 6, 3), True, 1, 128),
  'wide_resnet101_2': ((3, 4, 23, 3), True, 1, 128),
}
PLANES = (64, 128, 256, 512)


def _batch_norm_shapes(name: str, channels: int) -> dict:
  return {
    f'{name}.weight': (channels,),
    f'{name}.bias': (channels,),
    f'{name}.running_mean': (channels,),
    f'{name}.running_var': (channels,),
    f'{name}.num_batches_tracked': (),
  }


def torchvision_state_dict_shapes(model_name: str, num_classes: int = 1000) -> dict:
  """torchvision's ``model.state_dict()`` key -> shape, in its registration order."""
  layers, bottleneck, groups, width_per_group = TORCHVISION_RESNETS[model_name]
  expansion = 4 if bottleneck else 1
  shapes = {'conv1.weight': (64, 3, 7, 7), **_batch_norm_shapes('bn1', 64)}
  inplanes = 64
  for layer, (num_blocks, planes) in enumerate(zip(layers, PLANES), start=1):
    width = int(planes * (width_per_group / 64.0)) * groups  # torchvision's Bottleneck
    for j in range(num_blocks):
      block = f'layer{layer}.{j}'
      if bottleneck:  # conv1x1, grouped conv3x3 (strided, v1.5), conv1x1 to planes * 4
        convs = [(width, inplanes, 1), (width, width // groups, 3), (planes * 4, width, 1)]
      else:
        convs = [(planes, inplanes, 3), (planes, planes, 3)]
      for k, (out_channels, in_channels, size) in enumerate(convs, start=1):
        shapes[f'{block}.conv{k}.weight'] = (out_channels, in_channels, size, size)
        shapes.update(_batch_norm_shapes(f'{block}.bn{k}', out_channels))
      # Stride 2 in the first block of layers 2-4; a bottleneck's layer1 widens 64 -> 256.
      if j == 0 and (layer > 1 or bottleneck):
        shapes[f'{block}.downsample.0.weight'] = (planes * expansion, inplanes, 1, 1)
        shapes.update(_batch_norm_shapes(f'{block}.downsample.1', planes * expansion))
      inplanes = planes * expansion
  shapes['fc.weight'] = (num_classes, 512 * expansion)
  shapes['fc.bias'] = (num_classes,)
  return shapes


@functools.cache
def _variable_shapes(model_name: str, num_classes: int):
  model = _create_model(model_name, num_classes)
  import jax
  import jax.numpy as jnp

  x = jnp.zeros((1, 32, 32, 3))
  return jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))


def random_variables(model_name: str, num_classes: int = 1000, seed: int = 0):
  """Random weights at a scale that keeps activations O(1), and non-trivial BN statistics."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == 'kernel':
      fan_in = np.prod(leaf.shape[:-1])
      return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(np.float32)
    if name in ('scale', 'var'):
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    return (0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)  # bias, mean

  import jax

  return jax.tree_util.tree_map_with_path(fill, _variable_shapes(model_name, num_classes))


def _create_model(name, num_classes):
  from jax_resnet import models

  return models.create_model(name, num_classes)
