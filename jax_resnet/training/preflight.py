"""Preflight (``--mode=check``): will this config run on N devices of these platforms?

Answered on any machine, before an allocation is paid for. The config is validated for N
devices; the train step (at each training image size, with its steps per dispatch) and
the eval step are lowered for each platform without the device (JAX lowers for platforms
it does not have; the mesh is N CPU devices standing in for them); each lowered program
is checked for its convolutions' compute dtype and for the CPU-only convolution routes,
which must not reach a GPU or TPU program; and the memory a device holds is estimated:
parameters, optimizer state and weight average (replicated), the uint8 batch, and the
activations the backward pass keeps (the VJP's residuals at the per-device batch).

No data is read: the data set's class count and channels come from what is known of it
(``data.common.KNOWN_SIZES``, a folder's class sub-folders), else ImageNet's.
"""

import dataclasses
import os
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jax_resnet import parallel
from jax_resnet.data.common import FOLDER, KNOWN_SIZES
from jax_resnet.errors import UserError
from jax_resnet.models import cpu_conv
from jax_resnet.training import build
from jax_resnet.training.dispatch import ProgressiveResizing
from jax_resnet.training.step_functions import make_eval_step, make_train_step
from jax_resnet.training.timeline import Timeline

PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')
_CONVOLUTION = re.compile(r'stablehlo\.convolution.*->\s*tensor<[^>]*x(\w+)>')
_TINY = 8  # the per-device batch the activation estimate traces at, scaled up after
_MLIR_TYPES = {'float32': 'f32', 'bfloat16': 'bf16', 'float16': 'f16'}


@dataclasses.dataclass(frozen=True)
class Finding:
  ok: bool
  text: str

  def __str__(self) -> str:
    return f'{"ok  " if self.ok else "FAIL"} {self.text}'


@dataclasses.dataclass(frozen=True)
class DataShape:
  """What the programs need of the data set: its classes and image channels."""

  num_classes: int
  channels: int
  num_train: int
  source: str  # where these came from, for the report


def data_shape(config: ml_collections.ConfigDict) -> DataShape:
  """The data set's class count and channels, without reading it."""
  if config.dataset in KNOWN_SIZES:
    num_train, num_classes = KNOWN_SIZES[config.dataset]
    channels = 1 if config.dataset == 'digits' else 3
    if config.dataset == 'digits' and config.digits_classes:
      num_classes = len(set(config.digits_classes))
    return DataShape(num_classes, channels, num_train, config.dataset)
  if config.dataset == FOLDER and config.train_dir and os.path.isdir(config.train_dir):
    classes = [e for e in os.scandir(config.train_dir) if e.is_dir()]
    return DataShape(len(classes), 3, max(config.batch_size, 1), config.train_dir)
  return DataShape(1000, 3, KNOWN_SIZES['imagenet2012'][0], 'unknown here: ImageNet assumed')


def check(
  config: ml_collections.ConfigDict,
  devices: int,
  platforms: Sequence[str],
  mesh_devices: Sequence | None = None,
) -> list[Finding]:
  """Every finding for ``config`` on ``devices`` devices of each of ``platforms``.

  ``mesh_devices``: the devices that stand in for them (default: the first ``devices``
  of this process's); there must be that many (``--mode=check`` forces that many CPU
  devices before JAX starts).
  """
  from jax_resnet.configuration import validation

  unknown = [p for p in platforms if p not in PLATFORMS]
  if unknown:
    return [Finding(False, f'unknown platform(s) {", ".join(unknown)}: any of {PLATFORMS}')]
  try:
    validation.validate(config, devices)
  except UserError as e:
    return [Finding(False, f'config for {devices} devices: {e}')]
  findings = [Finding(True, f'config valid for {devices} devices')]
  stand_ins = list(mesh_devices or jax.devices()[:devices])
  if len(stand_ins) != devices:
    return findings + [
      Finding(False, f'{devices} devices to lower for, {len(stand_ins)} here to stand in')
    ]
  mesh = parallel.create_mesh(stand_ins)
  data = data_shape(config)
  programs = _Programs(config, data, mesh)
  findings.append(Finding(True, f'data: {data.num_classes} classes, {data.source}'))
  findings += programs.lowered_findings(platforms)
  findings += programs.memory_findings(devices)
  return findings


