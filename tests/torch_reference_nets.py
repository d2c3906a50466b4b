"""Minimal PyTorch re-statements of the reference architectures, for parameter counts and numerical parity.

Only imported by tests that first ran ``pytest.importorskip("torch")``. Each class keeps the reference's module
structure and attribute names (so ``state_dict`` keys match the originals); training-only machinery is left out.

- ``ResnetGenerator`` / ``NLayerDiscriminator``: junyanz/pytorch-CycleGAN-and-pix2pix ``models/networks.py``
  (instance norm, no anti-aliasing), with CUT's ``forward(x, layers, encode_only)``.
- ``PatchSampleF`` / ``PatchNCELoss``: taesungp/contrastive-unpaired-translation.
- ``UNet``: milesial/Pytorch-UNet (2020, bilinear, 64-128-256-512-512).
- ``FCDenseNet``: bfortuner/pytorch_tiramisu.
- ``PSPNet``: hszhao/semseg (deep-base dilated ResNet-50+, PPM, cls/aux heads).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

instance_norm = functools.partial(nn.InstanceNorm2d, affine=False, track_running_stats=False)


# ----------------------------------------------------------------------------------------------- CycleGAN / CUT
class ResnetBlock(nn.Module):

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

  def __init__(self, input_nc=1, output_nc=1, ngf=64, n_blocks=9, use_dropout=False):
    super().__init__()
    layers = [nn.ReflectionPad2d(3), nn.Conv2d(input_nc, ngf, 7), instance_norm(ngf), nn.ReLU(True)]
    for i in range(2):
      c = ngf * 2 ** i
      layers += [nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), instance_norm(2 * c), nn.ReLU(True)]
    layers += [ResnetBlock(ngf * 4, use_dropout) for _ in range(n_blocks)]
    for i in range(2):
      c = ngf * 4 // 2 ** i
      layers += [nn.ConvTranspose2d(c, c // 2, 3, stride=2, padding=1, output_padding=1), instance_norm(c // 2),
                 nn.ReLU(True)]
    layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, output_nc, 7), nn.Tanh()]
    self.model = nn.Sequential(*layers)

  def forward(self, x, layers=(), encode_only=False):
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

  def forward(self, x):
    return self.model(x)


class PatchSampleF(nn.Module):
  """CUT's mlp_sample head; MLPs are created eagerly from known input widths."""

  def __init__(self, in_channels, nc=256):
    super().__init__()
    for i, c in enumerate(in_channels):
      setattr(self, f"mlp_{i}", nn.Sequential(nn.Linear(c, nc), nn.ReLU(), nn.Linear(nc, nc)))

  def forward(self, feats, patch_ids):
    out = []
    for i, (feat, ids) in enumerate(zip(feats, patch_ids)):
      x = feat.permute(0, 2, 3, 1).flatten(1, 2)[:, ids, :].flatten(0, 1)
      x = getattr(self, f"mlp_{i}")(x)
      out.append(x / (x.pow(2).sum(1, keepdim=True).pow(0.5) + 1e-7))
    return out


def patch_nce_loss(feat_q, feat_k, batch_size, nce_t=0.07, all_negatives=False):
  """CUT's PatchNCELoss.forward (per-query losses)."""
  n, dim = feat_q.shape
  feat_k = feat_k.detach()
  l_pos = torch.bmm(feat_q.view(n, 1, -1), feat_k.view(n, -1, 1)).view(n, 1)
  groups = 1 if all_negatives else batch_size
  q = feat_q.view(groups, -1, dim)
  k = feat_k.view(groups, -1, dim)
  npatches = q.size(1)
  l_neg = torch.bmm(q, k.transpose(2, 1))
  l_neg.masked_fill_(torch.eye(npatches, dtype=torch.bool)[None], -10.0)
  out = torch.cat((l_pos, l_neg.view(-1, npatches)), dim=1) / nce_t
  return F.cross_entropy(out, torch.zeros(out.size(0), dtype=torch.long), reduction="none")


# ------------------------------------------------------------------------------------------------------ U-Net
class DoubleConv(nn.Module):

  def __init__(self, cin, cout):
    super().__init__()
    self.double_conv = nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

  def forward(self, x):
    return self.double_conv(x)


class Down(nn.Module):

  def __init__(self, cin, cout):
    super().__init__()
    self.maxpool_conv = nn.Sequential(nn.MaxPool2d(2), DoubleConv(cin, cout))

  def forward(self, x):
    return self.maxpool_conv(x)


