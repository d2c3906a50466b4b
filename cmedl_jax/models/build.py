"""Builds the networks by name (for configs) and counts parameters without allocating them."""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cmedl_jax.models.densefcn import FCDenseNet
from cmedl_jax.models.patchgan import PatchGANDiscriminator
from cmedl_jax.models.patchnce import PatchSampleMLP
from cmedl_jax.models.pspnet import PSPNet
from cmedl_jax.models.resnet_generator import ResnetGenerator
from cmedl_jax.models.unet import UNet

SEGMENTERS: Mapping[str, type[nn.Module]] = {"unet": UNet, "densefcn": FCDenseNet, "pspnet": PSPNet}


def build_segmenter(name: str, num_classes: int = 2, **kwargs: Any) -> nn.Module:
  """A segmenter by name ("unet" | "densefcn" | "pspnet").

  Every segmenter is called as ``model.apply(variables, x, train=..., mutable=["batch_stats"] if train else False)``
  and returns ``(logits, features)``; ``model.hint_feature_names()`` names the distillation features (do not rely
  on the dict's order: jax sorts dict keys when it flattens pytrees).

  Args:
    name: network name (case-insensitive).
    num_classes: logits channels.
    **kwargs: the network's attributes (e.g. ``features=(8, 16, 32, 32)`` for a tiny U-Net, ``bn_axis_name``).
  """
  key = name.lower()
  if key not in SEGMENTERS:
    raise ValueError(f"unknown segmenter {name!r}; expected one of {sorted(SEGMENTERS)}")
  return SEGMENTERS[key](num_classes=num_classes, **kwargs)


def build_generator(output_channels: int = 1, **kwargs: Any) -> ResnetGenerator:
  """The CycleGAN/CUT ResNet generator (``base_features``, ``num_blocks``, ``use_dropout``, ... as kwargs)."""
  return ResnetGenerator(output_channels=output_channels, **kwargs)


def build_discriminator(**kwargs: Any) -> PatchGANDiscriminator:
  """The 70x70 PatchGAN discriminator (``base_features``, ``num_layers``, ``norm``, ... as kwargs)."""
  return PatchGANDiscriminator(**kwargs)


def build_patch_sampler(**kwargs: Any) -> PatchSampleMLP:
  """CUT's PatchNCE projection head (``features``, ``use_mlp``, ``init_type``, ... as kwargs)."""
  return PatchSampleMLP(**kwargs)


def abstract_variables(module: nn.Module, input_shape, *args: Any, **kwargs: Any):
  """The variables ``module.init`` would create for a zero input of ``input_shape``, as ShapeDtypeStructs.

  Uses ``jax.eval_shape``: nothing is computed or allocated, so it is instant even for the 50M-parameter PSPNet.
  Extra args/kwargs go to the module's ``__call__`` (e.g. ``train=False``).
  """
  def init():
    return module.init(jax.random.PRNGKey(0), jnp.zeros(input_shape, jnp.float32), *args, **kwargs)
  return jax.eval_shape(init)


def count_parameters(module: nn.Module, input_shape, *args: Any, **kwargs: Any) -> int:
  """Number of trainable parameters (the "params" collection; batch-norm statistics excluded, as PyTorch)."""
  variables = abstract_variables(module, input_shape, *args, **kwargs)
  return int(sum(np.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(variables.get("params", {}))))
