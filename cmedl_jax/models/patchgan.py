"""The 70x70 PatchGAN discriminator of pix2pix / CycleGAN.

Reference: ``NLayerDiscriminator(input_nc, ndf=64, n_layers=3)`` in junyanz/pytorch-CycleGAN-and-pix2pix
``models/networks.py``. Every conv is 4x4 with zero padding 1::

  0 Conv(ndf, s2) 1 LeakyReLU(0.2)
  2 Conv(2 ndf, s2) 3 Norm 4 LeakyReLU   5 Conv(4 ndf, s2) 6 Norm 7 LeakyReLU     (n = 1 .. n_layers - 1)
  8 Conv(8 ndf, s1) 9 Norm 10 LeakyReLU
  11 Conv(1, s1)                                                                    (indices for n_layers = 3)

Channel multipliers are min(2 ** n, 8). A 256x256 input gives a 30x30 map of patch scores (receptive field 70);
a 64x64 input gives 6x6, a 32x32 input 2x2. The convs before a norm have a bias exactly when the norm is instance
norm, as in the reference; the first and the last conv always have one.

Parameter names: ``model.{i}.weight`` -> ``model_{i}/kernel`` (and ``model_{i}`` BatchNorm for ``norm="batch"``).
"""

from __future__ import annotations

import functools

import flax.linen as nn

from cmedl_jax.models import initializers
from cmedl_jax.models.layers import Conv2d, apply_norm

LEAKY_SLOPE = 0.2


class PatchGANDiscriminator(nn.Module):
  """pix2pix ``NLayerDiscriminator``; scores are raw (no sigmoid; LSGAN uses them directly).

  Attributes:
    base_features: ndf (64 in the paper).
    num_layers: n_layers (3 gives the 70x70 PatchGAN).
    norm: "instance" (CycleGAN setting) | "batch" | "none".
    init_type, init_gain: reference weight init (normal, 0.02).
    bn_axis_name: mapped axis for batch-norm statistics (``norm="batch"`` only).
  """

  base_features: int = 64
  num_layers: int = 3
  norm: str = "instance"
  init_type: str = "normal"
  init_gain: float = 0.02
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    """(N, H, W, in) -> (N, H', W', 1) patch scores, H' = H / 2 ** num_layers - 2 for H divisible by 8."""
    kernel_init = initializers.gan_kernel_init(self.init_type, self.init_gain)
    use_bias = self.norm == "instance"
    leaky = functools.partial(nn.leaky_relu, negative_slope=LEAKY_SLOPE)
    ndf = self.base_features
    index = 0

    def conv(h, features, stride, bias):
      nonlocal index
      h = Conv2d(features, 4, stride=stride, padding=1, use_bias=bias, kernel_init=kernel_init,
                 name=f"model_{index}")(h)
      index += 1
      return h

    def norm_and_activation(h):
      nonlocal index
      h = apply_norm(h, self.norm, train=train, axis_name=self.bn_axis_name, name=f"model_{index}")
      index += 2  # the norm and the LeakyReLU
      return leaky(h)

    h = leaky(conv(x, ndf, 2, True))
    index += 1
    for n in range(1, self.num_layers):
      h = norm_and_activation(conv(h, ndf * min(2 ** n, 8), 2, use_bias))
    h = norm_and_activation(conv(h, ndf * min(2 ** self.num_layers, 8), 1, use_bias))
    return conv(h, 1, 1, True)
