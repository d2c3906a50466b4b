"""2x2 max pooling: a CPU form with a custom VJP, and the plain ``lax.reduce_window`` form elsewhere.

XLA:CPU runs the gradient of a ``reduce_window`` max (``select_and_scatter``) slowly (docs/performance.md), so the
CPU form has a custom VJP instead, which routes each window's gradient to its first maximal element in row-major
order, as ``reduce_window``'s gradient and PyTorch do (so the subgradient at ties is the same in both forms).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from cmedl_jax.ops import backend


def _pool_quadrants(x):
  # The four members of each 2x2 window, in PyTorch's scan order (row-major within the window).
  return x[:, 0::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 0::2], x[:, 1::2, 1::2]


def plain_max_pool_2x2(x):
  """The plain form: ``lax.reduce_window`` max over 2x2 windows, stride 2 (odd trailing rows/columns dropped)."""
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


@jax.custom_vjp
def quadrant_max_pool_2x2(x):
  """The CPU form: the maximum of the four strided quadrants, with the gradient of :func:`plain_max_pool_2x2`."""
  x = x[:, :x.shape[1] // 2 * 2, :x.shape[2] // 2 * 2]
  a, b, c, d = _pool_quadrants(x)
  return jnp.maximum(jnp.maximum(a, b), jnp.maximum(c, d))


def _quadrant_fwd(x):
  y = quadrant_max_pool_2x2(x)
  return y, (x, y)


def _quadrant_bwd(residuals, g):
  x, y = residuals
  n, h, w, ch = x.shape
  a, b, c, _ = _pool_quadrants(x[:, :h // 2 * 2, :w // 2 * 2])
  zero = jnp.zeros((), g.dtype)
  taken_a = a == y
  taken_b = (b == y) & ~taken_a
  taken_c = (c == y) & ~(taken_a | taken_b)
  taken_d = ~(taken_a | taken_b | taken_c)
  ga, gb, gc, gd = (jnp.where(t, g, zero) for t in (taken_a, taken_b, taken_c, taken_d))
  # Interleave the quadrants back: columns within each row parity, then the two row parities.
  top = jnp.stack([ga, gb], axis=3).reshape(n, h // 2, w // 2 * 2, ch)
  bottom = jnp.stack([gc, gd], axis=3).reshape(n, h // 2, w // 2 * 2, ch)
  dx = jnp.stack([top, bottom], axis=2).reshape(n, h // 2 * 2, w // 2 * 2, ch)
  if dx.shape != x.shape:
    dx = jnp.pad(dx, ((0, 0), (0, h - dx.shape[1]), (0, w - dx.shape[2]), (0, 0)))
  return (dx,)


quadrant_max_pool_2x2.defvjp(_quadrant_fwd, _quadrant_bwd)


def max_pool_2x2(x, *, kernels: backend.Kernels | None = None):
  """``nn.MaxPool2d(2)`` on (N, H, W, C) -> (N, H // 2, W // 2, C).

  Args:
    x: (N, H, W, C).
    kernels: the CPU implementation (``plain``: the plain form on the CPU too); default
      :func:`cmedl_jax.ops.backend.current`.
  """
  kernels = kernels or backend.current()
  if kernels.backend == "plain":
    return plain_max_pool_2x2(x)
  return lax.platform_dependent(x, cpu=quadrant_max_pool_2x2, default=plain_max_pool_2x2)
