"""Layer-level checks: the CPU forms of the convolutions, sub-pixel transposed convs, pooling, norms, resampling and
initialisers.

The XLA:CPU forms (``conv_backend="xla"``: bit-identical rewrites, forced kernel-gradient paths) are tested here
against the plain convolution and its autodiff; the library's kernels in tests/test_onednn.py, test_fast_kernels.py
and test_work_pool.py; every form of every op against the plain one in tests/test_ops.py; and the networks against
PyTorch, with both the default and the plain forms, in tests/test_torch_port.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from cmedl_jax import ops
from cmedl_jax.models import initializers, layers, resample
from cmedl_jax.ops import subpixel, xla_cpu

XLA = ops.Kernels("xla")
PLAIN = ops.Kernels("plain")
# The CPU form and the plain form of the ops whose forms must agree exactly (pooling) or to rounding.
FORMS = {"cpu-xla": XLA, "plain": PLAIN}

DN = ("NHWC", "HWIO", "NHWC")


def _rng(seed=0):
  return np.random.default_rng(seed)


def _f32(a):
  return jnp.asarray(a, jnp.float32)


def numpy_conv_transpose(x, weight, bias, stride, padding, output_padding):
  """Scatter-add definition of PyTorch's conv_transpose2d; x (N, H, W, I), weight (I, O, k, k) -> NHWC."""
  n, h, w, _ = x.shape
  out_ch, k = weight.shape[1], weight.shape[2]
  full = np.zeros((n, (h - 1) * stride + k + output_padding, (w - 1) * stride + k + output_padding, out_ch))
  for i in range(h):
    for j in range(w):
      full[:, i * stride:i * stride + k, j * stride:j * stride + k] += np.einsum("ni,iokl->nklo", x[:, i, j], weight)
  out_h = (h - 1) * stride - 2 * padding + k + output_padding
  out_w = (w - 1) * stride - 2 * padding + k + output_padding
  out = full[:, padding:padding + out_h, padding:padding + out_w]
  return out + (0 if bias is None else bias)


# ------------------------------------------------------------------------------------------ conv2d fast forms
CONV_CASES = [  # kernel, stride, padding, mode, dilation
    (3, 1, 1, "reflect", 1), (7, 1, 3, "reflect", 1), (3, 1, 0, "zeros", 1), (7, 1, 0, "zeros", 1),
    (3, 2, 1, "zeros", 1), (4, 2, 1, "zeros", 1), (4, 1, 1, "zeros", 1), (3, 1, 2, "zeros", 2),
    (3, 1, 4, "zeros", 4), (3, 2, 0, "zeros", 1), (1, 1, 0, "zeros", 1), (3, 2, 1, "reflect", 1)]


@pytest.mark.parametrize("k,stride,pad,mode,dilation", CONV_CASES)
def test_conv2d_is_bit_identical_to_valid_conv_of_padded_input(k, stride, pad, mode, dilation):
  rng = _rng(k * 100 + stride * 10 + pad)
  x = _f32(rng.normal(size=(2, 17, 16, 5)))
  kernel = _f32(rng.normal(size=(k, k, 5, 3)))
  padded = layers.reflect_pad(x, pad) if mode == "reflect" else jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  expected = lax.conv_general_dilated(padded, kernel, (stride, stride), "VALID", rhs_dilation=(dilation, dilation),
                                      dimension_numbers=DN)
  fast = jax.jit(ops.using(XLA, lambda a, b: layers.conv2d(a, b, stride=stride, padding=pad, padding_mode=mode,
                                                            dilation=dilation)))
  got = fast(x, kernel)
  assert got.shape == expected.shape
  np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


def _valid_conv_of_padded(x, kernel, stride, pad, mode, dilation):
  """The straightforward form: explicit padding, then an unpadded convolution (XLA's own autodiff)."""
  padded = layers.reflect_pad(x, pad) if mode == "reflect" else jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  return lax.conv_general_dilated(padded, kernel, (stride, stride), "VALID", rhs_dilation=(dilation, dilation),
                                  dimension_numbers=DN)


