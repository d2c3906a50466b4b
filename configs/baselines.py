"""Baselines in the same framework: ct_only, pmri_only, ct_pmri_concat (cmedl_jax/train/methods.py).

Launch (argument: key=value pairs, defaults method=ct_only,translator=cyclegan,segmenter=unet):
  cmedl-train --config configs/baselines.py:method=ct_only,segmenter=unet --workdir runs/ct_only_unet \
      --config.data.ct_dir=/data/Lung_CT --config.data.mri_dir=/data/Lung_T2w

- ct_only: the student alone on CT (paper: DSC ~0.73 with U-Net). The MRI folder is still read (unused).
- pmri_only: translator + teacher trained on pMRI; at test time the teacher segments G(CT).
- ct_pmri_concat: translator + a segmenter on the two-channel [CT, G(CT)] input.
Runtime: like configs/cmedl.py (ct_only is about 4x cheaper per step: no translator).
"""

from cmedl_jax import config_base
from cmedl_jax.models.build import SEGMENTERS
from cmedl_jax.train.methods import METHODS, TRANSLATORS

CHOICES = {"method": tuple(m for m in METHODS if m != "cmedl"), "translator": tuple(TRANSLATORS),
           "segmenter": tuple(SEGMENTERS)}
DEFAULTS = {"method": "ct_only", "translator": "cyclegan", "segmenter": "unet"}


def get_config(arg=None):
  args = config_base.parse_arg(arg, CHOICES, DEFAULTS, "configs/baselines.py")
  c = config_base.base_config()
  c.data.target_spacing_mm = config_base.PAPER_TARGET_SPACING_MM  # one physical scale for CT and MRI
  c.method = args["method"]
  c.translator = args["translator"]
  c.model.segmenter = args["segmenter"]
  return c
