"""Weight initialisers that reproduce the PyTorch reference implementations.

Flax stores a convolution kernel as (kh, kw, in, out) and a transposed-convolution kernel of this package as
(kh, kw, in, out) too (see :class:`cmedl_jax.models.layers.ConvTranspose2d`), so the fan axes are the last two.
PyTorch computes the fans of a ``ConvTranspose2d`` weight (in, out, kh, kw) from its dim 1 as "fan in", i.e. the
*output* channels; ``transposed=True`` reproduces that.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

Initializer = Callable[..., Any]

GAN_INIT_TYPES = ("normal", "xavier", "kaiming", "orthogonal")


def _fan_axes(transposed):
  # PyTorch's ConvTranspose2d weight is (in, out, kh, kw) and torch calls dim 1 (out) the fan-in dimension.
  return {"in_axis": -1, "out_axis": -2} if transposed else {"in_axis": -2, "out_axis": -1}


def gan_kernel_init(init_type: str = "normal", gain: float = 0.02, transposed: bool = False):
  """The ``init_weights`` of pytorch-CycleGAN-and-pix2pix / CUT for conv and linear weights (biases get zeros).

  Args:
    init_type: "normal" (N(0, gain), CycleGAN's default), "xavier" (xavier_normal with ``gain``, CUT's default),
      "kaiming" (kaiming_normal, fan_in, a=0; ``gain`` ignored as in the reference) or "orthogonal".
    gain: standard deviation for "normal", scale for "xavier" and "orthogonal".
    transposed: the kernel belongs to a transposed convolution (PyTorch's fan convention for those).

  Returns:
    A ``jax.nn.initializers`` initializer.
  """
  axes = _fan_axes(transposed)
  if init_type == "normal":
    return jax.nn.initializers.normal(stddev=gain)
  if init_type == "xavier":
    # torch: std = gain * sqrt(2 / (fan_in + fan_out)); variance_scaling(s, fan_avg): std = sqrt(2 s / (fi + fo)).
    return jax.nn.initializers.variance_scaling(gain * gain, "fan_avg", "normal", **axes)
  if init_type == "kaiming":
    return jax.nn.initializers.variance_scaling(2.0, "fan_in", "normal", **axes)
  if init_type == "orthogonal":
    return jax.nn.initializers.orthogonal(scale=gain)
  raise ValueError(f"unknown init_type {init_type!r}; expected one of {GAN_INIT_TYPES}")


def torch_default_kernel_init(transposed: bool = False):
  """PyTorch's default conv/linear weight init: kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

  Used by the segmenters, whose reference code keeps PyTorch's defaults. (PyTorch also draws biases from
  U(+-1/sqrt(fan_in)); a flax bias initialiser does not see fan_in, so biases start at zero here.)
  """
  # variance_scaling(1/3, fan_in, uniform) draws from U(+-sqrt(3 * (1/3) / fan_in)) = U(+-1/sqrt(fan_in)).
  return jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", **_fan_axes(transposed))


def kaiming_normal_fan_out():
  """kaiming_normal(mode="fan_out", nonlinearity="relu"), torchvision's ResNet conv init."""
  return jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")


zeros = jax.nn.initializers.zeros
