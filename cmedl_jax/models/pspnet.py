"""PSPNet segmenter: dilated ResNet + pyramid pooling module (Zhao et al. 2017).

Reference: hszhao/semseg ``model/pspnet.py``: backbone at output stride 8 (:mod:`resnet_backbone`); PPM with bins
(1, 2, 3, 6): per bin AdaptiveAvgPool -> conv1x1 (C / len(bins), no bias) -> BN -> ReLU, bilinearly upsampled
(align_corners=True) and concatenated with the backbone output (2C channels); classifier ``cls``: conv3x3 (512, no
bias) -> BN -> ReLU -> Dropout2d(0.1) -> conv1x1 (classes); optional auxiliary head ``aux`` on layer3 (256 wide);
logits upsampled bilinearly (align_corners=True) to the input size.

Decoder features (returned in this order): ``ppm`` (the 2C-channel pyramid concatenation at H/8) and ``cls_hidden``
(the 512-channel ReLU output of the classifier's 3x3 conv at H/8, before dropout). Both are the hint features.
With ``aux_head`` the dict also holds ``aux_logits`` (N, H, W, classes), which is not a decoder feature.

Parameter names: backbone as in :mod:`resnet_backbone`; ``ppm.features.{b}.{1,2}`` -> ``ppm/features_{b}_{1,2}``;
``cls.{0,1,4}`` -> ``cls_{0,1,4}``; ``aux.{0,1,4}`` -> ``aux_{0,1,4}``.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from cmedl_jax.models.layers import Conv2d, batch_norm
from cmedl_jax.models.resample import adaptive_avg_pool2d, resize_bilinear_align_corners
from cmedl_jax.models.resnet_backbone import EXPANSION, RESNET_DEPTHS, dilated_resnet

PPM_BINS = (1, 2, 3, 6)


class PyramidPooling(nn.Module):
  """semseg ``PPM``: (N, h, w, C) -> (N, h, w, C + len(bins) * reduction_features)."""

  reduction_features: int
  bins: Sequence[int] = PPM_BINS
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    out = [x]
    for b, size in enumerate(self.bins):
      h = adaptive_avg_pool2d(x, size)
      h = Conv2d(self.reduction_features, 1, use_bias=False, name=f"features_{b}_1")(h)
      h = nn.relu(batch_norm(train, self.bn_axis_name, name=f"features_{b}_2")(h))
      out.append(resize_bilinear_align_corners(h, x.shape[1:3]))
    return jnp.concatenate(out, axis=-1)


class PSPNet(nn.Module):
  """PSPNet; ``__call__(x, train) -> (logits, features)``.

  Attributes:
    num_classes: classifier channels.
    depth: backbone depth (18, 34, 50, 101, 152; semseg uses 50/101/152).
    stage_blocks: optional blocks per backbone stage overriding the depth's (tiny test networks).
    base_width: backbone width (64 in the reference; e.g. 8 for CPU tests).
    deep_stem: semseg's three-conv stem.
    bins: pyramid bins.
    head_features: width of the classifier's 3x3 conv (512).
    aux_head: add the auxiliary classifier on layer3 (for the 0.4-weighted auxiliary loss).
    aux_features: width of the auxiliary 3x3 conv (256).
    dropout_rate: Dropout2d rate of the heads (0.1; needs a "dropout" rng when ``train``).
    bn_axis_name: mapped axis for batch-norm statistics in training.
  """

  num_classes: int = 2
  depth: int = 50
  stage_blocks: Sequence[int] | None = None
  base_width: int = 64
  deep_stem: bool = True
  bins: Sequence[int] = PPM_BINS
  head_features: int = 512
  aux_head: bool = False
  aux_features: int = 256
  dropout_rate: float = 0.1
  bn_axis_name: str | None = None

  def backbone_features(self) -> int:
    """Channels C of the backbone output (2048 for ResNet-50 at base width 64)."""
    kind, _ = RESNET_DEPTHS[self.depth]
    return 8 * self.base_width * EXPANSION[kind]

  def decoder_feature_names(self) -> tuple[str, ...]:
    """Names of the decoder feature maps, in decoder order."""
    return ("ppm", "cls_hidden")

  def hint_feature_names(self) -> tuple[str, ...]:
    """The distillation features: the last two decoder maps."""
    return self.decoder_feature_names()[-2:]

  def _head(self, x, features, prefix, train):
    h = Conv2d(features, 3, padding=1, use_bias=False, name=f"{prefix}_0")(x)
    hidden = nn.relu(batch_norm(train, self.bn_axis_name, name=f"{prefix}_1")(h))
    h = nn.Dropout(self.dropout_rate, broadcast_dims=(1, 2), deterministic=not train)(hidden)
    return Conv2d(self.num_classes, 1, name=f"{prefix}_4")(h), hidden

  @nn.compact
  def __call__(self, x, train: bool = False):
    """Segments ``x``.

    Args:
      x: (N, H, W, in), H and W divisible by 8.
      train: batch statistics and dropout.

    Returns:
      ``(logits, features)``: logits (N, H, W, num_classes); features ``ppm`` (N, H/8, W/8, 2C), ``cls_hidden``
      (N, H/8, W/8, head_features) and, with ``aux_head``, ``aux_logits`` (N, H, W, num_classes).
    """
    channels = self.backbone_features()
    if channels % len(self.bins):
      raise ValueError(f"backbone width {channels} is not divisible by the {len(self.bins)} pyramid bins")
    stages = dilated_resnet(x, depth=self.depth, base_width=self.base_width, deep_stem=self.deep_stem,
                            train=train, bn_axis_name=self.bn_axis_name, stage_blocks=self.stage_blocks)
    pyramid = PyramidPooling(channels // len(self.bins), tuple(self.bins), self.bn_axis_name,
                             name="ppm")(stages["layer4"], train)
    logits, hidden = self._head(pyramid, self.head_features, "cls", train)
    size = x.shape[1:3]
    features = {"ppm": pyramid, "cls_hidden": hidden}
    if self.aux_head:
      aux_logits, _ = self._head(stages["layer3"], self.aux_features, "aux", train)
      features["aux_logits"] = resize_bilinear_align_corners(aux_logits, size)
    return resize_bilinear_align_corners(logits, size), features
