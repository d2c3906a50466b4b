"""PyTorch reference networks (NCHW), with the reference repositories' module structure and ``state_dict`` keys.

- ``ResnetGenerator`` / ``NLayerDiscriminator``: junyanz/pytorch-CycleGAN-and-pix2pix ``models/networks.py``
  (instance norm without affine, reflection padding, optional dropout), with CUT's ``forward(x, layers,
  encode_only)``; ``NLayerDiscriminator.forward(x, detach_params=True)`` runs the network with its parameters
  detached (the generators' adversarial terms in the one-loss CMEDL step).
- ``UNet``: milesial/Pytorch-UNet (2020, bilinear, 64-128-256-512-512); returns ``(logits, {"up1": ..})``.
- ``FCDenseNet``: bfortuner/pytorch_tiramisu (FC-DenseNet67 defaults); returns ``(logits, {"up_block1": ..})``
  (logits before the reference's ``LogSoftmax``).

Decoder feature dicts use the names of the flax segmenters, so the hint layers are picked by the same names.
:func:`build` takes the option dicts of :mod:`cmedl_jax.torch_port.convert` (this package's attribute names), and
:func:`load_variables` loads flax variables into a module. This module (with ``reference_step``) is the only
place of ``cmedl_jax`` that imports torch at module level.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cmedl_jax.torch_port import convert

instance_norm = functools.partial(nn.InstanceNorm2d, affine=False, track_running_stats=False)


# ----------------------------------------------------------------------------------------------- CycleGAN / CUT
class ResnetBlock(nn.Module):
  """``x + conv_block(x)``; the Dropout (when used) is ``conv_block.4`` and moves the second conv to index 6."""

  def __init__(self, dim, use_dropout=False):
    super().__init__()
    block = [nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3), instance_norm(dim), nn.ReLU(True)]
    if use_dropout:
      block.append(nn.Dropout(0.5))
    block += [nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3), instance_norm(dim)]
    self.conv_block = nn.Sequential(*block)

  def forward(self, x):
    return x + self.conv_block(x)


class ResnetGenerator(nn.Module):
  """c7s1-ngf, ``n_downsampling`` x (conv3 s2), ``n_blocks`` ResnetBlocks, transposed convs back, c7s1-out, tanh."""

  def __init__(self, input_nc=1, output_nc=1, ngf=64, n_blocks=9, use_dropout=False, n_downsampling=2):
    super().__init__()
    layers = [nn.ReflectionPad2d(3), nn.Conv2d(input_nc, ngf, 7), instance_norm(ngf), nn.ReLU(True)]
    for i in range(n_downsampling):
      c = ngf * 2 ** i
      layers += [nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), instance_norm(2 * c), nn.ReLU(True)]
    layers += [ResnetBlock(ngf * 2 ** n_downsampling, use_dropout) for _ in range(n_blocks)]
    for i in range(n_downsampling):
      c = ngf * 2 ** (n_downsampling - i)
      layers += [nn.ConvTranspose2d(c, c // 2, 3, stride=2, padding=1, output_padding=1), instance_norm(c // 2),
                 nn.ReLU(True)]
    layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, output_nc, 7), nn.Tanh()]
    self.model = nn.Sequential(*layers)

  def forward(self, x, layers=(), encode_only=False):
    """(N, C, H, W) -> (N, out, H, W); with ``layers`` also CUT's features (``(y, feats)`` or ``feats``)."""
    if not layers:
      return self.model(x)
    feats = []
    for index, layer in enumerate(self.model):
      x = layer(x)
      if index in layers:
        feats.append(x)
        if encode_only and index == layers[-1]:
          return feats
    return x, feats


class NLayerDiscriminator(nn.Module):
  """PatchGAN: 4x4 convs, C64 (s2, no norm) .. C(64 min(2^n, 8)) (s1), a 1-channel conv; LeakyReLU 0.2."""

  def __init__(self, input_nc=1, ndf=64, n_layers=3):
    super().__init__()
    seq = [nn.Conv2d(input_nc, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
    mult = 1
    for n in range(1, n_layers):
      prev, mult = mult, min(2 ** n, 8)
      seq += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=2, padding=1), instance_norm(ndf * mult),
              nn.LeakyReLU(0.2, True)]
    prev, mult = mult, min(2 ** n_layers, 8)
    seq += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=1, padding=1), instance_norm(ndf * mult),
            nn.LeakyReLU(0.2, True)]
    seq += [nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1)]
    self.model = nn.Sequential(*seq)

  def forward(self, x, detach_params=False):
    """(N, C, H, W) -> (N, 1, H', W') patch scores.

    Args:
      x: images.
      detach_params: use detached weights, so the output carries gradients to ``x`` only (the generators'
        adversarial terms, where the discriminator is a fixed critic).
    """
    if not detach_params:
      return self.model(x)
    for layer in self.model:
      if isinstance(layer, nn.Conv2d):
        x = F.conv2d(x, layer.weight.detach(), layer.bias.detach(), layer.stride, layer.padding)
      else:
        x = layer(x)
    return x


