"""Network-level checks: parameter counts, shapes, distillation features, PatchNCE, BN axis names, PyTorch parity.

Parameter counts use ``jax.eval_shape`` (no real init). Without torch they are compared with counts derived here
from the layer formulas of the reference code (conv: in * out * k * k + out bias; BN: 2 * channels); with torch,
also with the in-test PyTorch re-statements in ``torch_reference_nets.py``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, PartitionSpec as P

from cmedl_jax import models
from cmedl_jax.models import patchnce, torch_names
from cmedl_jax.models.resnet_generator import CUT_NCE_LAYERS

TINY_UNET = dict(features=(4, 8, 16, 16))
TINY_DENSEFCN = dict(down_blocks=(2, 2), up_blocks=(2, 2), bottleneck_layers=2, growth_rate=4,
                     first_conv_features=8)
TINY_PSPNET = dict(depth=50, stage_blocks=(1, 1, 1, 1), base_width=4, head_features=8, aux_features=4)


def random_variables(module, shape, seed=0, **kwargs):
  """Variables of ``module`` filled with random numbers, without compiling ``init`` (which costs seconds on CPU)."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == "var":
      value = rng.uniform(0.5, 1.5, leaf.shape)
    elif name == "scale":
      value = 1.0 + 0.1 * rng.normal(size=leaf.shape)
    else:
      value = 0.2 * rng.normal(size=leaf.shape)
    return jnp.asarray(value, jnp.float32)

  return jax.tree_util.tree_map_with_path(fill, models.abstract_variables(module, shape, **kwargs))


# ------------------------------------------------------------------------------------ analytic parameter counts
def conv(cin, cout, k, bias=True):
  return cin * cout * k * k + (cout if bias else 0)


def bn(c):
  return 2 * c


def unet_count(in_ch=1, classes=2):
  """milesial 2020: DoubleConv = 2 x (conv3x3 with bias + BN), Up(in, out) convs in -> out -> out."""
  double = lambda cin, cout: conv(cin, cout, 3) + bn(cout) + conv(cout, cout, 3) + bn(cout)  # noqa: E731
  encoder = double(in_ch, 64) + double(64, 128) + double(128, 256) + double(256, 512) + double(512, 512)
  decoder = double(1024, 256) + double(512, 128) + double(256, 64) + double(128, 64)
  return encoder + decoder + conv(64, classes, 1)


def generator_count(in_ch=1, out_ch=1, ngf=64, blocks=9):
  """c7s1-64, d128, d256, 9 x R256 (two 3x3 convs), u128, u64 (3x3 transposed), c7s1-out; all with bias."""
  return (conv(in_ch, ngf, 7) + conv(ngf, 2 * ngf, 3) + conv(2 * ngf, 4 * ngf, 3)
          + blocks * 2 * conv(4 * ngf, 4 * ngf, 3) + conv(4 * ngf, 2 * ngf, 3) + conv(2 * ngf, ngf, 3)
          + conv(ngf, out_ch, 7))


def patchgan_count(in_ch=1, ndf=64):
  """C64-C128-C256-C512 (4x4) + the 1-channel 4x4 conv, all with bias (instance norm has no parameters)."""
  return (conv(in_ch, ndf, 4) + conv(ndf, 2 * ndf, 4) + conv(2 * ndf, 4 * ndf, 4) + conv(4 * ndf, 8 * ndf, 4)
          + conv(8 * ndf, 1, 4))


def densefcn67_count(in_ch=1, classes=2, growth=16, first=48, layers=5, blocks=5):
  """FC-DenseNet67 following the channel bookkeeping of the Tiramisu paper (Table 1 / Fig. 1)."""
  dense_block = lambda c: sum(bn(c + i * growth) + conv(c + i * growth, growth, 3) for i in range(layers))  # noqa
  total, c, skips = conv(in_ch, first, 3), first, []
  for _ in range(blocks):
    total += dense_block(c)
    c += growth * layers
    skips.append(c)
    total += bn(c) + conv(c, c, 1)  # transition down
  total += dense_block(c)  # bottleneck, passes on its growth * layers new maps
  new = growth * layers
  for _ in range(blocks):
    total += conv(new, new, 3)  # transition up (3x3 transposed conv)
    c = new + skips.pop()
    total += dense_block(c)
  c += new  # the last up block keeps its input
  return total + conv(c, classes, 1)


