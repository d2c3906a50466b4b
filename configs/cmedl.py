"""CMEDL at the paper's scale: translator {cyclegan, cut} x segmenter {unet, densefcn, pspnet}.

Launch (argument: key=value pairs, defaults translator=cyclegan,segmenter=unet):
  cmedl-train --config configs/cmedl.py:translator=cyclegan,segmenter=unet --workdir runs/cmedl_cyclegan_unet \
      --config.data.ct_dir=/data/Lung_CT --config.data.mri_dir=/data/Lung_T2w

Expected (paper, CT lung tumours, student at test time): DSC ~0.77 (U-Net), sDSC ~0.83, HD95 ~5.2 mm.
Runtime: a GPU job of many hours (256 px crops, full networks); on a CPU use configs/quickstart.py.
Scans are resampled in-plane to 1 mm pixels (config_base.PAPER_TARGET_SPACING_MM;
`--config.data.target_spacing_mm="()"` keeps each scan's own). Every other field is config_base.py's default.
"""

from cmedl_jax import config_base
from cmedl_jax.models.build import SEGMENTERS
from cmedl_jax.train.methods import TRANSLATORS

CHOICES = {"translator": tuple(TRANSLATORS), "segmenter": tuple(SEGMENTERS)}
DEFAULTS = {"translator": "cyclegan", "segmenter": "unet"}


def get_config(arg=None):
  args = config_base.parse_arg(arg, CHOICES, DEFAULTS, "configs/cmedl.py")
  c = config_base.base_config()
  c.data.target_spacing_mm = config_base.PAPER_TARGET_SPACING_MM  # one physical scale for CT and MRI
  c.method = "cmedl"
  c.translator = args["translator"]
  c.model.segmenter = args["segmenter"]
  return c