class _Programs:
  """The train and eval programs of a config, abstract: nothing is allocated."""

  def __init__(self, config, data: DataShape, mesh):
    self.config, self.data, self.mesh = config, data, mesh
    size = config.image_size
    self.image_shape = (size, size, data.channels)
    self.timeline = Timeline.from_config(config, max(data.num_train, config.batch_size))
    self.model = build.model_from_config(config, data.num_classes)
    self.state, self.learning_rate_fn = build.train_state_from_config(
      config, self.model, self.image_shape, self.timeline, mesh, abstract=True
    )
    mean = std = (1.0,) * data.channels
    self.options_at = lambda s: build.step_options(config, data.num_classes, mean, std, s)

  def _batch(self, shape, with_mask=False):
    sharding = parallel.batch_sharded(self.mesh)
    n = self.config.batch_size if not with_mask else self._eval_batch()
    batch = {
      'image': jax.ShapeDtypeStruct((n, *shape), jnp.uint8, sharding=sharding),
      'label': jax.ShapeDtypeStruct((n,), jnp.int32, sharding=sharding),
    }
    if with_mask:
      batch['mask'] = jax.ShapeDtypeStruct((n,), jnp.float32, sharding=sharding)
    return batch

  def _eval_batch(self) -> int:
    return parallel.round_up_to_devices(self.config.eval_batch_size, self.mesh.devices.size)

  def train_sizes(self) -> list[int]:
    """The training image sizes the run compiles (one unless progressive resizing)."""
    from jax_resnet.configuration.typed_options import from_config

    resizing = from_config(ProgressiveResizing, self.config)
    epochs = self.timeline.num_epochs
    sizes = {resizing.size_at(e, epochs) for e in range(int(np.ceil(epochs)) + 1)}
    return sorted(sizes)

  def lowered_findings(self, platforms: Sequence[str]) -> list[Finding]:
    """Each program traced once (per unrolling: the CPU runs k steps unrolled) and lowered
    for each platform; the findings in platform order."""
    k = self.config.steps_per_dispatch
    expected = _MLIR_TYPES[jnp.dtype(build.compute_dtype(self.config)).name]
    found = {platform: [] for platform in platforms}
    # k steps a dispatch run unrolled on the CPU and rolled elsewhere: two programs.
    groups = [(False, list(platforms))]
    if k > 1 and 'cpu' in platforms:
      groups = [(True, ['cpu']), (False, [p for p in platforms if p != 'cpu'])]
    for unroll, chosen in groups:
      if not chosen:
        continue
      for size in self.train_sizes():
        train_fn = make_train_step(
          self.options_at(size),
          self.learning_rate_fn,
          self.mesh,
          steps_per_dispatch=k,
          unroll=unroll,
        )
        batch = self._batch(self.image_shape)
        args = (self.state, batch if k == 1 else [batch] * k)
        what = f'train step ({k} per dispatch' + (f', {size} px)' if size else ')')
        for platform, finding in self._lowered(chosen, what, train_fn, args, expected):
          found[platform].append(finding)
    eval_fn = make_eval_step(self.options_at(0), self.mesh)
    args = (self.state, self._batch(self.image_shape, with_mask=True))
    for platform, finding in self._lowered(platforms, 'eval step', eval_fn, args, expected):
      found[platform].append(finding)
    return [finding for platform in platforms for finding in found[platform]]

  def _lowered(self, platforms, what, fn, args, expected_dtype):
    """(platform, Finding) of ``fn`` traced once and lowered for each of ``platforms``."""
    try:
      traced = fn.trace(*args)
    except Exception as e:  # what the config cannot trace: the finding, not a crash
      return [
        (p, Finding(False, f'{p}: {what} does not trace: {_first_line(e)}')) for p in platforms
      ]
    out = []
    for platform in platforms:
      try:
        text = traced.lower(lowering_platforms=(platform,)).as_text(debug_info=True)
      except Exception as e:  # what the platform cannot take
        out.append(
          (platform, Finding(False, f'{platform}: {what} does not lower: {_first_line(e)}'))
        )
        continue
      out.append((platform, _program_finding(platform, what, text, expected_dtype)))
    return out

  def memory_findings(self, devices: int) -> list[Finding]:
    """Bytes per device: replicated state, the batch, the backward pass's activations."""
    state = self.state
    params = _bytes(state.params) + _bytes(state.batch_stats)
    optimizer = _bytes(state.opt_state)
    ema = _bytes(state.ema) if state.ema is not None else 0
    per_device = self.config.batch_size // devices
    images = per_device * int(np.prod(self.image_shape)) * self.config.steps_per_dispatch
    # Accumulation keeps one micro-batch's activations at a time (and the gradient sum).
    micro_batch = per_device // self.config.grad_accum_steps
    activations = activation_bytes(self.model, self.image_shape, micro_batch)
    accumulated = _bytes(state.params) if self.config.grad_accum_steps > 1 else 0
    total = params + optimizer + ema + images + activations + accumulated
    return [
      Finding(
        True,
        f'memory per device (estimate): {_gib(total)} = parameters and statistics '
        f'{_gib(params)} + optimizer state {_gib(optimizer)} + weight average {_gib(ema)} '
        f'+ uint8 batch {_gib(images)} + activations kept for the backward pass '
        f'{_gib(activations)}'
        + (f' + the gradient sum {_gib(accumulated)}' if accumulated else '')
        + f', at {per_device} images per device (config.batch_size='
        f'{self.config.batch_size} over {devices}'
        + (f', in micro-batches of {micro_batch})' if accumulated else ')'),
      )
    ]


