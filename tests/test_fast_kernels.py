"""The library's own CPU kernels next to oneDNN: Winograd F(4x4, 3x3) and the one-channel ("thin") convolutions.

Checked against a float64 numpy convolution written tap by tap (independent of XLA and oneDNN), with the profile
key proving which kernel ran (a silent fall-back to oneDNN's direct kernels would fail the test).
"""

import jax
import numpy as np
import pytest

from cmedl_jax.bench import conv_profile
from cmedl_jax import ops
from cmedl_jax.models import layers
from cmedl_jax.ops import onednn

needs_onednn = pytest.mark.usefixtures("onednn_library")


def conv_float64(x, w, stride, padding):
  """Forward, input gradient and kernel gradient functions of a zero-padded NHWC/HWIO convolution in float64."""
  (pt, pb), (pl, pr) = padding
  kh, kw = w.shape[:2]
  n, h, wd, _ = x.shape
  padded_shape = (n, h + pt + pb, wd + pl + pr, x.shape[3])
  out_h, out_w = (padded_shape[1] - kh) // stride + 1, (padded_shape[2] - kw) // stride + 1

  def taps():
    for ky in range(kh):
      for kx in range(kw):
        yield ky, kx, (slice(None), slice(ky, ky + stride * (out_h - 1) + 1, stride),
                       slice(kx, kx + stride * (out_w - 1) + 1, stride))

  xp = np.zeros(padded_shape)
  xp[:, pt:pt + h, pl:pl + wd] = x
  y = sum(np.einsum("nhwc,ck->nhwk", xp[view], w[ky, kx]) for ky, kx, view in taps())

  def grads(dy):
    dxp = np.zeros(padded_shape)
    dw = np.zeros(w.shape)
    for ky, kx, view in taps():
      dxp[view] += np.einsum("nhwk,ck->nhwc", dy, w[ky, kx])
      dw[ky, kx] = np.einsum("nhwc,nhwk->ck", xp[view], dy)
    return dxp[:, pt:pt + h, pl:pl + wd], dw

  return y, grads


