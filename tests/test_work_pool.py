"""The library's thread pool (csrc/work_pool.h): every kernel family shared out over 1-5 threads, more than the cores.

The pool decides which thread runs which block at run time (a helper that is not running takes no share), and
oneDNN's own kernels run on it as batch parts whose kernel gradients are added at the end; a lost block, a block run
twice, a part at the wrong batch offset or a partial sum read before it is written gives a wrong result here. Each
result is checked against the float64 tap-by-tap convolution of tests/kernel_helpers.py, and the profile key says
which kernel ran; repeated calls must give the same bits (the reductions sum per-block partials in block order).
"""

import jax
import numpy as np
import pytest

from cmedl_jax.ops import onednn
from tests.kernel_helpers import assert_close, needs_onednn, relative_error, run_kernels

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
    assert_close(actual, reference, 2e-5)


@needs_onednn
@pytest.mark.parametrize("count", [3, 20])
def test_repeated_calls_on_more_threads_than_cores_are_bitwise_equal(threads, count):
  # More threads than CI's 2 cores: helpers are descheduled mid-block and wake late, so which thread runs which
  # block changes from call to call. 20 threads: the Winograd products split over positions and output rows. Every
  # reduction sums per-block (or per-part) partials in a fixed order, so 20 calls of each kernel and pass give the
  # same bits as the first; against one thread (other partials) the results agree to rounding.
  rng = np.random.default_rng(7)
  # CASES and, so that the helpers wake in time to take blocks (on small maps the caller runs all of them), the
  # one-channel layers of the quickstart step at 128 px (with per-thread partial sums, 30 of 30 calls differed).
  problems = [(x_shape, kernel_shape, stride, padding, winograd)
              for x_shape, kernel_shape, stride, padding, winograd, _ in CASES] + [
                  ((4, 134, 134, 1), (7, 7, 1, 8), 1, ((0, 0), (0, 0)), True),
                  ((4, 134, 134, 8), (7, 7, 8, 1), 1, ((0, 0), (0, 0)), True),
                  ((4, 66, 66, 8), (3, 3, 8, 8), 1, ((0, 0), (0, 0)), True)]
  inputs = [(rng.standard_normal(x).astype(np.float32), rng.standard_normal(k).astype(np.float32))
            for x, k, *_ in problems]

  def gradients(problem):
    x_shape, kernel_shape, stride, padding, winograd = problem
    geometry = dict(stride=(stride, stride), padding=padding, winograd=winograd)

    def run(x, k):
      y = onednn.conv_forward(x, k, **geometry)
      return (y, onednn.conv_backward_data(y, k, x_shape, **geometry),
              onednn.conv_backward_weights(x, y, kernel_shape, **geometry))

    return jax.jit(run)  # one program per problem: the helpers sleep between calls and wake at varying times

  threads(1)
  single = [np.asarray(a, np.float64) for problem, xk in zip(problems, inputs) for a in gradients(problem)(*xk)]
  threads(count)
  shared = [gradients(problem) for problem in problems]
  run_all = lambda: [np.asarray(a) for f, xk in zip(shared, inputs) for a in f(*xk)]  # noqa: E731
  first = run_all()
  for a, b in zip(first, single):
    assert relative_error(a, b) < 1e-5  # a lost, repeated or misplaced block is an error of order 1
  for _ in range(20):
    for a, b in zip(run_all(), first):
      np.testing.assert_array_equal(a, b)
