"""CMEDL at the paper's scale: translator {cyclegan, cut} x segmenter {unet, densefcn, pspnet}.

Launch (arg = "TRANSLATOR,SEGMENTER", default "cyclegan,unet"):
  cmedl-train --config configs/cmedl.py:cyclegan,unet --workdir runs/cmedl_cyclegan_unet \
      --config.data.ct_dir=/data/Lung_CT --config.data.mri_dir=/data/Lung_T2w

Expected (paper, CT lung tumors, student at test time): DSC ~0.77 (U-Net), sDSC ~0.83, HD95 ~5.2 mm.
Runtime: 256x256 crops, full networks (U-Net 13.4M, generators 11.4M each): a GPU job of many hours; on a 2-core
CPU a step takes tens of seconds - use configs/quickstart.py there.
All defaults are those of docs/design.md; see cmedl_jax/config_base.py for every field.
"""

from cmedl_jax import config_base

SEGMENTERS = ("unet", "densefcn", "pspnet")
TRANSLATORS = ("cyclegan", "cut")


def get_config(arg="cyclegan,unet"):
  translator, segmenter = (arg or "cyclegan,unet").split(",")
  if translator not in TRANSLATORS or segmenter not in SEGMENTERS:
    raise ValueError(f"arg must be TRANSLATOR,SEGMENTER with TRANSLATOR in {TRANSLATORS} and SEGMENTER in "
                     f"{SEGMENTERS}, got {arg!r}")
  c = config_base.base_config()
  c.method = "cmedl"
  c.translator = translator
  c.model.segmenter = segmenter
  return c
