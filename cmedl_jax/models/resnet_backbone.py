"""Dilated ResNet backbone (output stride 8) of PSPNet.

Reference: hszhao/semseg ``model/resnet.py`` + the dilation surgery in ``model/pspnet.py``: a "deep base" stem
(three 3x3 convs, 64-64-128, the first with stride 2, then maxpool 3/s2/p1), ResNet v1.5 stages (stride on the 3x3
conv), and in ``layer3`` / ``layer4`` every 3x3 conv gets stride 1 with dilation (= padding) 2 / 4 and the
shortcut convs stride 1, so ``layer4`` is at 1/8 of the input resolution.

semseg only builds ResNet-50/101/152 (Bottleneck). For small CPU networks this module also builds ResNet-18/34
(BasicBlock); there both 3x3 convs of the blocks in ``layer3``/``layer4`` are dilated (the semseg surgery renames
only ``conv2``, which would leave the BasicBlock's strided ``conv1`` in place).

:func:`dilated_resnet` is a function, not a module, so that the layers become direct children of the calling
module with PyTorch's names: ``layer0.{0,1,3,4,6,7}`` (stem convs/BNs) -> ``layer0_{0,1,3,4,6,7}`` and
``layer{s}.{b}.{conv1,bn1,...,downsample.0,downsample.1}`` ->
``layer{s}_{b}/{conv1,bn1,...,downsample_0,downsample_1}``.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn

from cmedl_jax.models import initializers
from cmedl_jax.models.layers import Conv2d, batch_norm

# depth -> (block type, blocks per stage)
RESNET_DEPTHS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
EXPANSION = {"basic": 1, "bottleneck": 4}
# (stride, dilation) of layer1 .. layer4 at output stride 8
STAGE_STRIDE_DILATION = ((1, 1), (2, 1), (1, 2), (1, 4))


def _conv(features, kernel_size, stride=1, dilation=1, name=None):
  padding = dilation * (kernel_size - 1) // 2
  return Conv2d(features, kernel_size, stride=stride, padding=padding, dilation=dilation, use_bias=False,
                kernel_init=initializers.kaiming_normal_fan_out(), name=name)


class BasicBlock(nn.Module):
  """ResNet-18/34 block: conv3x3(stride) - BN - ReLU - conv3x3 - BN, plus shortcut, ReLU."""

  planes: int
  stride: int = 1
  dilation: int = 1
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    """(N, H, W, c) -> (N, H / stride, W / stride, planes)."""
    bn = lambda name: batch_norm(train, self.bn_axis_name, name=name)  # noqa: E731
    h = nn.relu(bn("bn1")(_conv(self.planes, 3, self.stride, self.dilation, "conv1")(x)))
    h = bn("bn2")(_conv(self.planes, 3, 1, self.dilation, "conv2")(h))
    shortcut = x
    if self.stride != 1 or x.shape[-1] != self.planes:
      shortcut = bn("downsample_1")(_conv(self.planes, 1, self.stride, name="downsample_0")(x))
    return nn.relu(h + shortcut)


class Bottleneck(nn.Module):
  """ResNet-50+ block: conv1x1 - BN - ReLU - conv3x3(stride, dilation) - BN - ReLU - conv1x1(4 planes) - BN."""

  planes: int
  stride: int = 1
  dilation: int = 1
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    """(N, H, W, c) -> (N, H / stride, W / stride, 4 planes)."""
    bn = lambda name: batch_norm(train, self.bn_axis_name, name=name)  # noqa: E731
    out_features = self.planes * EXPANSION["bottleneck"]
    h = nn.relu(bn("bn1")(_conv(self.planes, 1, name="conv1")(x)))
    h = nn.relu(bn("bn2")(_conv(self.planes, 3, self.stride, self.dilation, "conv2")(h)))
    h = bn("bn3")(_conv(out_features, 1, name="conv3")(h))
    shortcut = x
    if self.stride != 1 or x.shape[-1] != out_features:
      shortcut = bn("downsample_1")(_conv(out_features, 1, self.stride, name="downsample_0")(x))
    return nn.relu(h + shortcut)


def dilated_resnet(x, *, depth: int = 50, base_width: int = 64, deep_stem: bool = True, train: bool = False,
                   bn_axis_name: str | None = None, stage_blocks: Sequence[int] | None = None):
  """Runs the dilated ResNet; call it inside a compact method (it creates the caller's submodules).

  Args:
    x: (N, H, W, in) with H, W divisible by 8.
    depth: 18, 34, 50, 101 or 152.
    base_width: width of layer1's blocks (64 in the reference); stages use 1, 2, 4, 8 times it.
    deep_stem: semseg's three-conv stem (widths base, base, 2 base) instead of a 7x7/s2 conv (width base).
    train: batch statistics.
    bn_axis_name: mapped axis for batch-norm statistics.
    stage_blocks: blocks per stage overriding the depth's (the block type still follows ``depth``), for tiny
      test networks.

  Returns:
    dict ``layer1`` .. ``layer4`` of (N, h, w, c) stage outputs: layer1 at H/4, layer2..4 at H/8; channels
    base_width * (1, 2, 4, 8) * expansion (expansion 4 for depth >= 50).
  """
  if depth not in RESNET_DEPTHS:
    raise ValueError(f"depth must be one of {sorted(RESNET_DEPTHS)}, got {depth}")
  kind, blocks = RESNET_DEPTHS[depth]
  if stage_blocks is not None:
    if len(stage_blocks) != 4:
      raise ValueError(f"stage_blocks needs 4 entries, got {stage_blocks}")
    blocks = tuple(stage_blocks)
  block_cls = BasicBlock if kind == "basic" else Bottleneck
  bn = lambda name: batch_norm(train, bn_axis_name, name=name)  # noqa: E731
  if deep_stem:
    h = nn.relu(bn("layer0_1")(_conv(base_width, 3, 2, name="layer0_0")(x)))
    h = nn.relu(bn("layer0_4")(_conv(base_width, 3, name="layer0_3")(h)))
    h = nn.relu(bn("layer0_7")(_conv(2 * base_width, 3, name="layer0_6")(h)))
  else:
    h = nn.relu(bn("layer0_1")(Conv2d(base_width, 7, stride=2, padding=3, use_bias=False,
                                      kernel_init=initializers.kaiming_normal_fan_out(), name="layer0_0")(x)))
  h = nn.max_pool(h, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
  outputs = {}
  for stage, (num_blocks, (stride, dilation)) in enumerate(zip(blocks, STAGE_STRIDE_DILATION), start=1):
    planes = base_width * 2 ** (stage - 1)
    for b in range(num_blocks):
      h = block_cls(planes, stride if b == 0 else 1, dilation, bn_axis_name, name=f"layer{stage}_{b}")(h, train)
    outputs[f"layer{stage}"] = h
  return outputs
