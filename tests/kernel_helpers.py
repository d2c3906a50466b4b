"""Helpers shared by the kernel tests (test_fast_kernels, test_onednn, test_work_pool): not a test module.

``run_kernels`` runs the library's forward, input-gradient and kernel-gradient kernels on random data and checks
nothing itself; ``conv_float64`` is the reference they are compared with, a float64 numpy convolution written tap
by tap (independent of XLA and oneDNN).
"""

import jax
import numpy as np
import pytest

from cmedl_jax.ops import onednn

# The conftest fixture builds the library on first use and skips the test where it cannot be built.
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
  """max |actual - expected| over the largest |expected|."""
  expected = np.asarray(expected, np.float64)
  return float(np.max(np.abs(np.asarray(actual, np.float64) - expected)) / np.max(np.abs(expected)))


def assert_close(actual, expected, tolerance):
  """Same shape and a :func:`relative_error` below ``tolerance`` (equal up to float32 summation order)."""
  assert np.shape(actual) == np.shape(expected)
  error = relative_error(actual, expected)
  assert error < tolerance, f"relative error {error}"
