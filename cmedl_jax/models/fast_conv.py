"""Convolution with a custom VJP whose forward and backward passes stay on XLA:CPU's fast paths.

Measured on this project's 2-core CPU (jax 0.10.2, docs/performance.md):

- an unpadded ("VALID") convolution runs 3-5x slower than the same convolution with any non-zero padding, so the
  forward pass runs unpadded convolutions as ``SAME`` ones and crops the border outputs (bit-identical);
- XLA's weight-gradient convolution is 1.5-4.5x slower than the forward convolution on the large maps of the paper
  networks (e.g. 2.3 s vs 0.2 s for the U-Net's 64-channel 256 px layer); the kernel gradient is computed instead as
  one matrix product per kernel row (:func:`conv_kernel_grad`), where that is faster (:func:`use_matmul_kernel_grad`);
- the input gradient of a stride-1 convolution is run as a padded convolution with the flipped kernel, i.e. in the
  same fast forward form.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
# conv_kernel_grad: inputs at least this wide get one matrix product per kernel tap instead of per kernel row.
_MIN_CHANNELS_PER_TAP = 64
# use_matmul_kernel_grad: larger inputs (bytes, float32) keep XLA's weight gradient (peak memory).
_MAX_INPUT_BYTES = 20 * 2 ** 20
# use_matmul_kernel_grad: kernels with more taps keep XLA's weight gradient (peak memory, see there).
_MAX_TAPS = 4


def _conv_forward(x, kernel, stride: int, padding: int, dilation: int):
  """Zero-padded convolution with PyTorch's output size, in the form XLA:CPU runs fastest (see module docstring)."""
  kh, kw = kernel.shape[0], kernel.shape[1]
  eff_h, eff_w = dilation * (kh - 1) + 1, dilation * (kw - 1) + 1
  out_h = (x.shape[1] + 2 * padding - eff_h) // stride + 1
  out_w = (x.shape[2] + 2 * padding - eff_w) // stride + 1
  conv = lambda pads: lax.conv_general_dilated(  # noqa: E731
      x, kernel, window_strides=(stride, stride), padding=pads, rhs_dilation=(dilation, dilation),
      dimension_numbers=_DIMENSION_NUMBERS)
  if padding > 0 or (eff_h == 1 and eff_w == 1):
    return conv(((padding, padding), (padding, padding)))
  if stride == 1:
    # SAME output row i' reads input rows i' - low ..; the VALID output row i is SAME row i + low.
    low_h, low_w = (eff_h - 1) // 2, (eff_w - 1) // 2
    y = conv(((low_h, eff_h - 1 - low_h), (low_w, eff_w - 1 - low_w)))
    return y[:, low_h:low_h + out_h, low_w:low_w + out_w]
  # Strided and unpadded: high-side zeros only add output rows past the VALID ones, which are dropped.
  y = conv(((0, stride), (0, stride)))
  return y[:, :out_h, :out_w]


def conv_kernel_grad(x, g, kernel_shape, *, stride: int, padding: int, dilation: int):
  """Gradient of a zero-padded convolution with respect to its (kh, kw, in, out) kernel, as matrix products.

  ``dw[i, j] = sum_{n, h, w} x_pad[n, h s + i d, w s + j d, :]^T g[n, h, w, :]``. One product per kernel row
  ``i``: the ``kw`` shifted (strided) views of the padded input are concatenated along channels, giving an
  (N H' W', kw * in) x (N H' W', out) contraction; inputs of 64 channels or more get one product per tap instead
  (same speed, a third of the peak memory). XLA:CPU's own weight-gradient convolution is 1.3-4x slower than
  this for the generator's and the U-Net's layers (docs/performance.md).

  Args:
    x: (N, H, W, in) input of the convolution (before its zero padding).
    g: (N, H', W', out) gradient of the output.
    kernel_shape: (kh, kw, in, out).
    stride, padding, dilation: of the convolution.

  Returns:
    (kh, kw, in, out) kernel gradient, in the dtype of ``x``.
  """
  kh, kw, cin, cout = kernel_shape
  n, out_h, out_w, _ = g.shape
  # The shifted copies of x depend on x alone, so XLA would schedule them as soon as the forward pass made x and
  # keep them all alive until their products; the barrier ties them to g.
  x, g = lax.optimization_barrier((x, g))
  if padding:
    x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  g2 = g.reshape(-1, cout).astype(x.dtype)
  rows = []
  for i in range(kh):
    views = [
        lax.slice(x, (0, i * dilation, j * dilation, 0),
                  (n, i * dilation + (out_h - 1) * stride + 1, j * dilation + (out_w - 1) * stride + 1, cin),
                  (1, stride, stride, 1))
        for j in range(kw)]
    # 2-D operands: XLA:CPU emits a multi-axis contraction as a slow loop nest, a 2-D one as a GEMM (30x here).
    product = lambda v: lax.dot_general(v.reshape(-1, v.shape[-1]), g2, (((0,), (0,)), ((), ())))  # noqa: E731
    if cin >= _MIN_CHANNELS_PER_TAP:
      # Wide inputs: one product per tap keeps one shifted copy alive at a time (the concatenated row of the
      # U-Net's 256 px layers would hold 3 copies of a 67 MB map, and XLA keeps several rows alive).
      rows.append(jnp.stack([product(v) for v in views]))
    else:
      # Narrow inputs (e.g. the 7x7 conv on 1 channel): per-tap products would be too thin to run fast.
      rows.append(product(views[0] if kw == 1 else jnp.concatenate(views, axis=-1)).reshape(kw, cin, cout))
  return jnp.stack(rows)


