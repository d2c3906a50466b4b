"""Transposed convolutions computed as sub-pixel convolutions (conv + depth-to-space).

A PyTorch ``ConvTranspose2d(k, stride=s, padding=p, output_padding=op)`` computes

    out[o] = sum_{i, j : o = i * s - p + j} x[i] * w[j]            (per spatial axis, w not flipped)

Writing the output index as ``o = m * s + a`` with phase ``a`` in [0, s) gives ``j = t * s + a + p`` and
``i = m - t``: every output phase is an ordinary (correlation-style) convolution of the *input* with a few taps of
``w``. Stacking the s * s phases as output channels of one small convolution and interleaving them with
depth-to-space reproduces the transposed convolution exactly, including ``padding``/``output_padding`` (they only
decide which outputs are kept).

Why: on XLA:CPU the weight gradient of ``lax.conv_transpose`` is pathologically slow (docs/performance.md); the
sub-pixel form is an ordinary convolution with a fast backward pass. It is the CPU form of
:func:`cmedl_jax.ops.conv.conv_transpose2d`; GPU/TPU programs run the plain transposed convolution.

For CycleGAN's up layer (k=3, s=2, p=1, op=1) the sub-pixel kernel is 2x2 with one zero padding row/column on the
high side, i.e. a ``SAME`` 2x2 convolution, and the output is exactly twice the input size.
"""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import numpy as np
from jax import lax

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


@functools.lru_cache(maxsize=None)
def subpixel_taps(kernel_size: int, stride: int, padding: int):
  """Which transposed-conv taps feed which sub-pixel tap (one spatial axis).

  Args:
    kernel_size: k of the transposed convolution.
    stride: s.
    padding: PyTorch's ``padding`` of the transposed convolution.

  Returns:
    ``(offset, table)``: the sub-pixel convolution reads input rows ``m + offset + r`` for r in
    ``range(len(table[0]))`` to produce output row ``m * s + a``, with weight tap ``table[a][r]`` of the transposed
    kernel (-1 where that pair contributes nothing).
  """
  taps = {}  # (phase a, input offset d = -t) -> kernel tap j
  for a in range(stride):
    for j in range(kernel_size):
      t, rem = divmod(j - a - padding, stride)
      if rem == 0:
        taps[(a, -t)] = j
  offsets = [d for _, d in taps]
  low, high = min(offsets), max(offsets)
  table = tuple(tuple(taps.get((a, d), -1) for d in range(low, high + 1)) for a in range(stride))
  return low, table


def transposed_output_size(size: int, kernel_size: int, stride: int, padding: int, output_padding: int) -> int:
  """PyTorch's ConvTranspose2d output length: (size - 1) * s - 2p + k + op."""
  return (size - 1) * stride - 2 * padding + kernel_size + output_padding


def transposed_kernel_to_subpixel(kernel, bias=None, *, stride: int, padding: int):
  """Rearranges a transposed-conv kernel into the equivalent sub-pixel convolution kernel.

  Differentiable (a gather), so the module can keep the PyTorch-shaped kernel as its parameter.

  Args:
    kernel: (k, k, in, out) transposed-conv kernel with ``kernel[kh, kw, i, o] == torch_weight[i, o, kh, kw]``.
    bias: optional (out,) bias.
    stride: s.
    padding: PyTorch ``padding``.

  Returns:
    ``(subpixel_kernel, subpixel_bias)``: (n, n, in, s * s * out) HWIO kernel whose output channel
    ``(a_h * s + a_w) * out + o`` is output phase (a_h, a_w) of channel o, and the bias tiled to s * s * out
    (``None`` if no bias).
  """
  k = kernel.shape[0]
  if kernel.shape[1] != k:
    raise ValueError(f"square kernels only, got {kernel.shape}")
  _, table = subpixel_taps(k, stride, padding)
  table = np.asarray(table)  # (s, n)
  valid = table >= 0
  index = np.where(valid, table, 0)
  # gathered[r_h, r_w, a_h, a_w] = kernel[table[a_h, r_h], table[a_w, r_w]]
  rows = index.T[:, None, :, None]  # (n, 1, s, 1)
  cols = index.T[None, :, None, :]  # (1, n, 1, s)
  gathered = kernel[rows, cols]  # (n, n, s, s, in, out)
  mask = (valid.T[:, None, :, None] & valid.T[None, :, None, :])[..., None, None]
  gathered = jnp.where(mask, gathered, jnp.zeros((), kernel.dtype))
  n = table.shape[1]
  cin, cout = kernel.shape[2], kernel.shape[3]
  subpixel = jnp.transpose(gathered, (0, 1, 4, 2, 3, 5)).reshape(n, n, cin, stride * stride * cout)
  subpixel_bias = None if bias is None else jnp.tile(bias, stride * stride)
  return subpixel, subpixel_bias


