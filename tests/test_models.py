import functools
import re

import flax.linen as nn
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
  'wide_resnet50_2': 68_883_240,
  'wide_resnet101_2': 126_886_696,
  'resnext50_32x4d': 25_028_904,
  'resnext101_32x8d': 88_791_336,
  'resnext101_64x4d': 83_455_272,
}
# Zagoruyko & Komodakis 2016, Table 1 (CIFAR-10, 10 classes): WRN-d-k in millions.
WRN_PARAMS = {'wrn16_8': 11.0, 'wrn28_10': 36.5, 'wrn40_4': 8.9}
# timm's counts (1000 classes): SE with rd_ratio 1/16 rounded by make_divisible(..., 8);
# ResNet-D's deep stem (32, 32, 64) and average-pool shortcuts.
TIMM_PARAMS = {
  'seresnet50': 28_088_024,
  'resnet50d': 25_576_264,
}
# The study's counts (10 classes), met exactly by models.registry._SMALL_CIFAR's widths.
SMALL_CIFAR_PARAMS = {
  'resnet26_small': 4_196_906,
  'resnet34_small': 4_348_082,
  'resnet50_small': 4_815_794,
}
NEW_NAMES = tuple(
  n
  for n in models.MODEL_NAMES
  if n.startswith('seresnet') or re.fullmatch(r'resnet\d+d', n) or n.endswith('_small')
)
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


@pytest.mark.parametrize('name,expected', sorted(WRN_PARAMS.items()))
def test_wide_resnet_parameter_counts_match_the_paper(name, expected):
  params = abstract_variables(models.create_model(name, 10), 32)['params']
  assert round(count(params) / 1e6, 1) == expected  # the paper's precision
  k = int(name.split('_')[1])
  assert params['stem_conv']['kernel'].shape == (3, 3, 3, 16)  # 16 wide, then 16k
  assert params['stage1_block1']['proj_conv']['kernel'].shape == (1, 1, 16, 16 * k)
  assert params['head']['kernel'].shape == (64 * k, 10)


def test_wide_resnet_dropout_acts_between_the_convolutions_in_training_only():
  model = models.create_model('wrn16_8', 10, block_dropout_rate=0.3)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
  variables = random_variables(model, 16)
  assert count(variables['params']) == count(
    random_variables(models.create_model('wrn16_8', 10), 16)['params']
  )
  train = lambda seed: model.apply(
    variables, x, train=True, mutable=['batch_stats'], rngs={'dropout': jax.random.PRNGKey(seed)}
  )[0]
  assert not np.allclose(train(0), train(1))
  np.testing.assert_array_equal(train(0), train(0))
  np.testing.assert_array_equal(
    model.apply(variables, x, train=False),
    models.create_model('wrn16_8', 10).apply(variables, x, train=False),
  )


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


@pytest.mark.parametrize('depth', [20, 18])
def test_plain_twin_has_no_skip_connection(depth):
  """With the ResNet's parameters (every block's last BN scale zero), a block's branch
  outputs zero: the ResNet still sees its input through the skips, a plain net cannot,
  so its logits no longer depend on the image."""
  size = 16 if depth == 20 else 32
  x = jax.random.normal(jax.random.PRNGKey(1), (4, size, size, 3))
  res = models.create_model(f'resnet{depth}', 10)
  plain = models.create_model(f'plain{depth}', 10)
  with jax.threefry_partitionable(False):
    variables = jax.jit(lambda x: res.init(jax.random.PRNGKey(0), x, train=False))(x)
  variables = jax.tree.map(
    lambda p: p + 0.1 if p.ndim == 1 and p.shape[0] == 10 else p, variables
  )  # a non-zero head bias
  out = res.apply(variables, x, train=False)
  out_plain = plain.apply(variables, x, train=False)
  assert float(jnp.std(out, axis=0).max()) > 1e-3  # the ResNet's logits follow the input
  np.testing.assert_allclose(
    out_plain, jnp.broadcast_to(out_plain[:1], out_plain.shape), atol=1e-6
  )  # the plain net's cannot


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


def random_variables(model, size):
  """Variables as an init would give them, from numpy: no init to compile or run."""
  return numpy_variables(abstract_variables(model, size))


