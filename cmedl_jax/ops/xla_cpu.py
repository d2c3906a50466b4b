"""Convolution forms that stay on XLA:CPU's fast paths (the ``xla`` CPU form of :mod:`cmedl_jax.ops`).

Each function rewrites a convolution that XLA:CPU runs slowly into one it runs well (the measurements:
docs/performance.md, "Measurements behind the code's choices"):

- an unpadded ("VALID") convolution is slower than the same convolution with any non-zero padding, so
  :func:`conv_forward` runs unpadded convolutions as ``SAME`` ones and crops the border outputs (bit-identical);
- XLA's weight-gradient convolution is much slower than the forward convolution on the large maps of the paper
  networks; :func:`conv_kernel_grad` computes the kernel gradient as matrix products over shifted views instead,
  where that is faster (:func:`use_matmul_kernel_grad`);
- the input gradient of a stride-1 convolution is a padded convolution with the flipped kernel, run in the same
  fast forward form (:func:`conv_input_grad`).

These are CPU forms: :mod:`cmedl_jax.ops.conv` stages them out for the CPU only (GPU/TPU programs get the plain
convolution and JAX's autodiff).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
# conv_kernel_grad: kernel rows whose shifted copies take more bytes run in a lax.scan (peak memory).
_MAX_UNROLLED_ROW_BYTES = 16 * 2 ** 20
# conv_kernel_grad: shifted operands at least this wide get one product per tap (XLA:CPU's concatenation of the
# shifted views would be a second copy of them); narrower ones one per kernel row (thin products are slow).
_MIN_CHANNELS_PER_TAP = 64
# use_matmul_kernel_grad: with fewer channels on the non-shifted side, XLA's weight gradient is as fast.
_MIN_OTHER_CHANNELS = 64


def conv_forward(x, kernel, stride: int, padding: int, dilation: int):
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

  ``dw[i, j] = sum_{n, h, w} x_pad[n, h s + i d, w s + j d, :]^T g[n, h, w, :]``, computed one kernel row ``i`` at
  a time from the ``kw`` shifted views of one operand, each contracted with the other operand over all pixels
  (2-D GEMMs). The shifted operand is the one with fewer channels (so the copies are small): the padded input,
  (N H' W', in) x (N H' W', out) per tap; or, for stride-1 convolutions with fewer output than input channels
  (e.g. the generator's last 7x7 conv), the output gradient padded by ``d (k - 1) - p``, (N H W, in) x
  (N H W, out) per tap. Views of fewer than ``_MIN_CHANNELS_PER_TAP`` channels are concatenated along channels
  first (one (kw * c)-wide product per row: thin products run slowly), wider ones get one product per tap (the
  concatenation would be a second copy). Large operands go through a ``lax.scan`` over kernel rows, so that only
  one row's shifted copies exist at a time (unrolled, XLA:CPU schedules the copies of many layers at once, which
  multiplies the step's peak temporary memory); small ones are unrolled (the loop has a fixed cost per layer). On
  the paper networks' 3x3/7x7 layers this is faster than XLA:CPU's own weight-gradient convolution
  (docs/performance.md).

  Args:
    x: (N, H, W, in) input of the convolution (before its zero padding).
    g: (N, H', W', out) gradient of the output.
    kernel_shape: (kh, kw, in, out).
    stride, padding, dilation: of the convolution.

  Returns:
    (kh, kw, in, out) kernel gradient, in the dtype of ``x``.
  """
  kh, kw, cin, cout = kernel_shape
  # The barrier materialises x and g once: otherwise XLA fuses their producers (instance norm, ReLU, reflection
  # padding) into every shifted copy and recomputes them per kernel row.
  x, g = lax.optimization_barrier((x, g.astype(x.dtype)))
  if _shift_output_gradient(kernel_shape, stride, padding, dilation):
    rows = _kernel_rows_shifting_g(x, g, kernel_shape, padding, dilation)
  else:
    rows = _kernel_rows_shifting_x(x, g, kernel_shape, stride, padding, dilation)
  return rows.reshape(kh, kw, cin, cout)


def _shift_output_gradient(kernel_shape, stride, padding, dilation) -> bool:
  kh, kw, cin, cout = kernel_shape
  return stride == 1 and cout < cin and min(kh - 1, kw - 1) * dilation >= padding


def _gemm_over_pixels(a, b):
  """(..., p) x (..., q) -> (p, q), contracting every leading axis.

  2-D operands on purpose: XLA:CPU emits a multi-axis contraction as a slow loop nest, a 2-D one as a GEMM (30x).
  """
  return lax.dot_general(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]), (((0,), (0,)), ((), ())))


def _map_rows(row_fn, source, kh: int, row_offset, row_span: int, kw: int):
  """``stack([row_fn(source[:, row_offset(i):row_offset(i) + row_span]) for i in range(kh)])``.

  Unrolled when one row's ``kw`` shifted copies are small, else a ``lax.scan`` (one row's copies alive at a time).
  """
  n, _, width, channels = source.shape
  if kw * n * row_span * width * channels * source.dtype.itemsize <= _MAX_UNROLLED_ROW_BYTES:
    return jnp.stack([row_fn(lax.slice_in_dim(source, row_offset(i), row_offset(i) + row_span, axis=1))
                      for i in range(kh)])

  def body(carry, i):
    return carry, row_fn(lax.dynamic_slice_in_dim(source, row_offset(i), row_span, axis=1))

  return lax.scan(body, None, jnp.arange(kh))[1]