def pspnet50_count(in_ch=1, classes=2, aux=True):
  """torchvision ResNet-50 (25,557,032 with the 1000-way fc) adapted to semseg's PSPNet, + PPM and heads."""
  resnet50 = 25_557_032 - conv(2048, 1000, 1) - conv(3, 64, 7, bias=False)  # no fc, no 7x7 stem conv
  deep_stem = conv(in_ch, 64, 3, False) + conv(64, 64, 3, False) + bn(64) + conv(64, 128, 3, False) + bn(128)
  wider_layer1_input = conv(64, 64, 1, False) + conv(64, 256, 1, False)  # layer1.0 sees 128 channels, not 64
  ppm = 4 * (conv(2048, 512, 1, False) + bn(512))
  cls = conv(4096, 512, 3, False) + bn(512) + conv(512, classes, 1)
  aux_head = conv(1024, 256, 3, False) + bn(256) + conv(256, classes, 1)
  return resnet50 + deep_stem + wider_layer1_input + ppm + cls + (aux_head if aux else 0)


FULL_SIZE = {  # name -> (module, input shape, analytic count, published rounded count, its rounding unit)
    "unet": (lambda: models.UNet(num_classes=2), (1, 64, 64, 1), unet_count(), 13.4e6, 0.1e6),
    "generator": (lambda: models.ResnetGenerator(), (1, 64, 64, 1), generator_count(), 11.4e6, 0.1e6),
    "patchgan": (lambda: models.PatchGANDiscriminator(), (1, 64, 64, 1), patchgan_count(), 2.8e6, 0.1e6),
    # The Tiramisu paper (Table 2) reports 3.5M for FC-DenseNet67.
    "densefcn67": (lambda: models.FCDenseNet(num_classes=2), (1, 64, 64, 1), densefcn67_count(), 3.5e6, 0.1e6),
    "pspnet50": (lambda: models.PSPNet(num_classes=2, aux_head=True), (1, 64, 64, 1), pspnet50_count(), 49.1e6,
                 0.1e6),
}


@pytest.mark.parametrize("name", sorted(FULL_SIZE))
def test_parameter_counts_match_reference_formulas(name):
  make, shape, analytic, published, unit = FULL_SIZE[name]
  counted = models.count_parameters(make(), shape)
  assert counted == analytic
  assert abs(counted - published) <= unit / 2  # agrees with the published number to its rounding
  assert abs(counted - analytic) <= 0.01 * analytic


def test_known_absolute_counts():
  # Measured values, written down in docs/models.md.
  assert unet_count() == 13_394_242
  assert generator_count() == 11_365_633
  assert patchgan_count() == 2_762_689
  assert densefcn67_count() == 3_459_778
  assert pspnet50_count() == 49_065_796
  assert pspnet50_count(aux=False) == 46_705_474


@pytest.mark.torch
def test_parameter_counts_equal_pytorch_reference_modules():
  pytest.importorskip("torch")
  from tests import torch_reference_nets as ref
  pairs = [
      (ref.UNet(), models.UNet(), (1, 64, 64, 1)),
      (ref.ResnetGenerator(), models.ResnetGenerator(), (1, 64, 64, 1)),
      (ref.NLayerDiscriminator(), models.PatchGANDiscriminator(), (1, 64, 64, 1)),
      (ref.FCDenseNet(), models.FCDenseNet(), (1, 64, 64, 1)),
      (ref.PSPNet(use_aux=False), models.PSPNet(), (1, 64, 64, 1)),
  ]
  for torch_module, flax_module, shape in pairs:
    assert models.count_parameters(flax_module, shape) == ref.count(torch_module), type(flax_module).__name__


# ----------------------------------------------------------------------------------------------------- shapes
def _abstract_apply(module, shape, **kwargs):
  return jax.eval_shape(lambda: module.init_with_output(jax.random.PRNGKey(0), jnp.zeros(shape), **kwargs))[0]