def numpy_variables(abstract):
  """He-scaled random kernels, BatchNorm at identity, zero biases, shaped as ``abstract``."""
  rng = np.random.default_rng(0)

  def leaf(path, x):
    name = path[-1].key
    if name == 'kernel':
      return rng.standard_normal(x.shape, np.float32) / np.sqrt(np.prod(x.shape[:-1]))
    return (np.ones if name in ('scale', 'var') else np.zeros)(x.shape, np.float32)

  return jax.tree_util.tree_map_with_path(leaf, abstract)


def test_new_names_are_registered():
  assert len(NEW_NAMES) == 13
  assert {'seresnet18', 'seresnet152', 'resnet18d', 'resnet152d', 'resnet50_small'} <= set(
    NEW_NAMES
  )


@pytest.mark.parametrize('name', NEW_NAMES)
def test_new_models_run_with_finite_outputs(name):
  model = models.create_model(name, 7)
  size = models.min_image_size(name)
  out = model.apply(random_variables(model, size), jnp.ones((1, size, size, 3)), train=False)
  assert out.shape == (1, 7) and bool(jnp.isfinite(out).all())


@pytest.mark.parametrize('name,expected', sorted(TIMM_PARAMS.items()))
def test_se_and_resnet_d_parameter_counts_equal_timm(name, expected):
  variables = abstract_variables(models.create_model(name, 1000), 64)
  assert count(variables['params']) == expected


@pytest.mark.parametrize('name,expected', sorted(SMALL_CIFAR_PARAMS.items()))
def test_small_cifar_models_have_the_studys_parameter_counts(name, expected):
  model = models.create_model(name, 10)
  params = abstract_variables(model, 32)['params']
  assert count(params) == expected
  assert params['stem_conv']['kernel'].shape[:2] == (3, 3)
  assert models.min_image_size(name) == 8  # no stem downsampling: three strided stages


def test_se_width_rounds_like_timm():
  # make_divisible(channels / 16, 8, round_limit=0): the nearest multiple of 8, at least 8.
  widths = [models.blocks.se_channels(c, 1 / 16) for c in (64, 120, 200, 256, 2048)]
  assert widths == [8, 8, 16, 16, 128]


def test_se_module_in_every_block():
  params = abstract_variables(models.create_model('seresnet18', 10), 32)['params']
  blocks = [k for k in params if k.startswith('stage')]
  assert len(blocks) == 8 and all(set(params[k]['se']) == {'fc1', 'fc2'} for k in blocks)
  assert params['stage1_block1']['se']['fc1']['kernel'].shape == (1, 1, 64, 8)
  assert params['stage4_block2']['se']['fc2']['kernel'].shape == (1, 1, 32, 512)
  assert (
    'se'
    not in abstract_variables(models.create_model('resnet18', 10), 32)['params']['stage1_block1']
  )


def test_se_gate_scales_the_branch_before_the_residual_add():
  """With fc2 zeroed the gate is sigmoid(0) = 1/2 everywhere, so the SE net must equal its
  twin without SE whose last BN in every block is halved (scale and bias): true only if SE
  scales the branch after its last BN and before the add."""
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 3))
  small = dict(stage_sizes=(1, 1), widths=(16, 32))  # two blocks, the second strided
  se = models.create_model('resnet20', 10, se_ratio=0.25, **small)
  plain = models.create_model('resnet20', 10, **small)
  v = random_variables(se, 8)
  se_params, halved = dict(v['params']), dict(v['params'])
  for name, block in v['params'].items():
    if 'se' in block:
      zeros = jax.tree.map(jnp.zeros_like, block['se']['fc2'])
      se_params[name] = {**block, 'se': {**block['se'], 'fc2': zeros}}
      last_bn = sorted(k for k in block if k.startswith('BatchNorm'))[-1]
      rest = {k: b for k, b in block.items() if k != 'se'}
      halved[name] = {**rest, last_bn: jax.tree.map(lambda a: a / 2, block[last_bn])}
  out_se = se.apply({**v, 'params': se_params}, x, train=False)
  out_halved = plain.apply({**v, 'params': halved}, x, train=False)
  np.testing.assert_allclose(out_se, out_halved, rtol=1e-5, atol=1e-6)
  assert not jnp.allclose(out_se, se.apply(v, x, train=False))  # a learned gate is not 1/2


