"""U-Net segmenter (milesial/Pytorch-UNet, bilinear variant).

Reference: milesial/Pytorch-UNet ``unet/unet_model.py`` + ``unet_parts.py`` as of early 2020, the
"64-128-256-512-512" network: ``inc = DoubleConv(in, 64)``, ``down1..4 = Down(64, 128) .. Down(512, 512)``,
``up1..4 = Up(1024, 256) .. Up(128, 64)`` with bilinear upsampling (``align_corners=True``), ``outc = OutConv(64,
n_classes)``. ``DoubleConv`` = (conv3x3 + BN + ReLU) x 2 with conv biases, ``Down`` = maxpool 2 + DoubleConv,
``Up`` = upsample x2, pad to the skip's size, concat [skip, upsampled], DoubleConv. 13,394,242 parameters for
1 input channel and 2 classes. (Later milesial versions use bias-free convs and a ``mid_channels = in // 2``
decoder, 17.3M parameters; set ``conv_bias=False`` for the former.)

``features`` generalises the widths: encoder widths ``features[0..L]`` (L = number of downsamplings), decoder
block i (i = 1..L) outputs ``features[max(L - 1 - i, 0)]`` channels, so (64, 128, 256, 512, 512) is the reference
and (8, 16, 32, 32) is a tiny CPU network.

Decoder features (returned in this order): ``up1`` .. ``upL``, the outputs of the decoder DoubleConvs. The
distillation hint uses the last two, ``up{L-1}`` (features[0] channels at H/2) and ``up{L}`` (features[0] channels
at H, the input of the 1x1 head).

Parameter names: ``inc.double_conv.{0,1,3,4}`` -> ``inc/double_conv_{0,1,3,4}``,
``down{i}.maxpool_conv.1.double_conv.{j}`` -> ``down{i}/maxpool_conv_1/double_conv_{j}``,
``up{i}.conv.double_conv.{j}`` -> ``up{i}/conv/double_conv_{j}``, ``outc.conv`` -> ``outc/conv``.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from cmedl_jax.models import initializers
from cmedl_jax.models.layers import Conv2d, batch_norm
from cmedl_jax.models.resample import pad_to, upsample2x_bilinear_align_corners
from cmedl_jax.ops import max_pool_2x2


class DoubleConv(nn.Module):
  """(Conv3x3 pad 1 -> BatchNorm -> ReLU) x 2; names ``double_conv_{0,1,3,4}`` as the PyTorch Sequential."""

  features: int
  conv_bias: bool = True
  bn_axis_name: str | None = None
  kernel_init: initializers.Initializer = initializers.torch_default_kernel_init()

  @nn.compact
  def __call__(self, x, train: bool):
    """(N, H, W, in) -> (N, H, W, features)."""
    for conv_index in (0, 3):
      x = Conv2d(self.features, 3, padding=1, use_bias=self.conv_bias, kernel_init=self.kernel_init,
                 name=f"double_conv_{conv_index}")(x)
      x = batch_norm(train, self.bn_axis_name, name=f"double_conv_{conv_index + 1}")(x)
      x = nn.relu(x)
    return x


class Down(nn.Module):
  """MaxPool 2x2 then DoubleConv (PyTorch ``maxpool_conv`` Sequential: the DoubleConv is index 1)."""

  features: int
  conv_bias: bool = True
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    """(N, H, W, in) -> (N, H // 2, W // 2, features)."""
    x = max_pool_2x2(x)
    return DoubleConv(self.features, self.conv_bias, self.bn_axis_name, name="maxpool_conv_1")(x, train)


class Up(nn.Module):
  """Bilinear x2 (align_corners=True), zero-pad to the skip's size, concat [skip, up], DoubleConv (``conv``)."""

  features: int
  conv_bias: bool = True
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x, skip, train: bool):
    """x (N, h, w, c), skip (N, H, W, c') with H ~ 2h -> (N, H, W, features)."""
    x = pad_to(upsample2x_bilinear_align_corners(x), skip.shape[1:3])
    x = jnp.concatenate([skip, x], axis=-1)
    return DoubleConv(self.features, self.conv_bias, self.bn_axis_name, name="conv")(x, train)


class OutConv(nn.Module):
  """The 1x1 classification conv (``outc.conv``)."""

  features: int

  @nn.compact
  def __call__(self, x):
    """(N, H, W, c) -> (N, H, W, features)."""
    return Conv2d(self.features, 1, name="conv")(x)


class UNet(nn.Module):
  """milesial U-Net with bilinear upsampling; ``__call__(x, train) -> (logits, features)``.

  Attributes:
    num_classes: output channels of the 1x1 head (2: background / tumour).
    features: encoder widths, length L + 1 (reference: (64, 128, 256, 512, 512)).
    conv_bias: biases on the 3x3 convs (True in the 13.4M reference).
    bn_axis_name: mapped axis (e.g. "data") over which training batch statistics are averaged.
  """

  num_classes: int = 2
  features: Sequence[int] = (64, 128, 256, 512, 512)
  conv_bias: bool = True
  bn_axis_name: str | None = None

  def decoder_feature_names(self) -> tuple[str, ...]:
    """Names of the decoder feature maps, in decoder order."""
    return tuple(f"up{i}" for i in range(1, len(self.features)))

  def hint_feature_names(self) -> tuple[str, ...]:
    """The distillation features: the last two decoder maps."""
    return self.decoder_feature_names()[-2:]

  @nn.compact
  def __call__(self, x, train: bool = False):
    """Segments ``x``.

    Args:
      x: (N, H, W, in); H, W divisible by 2 ** L for exact skips (other sizes are zero-padded like milesial).
      train: batch statistics (and their update) instead of running averages.

    Returns:
      ``(logits, features)``: logits (N, H, W, num_classes); features a dict ``up1`` .. ``upL`` of (N, H / 2 **
      (L - i), W / 2 ** (L - i), c_i) decoder maps, in decoder order.
    """
    widths = tuple(self.features)
    depth = len(widths) - 1
    if depth < 1:
      raise ValueError(f"features needs at least two widths, got {widths}")
    skips = [DoubleConv(widths[0], self.conv_bias, self.bn_axis_name, name="inc")(x, train)]
    for i in range(1, depth + 1):
      skips.append(Down(widths[i], self.conv_bias, self.bn_axis_name, name=f"down{i}")(skips[-1], train))
    h = skips.pop()
    features = {}
    for i in range(1, depth + 1):
      out = widths[max(depth - 1 - i, 0)]
      h = Up(out, self.conv_bias, self.bn_axis_name, name=f"up{i}")(h, skips.pop(), train)
      features[f"up{i}"] = h
    logits = OutConv(self.num_classes, name="outc")(h)
    return logits, features
