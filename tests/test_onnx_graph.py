"""The ONNX translation of the inference function: for each kind of block, stem and
shortcut the models have, onnxruntime gives the logits, probabilities and embeddings the
jitted JAX function gives, at any batch size; anything it cannot translate is refused by
name.

Random weights at a usable scale (``helpers.random_variables``), small images; the digits
run's export is compared with its msgpack export in test_export.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_variables

from jax_resnet import models
from jax_resnet.errors import ConfigError
from jax_resnet.inference import onnx_graph

MEAN, STD = (120.0, 115.0, 100.0), (60.0, 58.0, 62.0)


def metadata(model: str, image_shape, num_classes: int = 10) -> dict:
  return {
    'model': model,
    'model_options': {},
    'num_classes': num_classes,
    'image_shape': list(image_shape),
    'mean': list(MEAN[: image_shape[-1]]),
    'std': list(STD[: image_shape[-1]]),
  }


@pytest.mark.parametrize(
  'model, image_shape',
  [
    ('resnet20', (16, 16, 3)),  # CIFAR stem, option-A (strided slice, zero-pad) shortcuts
    ('resnet18d', (33, 33, 3)),  # deep stem, average-pool shortcuts on odd sizes (ceil)
    ('seresnet18', (24, 24, 3)),  # squeeze-and-excitation (sigmoid gates)
    ('preact_resnet18', (32, 32, 3)),  # pre-activation blocks, final BN
    ('resnext50_32x4d', (32, 32, 3)),  # bottlenecks, grouped 3x3 convs, projections
  ],
)
def test_onnxruntime_equals_jax(model, image_shape):
  variables = random_variables(model, num_classes=10)
  proto = onnx_graph.to_onnx(variables, metadata(model, image_shape))
  session = onnx_graph.onnxruntime_session(proto.SerializeToString())
  network = models.create_model(model, 10)
  reference = jax.jit(
    functools.partial(
      onnx_graph.inference_outputs,
      network,
      mean=MEAN[: image_shape[-1]],
      std=STD[: image_shape[-1]],
    )
  )
  rng = np.random.RandomState(0)
  images = rng.randint(0, 256, (5, *image_shape)).astype(np.uint8)
  expected = [np.asarray(x) for x in reference(variables, images)]
  assert np.ptp(expected[0]) > 1  # logits that differ: a wrong graph cannot pass
  found = session.run(list(onnx_graph.OUTPUT_NAMES), {onnx_graph.INPUT_NAME: images})
  for name, value, reference_value in zip(onnx_graph.OUTPUT_NAMES, found, expected):
    scale = np.abs(reference_value).max()
    np.testing.assert_allclose(value, reference_value, atol=1e-5 * scale, err_msg=name)
  # The batch is dynamic: one image alone gives its row of the batch of five.
  (alone,) = session.run(['logits'], {onnx_graph.INPUT_NAME: images[2:3]})
  np.testing.assert_allclose(alone[0], found[0][2], atol=1e-5 * np.abs(found[0]).max())


def test_the_graph_has_a_dynamic_batch_and_the_metadata():
  record = metadata('resnet20', (8, 8, 3))
  proto = onnx_graph.to_onnx(random_variables('resnet20'), record)
  (images,) = proto.graph.input
  dims = [d.dim_param or d.dim_value for d in images.type.tensor_type.shape.dim]
  assert dims == [onnx_graph.BATCH, 8, 8, 3]
  assert [o.name for o in proto.graph.output] == list(onnx_graph.OUTPUT_NAMES)
  props = {p.key: p.value for p in proto.metadata_props}
  assert props['model'] == '"resnet20"' and props['image_shape'] == '[8, 8, 3]'
  assert props[onnx_graph.METADATA_KEY].startswith('{"model": "resnet20"')
  # A frozen network: BatchNorm is folded into constants, no Sqrt or Reciprocal is left.
  ops = {node.op_type for node in proto.graph.node}
  assert 'Conv' in ops and not ops & {'Sqrt', 'Reciprocal', 'BatchNormalization'}


def test_a_primitive_without_a_translation_is_refused_by_name():
  closed = jax.make_jaxpr(lambda x: jnp.cumsum(x, axis=1))(jnp.zeros((2, 3)))
  graph = onnx_graph._Graph(onnx_graph._onnx(), batch=None)
  x = graph.input(onnx_graph.INPUT_NAME, jax.ShapeDtypeStruct((2, 3), jnp.float32))
  with pytest.raises(ConfigError, match="'cumsum' has no translation"):
    graph.translate(closed, [x])
