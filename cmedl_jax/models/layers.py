"""Layers with PyTorch semantics (NHWC activations, PyTorch-compatible parameter layout).

The arithmetic under them is :mod:`cmedl_jax.ops`: :func:`conv2d` does reflection padding explicitly (``jnp.pad``)
and hands zero padding to :func:`cmedl_jax.ops.conv2d`; :class:`ConvTranspose2d` keeps the PyTorch-shaped kernel as
its parameter and calls :func:`cmedl_jax.ops.conv_transpose2d` (the networks pool with
:func:`cmedl_jax.ops.max_pool_2x2`). Which form of each op runs (CPU forms or the plain ``lax`` ones) is the ops'
business, per platform.

Parameter layout (for importing PyTorch ``state_dict`` s; see docs/models.md):

==================  ===========================  =====================================================
this package        shape                        PyTorch
==================  ===========================  =====================================================
Conv2d kernel       (kh, kw, in, out)            ``weight`` (out, in, kh, kw): ``w.transpose(2, 3, 1, 0)``
ConvTranspose2d     ``transposed_kernel``        ``weight`` (in, out, kh, kw): ``w.transpose(2, 3, 0, 1)``
                    (kh, kw, in, out)            (not flipped)
bias                (out,)                       ``bias``
BatchNorm           params ``scale``, ``bias``;  ``weight``, ``bias``; ``running_mean``, ``running_var``
                    batch_stats ``mean``, ``var``
Dense kernel        (in, out)                    ``weight`` (out, in): ``w.T``
==================  ===========================  =====================================================
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from cmedl_jax import ops
from cmedl_jax.models import initializers

Initializer = initializers.Initializer
PADDING_MODES = ("zeros", "reflect")
NORM_KINDS = ("instance", "batch", "none")
INSTANCE_NORM_EPS = 1e-5
BATCH_NORM_EPS = 1e-5
# PyTorch's BatchNorm2d momentum 0.1 (weight of the new batch) is flax's momentum 0.9 (weight of the old value).
BATCH_NORM_MOMENTUM = 0.9


def reflect_pad(x, pad: int):
  """``nn.ReflectionPad2d(pad)`` on an (N, H, W, C) array (edge not repeated)."""
  if pad == 0:
    return x
  return jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")


def conv2d(x, kernel, *, stride: int = 1, padding: int = 0, padding_mode: str = "zeros", dilation: int = 1):
  """PyTorch ``Conv2d`` arithmetic (symmetric integer padding, ``padding_mode``).

  Args:
    x: (N, H, W, in) input.
    kernel: (kh, kw, in, out) kernel.
    stride, padding, dilation: as in PyTorch (same for both spatial axes).
    padding_mode: "zeros" or "reflect".

  Returns:
    (N, H', W', out) with H' = floor((H + 2p - dilation * (kh - 1) - 1) / stride) + 1.
  """
  if padding_mode not in PADDING_MODES:
    raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
  if padding_mode == "reflect":
    x = reflect_pad(x, padding)
    padding = 0
  return ops.conv2d(x, kernel, stride=stride, padding=padding, dilation=dilation)


def instance_norm(x, eps: float = INSTANCE_NORM_EPS):
  """``nn.InstanceNorm2d(affine=False, track_running_stats=False)``: per sample and channel over H, W.

  Args:
    x: (N, H, W, C).
    eps: added to the biased variance, as PyTorch.

  Returns:
    (N, H, W, C), computed in float32 at least.
  """
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  xf = x.astype(dtype)
  mean = jnp.mean(xf, axis=(1, 2), keepdims=True)
  centred = xf - mean
  var = jnp.mean(jnp.square(centred), axis=(1, 2), keepdims=True)
  return (centred * lax.rsqrt(var + eps)).astype(x.dtype)


class BatchNorm2d(nn.BatchNorm):
  """flax ``BatchNorm`` whose output keeps the input's dtype.

  Statistics, running averages and the normalisation are float32 (flax promotes a bfloat16 input to the float32
  parameters); the result is cast back, so a bfloat16 network stays bfloat16 after every normalisation (with a
  float32 input the cast is a no-op).
  """

  def __call__(self, x, *args, **kwargs):
    return super().__call__(x, *args, **kwargs).astype(x.dtype)


def batch_norm(train: bool, axis_name: str | None = None, name: str | None = None) -> BatchNorm2d:
  """``nn.BatchNorm2d`` defaults (eps 1e-5, momentum 0.1) as a flax ``BatchNorm`` (:class:`BatchNorm2d`).

  Args:
    train: use (and update) batch statistics; otherwise the running averages.
    axis_name: mapped axis (e.g. "data") over which batch statistics are averaged with ``lax.pmean`` in training.
      Only used when ``train`` is true, so evaluation and ``init`` (with ``train=False``) need no bound axis.
    name: the module name (PyTorch-mirroring, see docs/models.md).

  Note:
    PyTorch updates ``running_var`` with the unbiased batch variance, flax with the biased one; the normalisation
    itself (biased variance) is identical.
  """
  return BatchNorm2d(
      use_running_average=not train, momentum=BATCH_NORM_MOMENTUM, epsilon=BATCH_NORM_EPS,
      axis_name=axis_name if train else None, use_fast_variance=False, name=name)


def apply_norm(x, kind: str, *, train: bool, axis_name: str | None = None, name: str | None = None):
  """The ``norm_layer`` of pytorch-CycleGAN-and-pix2pix ("instance" | "batch" | "none") applied to ``x``.

  Must be called inside a compact method: "batch" creates a :func:`batch_norm` submodule called ``name``.
  """
  if kind == "instance":
    return instance_norm(x)
  if kind == "batch":
    return batch_norm(train, axis_name, name=name)(x)
  if kind == "none":
    return x
  raise ValueError(f"norm must be one of {NORM_KINDS}, got {kind!r}")


class Conv2d(nn.Module):
  """``torch.nn.Conv2d`` (square kernel, no groups) in NHWC; parameters ``kernel`` (kh, kw, in, out), ``bias``.

  Attributes:
    features: output channels.
    kernel_size: k.
    stride: stride.
    padding: symmetric padding p (PyTorch's ``padding``).
    padding_mode: "zeros" or "reflect".
    dilation: kernel dilation.
    use_bias: add a bias.
    kernel_init: kernel initialiser (default: PyTorch's default).
    bias_init: bias initialiser.
  """

  features: int
  kernel_size: int
  stride: int = 1
  padding: int = 0
  padding_mode: str = "zeros"
  dilation: int = 1
  use_bias: bool = True
  kernel_init: Initializer = initializers.torch_default_kernel_init()
  bias_init: Initializer = initializers.zeros

  @nn.compact
  def __call__(self, x):
    """(N, H, W, in) -> (N, H', W', features); H' as PyTorch."""
    k = self.kernel_size
    kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features), jnp.float32)
    y = conv2d(
        x, kernel.astype(x.dtype), stride=self.stride, padding=self.padding, padding_mode=self.padding_mode,
        dilation=self.dilation)
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,), jnp.float32).astype(y.dtype)
    return y