def test_resnet_d_has_a_deep_stem_that_downsamples_by_four():
  model = models.create_model('resnet50d', 1000)
  _, variables = jax.eval_shape(
    lambda: model.init_with_output(
      jax.random.PRNGKey(0), jnp.zeros((2, 64, 64, 3)), train=False, capture_intermediates=True
    )
  )
  params = variables['params']
  stem = [params[f'stem_conv{k}']['kernel'].shape for k in (1, 2, 3)]
  assert stem == [(3, 3, 3, 32), (3, 3, 32, 32), (3, 3, 32, 64)]
  assert 'stem_conv' not in params and 'stem_bn3' in params
  stage1 = variables['intermediates']['stage1_block1']['__call__'][0]
  assert stage1.shape == (2, 16, 16, 256)
  assert params['stage2_block1']['proj_conv']['kernel'].shape == (1, 1, 256, 512)
  assert models.min_image_size('resnet50d') == models.min_image_size('resnet50') == 32


def test_resnet_d_shortcut_average_pools_then_projects_at_stride_1():
  """On a 5x5 input the 2x2/2 pool keeps the odd last row and column, averaged over the
  pixels that exist (timm's AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False))."""
  block = models.blocks.BasicBlock(
    filters=4,
    conv=functools.partial(nn.Conv, use_bias=False),
    norm=functools.partial(nn.BatchNorm, use_running_average=True),
    strides=2,
    shortcut='avg_projection',
  )
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 5, 5, 4))  # >= 0: the final ReLU keeps it
  v = numpy_variables(jax.eval_shape(block.init, jax.random.PRNGKey(1), x))
  # Zero the branch (its last BN) and make the projection the identity.
  zero_bn = {'scale': jnp.zeros(4), 'bias': jnp.zeros(4)}
  params = {**v['params'], 'BatchNorm_1': zero_bn, 'proj_conv': {'kernel': jnp.eye(4)[None, None]}}
  out = block.apply({**v, 'params': params}, x)
  xs = np.asarray(x)
  expected = np.zeros((2, 3, 3, 4), np.float32)
  for i in range(3):
    for j in range(3):
      expected[:, i, j] = xs[:, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].mean(axis=(1, 2))
  np.testing.assert_allclose(out, expected / np.sqrt(1 + 1e-5), rtol=1e-5)


def test_drop_path_rates_are_linear_from_zero_to_the_rate():
  assert models.blocks.drop_path_rates(0.8, (3, 3, 3)) == pytest.approx([0.1 * b for b in range(9)])
  assert models.blocks.drop_path_rates(0.0, (2, 2)) == [0.0] * 4


def test_stochastic_depth_is_the_identity_at_eval():
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 3))
  on = models.create_model('resnet20', 10, stochastic_depth_rate=0.5, zero_init_residual=False)
  off = models.create_model('resnet20', 10, zero_init_residual=False)
  v = random_variables(off, 8)
  assert jax.tree.structure(v) == jax.tree.structure(abstract_variables(on, 8))
  np.testing.assert_array_equal(on.apply(v, x, train=False), off.apply(v, x, train=False))


@pytest.fixture(scope='module')
def branch_contribution():
  """resnet20 (9 blocks, rate 0.8: block b dropped with probability 0.1 b) with every
  residual branch zero but block b's, which is the constant 1 (its last BN: scale 0, bias
  1). Identity and pad shortcuts carry that constant unchanged to the pooled features, and
  a head of ones sums them, so per example logit(drop) - logit(no drop) =
  width_b * (m / (1 - p_b) - 1), m = 0 or 1. Returns m / (1 - p_b) per example."""
  n = 1024
  x = jax.random.normal(jax.random.PRNGKey(1), (n, 4, 4, 3))
  drop = models.create_model('resnet20', 1, stochastic_depth_rate=0.8)
  keep = models.create_model('resnet20', 1)
  v = random_variables(keep, 4)
  zero_branch = lambda bn: jax.tree.map(jnp.zeros_like, bn)
  base = {
    name: {**p, 'BatchNorm_1': zero_branch(p['BatchNorm_1'])} if name.startswith('stage') else p
    for name, p in v['params'].items()
  }
  base['head'] = {'kernel': jnp.ones_like(base['head']['kernel']), 'bias': jnp.zeros((1,))}

  @jax.jit
  def logits(params, rng):
    variables = {**v, 'params': params}
    out, _ = drop.apply(variables, x, train=True, mutable=['batch_stats'], rngs={'dropout': rng})
    ref, _ = keep.apply(variables, x, train=True, mutable=['batch_stats'])  # rate 0: no rng
    return out[:, 0], ref[:, 0]

  def contribution(block, width, rng):
    constant_one = {'scale': jnp.zeros(width), 'bias': jnp.ones(width)}
    params = {**base, block: {**base[block], 'BatchNorm_1': constant_one}}
    out, ref = logits(params, rng)
    return np.asarray((out - ref) / width + 1)

  return contribution