# ------------------------------------------------------------------------------------------------------ U-Net
class DoubleConv(nn.Module):

  def __init__(self, cin, cout, bias=True):
    super().__init__()
    self.double_conv = nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=bias), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=bias), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

  def forward(self, x):
    return self.double_conv(x)


class Down(nn.Module):

  def __init__(self, cin, cout, bias=True):
    super().__init__()
    self.maxpool_conv = nn.Sequential(nn.MaxPool2d(2), DoubleConv(cin, cout, bias))

  def forward(self, x):
    return self.maxpool_conv(x)


class Up(nn.Module):

  def __init__(self, cin, cout, bias=True):
    super().__init__()
    self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
    self.conv = DoubleConv(cin, cout, bias)

  def forward(self, x1, x2):
    x1 = self.up(x1)
    dy, dx = x2.size(2) - x1.size(2), x2.size(3) - x1.size(3)
    x1 = F.pad(x1, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
    return self.conv(torch.cat([x2, x1], dim=1))


class OutConv(nn.Module):

  def __init__(self, cin, cout):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, 1)

  def forward(self, x):
    return self.conv(x)


class UNet(nn.Module):
  """milesial U-Net; ``widths`` generalises 64-128-256-512-512 like the flax ``UNet.features``."""

  def __init__(self, n_channels=1, n_classes=2, widths=(64, 128, 256, 512, 512), bias=True):
    super().__init__()
    depth = len(widths) - 1
    self.depth = depth
    self.inc = DoubleConv(n_channels, widths[0], bias)
    for i in range(1, depth + 1):
      setattr(self, f"down{i}", Down(widths[i - 1], widths[i], bias))
    c = widths[-1]
    for i in range(1, depth + 1):
      out = widths[max(depth - 1 - i, 0)]
      setattr(self, f"up{i}", Up(c + widths[depth - i], out, bias))
      c = out
    self.outc = OutConv(c, n_classes)

  def decoder_feature_names(self):
    return tuple(f"up{i}" for i in range(1, self.depth + 1))

  def hint_feature_names(self):
    return self.decoder_feature_names()[-2:]

  def forward(self, x):
    """(N, C, H, W) -> (logits (N, classes, H, W), {"up1": .., "upL": ..})."""
    skips = [self.inc(x)]
    for i in range(1, self.depth + 1):
      skips.append(getattr(self, f"down{i}")(skips[-1]))
    x = skips.pop()
    feats = {}
    for i in range(1, self.depth + 1):
      x = getattr(self, f"up{i}")(x, skips.pop())
      feats[f"up{i}"] = x
    return self.outc(x), feats


# -------------------------------------------------------------------------------------------- FC-DenseNet (67)
class DenseLayer(nn.Sequential):

  def __init__(self, cin, growth, drop_rate=0.2):
    super().__init__()
    self.add_module("norm", nn.BatchNorm2d(cin))
    self.add_module("relu", nn.ReLU(True))
    self.add_module("conv", nn.Conv2d(cin, growth, 3, padding=1, bias=True))
    self.add_module("drop", nn.Dropout2d(drop_rate))


class DenseBlock(nn.Module):

  def __init__(self, cin, growth, n_layers, upsample=False, drop_rate=0.2):
    super().__init__()
    self.upsample = upsample
    self.layers = nn.ModuleList([DenseLayer(cin + i * growth, growth, drop_rate) for i in range(n_layers)])

  def forward(self, x):
    new = []
    for layer in self.layers:
      out = layer(x)
      x = torch.cat([x, out], 1)
      new.append(out)
    return torch.cat(new, 1) if self.upsample else x


class TransitionDown(nn.Sequential):

  def __init__(self, c, drop_rate=0.2):
    super().__init__()
    self.add_module("norm", nn.BatchNorm2d(c))
    self.add_module("relu", nn.ReLU(inplace=True))
    self.add_module("conv", nn.Conv2d(c, c, 1, bias=True))
    self.add_module("drop", nn.Dropout2d(drop_rate))
    self.add_module("maxpool", nn.MaxPool2d(2))


class TransitionUp(nn.Module):

  def __init__(self, cin, cout):
    super().__init__()
    self.convTrans = nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=0, bias=True)

  def forward(self, x, skip):
    out = self.convTrans(x)
    h, w = skip.size(2), skip.size(3)
    top, left = (out.size(2) - h) // 2, (out.size(3) - w) // 2
    return torch.cat([out[:, :, top:top + h, left:left + w], skip], 1)


class Bottleneck(nn.Sequential):

  def __init__(self, cin, growth, n_layers, drop_rate=0.2):
    super().__init__()
    self.add_module("bottleneck", DenseBlock(cin, growth, n_layers, upsample=True, drop_rate=drop_rate))


