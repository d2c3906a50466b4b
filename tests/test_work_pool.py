"""The library's thread pool (csrc/work_pool.h): every kernel family shared out over 1-5 threads, more than the cores.

The pool decides which thread runs which block at run time (a helper that is not running takes no share), and
oneDNN's own kernels run on it as batch parts whose kernel gradients are added at the end; a lost block, a block run
twice, a part at the wrong batch offset or a partial sum read before it is written gives a wrong result here. Each
result is checked against the float64 tap-by-tap convolution of test_fast_kernels, and the profile key says which
kernel ran.
"""

import jax
import numpy as np
import pytest

from cmedl_jax.ops import onednn
from tests.test_fast_kernels import needs_onednn, relative_error, run_kernels

# (x shape, kernel shape, stride, padding, winograd, {kind: the kernel that runs it}): a Winograd layer, both
# one-channel forms (their kernel gradients sum per-thread partials), oneDNN's kernels with batches split unevenly
# (5 images) and a batch smaller than the threads (one OpenMP team instead of parts).
WINOGRAD = {"fwd": "winograd", "dx": "winograd", "dw": "winograd"}
ONEDNN = {"fwd": "onednn", "dx": "onednn", "dw": "onednn"}
CASES = [
    ((3, 14, 13, 16), (3, 3, 16, 8), 1, ((1, 1), (1, 1)), True, WINOGRAD),
    ((3, 20, 17, 1), (7, 7, 1, 8), 1, ((3, 3), (3, 3)), True, {"fwd": "thin", "dx": "thin", "dw": "thin"}),
    ((3, 20, 17, 8), (7, 7, 8, 1), 1, ((0, 0), (0, 0)), True, {"fwd": "thin", "dx": "onednn", "dw": "thin"}),
    ((5, 16, 14, 8), (4, 4, 8, 16), 2, ((1, 1), (1, 1)), True, ONEDNN),
    ((5, 9, 11, 16), (2, 2, 16, 24), 1, ((0, 0), (0, 0)), False, ONEDNN),
    ((1, 12, 12, 8), (3, 3, 8, 8), 2, ((1, 1), (1, 1)), False, ONEDNN),
]


def kernel_of(key):
  """"fwd" etc. -> "winograd" | "thin" | "onednn", from a profile key."""
  last = key.split()[-1]
  return last if last in ("winograd", "thin") else "onednn"


@pytest.fixture
def threads(monkeypatch):
  """Sets the OpenMP/pool threads of the calls traced next (the attribute is read at trace time)."""

  def set_threads(count):
    monkeypatch.setattr(onednn, "threads_per_call", lambda: count)

  return set_threads


@needs_onednn
@pytest.mark.parametrize("count", [1, 2, 3, 5])
@pytest.mark.parametrize("x_shape, kernel_shape, stride, padding, winograd, kernels", CASES)
def test_every_kernel_is_exact_on_any_number_of_threads(threads, count, x_shape, kernel_shape, stride, padding,
                                                        winograd, kernels):
  threads(count)
  ours, expected, keys = run_kernels(x_shape, kernel_shape, stride, padding, winograd=winograd, seed=count)
  assert {key.split()[0]: kernel_of(key) for key in keys} == kernels, keys
  for actual, reference in zip(ours, expected):
    assert actual.shape == reference.shape
    assert relative_error(actual, reference) < 2e-5


@needs_onednn
def test_repeated_calls_on_more_threads_than_cores_stay_exact(threads):
  # 3 threads on CI's 2 cores: helpers are descheduled mid-block and wake late; 20 calls of each kernel and pass,
  # against the same calls on one thread.
  rng = np.random.default_rng(7)
  problems = [(x_shape, kernel_shape, stride, padding, winograd)
              for x_shape, kernel_shape, stride, padding, winograd, _ in CASES[:5]]
  inputs = [(rng.standard_normal(x).astype(np.float32), rng.standard_normal(k).astype(np.float32))
            for x, k, *_ in problems]

  def all_gradients(inputs):
    out = []
    for (x, k), (x_shape, kernel_shape, stride, padding, winograd) in zip(inputs, problems):
      geometry = dict(stride=(stride, stride), padding=padding, winograd=winograd)
      y = onednn.conv_forward(x, k, **geometry)
      out += [y, onednn.conv_backward_data(y, k, x_shape, **geometry),
              onednn.conv_backward_weights(x, y, kernel_shape, **geometry)]
    return out

  threads(1)
  single = [np.asarray(a, np.float64) for a in jax.jit(all_gradients)(inputs)]
  threads(3)
  shared = jax.jit(all_gradients)
  for _ in range(20):
    for a, b in zip(shared(inputs), single):
      # The one-channel kernel gradients add per-thread partial sums and oneDNN's per-part ones, so rounding differs
      # from one thread's; a lost, repeated or misplaced block is an error of order 1.
      assert relative_error(a, b) < 1e-5