@pytest.mark.parametrize(
  'block,width,rate',
  [('stage1_block1', 16, 0.0), ('stage2_block2', 32, 0.4), ('stage3_block3', 64, 0.8)],
)
def test_stochastic_depth_drops_by_the_linear_schedule_and_rescales(
  branch_contribution, block, width, rate
):
  kept = branch_contribution(block, width, jax.random.PRNGKey(0))
  dropped = np.isclose(kept, 0.0, atol=1e-3)
  # Kept branches are scaled by exactly 1 / (1 - p): the expectation is the eval output.
  np.testing.assert_allclose(kept[~dropped], 1 / (1 - rate), rtol=1e-3)
  assert abs(dropped.mean() - rate) < 0.05, dropped.mean()


def test_stochastic_depth_is_deterministic_for_a_dropout_key(branch_contribution):
  a, b, c = (branch_contribution('stage3_block3', 64, jax.random.PRNGKey(k)) for k in (0, 0, 1))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(np.isclose(a, 0, atol=1e-3), np.isclose(c, 0, atol=1e-3))


def test_invalid_regularisers_are_refused():
  with pytest.raises(ValueError, match='residual'):
    models.create_model('plain20', 10, stochastic_depth_rate=0.1)
  with pytest.raises(ValueError, match=r'\[0, 1\)'):
    models.create_model('resnet20', 10, stochastic_depth_rate=1.0)
  with pytest.raises(ValueError, match='se_ratio'):
    models.create_model('resnet20', 10, se_ratio=-0.1)
  models.create_model('plain20', 10, stochastic_depth_rate=0.0, se_ratio=1 / 16)


def test_per_device_batchnorm_normalises_each_group_by_its_own_statistics():
  """bn_groups=4 (config.bn_sync=False on 4 devices) gives each quarter of the batch what
  the model computes on that quarter alone, and moves the running statistics by the mean
  of the quarters' statistics; the variables are nn.BatchNorm's."""
  x = jax.random.normal(jax.random.PRNGKey(3), (8, 16, 16, 3))
  plain = models.create_model('resnet20', 10, zero_init_residual=False)
  grouped = models.create_model('resnet20', 10, zero_init_residual=False, bn_groups=4)
  with jax.threefry_partitionable(False):
    variables = jax.jit(lambda: plain.init(jax.random.PRNGKey(0), x[:1], train=False))()
  assert jax.tree.structure(variables) == jax.tree.structure(abstract_variables(grouped, 16))
  train = jax.jit(
    lambda m, x: m.apply(variables, x, train=True, mutable=['batch_stats']), static_argnums=0
  )
  out, updates = train(grouped, x)
  quarters = [train(plain, x[2 * i : 2 * i + 2]) for i in range(4)]
  np.testing.assert_allclose(out, np.concatenate([q[0] for q in quarters]), rtol=2e-4, atol=2e-5)
  mean_of_quarters = jax.tree.map(lambda *s: np.mean(s, axis=0), *[q[1] for q in quarters])
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
    updates,
    mean_of_quarters,
  )
  whole, _ = train(plain, x)
  assert float(jnp.abs(whole - out).max()) > 1e-3  # the grouping changes the outputs
  evaluated = jax.jit(lambda m: m.apply(variables, x, train=False), static_argnums=0)
  np.testing.assert_allclose(evaluated(grouped), evaluated(plain), rtol=1e-5, atol=1e-6)
