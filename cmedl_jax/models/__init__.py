"""Flax (linen) networks of CMEDL: translators, discriminator, PatchNCE head and segmenters (see docs/models.md)."""

from cmedl_jax.models.build import (
    SEGMENTERS,
    abstract_variables,
    build_discriminator,
    build_generator,
    build_patch_sampler,
    build_segmenter,
    count_parameters,
)
from cmedl_jax.models.densefcn import FCDenseNet
from cmedl_jax.models.initializers import gan_kernel_init, torch_default_kernel_init
from cmedl_jax.models.layers import (
    Conv2d,
    ConvTranspose2d,
    apply_norm,
    batch_norm,
    conv2d,
    instance_norm,
    reflect_pad,
)
from cmedl_jax.models.patchgan import PatchGANDiscriminator
from cmedl_jax.models.patchnce import (
    PatchSampleMLP,
    multilayer_patch_nce_loss,
    patch_nce_loss,
    sample_patch_ids,
)
from cmedl_jax.models.pspnet import PSPNet
from cmedl_jax.models.resample import adaptive_avg_pool2d, resize_bilinear_align_corners
from cmedl_jax.models.resnet_generator import CUT_NCE_LAYERS, ResnetGenerator
from cmedl_jax.models.torch_names import torch_state_dict_to_variables
from cmedl_jax.models.unet import UNet

__all__ = [
    "CUT_NCE_LAYERS",
    "Conv2d",
    "ConvTranspose2d",
    "FCDenseNet",
    "PSPNet",
    "PatchGANDiscriminator",
    "PatchSampleMLP",
    "ResnetGenerator",
    "SEGMENTERS",
    "UNet",
    "abstract_variables",
    "adaptive_avg_pool2d",
    "apply_norm",
    "batch_norm",
    "build_discriminator",
    "build_generator",
    "build_patch_sampler",
    "build_segmenter",
    "conv2d",
    "count_parameters",
    "gan_kernel_init",
    "instance_norm",
    "multilayer_patch_nce_loss",
    "patch_nce_loss",
    "reflect_pad",
    "resize_bilinear_align_corners",
    "sample_patch_ids",
    "torch_default_kernel_init",
    "torch_state_dict_to_variables",
]
