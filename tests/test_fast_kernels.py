"""The library's own CPU kernels next to oneDNN: Winograd F(4x4, 3x3) and the one-channel ("thin") convolutions.

Checked against a float64 numpy convolution written tap by tap (independent of XLA and oneDNN), with the profile
key proving which kernel ran (a silent fall-back to oneDNN's direct kernels would fail the test).
"""

import jax
import numpy as np
import pytest

from cmedl_jax import ops
from cmedl_jax.models import layers
from cmedl_jax.ops import onednn
from tests.kernel_helpers import assert_close, needs_onednn, relative_error, run_kernels

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
    # F(4x4, 3x3) in float32: ~1e-6 here (2e-5 at 256 channels, docs/performance.md); a wrong transform entry,
    # tile offset or crop gives errors of order 1.
    assert_close(actual, reference, 2e-5)


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
    assert_close(actual, reference, 1e-5)


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
    assert_close(actual, reference, 1e-5)


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