class FCDenseNet(nn.Module):

  def __init__(self, in_channels=1, down_blocks=(5,) * 5, up_blocks=(5,) * 5, bottleneck_layers=5, growth_rate=16,
               out_chans_first_conv=48, n_classes=2, drop_rate=0.2):
    super().__init__()
    self.firstconv = nn.Conv2d(in_channels, out_chans_first_conv, 3, padding=1, bias=True)
    c = out_chans_first_conv
    skip_counts = []
    self.denseBlocksDown, self.transDownBlocks = nn.ModuleList(), nn.ModuleList()
    for n in down_blocks:
      self.denseBlocksDown.append(DenseBlock(c, growth_rate, n, drop_rate=drop_rate))
      c += growth_rate * n
      skip_counts.insert(0, c)
      self.transDownBlocks.append(TransitionDown(c, drop_rate))
    self.bottleneck = Bottleneck(c, growth_rate, bottleneck_layers, drop_rate)
    prev = growth_rate * bottleneck_layers
    self.transUpBlocks, self.denseBlocksUp = nn.ModuleList(), nn.ModuleList()
    for i, n in enumerate(up_blocks):
      last = i == len(up_blocks) - 1
      self.transUpBlocks.append(TransitionUp(prev, prev))
      c = prev + skip_counts[i]
      self.denseBlocksUp.append(DenseBlock(c, growth_rate, n, upsample=not last, drop_rate=drop_rate))
      prev = growth_rate * n
      c += prev
    self.finalConv = nn.Conv2d(c, n_classes, 1, bias=True)

  def decoder_feature_names(self):
    return tuple(f"up_block{i + 1}" for i in range(len(self.denseBlocksUp)))

  def hint_feature_names(self):
    return self.decoder_feature_names()[-2:]

  def forward(self, x):
    """(N, C, H, W) -> (logits (N, classes, H, W), {"up_block1": .., ..})."""
    out = self.firstconv(x)
    skips = []
    for block, down in zip(self.denseBlocksDown, self.transDownBlocks):
      out = block(out)
      skips.append(out)
      out = down(out)
    out = self.bottleneck(out)
    feats = {}
    for i, (up, block) in enumerate(zip(self.transUpBlocks, self.denseBlocksUp)):
      out = block(up(out, skips.pop()))
      feats[f"up_block{i + 1}"] = out
    return self.finalConv(out), feats


# ------------------------------------------------------------------------------------------------- utilities
def build(arch: str, **options: Any) -> nn.Module:
  """The PyTorch reference of ``arch`` from :mod:`convert`'s options (defaults: ``convert.DEFAULT_OPTIONS``).

  Extra option for the segmenters: ``drop_rate`` (FC-DenseNet's Dropout2d, 0.2).
  """
  if arch not in convert.ARCHS:
    raise ValueError(f"unknown arch {arch!r}; expected one of {convert.ARCHS}")
  drop_rate = options.pop("drop_rate", 0.2)
  o = {**convert.DEFAULT_OPTIONS[arch], **options}
  if arch == "generator":
    return ResnetGenerator(o["input_channels"], o["output_channels"], o["base_features"], o["num_blocks"],
                           bool(o["use_dropout"]), o["num_downsampling"])
  if arch == "discriminator":
    return NLayerDiscriminator(o["input_channels"], o["base_features"], o["num_layers"])
  if arch == "unet":
    return UNet(o["input_channels"], o["num_classes"], tuple(o["features"]), bool(o["conv_bias"]))
  return FCDenseNet(o["input_channels"], tuple(o["down_blocks"]), tuple(o["up_blocks"]), o["bottleneck_layers"],
                    o["growth_rate"], o["first_conv_features"], o["num_classes"], drop_rate)


@torch.no_grad()
def init_gan_weights(module: nn.Module, gain: float = 0.02, seed: int | None = None) -> nn.Module:
  """CycleGAN's ``init_weights(net, "normal", gain)``: conv weights N(0, gain), biases 0."""
  gen = torch.Generator().manual_seed(seed) if seed is not None else None
  for m in module.modules():
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
      m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * gain)
      if m.bias is not None:
        m.bias.zero_()
  return module


@torch.no_grad()
def randomize_batch_norm(module: nn.Module, seed: int = 0) -> nn.Module:
  """Non-trivial BN affine parameters and running statistics (so that eval-mode comparisons exercise them)."""
  gen = torch.Generator().manual_seed(seed)
  for m in module.modules():
    if isinstance(m, nn.BatchNorm2d):
      m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
      m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
      m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
      m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
  return module


@torch.no_grad()
def load_variables(module: nn.Module, variables: Mapping[str, Any]) -> nn.Module:
  """Loads flax variables (e.g. a JAX run's params and batch_stats) into the PyTorch ``module`` (strict keys)."""
  state = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in convert.variables_to_state_dict(variables).items()}
  for key, value in module.state_dict().items():
    if key.endswith("num_batches_tracked"):
      state[key] = value  # PyTorch's BN step counter; flax has none
  module.load_state_dict(state, strict=True)
  return module


def state_dict_numpy(module: nn.Module) -> dict[str, np.ndarray]:
  """The module's state_dict as float32 numpy copies (for :func:`convert.convert_state_dict`)."""
  return {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}


def to_nchw(x) -> torch.Tensor:
  """NHWC numpy/jax array -> contiguous NCHW float tensor (a copy)."""
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def to_nhwc(t: torch.Tensor) -> np.ndarray:
  return t.detach().cpu().numpy().transpose(0, 2, 3, 1)
