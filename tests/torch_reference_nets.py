"""PyTorch reference networks for the tests: those of ``cmedl_jax.torch_port.reference`` plus the test-only ones.

Only imported by tests that first ran ``pytest.importorskip("torch")``. Each class keeps the reference's module
structure and attribute names (so ``state_dict`` keys match the originals); training-only machinery is left out.

- ``ResnetGenerator`` / ``NLayerDiscriminator`` / ``UNet`` / ``FCDenseNet``: re-exported from
  :mod:`cmedl_jax.torch_port.reference` (one definition for the parity tests and the weight converter).
- ``PatchSampleF`` / ``patch_nce_loss``: taesungp/contrastive-unpaired-translation.
- ``PSPNet``: hszhao/semseg (deep-base dilated ResNet-50+, PPM, cls/aux heads); no converter exists for it yet.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cmedl_jax.torch_port.reference import FCDenseNet, NLayerDiscriminator, ResnetGenerator, UNet  # noqa: F401
from cmedl_jax.torch_port.reference import randomize_batch_norm as randomize_batch_norm_stats  # noqa: F401


# ----------------------------------------------------------------------------------------------- CUT PatchNCE
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
