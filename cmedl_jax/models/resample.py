"""Resampling with PyTorch semantics: bilinear (align_corners=True), adaptive average pooling, crops and pads.

``jax.image.resize`` uses half-pixel centres (PyTorch's ``align_corners=False``), while milesial's U-Net and
PSPNet upsample with ``align_corners=True``. Both resampling ops here are separable linear maps, applied as two
small matrix products (one per spatial axis): exact, differentiable and fast on CPU.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=None)
def _align_corners_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) weights of 1-D linear interpolation with aligned corners (PyTorch's formula)."""
  matrix = np.zeros((out_size, in_size), np.float32)
  # torch: scale = (in - 1) / (out - 1) (0 when out == 1); src = dst * scale; lambda = src - floor(src).
  scale = np.float32(in_size - 1) / np.float32(out_size - 1) if out_size > 1 else np.float32(0.0)
  for dst in range(out_size):
    src = scale * np.float32(dst)
    low = min(int(np.floor(src)), in_size - 1)
    high = min(low + 1, in_size - 1)
    frac = np.float32(src - low)
    matrix[dst, low] += np.float32(1.0) - frac
    matrix[dst, high] += frac
  return matrix


@functools.lru_cache(maxsize=None)
def _adaptive_average_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) weights of ``AdaptiveAvgPool`` along one axis: bin i averages [floor(i n/o), ceil((i+1) n/o))."""
  matrix = np.zeros((out_size, in_size), np.float32)
  for i in range(out_size):
    start = (i * in_size) // out_size
    end = -((-(i + 1) * in_size) // out_size)
    matrix[i, start:end] = 1.0 / (end - start)
  return matrix


def _apply_separable(x, matrix_h, matrix_w):
  # Width first, like PyTorch's bilinear kernel (h0 * (w0 x00 + w1 x01) + h1 * (...)).
  dtype = x.dtype
  x = jnp.einsum("pw,nhwc->nhpc", jnp.asarray(matrix_w, dtype), x)
  return jnp.einsum("oh,nhpc->nopc", jnp.asarray(matrix_h, dtype), x)


def resize_bilinear_align_corners(x, size):
  """``F.interpolate(x, size, mode="bilinear", align_corners=True)`` on (N, H, W, C).

  Args:
    x: (N, H, W, C).
    size: (H', W') output size.

  Returns:
    (N, H', W', C).
  """
  out_h, out_w = size
  return _apply_separable(x, _align_corners_matrix(x.shape[1], out_h), _align_corners_matrix(x.shape[2], out_w))


def upsample2x_bilinear_align_corners(x):
  """``nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)`` on (N, H, W, C)."""
  return resize_bilinear_align_corners(x, (2 * x.shape[1], 2 * x.shape[2]))


def adaptive_avg_pool2d(x, size):
  """``nn.AdaptiveAvgPool2d(size)`` on (N, H, W, C); bins may overlap when the output exceeds the input.

  Args:
    x: (N, H, W, C).
    size: int or (H', W').

  Returns:
    (N, H', W', C).
  """
  out_h, out_w = (size, size) if isinstance(size, int) else size
  return _apply_separable(x, _adaptive_average_matrix(x.shape[1], out_h), _adaptive_average_matrix(x.shape[2], out_w))


def center_crop(x, size):
  """The FC-DenseNet ``center_crop``: keeps rows [(H - h) // 2, (H - h) // 2 + h) (same for columns)."""
  height, width = size
  top = (x.shape[1] - height) // 2
  left = (x.shape[2] - width) // 2
  return x[:, top:top + height, left:left + width]


def pad_to(x, size):
  """milesial's ``F.pad(x1, [dX // 2, dX - dX // 2, dY // 2, dY - dY // 2])``: zero-pad (N, H, W, C) to ``size``."""
  diff_h = size[0] - x.shape[1]
  diff_w = size[1] - x.shape[2]
  if diff_h == 0 and diff_w == 0:
    return x
  return jnp.pad(x, ((0, 0), (diff_h // 2, diff_h - diff_h // 2), (diff_w // 2, diff_w - diff_w // 2), (0, 0)))
