"""The CPU form of the zero-padded convolution: a custom VJP over the library's kernels or XLA:CPU's fast forms.

``library`` "onednn" runs the forward pass and both gradients as the FFI calls of :mod:`cmedl_jax.ops.onednn`
(float32 only; other dtypes take the XLA forms), "xla" the forms of :mod:`cmedl_jax.ops.xla_cpu`. Both give the
gradients of the plain convolution up to float summation order (tests/test_ops.py). Only the CPU branches of
:mod:`cmedl_jax.ops.conv` call this: its custom calls exist for the CPU alone.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from cmedl_jax.ops import onednn, xla_cpu


def _geometry(stride, padding, dilation, algorithm):
  return dict(stride=(stride, stride), padding=((padding, padding), (padding, padding)),
              dilation=(dilation, dilation), winograd=algorithm == "winograd")


def _on_library(library, *arrays) -> bool:
  return library == "onednn" and all(a.dtype == jnp.float32 for a in arrays)


def _varying_like(result, *primals):
  """``result`` typed as varying over the mesh axes ``primals`` vary over (under ``shard_map`` with check_vma).

  A custom call's result is typed invariant whatever its inputs; the branches of ``platform_dependent`` must have
  equal types, and a cotangent the type of its primal. Inside the custom VJP nothing differentiates this cast;
  outside it (:func:`conv`'s operands), JAX's autodiff transposes it into the sum over those axes.
  """
  varying = lambda a: jax.typeof(a).manual_axis_type.varying  # noqa: E731
  missing = frozenset().union(*(varying(p) for p in primals)) - varying(result)
  return lax.pcast(result, tuple(sorted(missing)), to="varying") if missing else result


def conv(x, kernel, stride: int, padding: int, dilation: int, library: str, algorithm: str):
  """PyTorch ``conv2d`` with zero padding (NHWC input, HWIO kernel) on the CPU.

  Args:
    x: (N, H, W, in).
    kernel: (kh, kw, in, out).
    stride, padding, dilation: as in PyTorch (same for both spatial axes).
    library: "onednn" | "xla".
    algorithm: "winograd" | "direct" (the library's 3x3 stride-1 layers).

  Returns:
    (N, H', W', out).
  """
  # Under shard_map with checked types, both operands first vary over the same mesh axes (as JAX does for a
  # primitive's operands): the cast's transpose then sums, e.g., a replicated kernel's gradient over the devices.
  both = [_varying_like(a, x, kernel) for a in (x, kernel)]
  return _conv(*both, stride, padding, dilation, library, algorithm)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _conv(x, kernel, stride, padding, dilation, library, algorithm):
  return _forward(x, kernel, stride, padding, dilation, library, algorithm)


def _forward(x, kernel, stride, padding, dilation, library, algorithm):
  if _on_library(library, x, kernel):
    y = onednn.conv_forward(x, kernel, **_geometry(stride, padding, dilation, algorithm))
    return _varying_like(y, x, kernel)
  return xla_cpu.conv_forward(x, kernel, stride, padding, dilation)


def _conv_fwd(x, kernel, stride, padding, dilation, library, algorithm):
  return _forward(x, kernel, stride, padding, dilation, library, algorithm), (x, kernel)


def _conv_bwd(stride, padding, dilation, library, algorithm, residuals, g):
  x, kernel = residuals
  if _on_library(library, x, kernel, g):
    geometry = _geometry(stride, padding, dilation, algorithm)
    dx = onednn.conv_backward_data(g, kernel, x.shape, **geometry)
    dw = onednn.conv_backward_weights(x, g, kernel.shape, **geometry)
    return _varying_like(dx, x), _varying_like(dw, kernel)
  geometry = dict(stride=stride, padding=padding, dilation=dilation)
  dx = xla_cpu.conv_input_grad(x, kernel, g, **geometry)
  dw = xla_cpu.conv_weight_grad(x, kernel, g, **geometry)
  return dx.astype(x.dtype), dw.astype(kernel.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)
