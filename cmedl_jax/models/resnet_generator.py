"""The CycleGAN ResNet generator (Johnson et al. style), also the CUT generator.

Reference: ``ResnetGenerator`` in junyanz/pytorch-CycleGAN-and-pix2pix ``models/networks.py`` (identical to CUT's
with ``--no_antialias --no_antialias_up``): c7s1-64, d128, d256, R256 x 9, u128, u64, c7s1-out, tanh; instance norm
without affine, reflection padding, optional dropout 0.5 inside the residual blocks.

CUT's PatchNCE reads intermediate activations by index into the PyTorch ``nn.Sequential`` (``--nce_layers
0,4,8,12,16``). This module builds its layers in exactly that order, so the same indices select the same tensors.
For the default configuration (2 downsamplings, stride-2 convolutions) the sequence is::

  0 ReflectionPad2d(3)   1 Conv7x7   2 Norm  3 ReLU
  4 Conv3x3/s2 (d128)    5 Norm      6 ReLU
  7 Conv3x3/s2 (d256)    8 Norm      9 ReLU
  10 .. 10+B-1  ResnetBlock x B (B = num_blocks)
  10+B ConvT (u128) 11+B Norm 12+B ReLU 13+B ConvT (u64) 14+B Norm 15+B ReLU
  16+B ReflectionPad2d(3) 17+B Conv7x7 18+B Tanh

so CUT's {0, 4, 8, 12, 16} are: the reflection-padded input (N, H+6, W+6, in), the first stride-2 conv output before
its norm (N, H/2, W/2, 2 ngf), the second downsampling after norm *and ReLU* (N, H/4, W/4, 4 ngf), and the outputs of
residual blocks 2 and 6 (N, H/4, W/4, 4 ngf). The ReLU at layer 8 is a quirk reproduced from PyTorch: CUT stores the
norm output and the following ``nn.ReLU(inplace=True)`` then overwrites that very tensor; this happens for any
tapped norm layer except the last one of an ``encode_only`` pass, where the loop stops before the ReLU.
(CUT's default anti-aliased generator has two extra ``Downsample`` layers, which shifts the numbering; it is not
implemented here because docs/design.md uses the CycleGAN generator for both translators.)

Parameter names mirror PyTorch's: ``model.{i}.weight`` -> ``model_{i}/kernel`` and
``model.{i}.conv_block.{j}.weight`` -> ``model_{i}/conv_block_{j}/kernel`` (see docs/models.md).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from cmedl_jax.models import initializers
from cmedl_jax.models.layers import Conv2d, ConvTranspose2d, apply_norm, reflect_pad

CUT_NCE_LAYERS = (0, 4, 8, 12, 16)


class ResnetBlock(nn.Module):
  """``x + conv_block(x)``; conv_block = [pad1, conv3, norm, ReLU, (Dropout), pad1, conv3, norm].

  Attributes:
    features: channels (in == out).
    norm: "instance" | "batch" | "none".
    use_dropout: add ``nn.Dropout(dropout_rate)`` after the first ReLU (then the second conv is index 6).
    dropout_rate: 0.5 in the reference.
    use_bias: conv biases (the reference uses them exactly when the norm is instance norm).
    kernel_init: conv kernel initialiser.
    bn_axis_name: mapped axis for batch-norm statistics (``norm="batch"`` only).
  """

  features: int
  norm: str = "instance"
  use_dropout: bool = False
  dropout_rate: float = 0.5
  use_bias: bool = True
  kernel_init: initializers.Initializer = initializers.gan_kernel_init()
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    """(N, H, W, C) -> (N, H, W, C)."""
    conv = lambda name: Conv2d(  # noqa: E731
        self.features, 3, padding=1, padding_mode="reflect", use_bias=self.use_bias, kernel_init=self.kernel_init,
        name=name)
    second = 6 if self.use_dropout else 5
    h = conv("conv_block_1")(x)
    h = apply_norm(h, self.norm, train=train, axis_name=self.bn_axis_name, name="conv_block_2")
    h = nn.relu(h)
    if self.use_dropout:
      h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
    h = conv(f"conv_block_{second}")(h)
    h = apply_norm(h, self.norm, train=train, axis_name=self.bn_axis_name, name=f"conv_block_{second + 1}")
    return x + h


class ResnetGenerator(nn.Module):
  """CycleGAN/CUT ResNet generator, NHWC, output in [-1, 1].

  Attributes:
    output_channels: channels of the generated image (1 for CT/MRI).
    base_features: ngf, width of the first conv (64 in the paper; small values for CPU tests).
    num_blocks: residual blocks at the bottleneck (9 for 256x256 images).
    num_downsampling: stride-2 convs (and transposed convs); 2 in the reference.
    norm: "instance" (reference) | "batch" | "none".
    use_dropout: dropout 0.5 in the residual blocks (needs a "dropout" rng when ``train``).
    init_type, init_gain: weight init of the reference (``gan_kernel_init``); CycleGAN uses normal/0.02.
    bn_axis_name: mapped axis for batch-norm statistics (``norm="batch"`` only).
  """

  output_channels: int = 1
  base_features: int = 64
  num_blocks: int = 9
  num_downsampling: int = 2
  norm: str = "instance"
  use_dropout: bool = False
  init_type: str = "normal"
  init_gain: float = 0.02
  bn_axis_name: str | None = None

  def num_layers(self) -> int:
    """Length of the equivalent PyTorch ``nn.Sequential`` (valid NCE layer ids are 0 .. num_layers() - 1)."""
    return 4 + 6 * self.num_downsampling + self.num_blocks + 3

  @nn.compact
  def __call__(self, x, train: bool = False, nce_layers: Sequence[int] = (), encode_only: bool = False):
    """Translates ``x``; optionally also returns CUT's intermediate activations.

    Args:
      x: (N, H, W, in) images in [-1, 1]; H, W divisible by 2 ** num_downsampling.
      train: dropout / batch-norm training mode.
      nce_layers: strictly increasing indices into the PyTorch-equivalent sequence (see module docstring).
      encode_only: return only the activations and skip every layer after the last requested one.

    Returns:
      ``y`` (N, H, W, output_channels) if ``nce_layers`` is empty; else ``(y, feats)``, or ``feats`` alone with
      ``encode_only``; ``feats`` is a list with one (N, h, w, c) array per requested layer, in order.
    """
    nce_layers = tuple(int(i) for i in nce_layers)
    if any(b <= a for a, b in zip(nce_layers, nce_layers[1:])):
      raise ValueError(f"nce_layers must be strictly increasing, got {nce_layers}")
    if nce_layers and not 0 <= nce_layers[0] <= nce_layers[-1] < self.num_layers():
      raise ValueError(f"nce_layers {nce_layers} outside 0..{self.num_layers() - 1}")
    if encode_only and not nce_layers:
      raise ValueError("encode_only needs nce_layers")

    use_bias = self.norm == "instance"  # the reference drops conv biases before an affine (batch) norm
    kernel_init = initializers.gan_kernel_init(self.init_type, self.init_gain)
    transposed_init = initializers.gan_kernel_init(self.init_type, self.init_gain, transposed=True)
    ngf = self.base_features

    # One entry per element of the PyTorch nn.Sequential, so that list positions are CUT's layer ids and
    # parameter names ("model_{i}") are PyTorch's.
    layers = []
    norm = lambda: (lambda h, i=len(layers): apply_norm(  # noqa: E731
        h, self.norm, train=train, axis_name=self.bn_axis_name, name=f"model_{i}"))
    layers += [lambda h: reflect_pad(h, 3)]
    layers += [Conv2d(ngf, 7, use_bias=use_bias, kernel_init=kernel_init, name="model_1")]
    layers += [norm(), nn.relu]
    for i in range(self.num_downsampling):
      features = ngf * 2 ** (i + 1)
      layers += [Conv2d(features, 3, stride=2, padding=1, use_bias=use_bias, kernel_init=kernel_init,
                        name=f"model_{len(layers)}")]
      layers += [norm(), nn.relu]
    bottleneck = ngf * 2 ** self.num_downsampling
    for _ in range(self.num_blocks):
      block = ResnetBlock(bottleneck, norm=self.norm, use_dropout=self.use_dropout, use_bias=use_bias,
                          kernel_init=kernel_init, bn_axis_name=self.bn_axis_name, name=f"model_{len(layers)}")
      layers += [lambda h, block=block: block(h, train=train)]
    for i in range(self.num_downsampling):
      features = bottleneck // 2 ** (i + 1)
      layers += [ConvTranspose2d(features, 3, stride=2, padding=1, output_padding=1, use_bias=use_bias,
                                 kernel_init=transposed_init, name=f"model_{len(layers)}")]
      layers += [norm(), nn.relu]
    layers += [lambda h: reflect_pad(h, 3)]
    layers += [Conv2d(self.output_channels, 7, kernel_init=kernel_init, name=f"model_{len(layers)}")]
    layers += [jnp.tanh]
    assert len(layers) == self.num_layers()

    feats = []
    h = x
    for index, layer in enumerate(layers):
      h = layer(h)
      if layer is nn.relu and feats and nce_layers[len(feats) - 1] == index - 1:
        # PyTorch's nn.ReLU(inplace=True) overwrites the tapped norm output it follows, so CUT's features at a
        # norm layer are post-ReLU (unless the encoder stopped right at that layer).
        feats[-1] = h
      if index in nce_layers:
        feats.append(h)
        if encode_only and index == nce_layers[-1]:
          return feats
    return (h, feats) if nce_layers else h
