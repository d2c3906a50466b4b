"""The convolution entry points of the networks: one per op, each a CPU form and a plain form per platform.

:func:`conv2d` and :func:`conv_transpose2d` stage out both forms with ``lax.platform_dependent``; the program
lowered for a platform holds only that platform's form (the other branch is dropped at lowering):

- CPU: the form chosen by :mod:`cmedl_jax.ops.backend` -- the library's convolutions (``onednn``), XLA:CPU's fast
  forms (``xla``), each with its custom VJP (:mod:`cmedl_jax.ops.cpu_conv`); transposed convolutions as sub-pixel
  convolutions (:mod:`cmedl_jax.ops.subpixel`); or the plain form (``plain``);
- GPU, TPU and any other platform: the plain form, ``lax.conv_general_dilated`` differentiated by JAX.

All forms compute PyTorch's ``conv2d`` / ``conv_transpose2d`` with NHWC activations and HWIO kernels; they agree up
to float summation order (tests/test_ops.py).
"""

from __future__ import annotations

from jax import lax

from cmedl_jax.ops import backend, cpu_conv, subpixel

DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def plain_conv2d(x, kernel, *, stride: int = 1, padding: int = 0, dilation: int = 1):
  """The plain form of :func:`conv2d`: one ``lax.conv_general_dilated``."""
  return lax.conv_general_dilated(x, kernel, window_strides=(stride, stride),
                                  padding=((padding, padding), (padding, padding)),
                                  rhs_dilation=(dilation, dilation), dimension_numbers=DIMENSION_NUMBERS)


def conv2d(x, kernel, *, stride: int = 1, padding: int = 0, dilation: int = 1, kernels: backend.Kernels | None = None):
  """PyTorch ``conv2d`` with zero padding (square kernel, no groups).

  Args:
    x: (N, H, W, in).
    kernel: (kh, kw, in, out).
    stride, padding, dilation: as in PyTorch (same for both spatial axes).
    kernels: the CPU implementation; default :func:`cmedl_jax.ops.backend.current`.

  Returns:
    (N, H', W', out) with H' = floor((H + 2p - dilation * (kh - 1) - 1) / stride) + 1.
  """
  kernels = kernels or backend.current()
  form = backend.cpu_form(kernels)

  def plain(a, k):
    return plain_conv2d(a, k, stride=stride, padding=padding, dilation=dilation)

  if form == "plain":
    return plain(x, kernel)

  def cpu(a, k):
    return cpu_conv.conv(a, k, stride, padding, dilation, form, kernels.algorithm)

  return lax.platform_dependent(x, kernel, cpu=cpu, default=plain)


def plain_conv_transpose2d(x, kernel, bias=None, *, stride: int, padding: int = 0, output_padding: int = 0):
  """The plain form of :func:`conv_transpose2d`: ``lax.conv_general_dilated`` of the dilated input (as
  ``lax.conv_transpose``) with the flipped kernel."""
  k = kernel.shape[0]
  low, high = k - 1 - padding, k - 1 - padding + output_padding
  y = lax.conv_general_dilated(x, kernel[::-1, ::-1], window_strides=(1, 1), padding=((low, high), (low, high)),
                               lhs_dilation=(stride, stride), dimension_numbers=DIMENSION_NUMBERS)
  return y if bias is None else y + bias


def conv_transpose2d(x, kernel, bias=None, *, stride: int, padding: int = 0, output_padding: int = 0,
                     kernels: backend.Kernels | None = None):
  """PyTorch ``conv_transpose2d`` (square kernel, no dilation, no groups).

  Args:
    x: (N, H, W, in).
    kernel: (k, k, in, out) with ``kernel[kh, kw, i, o] == torch_weight[i, o, kh, kw]`` (not flipped).
    bias: optional (out,).
    stride, padding, output_padding: as in PyTorch.
    kernels: the CPU implementation; default :func:`cmedl_jax.ops.backend.current`.

  Returns:
    (N, H', W', out) with H' = (H - 1) * s - 2p + k + op.
  """
  kernels = kernels or backend.current()
  form = backend.cpu_form(kernels)
  geometry = dict(stride=stride, padding=padding, output_padding=output_padding)

  def plain(a, k, b):
    return plain_conv_transpose2d(a, k, b, **geometry)

  if form == "plain":
    return plain(x, kernel, bias)

  def cpu(a, k, b):
    return subpixel.conv_transpose2d(
        a, k, b, conv=lambda xs, ks: cpu_conv.conv(xs, ks, 1, 0, 1, form, kernels.algorithm), **geometry)

  return lax.platform_dependent(x, kernel, bias, cpu=cpu, default=plain)