def _kernel_rows_shifting_x(x, g, kernel_shape, stride, padding, dilation):
  kh, kw, cin, cout = kernel_shape
  n, out_h, out_w, _ = g.shape
  if padding:
    x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  span_h, span_w = (out_h - 1) * stride + 1, (out_w - 1) * stride + 1

  def row(block):  # block: the padded input rows read by kernel row i, (N, span_h, W_pad, in)
    views = [lax.slice(block, (0, 0, j * dilation, 0), (n, span_h, j * dilation + span_w, cin),
                       (1, stride, stride, 1)) for j in range(kw)]
    if cin >= _MIN_CHANNELS_PER_TAP:
      return jnp.stack([_gemm_over_pixels(v, g) for v in views])
    return _gemm_over_pixels(views[0] if kw == 1 else jnp.concatenate(views, axis=-1), g)  # (kw * in, out)

  return _map_rows(row, x, kh, lambda i: i * dilation, span_h, kw)


def _kernel_rows_shifting_g(x, g, kernel_shape, padding, dilation):
  # Stride 1: output pixel (h, w) reads input (h + i d - p, w + j d - p), so
  # dw[i, j] = sum_{h', w'} x[h', w']^T g[h' - i d + p, w' - j d + p] (zero outside g).
  kh, kw, cin, cout = kernel_shape
  n, h, w, _ = x.shape
  low_h, low_w = (kh - 1) * dilation - padding, (kw - 1) * dilation - padding
  g = jnp.pad(g, ((0, 0), (low_h, low_h), (low_w, low_w), (0, 0)))

  def row(block):  # block: the padded gradient rows that meet the input under kernel row i, (N, H, W_pad, out)
    views = [lax.slice(block, (0, 0, low_w + padding - j * dilation, 0),
                       (n, h, low_w + padding - j * dilation + w, cout)) for j in range(kw)]
    if cout >= _MIN_CHANNELS_PER_TAP:
      return jnp.stack([_gemm_over_pixels(x, v) for v in views])
    product = _gemm_over_pixels(x, views[0] if kw == 1 else jnp.concatenate(views, axis=-1))  # (in, kw * out)
    return product.reshape(cin, kw, cout).transpose(1, 0, 2)

  return _map_rows(row, g, kh, lambda i: low_h + padding - i * dilation, h, kw)


def use_matmul_kernel_grad(out_shape, kernel_shape, stride: int = 1, padding: int = 0, dilation: int = 1) -> bool:
  """Where :func:`conv_kernel_grad` is used instead of XLA:CPU's weight-gradient convolution (docs/performance.md).

  The matrix products copy the shifted operand ``kh * kw`` times and do ``2 * c`` flops per copied value, ``c``
  the other operand's channels, so they pay where ``c`` is large: on the paper networks' layers (``c`` >= 64) they
  beat XLA's weight gradient, on the quickstart networks' 8-32 channel layers the copies cost more than XLA's
  convolution saves. So they are used for: kernels of 2-4 taps (the sub-pixel up layers, whose XLA gradient is
  slow), kernels whose non-shifted operand has at least ``_MIN_OTHER_CHANNELS`` channels, and kernels with one
  output channel (XLA runs their gradient as a whole-map window) -- each on maps of at least 4096 output pixels.
  1x1 kernels are already a GEMM.
  """
  n, out_h, out_w, cout = out_shape
  kh, kw, cin, _ = kernel_shape
  taps = kh * kw
  if taps == 1 or n * out_h * out_w < 4096:
    return False
  if taps <= 4:
    return cout >= 8
  shifted_g = _shift_output_gradient(kernel_shape, stride, padding, dilation)
  other_channels = cin if shifted_g else cout
  return other_channels >= _MIN_OTHER_CHANNELS or cout == 1


def conv_input_grad(x, kernel, g, *, stride: int, padding: int, dilation: int):
  """Gradient of :func:`conv_forward` with respect to its input ``x``, given the output gradient ``g``.

  Stride 1 (square kernel): a convolution of ``g`` with the flipped, in/out-swapped kernel and padding
  ``d (k - 1) - p``, run through the forward form; otherwise XLA's autodiff of the forward form.
  """
  kh = kernel.shape[0]
  full = dilation * (kh - 1) - padding
  if stride == 1 and full >= 0 and kernel.shape[1] == kh:
    flipped = jnp.swapaxes(kernel[::-1, ::-1], 2, 3)
    return conv_forward(g, flipped, 1, full, dilation)
  # At the primal itself (not a shape): the cotangent takes its type, mesh axes included; the unused forward is
  # dropped by XLA.
  return jax.vjp(lambda a: conv_forward(a, kernel, stride, padding, dilation), x)[1](g)[0]


def conv_weight_grad(x, kernel, g, *, stride: int, padding: int, dilation: int):
  """Gradient of :func:`conv_forward` with respect to its kernel: :func:`conv_kernel_grad` where
  :func:`use_matmul_kernel_grad` says it is faster, else XLA's autodiff of the forward form."""
  if use_matmul_kernel_grad(g.shape, kernel.shape, stride, padding, dilation):
    return conv_kernel_grad(x, g, kernel.shape, stride=stride, padding=padding, dilation=dilation)
  return jax.vjp(lambda k: conv_forward(x, k, stride, padding, dilation), kernel)[1](g)[0]