def activation_bytes(model, image_shape, per_device_batch: int) -> int:
  """The activations the backward pass keeps at ``per_device_batch`` images: the VJP's
  residuals, traced (not run) at a small batch, less the weights among them (what does not
  grow with the batch), scaled to the batch."""
  shape = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(shape.shape)))

  def residuals(variables, images):
    def loss(p):
      logits, _ = model.apply(
        {**variables, 'params': p},
        images,
        train=True,
        mutable=['batch_stats'],
        rngs={'dropout': jax.random.PRNGKey(0)},
      )
      return jnp.mean(logits)

    return jax.vjp(loss, variables['params'])[1]

  saved = _bytes(jax.eval_shape(residuals, variables, _images(_TINY, image_shape)))
  return int(max(saved - _bytes(variables['params']), 0) / _TINY * per_device_batch)


def _images(n: int, image_shape):
  return jax.ShapeDtypeStruct((n, *image_shape), jnp.float32)


def _program_finding(platform: str, what: str, text: str, expected_dtype: str) -> Finding:
  """A lowered program's convolutions are all in the compute dtype, and a GPU or TPU
  program holds no CPU-only route."""
  dtypes = _convolution_dtypes(text)
  problems = []
  if set(dtypes) - {expected_dtype}:
    problems.append(f'convolutions in {dict(dtypes)}, expected {expected_dtype}')
  if platform != 'cpu' and cpu_conv.CPU_ONLY_SCOPE in text:
    problems.append(f'CPU-only routes ({cpu_conv.CPU_ONLY_SCOPE}) in the program')
  if problems:
    return Finding(False, f'{platform}: {what}: {"; ".join(problems)}')
  count = sum(dtypes.values())
  return Finding(True, f'{platform}: {what} lowers: {count} convolutions, all {expected_dtype}')


def _first_line(error: Exception) -> str:
  text = str(error).strip()
  return f'{type(error).__name__}: {text.splitlines()[0][:300] if text else ""}'


def _convolution_dtypes(text: str) -> dict[str, int]:
  """{element type: count} of the convolutions' results in a lowered program."""
  counts = {}
  for line in text.splitlines():
    match = _CONVOLUTION.search(line)
    if match:
      counts[match.group(1)] = counts.get(match.group(1), 0) + 1
  return counts


def _bytes(tree) -> int:
  return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def _gib(n: int) -> str:
  return f'{n / 2**30:.2f} GiB' if n >= 2**28 else f'{n / 2**20:.1f} MiB'


def report(findings: Sequence[Finding]) -> tuple[str, bool]:
  """The findings one per line, and whether all passed."""
  return '\n'.join(map(str, findings)), all(f.ok for f in findings)