# Kernel-gradient paths (forced): XLA's; the matrix products per kernel row (shifted views concatenated) or per
# tap, unrolled or in a lax.scan over kernel rows. With 5 -> 3 channels stride-1 convolutions shift the output
# gradient, with 3 -> 5 the input.
KERNEL_GRAD_PATHS = [("xla", 5, 3), ("rows", 5, 3), ("rows", 3, 5), ("scan-rows", 5, 3), ("scan-rows", 3, 5),
                     ("scan-taps", 5, 3), ("scan-taps", 3, 5)]


@pytest.mark.parametrize("path,cin,cout", KERNEL_GRAD_PATHS)
@pytest.mark.parametrize("k,stride,pad,mode,dilation", CONV_CASES)
def test_conv2d_custom_gradients_match_autodiff_of_plain_conv(k, stride, pad, mode, dilation, path, cin, cout,
                                                             monkeypatch):
  # conv2d's custom VJP (flipped-kernel input gradient, matrix-product kernel gradient) against XLA's autodiff of
  # the textbook form.
  monkeypatch.setattr(xla_cpu, "use_matmul_kernel_grad", lambda *_: path != "xla")
  if path.startswith("scan"):
    monkeypatch.setattr(xla_cpu, "_MAX_UNROLLED_ROW_BYTES", 0)
  if path.endswith("taps"):
    monkeypatch.setattr(xla_cpu, "_MIN_CHANNELS_PER_TAP", 1)
  rng = _rng(k * 100 + stride * 10 + pad + 7)
  x = _f32(rng.normal(size=(2, 17, 16, cin)))
  kernel = _f32(rng.normal(size=(k, k, cin, cout)))
  weights = _f32(rng.normal(size=_valid_conv_of_padded(x, kernel, stride, pad, mode, dilation).shape))
  loss = lambda conv: (lambda a, b: jnp.sum(jnp.sin(conv(a, b)) * weights))  # noqa: E731
  fast = jax.jit(ops.using(XLA, jax.value_and_grad(loss(lambda a, b: layers.conv2d(
      a, b, stride=stride, padding=pad, padding_mode=mode, dilation=dilation)), (0, 1))))
  plain = jax.jit(jax.value_and_grad(loss(lambda a, b: _valid_conv_of_padded(a, b, stride, pad, mode, dilation)),
                                     (0, 1)))
  (value, (dx, dw)), (ref_value, (ref_dx, ref_dw)) = fast(x, kernel), plain(x, kernel)
  np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(dx), np.asarray(ref_dx), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(dw), np.asarray(ref_dw), rtol=1e-5, atol=1e-4)


def test_matmul_kernel_grad_is_used_except_where_xla_is_as_fast():
  use = xla_cpu.use_matmul_kernel_grad
  paper_layers = [  # (output, kernel, stride, padding) of the paper networks at 256 px, batch 2
      ((2, 64, 64, 512), (2, 2, 256, 512), 1, 0),  # generator sub-pixel up
      ((2, 64, 64, 256), (3, 3, 256, 256), 1, 0),  # generator residual block
      ((2, 256, 256, 64), (7, 7, 1, 64), 1, 0),  # generator input layer
      ((2, 256, 256, 1), (7, 7, 64, 1), 1, 0),  # generator output layer
      ((2, 128, 128, 128), (3, 3, 64, 128), 2, 1),  # generator down
      ((2, 256, 256, 64), (3, 3, 64, 64), 1, 1),  # U-Net first block
      ((2, 64, 64, 128), (4, 4, 64, 128), 2, 1)]  # PatchGAN
  for shapes in paper_layers:
    assert use(*shapes), shapes
  assert use((4, 32, 32, 64), (2, 2, 32, 64), 1, 0)  # quickstart sub-pixel up
  assert use((4, 128, 128, 1), (7, 7, 8, 1), 1, 0)  # one output channel
  assert not use((4, 32, 32, 32), (3, 3, 32, 32), 1, 0)  # quickstart residual block: narrow
  assert not use((4, 128, 128, 8), (7, 7, 1, 8), 1, 0)  # narrow
  assert not use((4, 15, 15, 64), (4, 4, 64, 64), 1, 0)  # small map
  assert not use((4, 128, 128, 8), (1, 1, 8, 8), 1, 0)  # 1x1: a GEMM