class ConvTranspose2d(nn.Module):
  """``torch.nn.ConvTranspose2d`` (square kernel).

  The parameter ``transposed_kernel`` (k, k, in, out) holds PyTorch's weight (in, out, k, k) transposed by
  (2, 3, 0, 1), not flipped, so gradients and optimiser state live in the PyTorch layout and the parameter count
  equals PyTorch's (the CPU form rearranges it into a sub-pixel kernel on every call, a cheap gather).

  Attributes:
    features: output channels.
    kernel_size: k.
    stride: s.
    padding: PyTorch's ``padding``.
    output_padding: PyTorch's ``output_padding``.
    use_bias: add a bias.
    kernel_init: initialiser of ``transposed_kernel``.
    bias_init: bias initialiser.
  """

  features: int
  kernel_size: int = 3
  stride: int = 2
  padding: int = 1
  output_padding: int = 1
  use_bias: bool = True
  kernel_init: Initializer = initializers.torch_default_kernel_init(transposed=True)
  bias_init: Initializer = initializers.zeros

  @nn.compact
  def __call__(self, x):
    """(N, H, W, in) -> (N, (H - 1) s - 2p + k + op, ..., features)."""
    k = self.kernel_size
    kernel = self.param("transposed_kernel", self.kernel_init, (k, k, x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", self.bias_init, (self.features,), jnp.float32) if self.use_bias else None
    return ops.conv_transpose2d(
        x, kernel.astype(x.dtype), None if bias is None else bias.astype(x.dtype), stride=self.stride,
        padding=self.padding, output_padding=self.output_padding)
