"""An ONNX graph of a ResNet's inference function, translated from its jaxpr.

``--export_format=onnx`` needs the maintained converters to run beside this project's own
pins, and neither does: jax2onnx 0.17 requires orbax-checkpoint < 0.11.37 (we run 0.12.8),
and jax2tf + tf2onnx 1.17 fails to convert under TensorFlow 2.21 ("Could not infer the
attribute type"). So the graph is translated here, from the jaxpr of the same function
``Predictor`` jits, with ``onnx.helper``: the inference function of a ResNet uses about
twenty primitives, and any other one is refused by name rather than exported wrongly.

What the translation does beyond one ONNX node per primitive:

- Weights are constants, and every primitive whose inputs are all constants is evaluated
  here (BatchNorm's ``scale * rsqrt(var + eps)`` becomes one tensor), so the graph holds
  the arithmetic of a frozen network and nothing else.
- ``lax.platform_dependent`` (``models/cpu_conv.py``'s XLA:CPU formulations) takes its
  default branch: the plain convolutions and max-pool every other platform gets.
- The batch dimension is a symbol (``jax.export.symbolic_shape``), so the ONNX input and
  outputs have a dynamic ``batch``; shapes that name it are computed from the input's.
- ``broadcast_in_dim`` becomes a reshape to the target rank, left to ONNX's own
  broadcasting in the elementwise ops that read it, and expanded only where another op
  reads it.
- NHWC convolutions and pools are wrapped in transposes to ONNX's NCHW; the kernels are
  stored already transposed. Runtimes fold the transposes between neighbouring convs.

``to_onnx`` needs the optional ``onnx`` package (``pip install 'jax_resnet[onnx]'``).
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from jax_resnet import models
from jax_resnet.augment import image_ops
from jax_resnet.errors import ConfigError

OPSET = 18  # onnxruntime, TensorRT and OpenVINO all run it; Reduce* take axes as inputs
INPUT_NAME = 'images'  # uint8 [batch, height, width, channels], prepared as Predictor.prepare
OUTPUT_NAMES = ('logits', 'probabilities', 'embeddings')
BATCH = 'batch'
METADATA_KEY = 'jax_resnet'  # the whole metadata record, as JSON, in metadata_props
INSTALL_HINT = "pip install 'jax_resnet[onnx]'"


def _onnx():
  try:
    import onnx
  except ImportError:
    raise ConfigError(f'ONNX export needs the onnx package: {INSTALL_HINT}.') from None
  return onnx


def inference_outputs(model, variables, images, mean, std):
  """(logits, probabilities, embeddings) of uint8 NHWC ``images``: ``Predictor``'s
  normalisation, the eval-mode network, and the head applied to the pooled features it
  returns (the head is one Dense layer; eval-mode dropout is the identity)."""
  x = image_ops.normalize(images, mean, std)
  embeddings = model.apply(variables, x, train=False, features=True)
  head = variables['params']['head']
  logits = embeddings @ head['kernel'] + head['bias']
  return logits, jax.nn.softmax(logits), embeddings


def to_onnx(variables: dict, metadata: dict):
  """The ``onnx.ModelProto`` of a run's inference function, ``metadata`` (``export``'s
  ``inference_metadata``) in its ``metadata_props``: every field as JSON under its own
  key, and the whole record under ``jax_resnet``."""
  onnx = _onnx()
  model = models.create_model(
    metadata['model'], int(metadata['num_classes']), **metadata['model_options']
  )
  fn = functools.partial(
    inference_outputs, model, mean=tuple(metadata['mean']), std=tuple(metadata['std'])
  )
  (batch,) = jax.export.symbolic_shape(BATCH)
  images = jax.ShapeDtypeStruct((batch, *metadata['image_shape']), jnp.uint8)
  variables = jax.tree.map(lambda x: np.asarray(x, np.float32), variables)
  closed = jax.make_jaxpr(fn)(variables, images)
  graph = _Graph(onnx, batch)
  flat_variables = jax.tree.leaves(variables)
  inputs = [*flat_variables, graph.input(INPUT_NAME, images)]
  outputs = graph.translate(closed, inputs)
  for name, value, aval in zip(OUTPUT_NAMES, outputs, closed.out_avals):
    graph.output(name, value, aval)
  proto = onnx.helper.make_model(
    onnx.helper.make_graph(
      graph.nodes,
      f'{metadata["model"]}_inference',
      graph.inputs,
      graph.outputs,
      graph.initializers,
    ),
    opset_imports=[onnx.helper.make_opsetid('', OPSET)],
    producer_name='jax_resnet',
  )
  proto.ir_version = min(proto.ir_version, 9)  # readable by runtimes a year old
  props = {key: json.dumps(value) for key, value in metadata.items()}
  props[METADATA_KEY] = json.dumps(metadata)
  onnx.helper.set_model_props(proto, props)
  onnx.checker.check_model(proto, full_check=True)
  return proto


class _Const:
  """A value known while translating (weights, and what is computed from them alone)."""

  def __init__(self, value):
    self.value = np.asarray(value)
    self.name = None  # its initializer's name, once the graph reads it


class _Tensor:
  """A value the ONNX graph computes; ``pending`` when it still needs ONNX broadcasting to
  reach its jaxpr shape (see ``_Graph._broadcast_in_dim``)."""

  def __init__(self, name: str, pending: bool = False):
    self.name, self.pending = name, pending


# jaxpr primitives that are one ONNX elementwise node (ONNX broadcasting applies).
_ELEMENTWISE = {
  'add': 'Add',
  'sub': 'Sub',
  'mul': 'Mul',
  'div': 'Div',
  'max': 'Max',
  'min': 'Min',
  'exp': 'Exp',
  'log': 'Log',
  'neg': 'Neg',
  'sqrt': 'Sqrt',
  'logistic': 'Sigmoid',
  'tanh': 'Tanh',
  'abs': 'Abs',
}
_IDENTITY = ('stop_gradient', 'copy', 'copy_p', 'optimization_barrier')
_REDUCTIONS = {'reduce_sum': 'ReduceSum', 'reduce_max': 'ReduceMax', 'reduce_min': 'ReduceMin'}
_INLINED = ('jit', 'pjit', 'custom_jvp_call', 'custom_vjp_call', 'closed_call', 'remat')


class _Graph:
  """ONNX nodes, initializers and names, built by walking a jaxpr."""

  def __init__(self, onnx, batch):
    self.onnx, self.batch = onnx, batch
    self.nodes, self.initializers, self.inputs, self.outputs = [], [], [], []
    self._count = 0
    self._batch_size = None  # the input's batch size as an int64 [1] tensor, once made

  def name(self, hint: str) -> str:
    self._count += 1
    return f'{hint}_{self._count}'

  def node(self, op: str, inputs, hint: str | None = None, **attributes) -> str:
    out = self.name(hint or op.lower())
    self.nodes.append(self.onnx.helper.make_node(op, list(inputs), [out], **attributes))
    return out

  def constant(self, value, hint: str = 'const') -> str:
    name = self.name(hint)
    self.initializers.append(self.onnx.numpy_helper.from_array(np.asarray(value), name))
    return name

  def input(self, name: str, aval) -> _Tensor:
    shape = [self._dim(d) for d in aval.shape]
    dtype = self.onnx.helper.np_dtype_to_tensor_dtype(np.dtype(aval.dtype))
    self.inputs.append(self.onnx.helper.make_tensor_value_info(name, dtype, shape))
    return _Tensor(name)

  def output(self, name: str, value, aval) -> None:
    tensor = self.materialise(value, aval)
    self.nodes.append(self.onnx.helper.make_node('Identity', [tensor], [name]))
    shape = [self._dim(d) for d in aval.shape]
    dtype = self.onnx.helper.np_dtype_to_tensor_dtype(np.dtype(aval.dtype))
    self.outputs.append(self.onnx.helper.make_tensor_value_info(name, dtype, shape))

  def tensor(self, value) -> str:
    """The ONNX name of a translated value (a constant becomes an initializer)."""
    if isinstance(value, _Const) and value.name is None:  # one initializer however often read
      value.name = self.constant(value.value)
    return value.name

  def materialise(self, value, aval) -> str:
    """The name of ``value`` at its full jaxpr shape (a pending broadcast expanded)."""
    if isinstance(value, _Tensor) and value.pending:
      return self.node('Expand', [value.name, self.shape(aval.shape)])
    return self.tensor(value)

  def shape(self, dims) -> str:
    """An int64 shape tensor; a dimension that is the batch symbol is the input's."""
    if all(isinstance(d, int) for d in dims):
      return self.constant(np.asarray(dims, np.int64), 'shape')
    pieces = [
      self.batch_size() if self._dim(d) == BATCH else self.constant(np.asarray([d], np.int64))
      for d in dims
    ]
    return self.node('Concat', pieces, 'shape', axis=0)

  def _dim(self, d) -> int | str:
    """A jaxpr dimension as an ONNX one: an int, or the batch symbol's name."""
    if isinstance(d, int | np.integer):
      return int(d)
    if d == self.batch:
      return BATCH
    raise ConfigError(f'ONNX export: the dimension {d} is not the batch; not supported.')

  def batch_size(self) -> str:
    if self._batch_size is None:
      self._batch_size = self.node('Shape', [INPUT_NAME], 'batch_size', start=0, end=1)
    return self._batch_size

  # The walk over the jaxpr.

  def translate(self, closed, inputs: list) -> list:
    """The values of ``closed``'s outputs, ``inputs`` bound to its inputs."""
    env = {}
    read = lambda v: _Const(v.val) if isinstance(v, jex_core.Literal) else env[v]
    for var, const in zip(closed.jaxpr.constvars, closed.consts):
      env[var] = _Const(const)
    for var, value in zip(closed.jaxpr.invars, inputs):
      env[var] = value if isinstance(value, _Tensor | _Const) else _Const(value)
    for eqn in closed.jaxpr.eqns:
      args = [read(v) for v in eqn.invars]
      outs = self._equation(eqn, args)
      for var, value in zip(eqn.outvars, outs):
        env[var] = value
    return [read(v) for v in closed.jaxpr.outvars]

  def _equation(self, eqn, args) -> list:
    name, params = eqn.primitive.name, eqn.params
    if name == 'platform_index':  # lax.platform_dependent: its default branch
      platforms = params['platforms']
      if None not in platforms:
        raise ConfigError('ONNX export: a platform-dependent branch without a default.')
      return [_Const(np.int32(platforms.index(None)))]
    if name == 'cond':
      if not isinstance(args[0], _Const):
        raise ConfigError('ONNX export: a data-dependent lax.cond is not supported.')
      branch = params['branches'][int(args[0].value)]
      return self.translate(branch, args[1:])
    if name in _INLINED:
      sub = params.get('jaxpr') or params.get('call_jaxpr') or params.get('fun_jaxpr')
      if not isinstance(sub, jex_core.ClosedJaxpr):
        sub = jex_core.ClosedJaxpr(sub, ())
      return self.translate(sub, args)
    if all(isinstance(a, _Const) for a in args) and not _has_subjaxpr(params):
      outs = eqn.primitive.bind(*(a.value for a in args), **params)
      return [_Const(o) for o in (outs if eqn.primitive.multiple_results else [outs])]
    if name in _ELEMENTWISE:
      return [self._elementwise(_ELEMENTWISE[name], args)]
    if name in _IDENTITY:
      return list(args)
    if name in _REDUCTIONS:
      return [self._reduce(_REDUCTIONS[name], args[0], params['axes'], eqn)]
    translate = getattr(self, f'_p_{name}', None)
    if translate is None:
      raise ConfigError(
        f'ONNX export: the jaxpr primitive {name!r} has no translation here '
        '(jax_resnet/inference/onnx_graph.py); the msgpack and safetensors exports '
        'carry every model.'
      )
    return [translate(eqn, args)]

  def _in(self, value, eqn, i: int) -> str:
    return self.materialise(value, eqn.invars[i].aval)

  def _elementwise(self, op: str, args) -> _Tensor:
    names = [self.tensor(a) for a in args]
    # Pending (unexpanded) operands broadcast against full ones; all pending stays pending.
    pending = all(isinstance(a, _Const) or a.pending for a in args)
    return _Tensor(self.node(op, names), pending=pending)

  def _reduce(self, op: str, value, axes, eqn) -> _Tensor:
    axes_name = self.constant(np.asarray(axes, np.int64), 'axes')
    return _Tensor(self.node(op, [self._in(value, eqn, 0), axes_name], keepdims=0))

  def _p_rsqrt(self, eqn, args):
    return _Tensor(self.node('Reciprocal', [self.node('Sqrt', [self._in(args[0], eqn, 0)])]))

  def _p_integer_pow(self, eqn, args):
    x = self._in(args[0], eqn, 0)
    exponent = self.constant(np.asarray(eqn.params['y'], eqn.invars[0].aval.dtype))
    return _Tensor(self.node('Pow', [x, exponent]))

  def _p_square(self, eqn, args):
    x = self._in(args[0], eqn, 0)
    return _Tensor(self.node('Mul', [x, x]))

  def _p_convert_element_type(self, eqn, args):
    to = self.onnx.helper.np_dtype_to_tensor_dtype(np.dtype(eqn.params['new_dtype']))
    pending = isinstance(args[0], _Tensor) and args[0].pending
    return _Tensor(self.node('Cast', [self.tensor(args[0])], to=to), pending=pending)

  def _p_broadcast_in_dim(self, eqn, args):
    """A reshape to the target rank (ones where the operand has no dimension), expanded
    later only if a non-elementwise op reads it."""
    shape, kept = eqn.params['shape'], eqn.params['broadcast_dimensions']
    operand = eqn.invars[0].aval.shape
    ranked = [1] * len(shape)
    for source, target in enumerate(kept):
      ranked[target] = operand[source]
    if isinstance(args[0], _Const):
      return _Tensor(self.constant(np.reshape(args[0].value, ranked)), pending=True)
    reshaped = self.node('Reshape', [self.tensor(args[0]), self.shape(ranked)])
    return _Tensor(reshaped, pending=True)

  def _p_reshape(self, eqn, args):
    if eqn.params.get('dimensions') is not None:
      raise ConfigError('ONNX export: a reshape with dimensions is not supported.')
    target = self.shape(eqn.params['new_sizes'])
    return _Tensor(self.node('Reshape', [self._in(args[0], eqn, 0), target]))

  def _p_squeeze(self, eqn, args):
    target = self.shape(eqn.outvars[0].aval.shape)
    return _Tensor(self.node('Reshape', [self._in(args[0], eqn, 0), target]))

  _p_expand_dims = _p_squeeze

  def _p_transpose(self, eqn, args):
    perm = list(eqn.params['permutation'])
    return _Tensor(self.node('Transpose', [self._in(args[0], eqn, 0)], perm=perm))

  def _p_concatenate(self, eqn, args):
    names = [self._in(a, eqn, i) for i, a in enumerate(args)]
    return _Tensor(self.node('Concat', names, axis=int(eqn.params['dimension'])))

  def _p_slice(self, eqn, args):
    starts, limits = eqn.params['start_indices'], eqn.params['limit_indices']
    strides = eqn.params['strides'] or (1,) * len(starts)
    ends = [d if isinstance(d, int) else np.iinfo(np.int64).max for d in limits]
    names = [
      self._in(args[0], eqn, 0),
      self.constant(np.asarray(starts, np.int64), 'starts'),
      self.constant(np.asarray(ends, np.int64), 'ends'),
      self.constant(np.arange(len(starts), dtype=np.int64), 'axes'),
      self.constant(np.asarray(strides, np.int64), 'steps'),
    ]
    return _Tensor(self.node('Slice', names))

  def _p_pad(self, eqn, args):
    config = [tuple(int(p) for p in c) for c in eqn.params['padding_config']]
    if any(interior for _, _, interior in config) or any(lo < 0 or hi < 0 for lo, hi, _ in config):
      raise ConfigError('ONNX export: interior or negative padding is not supported.')
    pads = np.asarray([lo for lo, _, _ in config] + [hi for _, hi, _ in config], np.int64)
    value = self.constant(np.asarray(args[1].value, eqn.invars[0].aval.dtype))
    return _Tensor(self.node('Pad', [self._in(args[0], eqn, 0), self.constant(pads), value]))

  def _p_dot_general(self, eqn, args):
    """The head's ``features @ kernel``: [N, F] x [F, C], no batch dimensions."""
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = eqn.params['dimension_numbers']
    lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
    if lhs_batch or rhs_batch or tuple(lhs_contract) != (lhs.ndim - 1,):
      raise ConfigError('ONNX export: only a matrix product (x @ w) is supported.')
    right = args[1]
    if tuple(rhs_contract) != (0,):
      if not isinstance(right, _Const) or rhs.ndim != 2:
        raise ConfigError('ONNX export: only a matrix product (x @ w) is supported.')
      right = _Const(np.transpose(right.value))
    return _Tensor(self.node('MatMul', [self._in(args[0], eqn, 0), self.tensor(right)]))

  def _p_conv_general_dilated(self, eqn, args):
    """NHWC input and HWIO kernel (flax's) as ONNX's NCHW and OIHW."""
    params = eqn.params
    numbers = params['dimension_numbers']
    if (
      tuple(numbers.lhs_spec) != (0, 3, 1, 2)
      or tuple(numbers.rhs_spec) != (3, 2, 0, 1)
      or tuple(numbers.out_spec) != (0, 3, 1, 2)
      or any(d != 1 for d in params['lhs_dilation'])
      or params['batch_group_count'] != 1
      or not isinstance(args[1], _Const)
    ):
      raise ConfigError('ONNX export: only NHWC x HWIO convolutions of constant kernels.')
    kernel = np.transpose(args[1].value, (3, 2, 0, 1))  # HWIO -> OIHW
    padding = [tuple(int(p) for p in pair) for pair in params['padding']]
    x = self.node('Transpose', [self._in(args[0], eqn, 0)], perm=[0, 3, 1, 2])
    y = self.node(
      'Conv',
      [x, self.constant(kernel, 'kernel')],
      strides=list(params['window_strides']),
      dilations=list(params['rhs_dilation']),
      pads=[lo for lo, _ in padding] + [hi for _, hi in padding],
      group=int(params['feature_group_count']),
    )
    return _Tensor(self.node('Transpose', [y], perm=[0, 2, 3, 1]))

  def _pool(self, op: str, eqn, args, **attributes) -> str:
    params = eqn.params
    window, strides = params['window_dimensions'], params['window_strides']
    padding = [tuple(int(p) for p in pair) for pair in params['padding']]
    if (
      window[0] != 1
      or window[3] != 1
      or strides[0] != 1
      or strides[3] != 1
      or padding[0] != (0, 0)
      or padding[3] != (0, 0)
      or any(d != 1 for d in (*params['base_dilation'], *params['window_dilation']))
    ):
      raise ConfigError('ONNX export: only spatial NHWC pooling windows are supported.')
    x = self.node('Transpose', [self._in(args[0], eqn, 0)], perm=[0, 3, 1, 2])
    y = self.node(
      op,
      [x],
      kernel_shape=list(window[1:3]),
      strides=list(strides[1:3]),
      pads=[padding[1][0], padding[2][0], padding[1][1], padding[2][1]],
      **attributes,
    )
    return self.node('Transpose', [y], perm=[0, 2, 3, 1])

  def _p_reduce_window_max(self, eqn, args):
    # Padding counts as -inf in reduce_window_max and is ignored by MaxPool: the same.
    return _Tensor(self._pool('MaxPool', eqn, args))

  def _p_reduce_window_sum(self, eqn, args):
    """A windowed sum: the mean with padding counted as zeros, times the window's size."""
    mean = self._pool('AveragePool', eqn, args, count_include_pad=1)
    size = np.prod(eqn.params['window_dimensions'])
    factor = self.constant(np.asarray(size, eqn.invars[0].aval.dtype))
    return _Tensor(self.node('Mul', [mean, factor]))


def _has_subjaxpr(params: dict) -> bool:
  return any(
    isinstance(p, jex_core.ClosedJaxpr | jex_core.Jaxpr)
    or (isinstance(p, tuple) and any(isinstance(q, jex_core.ClosedJaxpr) for q in p))
    for p in params.values()
  )


def onnxruntime_session(path_or_bytes):
  """An onnxruntime ``InferenceSession`` of an ONNX export (CPU)."""
  try:
    import onnxruntime
  except ImportError:
    raise ConfigError(f'Running an ONNX export needs onnxruntime: {INSTALL_HINT}.') from None
  options = onnxruntime.SessionOptions()
  options.log_severity_level = 3  # errors only: its warnings are about its own graph passes
  return onnxruntime.InferenceSession(path_or_bytes, options, providers=['CPUExecutionProvider'])