@pytest.mark.parametrize("k,stride,pad,cin,cout",
                         [(4, 2, 1, 6, 8), (7, 1, 3, 8, 1), (3, 1, 1, 1, 4), (3, 1, 1, 64, 64)])
def test_conv_kernel_grad_matches_torch(k, stride, pad, cin, cout):
  torch = pytest.importorskip("torch")
  rng = _rng(3)
  x = rng.normal(size=(2, 20, 20, cin)).astype(np.float32)
  kernel = rng.normal(size=(k, k, cin, cout)).astype(np.float32)
  out = (20 + 2 * pad - k) // stride + 1
  g = rng.normal(size=(2, out, out, cout)).astype(np.float32)
  got = xla_cpu.conv_kernel_grad(_f32(x), _f32(g), kernel.shape, stride=stride, padding=pad, dilation=1)
  xt = torch.tensor(x.transpose(0, 3, 1, 2))
  wt = torch.tensor(kernel.transpose(3, 2, 0, 1), requires_grad=True)
  torch.nn.functional.conv2d(xt, wt, stride=stride, padding=pad).backward(torch.tensor(g.transpose(0, 3, 1, 2)))
  np.testing.assert_allclose(np.asarray(got), wt.grad.numpy().transpose(2, 3, 1, 0), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("shape", [(2, 8, 10, 3), (1, 9, 7, 2)])
def test_max_pool_2x2_values_and_gradients_match_flax_max_pool(shape, form):
  import flax.linen as nn
  rng = _rng(sum(shape))
  # Quantised values make ties inside windows common: the gradient must go to the same (first) element.
  x = _f32(np.round(rng.normal(size=shape) * 2) / 2)
  weights = _f32(rng.normal(size=(shape[0], shape[1] // 2, shape[2] // 2, shape[3])))
  reference = lambda a: nn.max_pool(a, (2, 2), strides=(2, 2))  # noqa: E731
  pool = ops.using(FORMS[form], ops.max_pool_2x2)
  np.testing.assert_array_equal(np.asarray(jax.jit(pool)(x)), np.asarray(reference(x)))
  grad = lambda pool: jax.jit(jax.grad(lambda a: jnp.sum(pool(a) * weights)))(x)  # noqa: E731
  np.testing.assert_array_equal(np.asarray(grad(pool)), np.asarray(grad(reference)))


@pytest.mark.parametrize("form", sorted(FORMS))
def test_max_pool_2x2_gradient_matches_torch_at_ties(form):
  torch = pytest.importorskip("torch")
  x = np.round(_rng(5).normal(size=(2, 6, 8, 3)) * 2).astype(np.float32) / 2
  g = _rng(6).normal(size=(2, 3, 4, 3)).astype(np.float32)
  got = jax.vjp(ops.using(FORMS[form], ops.max_pool_2x2), _f32(x))[1](_f32(g))[0]
  xt = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
  torch.nn.functional.max_pool2d(xt, 2).backward(torch.tensor(g.transpose(0, 3, 1, 2)))
  np.testing.assert_array_equal(np.asarray(got), xt.grad.numpy().transpose(0, 2, 3, 1))


def test_reflect_pad_matches_numpy_reflect():
  x = _rng().normal(size=(1, 5, 6, 2)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(layers.reflect_pad(_f32(x), 3)),
                                np.pad(x, ((0, 0), (3, 3), (3, 3), (0, 0)), mode="reflect"))


def test_conv2d_rejects_unknown_padding_mode():
  with pytest.raises(ValueError, match="padding_mode"):
    layers.conv2d(jnp.zeros((1, 4, 4, 1)), jnp.zeros((3, 3, 1, 1)), padding=1, padding_mode="circular")


def test_conv2d_module_parameters():
  module = layers.Conv2d(6, 3, padding=1)
  variables = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 4)))
  assert variables["params"]["kernel"].shape == (3, 3, 4, 6)
  assert variables["params"]["bias"].shape == (6,)
  no_bias = layers.Conv2d(6, 3, use_bias=False).init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 4)))
  assert "bias" not in no_bias["params"]


# -------------------------------------------------------------------------------------- sub-pixel transposed conv
TRANSPOSED_CASES = [(3, 2, 1, 1), (3, 2, 0, 0), (4, 2, 1, 0), (2, 2, 0, 0), (3, 3, 1, 2), (5, 2, 2, 1), (3, 1, 1, 0)]