def run_kernels(x_shape, kernel_shape, stride, padding, winograd, seed=0):
  """(ours: y, dx, dw), (float64: y, dx, dw), the profile's keys."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(x_shape)
  w = rng.standard_normal(kernel_shape) / np.sqrt(np.prod(kernel_shape[:3]))
  y64, grads = conv_float64(x, w, stride, padding)
  dy = rng.standard_normal(y64.shape)
  dx64, dw64 = grads(dy)
  geometry = dict(stride=(stride, stride), padding=padding, winograd=winograd)
  x32, w32, dy32 = (np.asarray(a, np.float32) for a in (x, w, dy))
  onednn.profile_start()
  ours = jax.block_until_ready((onednn.conv_forward(x32, w32, **geometry),
                                onednn.conv_backward_data(dy32, w32, x_shape, **geometry),
                                onednn.conv_backward_weights(x32, dy32, kernel_shape, **geometry)))
  keys = sorted(onednn.profile_stop()["calls"])
  return ours, (y64, dx64, dw64), keys


def relative_error(actual, expected):
  return float(np.max(np.abs(np.asarray(actual, np.float64) - expected)) / np.max(np.abs(expected)))


# (x shape, kernel shape, ((top, bottom), (left, right))): reflect-padded residual blocks (padding 0), U-Net
# layers (padding 1), padding 2, outputs that are not multiples of the 4x4 tile, uneven channel counts.
WINOGRAD_CASES = [
    ((2, 18, 18, 16), (3, 3, 16, 16), ((0, 0), (0, 0))),
    ((1, 13, 11, 8), (3, 3, 8, 24), ((1, 1), (1, 1))),
    ((2, 9, 14, 24), (3, 3, 24, 8), ((2, 2), (2, 2))),
    ((1, 7, 6, 32), (3, 3, 32, 16), ((1, 0), (0, 1))),
    ((1, 9, 10, 8), (3, 3, 8, 8), ((2, 4), (1, 3))),  # bottom/right padding past 2
]


@needs_onednn
@pytest.mark.parametrize("x_shape, kernel_shape, padding", WINOGRAD_CASES)
def test_winograd_matches_a_float64_convolution(x_shape, kernel_shape, padding):
  assert onednn.winograd_applies(kernel_shape, padding=padding)
  ours, expected, keys = run_kernels(x_shape, kernel_shape, 1, padding, winograd=True)
  assert all(key.endswith(" winograd") for key in keys), keys
  for actual, reference in zip(ours, expected):
    assert actual.shape == reference.shape
    # F(4x4, 3x3) in float32: ~1e-6 here (2e-5 at 256 channels, docs/performance.md); a wrong transform entry,
    # tile offset or crop gives errors of order 1.
    assert relative_error(actual, reference) < 2e-5


@needs_onednn
def test_winograd_error_stays_within_10x_of_the_direct_kernels():
  shape, kernel, padding = (2, 16, 16, 64), (3, 3, 64, 64), ((1, 1), (1, 1))
  winograd, expected, _ = run_kernels(shape, kernel, 1, padding, winograd=True)
  direct, _, keys = run_kernels(shape, kernel, 1, padding, winograd=False)
  assert not any(key.endswith(" winograd") for key in keys)
  for w_out, d_out, reference in zip(winograd, direct, expected):
    assert relative_error(w_out, reference) < 10 * max(relative_error(d_out, reference), 1e-7)


@pytest.mark.parametrize("kernel_shape, stride, padding, applies", [
    ((3, 3, 8, 16), (1, 1), ((1, 1), (1, 1)), True),
    ((3, 3, 8, 16), (2, 2), ((1, 1), (1, 1)), False),
    ((3, 3, 6, 16), (1, 1), ((1, 1), (1, 1)), False),
    ((3, 3, 8, 12), (1, 1), ((1, 1), (1, 1)), False),
    ((4, 4, 8, 16), (1, 1), ((1, 1), (1, 1)), False),
    ((3, 3, 8, 16), (1, 1), ((3, 3), (3, 3)), False),
])
def test_winograd_applies_to_3x3_stride_1_layers_with_channels_in_multiples_of_8(kernel_shape, stride, padding,
                                                                                   applies):
  assert onednn.winograd_applies(kernel_shape, stride, padding) == applies


@needs_onednn
def test_winograd_flag_is_ignored_where_it_does_not_apply():
  ours, expected, keys = run_kernels((1, 12, 12, 8), (3, 3, 8, 16), 2, ((1, 1), (1, 1)), winograd=True)
  assert not any(key.endswith(" winograd") for key in keys)
  for actual, reference in zip(ours, expected):
    assert relative_error(actual, reference) < 1e-5


# (x shape, kernel shape, stride, padding): the generators' 7x7 first and last layers (reflect-padded, so padding
# 0), the PatchGAN's first layer (4x4, stride 2, padding 1), and zero-padded / uneven variants.
THIN_CASES = [
    ((2, 20, 23, 1), (7, 7, 1, 8), 1, ((0, 0), (0, 0))),
    ((2, 20, 23, 8), (7, 7, 8, 1), 1, ((0, 0), (0, 0))),
    ((1, 19, 17, 1), (7, 7, 1, 24), 1, ((3, 3), (3, 3))),
    ((1, 19, 17, 16), (7, 7, 16, 1), 1, ((3, 3), (3, 3))),
    ((2, 16, 18, 1), (4, 4, 1, 8), 2, ((1, 1), (1, 1))),
    ((1, 23, 21, 8), (4, 4, 8, 1), 2, ((2, 2), (2, 2))),
    # Kernel wider than input + padding, stride 2: a tap that misses every column (review: read past the row).
    ((1, 2, 2, 1), (4, 4, 1, 8), 2, ((1, 1), (1, 1))),
    ((1, 2, 2, 8), (4, 4, 8, 1), 2, ((1, 1), (1, 1))),
]


@needs_onednn
@pytest.mark.parametrize("x_shape, kernel_shape, stride, padding", THIN_CASES)
def test_one_channel_kernels_match_a_float64_convolution(x_shape, kernel_shape, stride, padding):
  ours, expected, keys = run_kernels(x_shape, kernel_shape, stride, padding, winograd=True)
  thin = {key.split()[0] for key in keys if key.endswith(" thin")}
  # The forward and kernel gradient always run here; the input gradient for one-input-channel, stride-1 layers.
  assert thin == ({"fwd", "dw", "dx"} if kernel_shape[2] == 1 and stride == 1 else {"fwd", "dw"}), keys
  for actual, reference in zip(ours, expected):
    assert actual.shape == reference.shape
    assert relative_error(actual, reference) < 1e-5


def test_profile_keys_of_the_library_kernels_parse():
  direct = conv_profile.gflop("fwd n2 66x66x256 -> 64x64x256 k3x3 s1")
  assert conv_profile.gflop("fwd n2 66x66x256 -> 64x64x256 k3x3 s1 winograd") == direct
  assert conv_profile.gflop("dx  n4 134x134x1 -> 128x128x8 k7x7 s1 thin") == pytest.approx(
      2 * 4 * 128 * 128 * 8 * 49 / 1e9)


def test_unknown_algorithms_are_rejected():
  with pytest.raises(ValueError, match="conv_algorithm must be one of"):
    ops.Kernels("onednn", "fft")


@needs_onednn
@pytest.mark.parametrize("name", ["winograd", "direct"])
def test_conv2d_uses_the_algorithm_of_its_kernels(name):
  x = np.random.default_rng(0).standard_normal((1, 12, 12, 8)).astype(np.float32)
  conv = layers.Conv2d(16, 3, padding=1)
  params = conv.init(jax.random.key(0), x)
  loss = jax.jit(ops.using(ops.Kernels("onednn", name),
                           jax.grad(lambda p, x: (conv.apply(p, x) ** 2).sum(), argnums=(0, 1))))
  onednn.profile_start()
  jax.block_until_ready(loss(params, x))
  keys = onednn.profile_stop()["calls"]
  assert len(keys) == 3 and all(key.endswith(" winograd") == (name == "winograd") for key in keys), keys


@needs_onednn
def test_winograd_kernel_gradient_of_an_empty_batch_is_zero():
  # A previous call leaves its sums in the library's buffers; an empty batch (no tiles) must not return them.
  run_kernels((1, 8, 8, 8), (3, 3, 8, 8), 1, ((1, 1), (1, 1)), winograd=True)
  empty = np.zeros((0, 8, 8, 8), np.float32)
  dw = onednn.conv_backward_weights(empty, empty, (3, 3, 8, 8), padding=((1, 1), (1, 1)), winograd=True)
  np.testing.assert_array_equal(np.asarray(dw), 0)