def depth_to_space(x, block: int):
  """(N, H, W, b * b * C) -> (N, H * b, W * b, C); channel (a_h * b + a_w) * C + c lands at (h * b + a_h, w * b + a_w).

  Note the channel order differs from ``torch.nn.PixelShuffle`` (which uses c * b * b + a_h * b + a_w).
  """
  n, h, w, c = x.shape
  out_c = c // (block * block)
  x = x.reshape(n, h, w, block, block, out_c)
  x = jnp.transpose(x, (0, 1, 3, 2, 4, 5))
  return x.reshape(n, h * block, w * block, out_c)


def conv_transpose2d(x, kernel, bias=None, *, stride: int, padding: int = 0, output_padding: int = 0,
                     conv=None):
  """PyTorch ``conv_transpose2d`` (square kernel, no dilation, no groups) through a sub-pixel convolution.

  Args:
    x: (N, H, W, in) input.
    kernel: (k, k, in, out) with ``kernel[kh, kw, i, o] == torch_weight[i, o, kh, kw]``.
    bias: optional (out,).
    stride, padding, output_padding: as in PyTorch.
    conv: ``conv(x, kernel)``, the unpadded stride-1 convolution of the zero-padded input (e.g. a CPU form of
      :mod:`cmedl_jax.ops.cpu_conv`); default ``lax.conv_general_dilated``.

  Returns:
    (N, H', W', out) with H' = (H - 1) * s - 2p + k + op (same for W).
  """
  k = kernel.shape[0]
  offset, table = subpixel_taps(k, stride, padding)
  n_taps = len(table[0])
  in_h, in_w = x.shape[1], x.shape[2]
  out_h = transposed_output_size(in_h, k, stride, padding, output_padding)
  out_w = transposed_output_size(in_w, k, stride, padding, output_padding)
  rows_h, rows_w = math.ceil(out_h / stride), math.ceil(out_w / stride)
  sub_kernel, sub_bias = transposed_kernel_to_subpixel(kernel, bias, stride=stride, padding=padding)
  # Sub-pixel row m reads input rows m + offset .. m + offset + n_taps - 1; zeros outside the input.
  pads = []
  for size, rows in ((in_h, rows_h), (in_w, rows_w)):
    low = -offset
    high = (rows - 1 + offset + n_taps - 1) - (size - 1)
    pads.append([low, high])
  if conv is not None and all(p >= 0 for pair in pads for p in pair):
    # Explicit zero padding, then the given convolution: with a CPU form of cpu_conv, the up layers get that form's
    # kernel gradient, faster than XLA's (docs/performance.md).
    x = jnp.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
    y = conv(x, sub_kernel)
  else:
    y = lax.conv_general_dilated(
        x, sub_kernel, window_strides=(1, 1), padding=[tuple(p) for p in pads],
        dimension_numbers=_DIMENSION_NUMBERS)
  y = y[:, :rows_h, :rows_w]
  if sub_bias is not None:
    y = y + sub_bias
  y = depth_to_space(y, stride)
  return y[:, :out_h, :out_w]