@pytest.mark.parametrize("k,stride,pad,out_pad", TRANSPOSED_CASES)
def test_subpixel_conv_transpose_matches_numpy_definition(k, stride, pad, out_pad):
  rng = _rng(k + 7 * stride + 13 * pad)
  x = rng.normal(size=(2, 5, 6, 3))
  weight = rng.normal(size=(3, 4, k, k))
  bias = rng.normal(size=(4,))
  got = subpixel.conv_transpose2d(_f32(x), _f32(weight.transpose(2, 3, 0, 1)), _f32(bias), stride=stride,
                                  padding=pad, output_padding=out_pad)
  expected = numpy_conv_transpose(x, weight, bias, stride, pad, out_pad)
  assert got.shape == expected.shape
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)


def _lax_conv_transpose(x, kernel, k=3, stride=2, pad=1, out_pad=1):
  # PyTorch's transposed conv is a conv of the stride-dilated input with the spatially flipped kernel.
  lo, hi = k - 1 - pad, k - 1 - pad + out_pad
  return lax.conv_transpose(x, kernel[::-1, ::-1], (stride, stride), ((lo, hi), (lo, hi)), dimension_numbers=DN)


def test_cyclegan_up_layer_equals_lax_conv_transpose_and_doubles_size():
  rng = _rng(1)
  x = _f32(rng.normal(size=(2, 8, 8, 6)))
  kernel = _f32(rng.normal(size=(3, 3, 6, 4)))
  got = subpixel.conv_transpose2d(x, kernel, stride=2, padding=1, output_padding=1)
  assert got.shape == (2, 16, 16, 4)
  np.testing.assert_allclose(np.asarray(got), np.asarray(_lax_conv_transpose(x, kernel)), rtol=1e-5, atol=1e-5)


def test_cyclegan_up_layer_is_a_same_2x2_conv_then_depth_to_space():
  assert subpixel.subpixel_taps(3, 2, 1) == (0, ((1, -1), (2, 0)))
  rng = _rng(2)
  weight = rng.normal(size=(6, 4, 3, 3)).astype(np.float32)
  bias = rng.normal(size=(4,)).astype(np.float32)
  sub_kernel, sub_bias = subpixel.transposed_kernel_to_subpixel(_f32(weight.transpose(2, 3, 0, 1)), _f32(bias),
                                                                 stride=2, padding=1)
  assert sub_kernel.shape == (2, 2, 6, 16) and sub_bias.shape == (16,)
  x = rng.normal(size=(1, 5, 7, 6)).astype(np.float32)
  y = lax.conv_general_dilated(_f32(x), _f32(sub_kernel), (1, 1), "SAME", dimension_numbers=DN) + sub_bias
  got = subpixel.depth_to_space(y, 2)
  np.testing.assert_allclose(np.asarray(got), numpy_conv_transpose(x, weight, bias, 2, 1, 1), rtol=1e-5, atol=1e-5)


def test_subpixel_weight_gradient_matches_transposed_conv_gradient():
  rng = _rng(3)
  x = _f32(rng.normal(size=(2, 6, 6, 3)))
  kernel = _f32(rng.normal(size=(3, 3, 3, 5)))
  target = _f32(rng.normal(size=(2, 12, 12, 5)))
  loss_sub = lambda kern: jnp.sum(subpixel.conv_transpose2d(x, kern, stride=2, padding=1, output_padding=1) * target)
  loss_ref = lambda kern: jnp.sum(_lax_conv_transpose(x, kern) * target)
  np.testing.assert_allclose(np.asarray(jax.grad(loss_sub)(kernel)), np.asarray(jax.grad(loss_ref)(kernel)),
                             rtol=1e-4, atol=1e-4)


def test_depth_to_space_channel_order():
  x = jnp.arange(8, dtype=jnp.float32).reshape(1, 1, 1, 8)  # block 2, 2 output channels
  y = np.asarray(subpixel.depth_to_space(x, 2))
  assert y.shape == (1, 2, 2, 2)
  # channel (a_h * 2 + a_w) * C + c -> position (a_h, a_w), channel c
  np.testing.assert_array_equal(y[0, :, :, 0], [[0, 2], [4, 6]])
  np.testing.assert_array_equal(y[0, :, :, 1], [[1, 3], [5, 7]])