@pytest.mark.parametrize("size", [32, 64])
def test_generator_and_discriminator_shapes(size):
  generator = models.ResnetGenerator()
  assert _abstract_apply(generator, (2, size, size, 1)).shape == (2, size, size, 1)
  feats = _abstract_apply(generator, (2, size, size, 1), nce_layers=CUT_NCE_LAYERS, encode_only=True)
  q = size // 4
  assert [f.shape for f in feats] == [(2, size + 6, size + 6, 1), (2, size // 2, size // 2, 128),
                                      (2, q, q, 256), (2, q, q, 256), (2, q, q, 256)]
  patches = {32: 2, 64: 6, 256: 30}[size]
  assert _abstract_apply(models.PatchGANDiscriminator(), (2, size, size, 1)).shape == (2, patches, patches, 1)


SEGMENTER_SHAPES = {  # name -> (kwargs, {feature: (scale divisor, channels)}) for 64 px, 1 input channel
    "unet": (dict(), {"up1": (8, 256), "up2": (4, 128), "up3": (2, 64), "up4": (1, 64)}),
    "unet_tiny": (dict(features=(8, 16, 32, 32)), {"up1": (4, 16), "up2": (2, 8), "up3": (1, 8)}),
    "densefcn": (dict(), {"up_block1": (16, 80), "up_block2": (8, 80), "up_block3": (4, 80), "up_block4": (2, 80),
                          "up_block5": (1, 288)}),
    "pspnet": (dict(aux_head=True), {"ppm": (8, 4096), "cls_hidden": (8, 512), "aux_logits": (1, 2)}),
    "pspnet_tiny": (dict(depth=18, base_width=8, head_features=16), {"ppm": (8, 128), "cls_hidden": (8, 16)}),
}


@pytest.mark.parametrize("name", sorted(SEGMENTER_SHAPES))
@pytest.mark.parametrize("size", [32, 64])
def test_segmenter_shapes_and_hint_features(name, size):
  kwargs, expected = SEGMENTER_SHAPES[name]
  model = models.build_segmenter(name.split("_")[0], 2, **kwargs)
  logits, feats = _abstract_apply(model, (2, size, size, 1), train=False)
  assert logits.shape == (2, size, size, 2)
  assert {k: v.shape for k, v in feats.items()} == {
      k: (2, size // div, size // div, c) for k, (div, c) in expected.items()}
  decoder = [k for k in expected if k != "aux_logits"]
  assert model.decoder_feature_names() == tuple(decoder)
  assert model.hint_feature_names() == tuple(decoder[-2:])


def test_build_factory():
  assert isinstance(models.build_segmenter("UNet", 3), models.UNet)
  assert models.build_segmenter("densefcn", 3).num_classes == 3
  assert isinstance(models.build_segmenter("pspnet"), models.PSPNet)
  assert models.build_generator(base_features=8).base_features == 8
  assert models.build_discriminator(num_layers=2).num_layers == 2
  assert models.build_patch_sampler(features=16).features == 16
  with pytest.raises(ValueError, match="unknown segmenter"):
    models.build_segmenter("segformer")


# --------------------------------------------------------------------------------------------------- generator
def test_generator_nce_layers_follow_pytorch_sequential_numbering():
  generator = models.ResnetGenerator(base_features=4, num_blocks=1)
  x = jax.random.uniform(jax.random.PRNGKey(1), (2, 16, 16, 1), minval=-1, maxval=1)
  variables = random_variables(generator, x.shape)
  layers = (0, 4, 8, 10)

  @jax.jit
  def run(v, a):
    encoded = generator.apply(v, a, nce_layers=layers, encode_only=True)
    y, feats = generator.apply(v, a, nce_layers=layers)
    stop_at_norm = generator.apply(v, a, nce_layers=(8,), encode_only=True)
    return encoded, y, feats, generator.apply(v, a), stop_at_norm[0]

  encoded, y, feats, plain, norm_output = run(variables, x)
  np.testing.assert_array_equal(np.asarray(encoded[0]), np.asarray(models.reflect_pad(x, 3)))  # 0: ReflectionPad
  for a, b in zip(encoded, feats):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(y), np.asarray(plain))
  assert float(jnp.max(jnp.abs(y))) <= 1.0
  assert [f.shape for f in feats] == [(2, 22, 22, 1), (2, 8, 8, 8), (2, 4, 4, 16), (2, 4, 4, 16)]
  # 8 is the norm after the second downsampling: zero mean per channel when the pass stops there, and
  # overwritten by the in-place ReLU that follows it otherwise (as in CUT)
  np.testing.assert_allclose(np.asarray(norm_output).mean(axis=(1, 2)), 0.0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(feats[2]), np.maximum(np.asarray(norm_output), 0.0), atol=1e-6)
  assert generator.num_layers() == 10 + 1 + 9
  with pytest.raises(ValueError, match="increasing"):
    generator.apply(variables, x, nce_layers=(4, 0))
  with pytest.raises(ValueError, match="outside"):
    generator.apply(variables, x, nce_layers=(0, 20))


def test_generator_dropout_only_in_training():
  generator = models.ResnetGenerator(base_features=4, num_blocks=1, use_dropout=True)
  x = jax.random.normal(jax.random.PRNGKey(1), (1, 8, 8, 1))
  variables = random_variables(generator, x.shape)
  assert "conv_block_6" in variables["params"]["model_10"]  # dropout shifts the second conv to index 6

  @jax.jit
  def run(v, a):
    train = generator.apply(v, a, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
    return generator.apply(v, a), generator.apply(v, a), train

  eval_a, eval_b, train = run(variables, x)
  np.testing.assert_array_equal(np.asarray(eval_a), np.asarray(eval_b))
  assert not np.allclose(np.asarray(train), np.asarray(eval_a))


# ---------------------------------------------------------------------------------------------------- PatchNCE
def numpy_patch_nce(feats_q, feats_k, batch_size, tau=0.07):
  """Loop-level restatement of CUT's loss: per image, per query patch, softmax over [positive, negatives]."""
  layer_losses = []
  for q, k in zip(feats_q, feats_k):
    q = np.asarray(q, np.float64).reshape(batch_size, -1, q.shape[-1])
    k = np.asarray(k, np.float64).reshape(batch_size, -1, k.shape[-1])
    losses = []
    for b in range(batch_size):
      for i in range(q.shape[1]):
        logits = [q[b, i] @ k[b, i]] + [(-10.0 if j == i else q[b, i] @ k[b, j]) for j in range(q.shape[1])]
        logits = np.asarray(logits) / tau
        losses.append(np.log(np.sum(np.exp(logits - logits.max()))) + logits.max() - logits[0])
    layer_losses.append(np.mean(losses))
  return float(np.mean(layer_losses))


def test_patch_nce_loss_matches_numpy():
  rng = np.random.default_rng(0)
  batch, patches = 2, 5
  unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
  feats_q = [unit(rng.normal(size=(batch * patches, 8))) for _ in range(2)]
  feats_k = [unit(rng.normal(size=(batch * patches, 8))) for _ in range(2)]
  got = patchnce.multilayer_patch_nce_loss([jnp.asarray(q, jnp.float32) for q in feats_q],
                                           [jnp.asarray(k, jnp.float32) for k in feats_k], batch)
  assert float(got) == pytest.approx(numpy_patch_nce(feats_q, feats_k, batch), rel=1e-5)
  # negatives of other images change the loss when they are included
  all_neg = patchnce.multilayer_patch_nce_loss([jnp.asarray(q) for q in feats_q], [jnp.asarray(k) for k in feats_k],
                                               batch, include_all_negatives_from_minibatch=True)
  assert float(all_neg) != pytest.approx(float(got), rel=1e-3)


def test_patch_nce_gradient_flows_only_through_queries():
  q = jax.random.normal(jax.random.PRNGKey(0), (6, 4))
  k = jax.random.normal(jax.random.PRNGKey(1), (6, 4))
  loss = lambda q_, k_: jnp.sum(patchnce.patch_nce_loss(q_, k_, 2))  # noqa: E731
  grad_q, grad_k = jax.jit(jax.grad(loss, argnums=(0, 1)))(q, k)
  assert float(jnp.abs(grad_k).max()) == 0.0 and float(jnp.abs(grad_q).max()) > 0.0


def test_l2_normalize_has_finite_gradient_at_zero():
  x = jnp.zeros((3, 4)).at[0].set(jnp.array([3.0, 4.0, 0.0, 0.0]))
  np.testing.assert_allclose(np.asarray(patchnce.l2_normalize(x))[0], [0.6, 0.8, 0, 0], rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(patchnce.l2_normalize(x))[1:], 0.0)
  grad = jax.jit(jax.grad(lambda a: jnp.sum(patchnce.l2_normalize(a) * jnp.arange(4.0))))(x)
  assert np.all(np.isfinite(np.asarray(grad)))


def test_patch_sampling_and_mlp_head():
  shapes = ((2, 38, 38, 1), (2, 8, 8, 16), (2, 4, 4, 32))
  sample = jax.jit(patchnce.sample_patch_ids, static_argnums=(1, 2))
  ids = sample(jax.random.PRNGKey(0), shapes, 32)
  assert [i.shape for i in ids] == [(32,), (32,), (16,)]  # at most H * W locations
  assert all(len(np.unique(np.asarray(i))) == i.shape[0] for i in ids)
  again = sample(jax.random.PRNGKey(0), shapes, 32)
  assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(ids, again))
  rng = np.random.default_rng(0)
  feats = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]
  noisy = [f + jnp.asarray(rng.normal(size=f.shape), jnp.float32) for f in feats]
  head = models.PatchSampleMLP(features=16)
  variables = jax.tree_util.tree_map(
      lambda leaf: jnp.asarray(0.3 * rng.normal(size=leaf.shape), jnp.float32),
      jax.eval_shape(lambda: head.init(jax.random.PRNGKey(0), feats, ids)))
  assert set(variables["params"]) == {f"mlp_{i}_{j}" for i in range(3) for j in (0, 2)}

  @jax.jit
  def run(v):
    out = head.apply(v, feats, ids)
    other = head.apply(v, noisy, ids)
    return (out, patchnce.gather_patches(feats[1], ids[1]), patchnce.multilayer_patch_nce_loss(out, out, 2),
            patchnce.multilayer_patch_nce_loss(out, other, 2))

  out, gathered, same, different = run(variables)
  assert [o.shape for o in out] == [(64, 16), (64, 16), (32, 16)]
  # unit length up to CUT's 1e-7 in the denominator
  np.testing.assert_allclose(np.linalg.norm(np.asarray(out[1]), axis=-1), 1.0, rtol=1e-5)
  # rows are image-major: row b * P + p is image b at location ids[p]
  flat = np.asarray(feats[1]).reshape(2, 64, 16)
  np.testing.assert_array_equal(np.asarray(gathered)[32 + 3], flat[1, int(ids[1][3])])
  # identical source and target features: each query's positive is its own key, so the loss is lower
  assert float(same) < float(different)


# --------------------------------------------------------------------------------------- BN over a mapped axis
def _train_step(model, variables, x):
  (logits, _), updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  return logits, updates["batch_stats"]


def test_batch_norm_statistics_are_averaged_over_the_vmapped_axis():
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 8, 8, 1)) + 0.5
  full = models.UNet(features=(4, 8))
  synced = models.UNet(features=(4, 8), bn_axis_name="data")
  variables = random_variables(full, x.shape)  # variables need no bound axis: init uses running averages
  shards = x.reshape(2, 4, 8, 8, 1)

  @jax.jit
  def run(v):
    per_shard = lambda m: jax.vmap(functools.partial(_train_step, m), in_axes=(None, 0), axis_name="data")  # noqa
    return _train_step(full, v, x), per_shard(synced)(v, shards), per_shard(full)(v, shards)

  (logits_full, stats_full), (logits_synced, stats_synced), (_, stats_local) = run(variables)
  np.testing.assert_allclose(np.asarray(logits_synced).reshape(logits_full.shape), np.asarray(logits_full),
                             rtol=1e-4, atol=1e-4)
  for a, b in zip(jax.tree_util.tree_leaves(stats_synced), jax.tree_util.tree_leaves(stats_full)):
    for shard in range(2):
      np.testing.assert_allclose(np.asarray(a)[shard], np.asarray(b), rtol=1e-4, atol=1e-5)
  # without the axis name each shard keeps its own statistics (what the averaging above fixes)
  leaf = jax.tree_util.tree_leaves(stats_local)[0]
  assert not np.allclose(np.asarray(leaf)[0], np.asarray(leaf)[1])