class Up(nn.Module):

  def __init__(self, cin, cout):
    super().__init__()
    self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
    self.conv = DoubleConv(cin, cout)

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
  """milesial U-Net; ``widths`` generalises 64-128-256-512-512 like cmedl_jax's ``features``."""

  def __init__(self, n_channels=1, n_classes=2, widths=(64, 128, 256, 512, 512)):
    super().__init__()
    depth = len(widths) - 1
    self.depth = depth
    self.inc = DoubleConv(n_channels, widths[0])
    for i in range(1, depth + 1):
      setattr(self, f"down{i}", Down(widths[i - 1], widths[i]))
    c = widths[-1]
    for i in range(1, depth + 1):
      skip = widths[depth - i]
      out = widths[max(depth - 1 - i, 0)]
      setattr(self, f"up{i}", Up(c + skip, out))
      c = out
    self.outc = OutConv(c, n_classes)

  def forward(self, x):
    skips = [self.inc(x)]
    for i in range(1, self.depth + 1):
      skips.append(getattr(self, f"down{i}")(skips[-1]))
    x = skips.pop()
    feats = []
    for i in range(1, self.depth + 1):
      x = getattr(self, f"up{i}")(x, skips.pop())
      feats.append(x)
    return self.outc(x), feats


# -------------------------------------------------------------------------------------------- FC-DenseNet (67)
class DenseLayer(nn.Sequential):

  def __init__(self, cin, growth):
    super().__init__()
    self.add_module("norm", nn.BatchNorm2d(cin))
    self.add_module("relu", nn.ReLU(True))
    self.add_module("conv", nn.Conv2d(cin, growth, 3, padding=1, bias=True))
    self.add_module("drop", nn.Dropout2d(0.2))


class DenseBlock(nn.Module):

  def __init__(self, cin, growth, n_layers, upsample=False):
    super().__init__()
    self.upsample = upsample
    self.layers = nn.ModuleList([DenseLayer(cin + i * growth, growth) for i in range(n_layers)])

  def forward(self, x):
    new = []
    for layer in self.layers:
      out = layer(x)
      x = torch.cat([x, out], 1)
      new.append(out)
    return torch.cat(new, 1) if self.upsample else x


class TransitionDown(nn.Sequential):

  def __init__(self, c):
    super().__init__()
    self.add_module("norm", nn.BatchNorm2d(c))
    self.add_module("relu", nn.ReLU(inplace=True))
    self.add_module("conv", nn.Conv2d(c, c, 1, bias=True))
    self.add_module("drop", nn.Dropout2d(0.2))
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

  def __init__(self, cin, growth, n_layers):
    super().__init__()
    self.add_module("bottleneck", DenseBlock(cin, growth, n_layers, upsample=True))


class FCDenseNet(nn.Module):

  def __init__(self, in_channels=1, down_blocks=(5,) * 5, up_blocks=(5,) * 5, bottleneck_layers=5, growth_rate=16,
               out_chans_first_conv=48, n_classes=2):
    super().__init__()
    self.firstconv = nn.Conv2d(in_channels, out_chans_first_conv, 3, padding=1, bias=True)
    c = out_chans_first_conv
    skip_counts = []
    self.denseBlocksDown, self.transDownBlocks = nn.ModuleList(), nn.ModuleList()
    for n in down_blocks:
      self.denseBlocksDown.append(DenseBlock(c, growth_rate, n))
      c += growth_rate * n
      skip_counts.insert(0, c)
      self.transDownBlocks.append(TransitionDown(c))
    self.bottleneck = Bottleneck(c, growth_rate, bottleneck_layers)
    prev = growth_rate * bottleneck_layers
    self.transUpBlocks, self.denseBlocksUp = nn.ModuleList(), nn.ModuleList()
    for i, n in enumerate(up_blocks):
      last = i == len(up_blocks) - 1
      self.transUpBlocks.append(TransitionUp(prev, prev))
      c = prev + skip_counts[i]
      self.denseBlocksUp.append(DenseBlock(c, growth_rate, n, upsample=not last))
      prev = growth_rate * n
      c += prev
    self.finalConv = nn.Conv2d(c, n_classes, 1, bias=True)

  def forward(self, x):
    out = self.firstconv(x)
    skips = []
    for block, down in zip(self.denseBlocksDown, self.transDownBlocks):
      out = block(out)
      skips.append(out)
      out = down(out)
    out = self.bottleneck(out)
    feats = []
    for up, block in zip(self.transUpBlocks, self.denseBlocksUp):
      out = block(up(out, skips.pop()))
      feats.append(out)
    return self.finalConv(out), feats