def test_conv_transpose_module_keeps_pytorch_shaped_kernel():
  module = layers.ConvTranspose2d(4)
  variables = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 5, 5, 6)))
  assert variables["params"]["transposed_kernel"].shape == (3, 3, 6, 4)
  assert module.apply(variables, jnp.zeros((1, 5, 5, 6))).shape == (1, 10, 10, 4)


@pytest.mark.parametrize("form", sorted(FORMS))
def test_conv_transpose_matches_torch(form):
  torch = pytest.importorskip("torch")
  rng = _rng(4)
  for k, stride, pad, out_pad in [(3, 2, 1, 1), (3, 2, 0, 0)]:
    ref = torch.nn.ConvTranspose2d(6, 4, k, stride=stride, padding=pad, output_padding=out_pad)
    x = rng.normal(size=(2, 6, 7, 9)).astype(np.float32)
    expected = ref(torch.from_numpy(x)).detach().numpy().transpose(0, 2, 3, 1)
    kernel = ref.weight.detach().numpy().transpose(2, 3, 0, 1)
    got = ops.conv_transpose2d(_f32(x.transpose(0, 2, 3, 1)), _f32(kernel), _f32(ref.bias.detach().numpy()),
                               stride=stride, padding=pad, output_padding=out_pad, kernels=FORMS[form])
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)
    sub_kernel, sub_bias = subpixel.transposed_kernel_to_subpixel(_f32(kernel), _f32(ref.bias.detach().numpy()),
                                                                   stride=stride, padding=pad)
    assert sub_kernel.shape[:2] == (2, 2) and sub_bias.shape == (16,)


# ----------------------------------------------------------------------------------------------------- norms
def test_instance_norm_matches_numpy():
  x = _rng(5).normal(3.0, 2.0, size=(2, 6, 7, 4)).astype(np.float32)
  mean = x.mean(axis=(1, 2), keepdims=True)
  var = ((x - mean) ** 2).mean(axis=(1, 2), keepdims=True)  # biased, as PyTorch
  expected = (x - mean) / np.sqrt(var + 1e-5)
  np.testing.assert_allclose(np.asarray(layers.instance_norm(_f32(x))), expected, rtol=1e-5, atol=1e-5)