def use_matmul_kernel_grad(in_shape, out_shape, kernel_shape) -> bool:
  """Where :func:`conv_kernel_grad` is used instead of XLA:CPU's weight-gradient convolution (docs/performance.md).

  In isolation it is 1.5-4.5x faster on the paper networks' large layers and slower on small maps and on
  single-output-channel kernels (the generator's last conv). But XLA:CPU keeps the shifted input copies of many
  layers alive at once: used for every 3x3/4x4/7x7 layer it raised the paper step's peak temporary memory from
  4.8 to 10.8 GB (and got the benchmark killed for memory), even with an optimization barrier. So it is used only
  for kernels of at most ``_MAX_TAPS`` taps (the generator's sub-pixel up layers, 2x2: 4.2 s -> 0.9 s for the
  second one at 256 px) on inputs of at most ``_MAX_INPUT_BYTES``.
  """
  n, out_h, out_w, cout = out_shape
  kh, kw = kernel_shape[0], kernel_shape[1]
  in_bytes = 4 * in_shape[0] * in_shape[1] * in_shape[2] * in_shape[3]
  return 1 < kh * kw <= _MAX_TAPS and cout >= 8 and n * out_h * out_w >= 4096 and in_bytes <= _MAX_INPUT_BYTES


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv_zero_padded(x, kernel, stride: int, padding: int, dilation: int):
  """PyTorch ``conv2d`` with zero padding (HWIO kernel, NHWC), with the fast forward form and a custom VJP.

  Gradients equal XLA's autodiff of the same convolution up to float summation order (tests/test_layers.py).
  """
  return _conv_forward(x, kernel, stride, padding, dilation)


def _conv_zero_padded_fwd(x, kernel, stride, padding, dilation):
  return _conv_forward(x, kernel, stride, padding, dilation), (x, kernel)


def _conv_zero_padded_bwd(stride, padding, dilation, residuals, g):
  x, kernel = residuals
  kh = kernel.shape[0]
  full = dilation * (kh - 1) - padding
  if stride == 1 and full >= 0 and kernel.shape[1] == kh:
    # The input gradient of a stride-1 convolution is a convolution of g with the flipped, in/out-swapped kernel
    # and padding d (k - 1) - p; running it through the forward form keeps it on XLA:CPU's fast path.
    flipped = jnp.swapaxes(kernel[::-1, ::-1], 2, 3)
    dx = _conv_forward(g, flipped, 1, full, dilation)
  else:
    _, vjp = jax.vjp(lambda x: _conv_forward(x, kernel, stride, padding, dilation), x)
    dx, = vjp(g)
  if use_matmul_kernel_grad(x.shape, g.shape, kernel.shape):
    dw = conv_kernel_grad(x, g, kernel.shape, stride=stride, padding=padding, dilation=dilation)
  else:
    _, vjp = jax.vjp(lambda k: _conv_forward(x, k, stride, padding, dilation), kernel)
    dw, = vjp(g)
  return dx.astype(x.dtype), dw.astype(kernel.dtype)


conv_zero_padded.defvjp(_conv_zero_padded_fwd, _conv_zero_padded_bwd)