# ------------------------------------------------------------------------------------------------------ PSPNet
class ResNetBottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride=1, dilation=1):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.downsample = None
    if stride != 1 or inplanes != planes * 4:
      self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False),
                                      nn.BatchNorm2d(planes * 4))

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = F.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class PPM(nn.Module):

  def __init__(self, in_dim, reduction_dim, bins):
    super().__init__()
    self.features = nn.ModuleList([
        nn.Sequential(nn.AdaptiveAvgPool2d(b), nn.Conv2d(in_dim, reduction_dim, 1, bias=False),
                      nn.BatchNorm2d(reduction_dim), nn.ReLU(inplace=True)) for b in bins])

  def forward(self, x):
    out = [x]
    for f in self.features:
      out.append(F.interpolate(f(x), x.shape[2:], mode="bilinear", align_corners=True))
    return torch.cat(out, 1)


class PSPNet(nn.Module):
  """semseg PSPNet with a deep-base dilated ResNet-50/101/152 (``base`` scales every width)."""

  def __init__(self, in_channels=1, classes=2, layers=(3, 4, 6, 3), base=64, bins=(1, 2, 3, 6), head=512, aux=256,
               use_aux=True):
    super().__init__()
    self.layer0 = nn.Sequential(
        nn.Conv2d(in_channels, base, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(base), nn.ReLU(True),
        nn.Conv2d(base, base, 3, padding=1, bias=False), nn.BatchNorm2d(base), nn.ReLU(True),
        nn.Conv2d(base, 2 * base, 3, padding=1, bias=False), nn.BatchNorm2d(2 * base), nn.ReLU(True),
        nn.MaxPool2d(3, stride=2, padding=1))
    inplanes = 2 * base
    for stage, (n, stride, dilation) in enumerate(zip(layers, (1, 2, 1, 1), (1, 1, 2, 4)), start=1):
      planes = base * 2 ** (stage - 1)
      blocks = []
      for b in range(n):
        blocks.append(ResNetBottleneck(inplanes, planes, stride if b == 0 else 1, dilation))
        inplanes = planes * 4
      setattr(self, f"layer{stage}", nn.Sequential(*blocks))
    fea_dim = inplanes
    self.ppm = PPM(fea_dim, fea_dim // len(bins), bins)
    self.cls = nn.Sequential(nn.Conv2d(2 * fea_dim, head, 3, padding=1, bias=False), nn.BatchNorm2d(head),
                             nn.ReLU(inplace=True), nn.Dropout2d(0.1), nn.Conv2d(head, classes, 1))
    self.use_aux = use_aux
    if use_aux:
      self.aux = nn.Sequential(nn.Conv2d(fea_dim // 2, aux, 3, padding=1, bias=False), nn.BatchNorm2d(aux),
                               nn.ReLU(inplace=True), nn.Dropout2d(0.1), nn.Conv2d(aux, classes, 1))

  def forward(self, x):
    size = x.shape[2:]
    h = self.layer2(self.layer1(self.layer0(x)))
    h3 = self.layer3(h)
    ppm = self.ppm(self.layer4(h3))
    hidden = self.cls[2](self.cls[1](self.cls[0](ppm)))
    logits = F.interpolate(self.cls[4](self.cls[3](hidden)), size, mode="bilinear", align_corners=True)
    feats = {"ppm": ppm, "cls_hidden": hidden}
    if self.use_aux:
      feats["aux_logits"] = F.interpolate(self.aux(h3), size, mode="bilinear", align_corners=True)
    return logits, feats


def count(module: nn.Module) -> int:
  return sum(p.numel() for p in module.parameters())


def randomize_batch_norm_stats(module: nn.Module, seed: int = 0) -> None:
  """Non-trivial running statistics, so that eval-mode comparisons exercise them."""
  gen = torch.Generator().manual_seed(seed)
  for m in module.modules():
    if isinstance(m, nn.BatchNorm2d):
      m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
      m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
      m.weight.data.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
      m.bias.data.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