def test_instance_norm_matches_torch():
  torch = pytest.importorskip("torch")
  x = _rng(6).normal(size=(2, 3, 5, 6)).astype(np.float32)
  expected = torch.nn.InstanceNorm2d(3)(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(np.asarray(layers.instance_norm(_f32(x.transpose(0, 2, 3, 1)))), expected,
                             rtol=1e-5, atol=1e-5)


def test_batch_norm_uses_pytorch_momentum_and_eps():
  x = _f32(_rng(7).normal(2.0, 3.0, size=(4, 3, 3, 2)))
  bn = layers.batch_norm(train=True)
  variables = bn.init(jax.random.PRNGKey(0), x)
  y, updates = bn.apply(variables, x, mutable=["batch_stats"])
  batch_mean = np.asarray(x).mean(axis=(0, 1, 2))
  # PyTorch: running = 0.9 * running + 0.1 * batch (running_mean starts at 0)
  np.testing.assert_allclose(np.asarray(updates["batch_stats"]["mean"]), 0.1 * batch_mean, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(y).mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
  assert bn.epsilon == 1e-5


def test_apply_norm_rejects_unknown_kind():
  with pytest.raises(ValueError, match="norm"):
    layers.apply_norm(jnp.zeros((1, 2, 2, 1)), "group", train=False)


# ------------------------------------------------------------------------------------------------ resampling
def _numpy_bilinear_align_corners(x, out_h, out_w):
  n, h, w, c = x.shape
  out = np.zeros((n, out_h, out_w, c))
  for i in range(out_h):
    src_i = i * (h - 1) / (out_h - 1) if out_h > 1 else 0.0
    i0 = int(np.floor(src_i)); i1 = min(i0 + 1, h - 1); fi = src_i - i0
    for j in range(out_w):
      src_j = j * (w - 1) / (out_w - 1) if out_w > 1 else 0.0
      j0 = int(np.floor(src_j)); j1 = min(j0 + 1, w - 1); fj = src_j - j0
      out[:, i, j] = ((1 - fi) * ((1 - fj) * x[:, i0, j0] + fj * x[:, i0, j1])
                      + fi * ((1 - fj) * x[:, i1, j0] + fj * x[:, i1, j1]))
  return out


@pytest.mark.parametrize("size", [(14, 18), (13, 5), (1, 1), (7, 9)])
def test_bilinear_align_corners_matches_numpy(size):
  x = _rng(8).normal(size=(2, 7, 9, 3)).astype(np.float32)
  got = resample.resize_bilinear_align_corners(_f32(x), size)
  np.testing.assert_allclose(np.asarray(got), _numpy_bilinear_align_corners(x, *size), rtol=1e-5, atol=1e-5)


def test_adaptive_avg_pool_matches_numpy_bins():
  x = _rng(9).normal(size=(1, 7, 8, 2)).astype(np.float32)
  for out in (1, 2, 3, 6, (4, 10)):
    oh, ow = (out, out) if isinstance(out, int) else out
    expected = np.zeros((1, oh, ow, 2))
    for i in range(oh):
      for j in range(ow):
        rows = slice(i * 7 // oh, -(-(i + 1) * 7 // oh))
        cols = slice(j * 8 // ow, -(-(j + 1) * 8 // ow))
        expected[:, i, j] = x[:, rows, cols].mean(axis=(1, 2))
    np.testing.assert_allclose(np.asarray(resample.adaptive_avg_pool2d(_f32(x), out)), expected, rtol=1e-5, atol=1e-6)


def test_resampling_matches_torch():
  torch = pytest.importorskip("torch")
  functional = torch.nn.functional
  x = _rng(10).normal(size=(2, 3, 7, 9)).astype(np.float32)
  xt, xj = torch.from_numpy(x), _f32(x.transpose(0, 2, 3, 1))
  for size in [(14, 18), (32, 33), (1, 1)]:
    expected = functional.interpolate(xt, size=size, mode="bilinear", align_corners=True).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(resample.resize_bilinear_align_corners(xj, size)), expected, atol=1e-6)
  for size in (1, 2, 3, 6):
    expected = functional.adaptive_avg_pool2d(xt, size).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(resample.adaptive_avg_pool2d(xj, size)), expected, atol=1e-6)


def test_center_crop_and_pad_to():
  x = jnp.arange(5 * 5, dtype=jnp.float32).reshape(1, 5, 5, 1)
  np.testing.assert_array_equal(np.asarray(resample.center_crop(x, (4, 4)))[0, :, :, 0], np.asarray(x)[0, :4, :4, 0])
  padded = resample.pad_to(x[:, :3, :4], (5, 5))
  assert padded.shape == (1, 5, 5, 1)
  np.testing.assert_array_equal(np.asarray(padded)[0, 1:4, 0:4, 0], np.asarray(x)[0, :3, :4, 0])


# ---------------------------------------------------------------------------------------------- initialisers
def test_gan_initialisers_have_reference_statistics():
  key = jax.random.PRNGKey(0)
  shape = (3, 3, 128, 128)
  normal = initializers.gan_kernel_init("normal", 0.02)(key, shape)
  assert abs(float(jnp.std(normal)) - 0.02) < 0.001 and abs(float(jnp.mean(normal))) < 0.001
  xavier = initializers.gan_kernel_init("xavier", 0.02)(key, shape)
  expected_std = 0.02 * np.sqrt(2.0 / (128 * 9 + 128 * 9))  # torch xavier_normal_: gain * sqrt(2 / (fan_in + fan_out))
  assert abs(float(jnp.std(xavier)) / expected_std - 1) < 0.05
  default = initializers.torch_default_kernel_init()(key, shape)
  bound = 1 / np.sqrt(128 * 9)
  assert float(jnp.max(jnp.abs(default))) <= bound and float(jnp.max(jnp.abs(default))) > 0.9 * bound
  with pytest.raises(ValueError, match="init_type"):
    initializers.gan_kernel_init("uniformish")
