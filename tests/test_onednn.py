"""The library's convolutions through XLA's FFI (cmedl_jax.ops.onednn) against XLA's convolutions; its build."""

import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from cmedl_jax.ops import onednn
from tests.kernel_helpers import assert_close, needs_onednn

DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
TOLERANCE = 3e-5  # relative to the largest |value|: equal up to float32 summation order


def reference(x, kernel, stride, padding, dilation):
  return lax.conv_general_dilated(x, kernel, stride, padding, rhs_dilation=dilation,
                                  dimension_numbers=DIMENSION_NUMBERS, precision=lax.Precision.HIGHEST)


def random(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


# (x shape, kernel shape, stride, ((top, bottom), (left, right)), dilation): every layer form the networks use
# (7x7 reflect-padded, 3x3 stride 1/2, 4x4 stride 2, the sub-pixel 2x2, 1x1) plus uneven shapes and paddings.
CASES = [
    ((2, 14, 14, 1), (7, 7, 1, 8), (1, 1), ((0, 0), (0, 0)), (1, 1)),
    ((2, 14, 14, 8), (7, 7, 8, 1), (1, 1), ((0, 0), (0, 0)), (1, 1)),
    ((2, 16, 12, 8), (3, 3, 8, 16), (2, 2), ((1, 1), (1, 1)), (1, 1)),
    ((3, 16, 16, 5), (4, 4, 5, 7), (2, 2), ((1, 1), (1, 1)), (1, 1)),
    ((2, 9, 11, 16), (2, 2, 16, 32), (1, 1), ((0, 0), (0, 0)), (1, 1)),
    ((2, 8, 8, 32), (1, 1, 32, 2), (1, 1), ((0, 0), (0, 0)), (1, 1)),
    ((1, 13, 10, 6), (3, 3, 6, 4), (1, 1), ((2, 2), (2, 2)), (2, 2)),
    ((2, 11, 13, 3), (3, 2, 3, 5), (3, 2), ((0, 2), (1, 0)), (1, 2)),
    ((1, 10, 10, 64), (3, 3, 64, 64), (1, 1), ((1, 1), (1, 1)), (1, 1)),
]


@needs_onednn
@pytest.mark.parametrize("x_shape, kernel_shape, stride, padding, dilation", CASES)
def test_forward_and_gradients_equal_xla(x_shape, kernel_shape, stride, padding, dilation):
  x, kernel = random(x_shape, 0), random(kernel_shape, 1)
  geometry = dict(stride=stride, padding=padding, dilation=dilation)
  expected, vjp = jax.vjp(lambda x, k: reference(x, k, stride, padding, dilation), x, kernel)
  assert onednn.output_shape(x_shape, kernel_shape, stride, padding, dilation) == expected.shape
  g = random(expected.shape, 2)
  dx_expected, dk_expected = vjp(g)
  forward = jax.jit(lambda x, k: onednn.conv_forward(x, k, **geometry))
  backward_data = jax.jit(lambda g, k: onednn.conv_backward_data(g, k, x_shape, **geometry))
  backward_weights = jax.jit(lambda x, g: onednn.conv_backward_weights(x, g, kernel_shape, **geometry))
  assert_close(forward(x, kernel), expected, TOLERANCE)
  assert_close(backward_data(g, kernel), dx_expected, TOLERANCE)
  assert_close(backward_weights(x, g), dk_expected, TOLERANCE)


# Independent convolutions of different geometries, which XLA may issue from several of its threads at once.
CONCURRENT = [((2, 20, 20, 16), (3, 3, 16, 16), (1, 1), ((1, 1), (1, 1))),
              ((2, 24, 24, 8), (4, 4, 8, 12), (2, 2), ((1, 1), (1, 1))),
              ((2, 26, 26, 1), (7, 7, 1, 8), (1, 1), ((0, 0), (0, 0))),
              ((2, 16, 16, 32), (1, 1, 32, 4), (1, 1), ((0, 0), (0, 0)))]


@needs_onednn
def test_concurrent_calls_are_correct_and_run_on_one_executor_thread():
  inputs = [(random(x_shape, 10 + i), random(kernel_shape, 20 + i)) for i, (x_shape, kernel_shape, _, _) in
            enumerate(CONCURRENT)]

  def all_convs(inputs):
    return [onednn.conv_forward(x, k, stride=s, padding=p) for (x, k), (_, _, s, p) in zip(inputs, CONCURRENT)]

  expected = [reference(x, k, s, p, (1, 1)) for (x, k), (_, _, s, p) in zip(inputs, CONCURRENT)]
  fn = jax.jit(all_convs)
  jax.block_until_ready(fn(inputs))
  results, errors = {}, []

  def worker(index):
    try:
      for repeat in range(3):
        results[index, repeat] = jax.block_until_ready(fn(inputs))
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  onednn.profile_start()
  threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  profile = onednn.profile_stop()
  assert not errors
  for outputs in results.values():
    for actual, want in zip(outputs, expected):
      assert_close(actual, want, TOLERANCE)
  assert profile["threads"] == 1  # every call of every XLA thread ran on the one executor thread
  assert sorted(calls for calls, _ in profile["calls"].values()) == [12] * len(CONCURRENT)
  assert 0 < profile["busy_s"] <= sum(seconds for _, seconds in profile["calls"].values()) + 1e-3


@needs_onednn
def test_profile_names_each_geometry_and_counts_its_calls():
  x, kernel = random((3, 18, 14, 5), 30), random((4, 4, 5, 7), 31)
  geometry = dict(stride=(2, 2), padding=((1, 1), (1, 1)))
  forward = jax.jit(lambda x, k: onednn.conv_forward(x, k, **geometry))
  backward_weights = jax.jit(lambda x, g: onednn.conv_backward_weights(x, g, kernel.shape, **geometry))
  y = forward(x, kernel)
  assert y.shape == (3, 9, 7, 7)
  jax.block_until_ready(backward_weights(x, y))
  onednn.profile_start()
  for _ in range(2):
    jax.block_until_ready(forward(x, kernel))
  jax.block_until_ready(backward_weights(x, y))
  profile = onednn.profile_stop()
  assert set(profile["calls"]) == {"fwd n3 18x14x5 -> 9x7x7 k4x4 s2", "dw  n3 18x14x5 -> 9x7x7 k4x4 s2"}
  assert profile["calls"]["fwd n3 18x14x5 -> 9x7x7 k4x4 s2"][0] == 2
  assert profile["calls"]["dw  n3 18x14x5 -> 9x7x7 k4x4 s2"][0] == 1
  # stopped: later calls are not counted
  jax.block_until_ready(forward(x, kernel))
  onednn.profile_start()
  assert onednn.profile_stop()["calls"] == {}


def test_missing_onednn_says_what_to_install(monkeypatch, tmp_path):
  monkeypatch.setattr(onednn, "_prefixes", lambda: [str(tmp_path)])
  with pytest.raises(onednn.OnednnUnavailable, match="pip install onednn-cpu-gomp"):
    onednn.find_onednn()


@needs_onednn
def test_failed_build_reports_the_compiler_output(monkeypatch, tmp_path):
  script = tmp_path / "broken-cxx"
  script.write_text("#!/bin/sh\necho 'cc1plus: fatal error: out of cheese' >&2\nexit 3\n")
  script.chmod(0o755)
  monkeypatch.setenv("CXX", str(script))
  out = tmp_path / "lib.so"
  with pytest.raises(onednn.OnednnUnavailable, match=r"(?s)failed \(exit 3\).*out of cheese"):
    onednn.build(str(out))
  assert not out.exists() and os.listdir(tmp_path) == ["broken-cxx"]  # no half-written library left behind


@needs_onednn
def test_unwritable_cache_folder_is_reported(tmp_path):
  not_a_folder = tmp_path / "a-file"
  not_a_folder.write_text("")
  with pytest.raises(onednn.OnednnUnavailable, match="CMEDL_ONEDNN_CACHE"):
    onednn.build(str(not_a_folder / "lib.so"))
