import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_resnet import models

TORCHVISION_PARAMS = {
  'resnet18': 11_689_512,
  'resnet34': 21_797_672,
  'resnet50': 25_557_032,
  'resnet101': 44_549_160,
  'resnet152': 60_192_808,
}
PAPER_PARAMS = {
  'resnet20': 0.27e6,
  'resnet32': 0.46e6,
  'resnet44': 0.66e6,
  'resnet56': 0.85e6,
  'resnet110': 1.7e6,
}


def abstract_variables(model, size):
  return jax.eval_shape(
    lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((2, size, size, 3)), train=False)
  )


def count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


@pytest.mark.parametrize('name,expected', sorted(TORCHVISION_PARAMS.items()))
def test_imagenet_parameter_counts_equal_torchvision(name, expected):
  variables = abstract_variables(models.create_model(name, 1000), 64)
  assert count(variables['params']) == expected


@pytest.mark.parametrize('name,expected', sorted(PAPER_PARAMS.items()))
def test_cifar_parameter_counts_match_paper(name, expected):
  n = count(abstract_variables(models.create_model(name, 10), 32)['params'])
  assert abs(n - expected) / expected < 0.02


@pytest.mark.parametrize('name', models.MODEL_NAMES)
def test_output_shape_for_every_model(name):
  model = models.create_model(name, 7)
  size = 32
  variables = abstract_variables(model, size)
  out = jax.eval_shape(
    lambda v, x: model.apply(v, x, train=False),
    variables,
    jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32),
  )
  assert out.shape == (2, 7) and out.dtype == jnp.float32


def test_plain_twin_has_same_parameters_but_different_function():
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
  res, plain = models.create_model('resnet20', 10), models.create_model('plain20', 10)
  init_apply = lambda m: jax.jit(
    lambda x: (lambda v: (v, m.apply(v, x, train=False)))(
      m.init(jax.random.PRNGKey(0), x, train=False)
    )
  )(x)
  with jax.threefry_partitionable(False):  # compiles the random init much faster on CPU
    (v, out), (v_plain, out_plain) = init_apply(res), init_apply(plain)
  assert jax.tree.structure(v) == jax.tree.structure(v_plain)
  # With the residual branches zero-initialised, the ResNet starts near identity blocks;
  # the plain net must not (its BN scales start at one).
  assert not jnp.allclose(out, out_plain)


def test_bf16_compute_keeps_fp32_params():
  model = models.create_model('resnet20', 10, dtype=jnp.bfloat16)
  x = jnp.ones((2, 16, 16, 3))
  v = model.init(jax.random.PRNGKey(0), x, train=False)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(v))
  assert model.apply(v, x, train=False).dtype == jnp.float32


def test_zero_init_residual_option():
  x = jnp.ones((1, 16, 16, 3))
  on = models.create_model('resnet20', 10).init(jax.random.PRNGKey(0), x, train=False)
  off = models.create_model('resnet20', 10, zero_init_residual=False).init(
    jax.random.PRNGKey(0), x, train=False
  )
  block = 'stage1_block1'
  last_bn = sorted(k for k in on['params'][block] if k.startswith('BatchNorm'))[-1]
  assert float(jnp.abs(on['params'][block][last_bn]['scale']).sum()) == 0.0
  assert float(off['params'][block][last_bn]['scale'].sum()) > 0.0


def test_dropout_needs_rng_only_in_training():
  model = models.create_model('resnet20', 10, dropout_rate=0.5)
  x = jnp.ones((4, 8, 8, 3))
  v = model.init(jax.random.PRNGKey(0), x, train=False)
  a, _ = model.apply(
    v, x, train=True, mutable=['batch_stats'], rngs={'dropout': jax.random.PRNGKey(1)}
  )
  b, _ = model.apply(
    v, x, train=True, mutable=['batch_stats'], rngs={'dropout': jax.random.PRNGKey(2)}
  )
  assert not jnp.allclose(a, b)


def test_cifar_stem_option_on_imagenet_depth():
  model = models.create_model('resnet18', 10, stem='cifar')
  v = abstract_variables(model, 32)
  assert v['params']['stem_conv']['kernel'].shape == (3, 3, 3, 64)


def test_unknown_model_lists_valid_names():
  with pytest.raises(ValueError, match='resnet50.*|Valid names'):
    models.create_model('resnet51', 10)
  with pytest.raises(ValueError, match='Unknown model options'):
    models.create_model('resnet20', 10, width=3)


def test_remat_same_gradients_fewer_saved_activations():
  """remat changes neither the parameters nor the maths, only what the backward keeps.

  What it keeps is measured where JAX decides it: the residuals of the VJP. (Whether
  the compiler then uses less memory is the backend's business: XLA:CPU does not.)
  """
  x = jax.random.normal(jax.random.PRNGKey(1), (16, 32, 32, 3))
  plain_model = models.create_model('resnet20', 10, zero_init_residual=False)
  remat_model = models.create_model('resnet20', 10, zero_init_residual=False, remat=True)
  with jax.threefry_partitionable(False):
    v = jax.jit(lambda: plain_model.init(jax.random.PRNGKey(0), x[:1], train=False))()
  assert jax.tree.structure(v) == jax.tree.structure(abstract_variables(remat_model, 32))

  def vjp(model):
    def loss(params):
      out, _ = model.apply({**v, 'params': params}, x, train=True, mutable=['batch_stats'])
      return jnp.mean(out**2)

    return lambda params: jax.vjp(loss, params)[1]

  grads = [
    jax.jit(lambda p, m=m: vjp(m)(p)(1.0)[0])(v['params']) for m in (plain_model, remat_model)
  ]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), *grads)
  saved = [
    sum(r.size * r.dtype.itemsize for r in jax.tree.leaves(jax.eval_shape(vjp(m), v['params'])))
    for m in (plain_model, remat_model)
  ]
  assert saved[1] < 0.5 * saved[0], saved
