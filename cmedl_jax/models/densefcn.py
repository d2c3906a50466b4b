"""FC-DenseNet ("One Hundred Layers Tiramisu", Jegou et al. 2017) segmenter, FC-DenseNet67 by default.

Reference: bfortuner/pytorch_tiramisu ``models/tiramisu.py`` + ``models/layers.py`` (``FCDenseNet67``: first conv
48, growth 16, 5 dense blocks of 5 layers down, a 5-layer bottleneck, 5 blocks of 5 layers up):

- DenseLayer: BN -> ReLU -> conv3x3 (growth, bias) -> Dropout2d(0.2) (channel dropout);
- DenseBlock: each layer sees the concatenation of the block input and all earlier outputs; down blocks return
  that whole concatenation, up blocks (``upsample=True``) and the bottleneck only the new features;
- TransitionDown: BN -> ReLU -> conv1x1 (same width, bias) -> Dropout2d(0.2) -> maxpool 2;
- TransitionUp: ConvTranspose2d(k=3, s=2, p=0) of the previous block's new features (output 2h + 1), centre-crop
  to the skip's size, concat [up, skip];
- a 1x1 classification conv on the last block's output.

Decoder features (returned in this order): ``up_block1`` .. ``up_block5``, the outputs of the up dense blocks.
The hint uses the last two: ``up_block4`` (the 80 new features at H/2 for FC-DenseNet67) and ``up_block5`` (the
full concatenation at H, 48 + 5 * 16 * 2 + 80 = 288 channels, the input of the classifier).

Parameter names: ``firstconv``, ``denseBlocksDown.{i}.layers.{j}.{norm,conv}``,
``transDownBlocks.{i}.{norm,conv}``, ``bottleneck.bottleneck.layers.{j}.{norm,conv}``, ``transUpBlocks.{i}.convTrans``,
``denseBlocksUp.{i}.layers.{j}.{norm,conv}``, ``finalConv`` -> the same path with ``.{int}`` appended to the
preceding name by ``_`` (e.g. ``denseBlocksDown_0/layers_1/conv/kernel``).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from cmedl_jax.models.layers import Conv2d, ConvTranspose2d, batch_norm
from cmedl_jax.models.resample import center_crop
from cmedl_jax.ops import max_pool_2x2

DROPOUT_RATE = 0.2


def _channel_dropout(rate: float, train: bool):
  # Dropout2d: one keep/drop decision per (sample, channel), broadcast over H and W.
  return nn.Dropout(rate, broadcast_dims=(1, 2), deterministic=not train)


class DenseLayer(nn.Module):
  """BN -> ReLU -> conv3x3(growth_rate) -> Dropout2d; (N, H, W, c) -> (N, H, W, growth_rate)."""

  growth_rate: int
  dropout_rate: float = DROPOUT_RATE
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.relu(batch_norm(train, self.bn_axis_name, name="norm")(x))
    x = Conv2d(self.growth_rate, 3, padding=1, name="conv")(x)
    return _channel_dropout(self.dropout_rate, train)(x)


class DenseBlock(nn.Module):
  """``num_layers`` DenseLayers with dense connectivity.

  Returns (N, H, W, c + L * g) (input and new features) or, with ``upsample``, only the (N, H, W, L * g) new ones.
  """

  growth_rate: int
  num_layers: int
  upsample: bool = False
  dropout_rate: float = DROPOUT_RATE
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    new_features = []
    for j in range(self.num_layers):
      out = DenseLayer(self.growth_rate, self.dropout_rate, self.bn_axis_name, name=f"layers_{j}")(x, train)
      x = jnp.concatenate([x, out], axis=-1)
      new_features.append(out)
    return jnp.concatenate(new_features, axis=-1) if self.upsample else x


class TransitionDown(nn.Module):
  """BN -> ReLU -> conv1x1 (same width) -> Dropout2d -> maxpool 2; (N, H, W, c) -> (N, H // 2, W // 2, c)."""

  dropout_rate: float = DROPOUT_RATE
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    h = nn.relu(batch_norm(train, self.bn_axis_name, name="norm")(x))
    h = Conv2d(x.shape[-1], 1, name="conv")(h)
    h = _channel_dropout(self.dropout_rate, train)(h)
    return max_pool_2x2(h)


class TransitionUp(nn.Module):
  """ConvTranspose2d(k3, s2, p0) keeping the width, centre-crop to ``skip``, concat [up, skip]."""

  @nn.compact
  def __call__(self, x, skip):
    """x (N, h, w, c), skip (N, H, W, c') with H <= 2h + 1 -> (N, H, W, c + c')."""
    up = ConvTranspose2d(x.shape[-1], 3, stride=2, padding=0, output_padding=0, name="convTrans")(x)
    return jnp.concatenate([center_crop(up, skip.shape[1:3]), skip], axis=-1)


class Bottleneck(nn.Module):
  """The bottleneck DenseBlock (``upsample=True``), wrapped like the reference (``bottleneck.bottleneck``)."""

  growth_rate: int
  num_layers: int
  dropout_rate: float = DROPOUT_RATE
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    return DenseBlock(self.growth_rate, self.num_layers, True, self.dropout_rate, self.bn_axis_name,
                      name="bottleneck")(x, train)


class FCDenseNet(nn.Module):
  """FC-DenseNet; ``__call__(x, train) -> (logits, features)``.

  Attributes:
    num_classes: classifier channels.
    down_blocks: layers per down dense block ((5,) * 5 for FC-DenseNet67).
    up_blocks: layers per up dense block (same length as ``down_blocks``).
    bottleneck_layers: layers of the bottleneck block.
    growth_rate: k (16).
    first_conv_features: width of the first 3x3 conv (48).
    dropout_rate: Dropout2d rate (0.2; needs a "dropout" rng when ``train``).
    bn_axis_name: mapped axis for batch-norm statistics in training.
  """

  num_classes: int = 2
  down_blocks: Sequence[int] = (5, 5, 5, 5, 5)
  up_blocks: Sequence[int] = (5, 5, 5, 5, 5)
  bottleneck_layers: int = 5
  growth_rate: int = 16
  first_conv_features: int = 48
  dropout_rate: float = DROPOUT_RATE
  bn_axis_name: str | None = None

  def decoder_feature_names(self) -> tuple[str, ...]:
    """Names of the decoder feature maps, in decoder order."""
    return tuple(f"up_block{i + 1}" for i in range(len(self.up_blocks)))

  def hint_feature_names(self) -> tuple[str, ...]:
    """The distillation features: the last two decoder maps."""
    return self.decoder_feature_names()[-2:]

  @nn.compact
  def __call__(self, x, train: bool = False):
    """Segments ``x``.

    Args:
      x: (N, H, W, in), H and W divisible by 2 ** len(down_blocks).
      train: batch statistics and dropout.

    Returns:
      ``(logits, features)``: logits (N, H, W, num_classes); features a dict ``up_block1`` .. of decoder maps.
    """
    if len(self.up_blocks) != len(self.down_blocks):
      raise ValueError(f"up_blocks {self.up_blocks} and down_blocks {self.down_blocks} differ in length")
    dense = lambda layers, upsample, name: DenseBlock(  # noqa: E731
        self.growth_rate, layers, upsample, self.dropout_rate, self.bn_axis_name, name=name)
    h = Conv2d(self.first_conv_features, 3, padding=1, name="firstconv")(x)
    skips = []
    for i, layers in enumerate(self.down_blocks):
      h = dense(layers, False, f"denseBlocksDown_{i}")(h, train)
      skips.append(h)
      h = TransitionDown(self.dropout_rate, self.bn_axis_name, name=f"transDownBlocks_{i}")(h, train)
    h = Bottleneck(self.growth_rate, self.bottleneck_layers, self.dropout_rate, self.bn_axis_name,
                   name="bottleneck")(h, train)
    features = {}
    last = len(self.up_blocks) - 1
    for i, layers in enumerate(self.up_blocks):
      h = TransitionUp(name=f"transUpBlocks_{i}")(h, skips.pop())
      h = dense(layers, i < last, f"denseBlocksUp_{i}")(h, train)
      features[f"up_block{i + 1}"] = h
    logits = Conv2d(self.num_classes, 1, name="finalConv")(h)
    return logits, features