def test_batch_norm_axis_name_under_shard_map_on_8_devices():
  devices = jax.devices()
  if len(devices) < 8:
    pytest.skip("needs the 8 virtual CPU devices of tests/conftest.py")
  mesh = Mesh(np.asarray(devices[:8]), ("data",), axis_types=(AxisType.Auto,))
  model = models.build_segmenter("unet", 2, features=(4, 8), bn_axis_name="data")
  reference = models.build_segmenter("unet", 2, features=(4, 8))
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 8, 8, 1))
  variables = random_variables(reference, x.shape)
  sharded = jax.shard_map(functools.partial(_train_step, model), mesh=mesh, in_specs=(P(), P("data")),
                          out_specs=(P("data"), P()))
  (logits, stats), (ref_logits, ref_stats) = jax.jit(
      lambda v: (sharded(v, x), _train_step(reference, v, x)))(variables)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), rtol=1e-4, atol=1e-4)
  for a, b in zip(jax.tree_util.tree_leaves(stats), jax.tree_util.tree_leaves(ref_stats)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------- naming rule
def test_torch_key_to_flax_module_path():
  assert torch_names.module_path("model.10.conv_block.5.weight") == ("model_10", "conv_block_5")
  assert torch_names.module_path("down1.maxpool_conv.1.double_conv.0.weight") == (
      "down1", "maxpool_conv_1", "double_conv_0")
  assert torch_names.module_path("ppm.features.0.2.running_var") == ("ppm", "features_0_2")
  assert torch_names.module_path("bottleneck.bottleneck.layers.0.norm.weight") == (
      "bottleneck", "bottleneck", "layers_0", "norm")


# ------------------------------------------------------------------------------------------- PyTorch parity
def _port(torch_module, flax_module, shape, **init_kwargs):
  target = models.abstract_variables(flax_module, shape, **init_kwargs)
  return torch_names.torch_state_dict_to_variables(torch_module.state_dict(), target)


def _nchw(x):
  import torch
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.mark.torch
def test_generator_and_discriminator_match_pytorch():
  torch = pytest.importorskip("torch")
  from tests import torch_reference_nets as ref
  torch.manual_seed(0)
  x = np.random.default_rng(0).uniform(-1, 1, size=(2, 32, 32, 1)).astype(np.float32)
  generator_t, generator = ref.ResnetGenerator(ngf=4, n_blocks=2), models.ResnetGenerator(base_features=4, num_blocks=2)
  variables = _port(generator_t, generator, x.shape)
  layers = (0, 4, 8, 10, 11)
  y_t, feats_t = generator_t(_nchw(x), layers)
  y, feats = jax.jit(lambda v, a: generator.apply(v, a, nce_layers=layers))(variables, jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(y), _nhwc(y_t), rtol=1e-4, atol=1e-5)
  for a, b in zip(feats, feats_t):
    np.testing.assert_allclose(np.asarray(a), _nhwc(b), rtol=1e-4, atol=1e-4)
  disc_t, disc = ref.NLayerDiscriminator(ndf=4), models.PatchGANDiscriminator(base_features=4)
  np.testing.assert_allclose(np.asarray(jax.jit(disc.apply)(_port(disc_t, disc, x.shape), jnp.asarray(x))),
                             _nhwc(disc_t(_nchw(x))), rtol=1e-4, atol=1e-5)


@pytest.mark.torch
@pytest.mark.parametrize("name", ["unet", "densefcn", "pspnet"])
def test_segmenters_match_pytorch(name):
  torch = pytest.importorskip("torch")
  from tests import torch_reference_nets as ref
  torch.manual_seed(0)
  x = np.random.default_rng(1).normal(size=(2, 32, 32, 1)).astype(np.float32)
  if name == "unet":
    torch_model, model = ref.UNet(widths=TINY_UNET["features"]), models.UNet(**TINY_UNET)
  elif name == "densefcn":
    torch_model = ref.FCDenseNet(down_blocks=(2, 2), up_blocks=(2, 2), bottleneck_layers=2, growth_rate=4,
                                 out_chans_first_conv=8)
    model = models.FCDenseNet(**TINY_DENSEFCN)
  else:
    torch_model = ref.PSPNet(layers=(1, 1, 1, 1), base=4, head=8, aux=4)
    model = models.PSPNet(aux_head=True, **TINY_PSPNET)
  with torch.no_grad():
    ref.randomize_batch_norm_stats(torch_model)
  variables = _port(torch_model, model, x.shape)
  torch_model.eval()
  logits_t, feats_t = torch_model(_nchw(x))
  logits, feats = jax.jit(model.apply)(variables, jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(logits), _nhwc(logits_t), rtol=1e-4, atol=1e-4)
  feats_t = feats_t if isinstance(feats_t, dict) else dict(zip(model.decoder_feature_names(), feats_t))
  for key, value in feats_t.items():
    np.testing.assert_allclose(np.asarray(feats[key]), _nhwc(value), rtol=1e-4, atol=1e-4, err_msg=key)


@pytest.mark.torch
def test_unet_training_mode_matches_pytorch():
  torch = pytest.importorskip("torch")
  from tests import torch_reference_nets as ref
  torch.manual_seed(0)
  x = np.random.default_rng(2).normal(size=(4, 32, 32, 1)).astype(np.float32)
  torch_model, model = ref.UNet(widths=TINY_UNET["features"]), models.UNet(**TINY_UNET)
  variables = _port(torch_model, model, x.shape)
  torch_model.train()
  logits_t, _ = torch_model(_nchw(x))
  logits, stats = jax.jit(functools.partial(_train_step, model))(variables, jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(logits), _nhwc(logits_t), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(stats["inc"]["double_conv_1"]["mean"]),
                             torch_model.inc.double_conv[1].running_mean.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.torch
def test_patch_sample_mlp_and_nce_loss_match_pytorch():
  torch = pytest.importorskip("torch")
  from tests import torch_reference_nets as ref
  torch.manual_seed(0)
  shapes = [(2, 8, 8, 3), (2, 4, 4, 5)]
  feats = [np.random.default_rng(i).normal(size=s).astype(np.float32) for i, s in enumerate(shapes)]
  feats_src = [f + 0.3 * np.random.default_rng(9 + i).normal(size=f.shape).astype(np.float32)
               for i, f in enumerate(feats)]
  ids = patchnce.sample_patch_ids(jax.random.PRNGKey(0), shapes, num_patches=6)
  head_t, head = ref.PatchSampleF([3, 5], nc=16), models.PatchSampleMLP(features=16)
  target = jax.eval_shape(lambda: head.init(jax.random.PRNGKey(0), [jnp.asarray(f) for f in feats], ids))
  variables = torch_names.torch_state_dict_to_variables(head_t.state_dict(), target)
  ids_t = [torch.from_numpy(np.asarray(i).astype(np.int64)) for i in ids]
  q_t, k_t = head_t([_nchw(f) for f in feats], ids_t), head_t([_nchw(f) for f in feats_src], ids_t)
  apply = jax.jit(head.apply)
  q, k = (apply(variables, [jnp.asarray(f) for f in fs], ids) for fs in (feats, feats_src))
  for a, b in zip(q, q_t):
    np.testing.assert_allclose(np.asarray(a), b.detach().numpy(), rtol=1e-4, atol=1e-5)
  expected = sum(ref.patch_nce_loss(a, b, 2).mean() for a, b in zip(q_t, k_t)).detach() / 2
  assert float(patchnce.multilayer_patch_nce_loss(q, k, 2)) == pytest.approx(float(expected), rel=1e-4)
