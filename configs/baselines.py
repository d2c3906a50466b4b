"""Baselines in the same framework: ct_only, pmri_only, ct_pmri_concat (docs/design.md).

Launch (arg = "METHOD[,SEGMENTER[,TRANSLATOR]]"):
  cmedl-train --config configs/baselines.py:ct_only,unet --workdir runs/ct_only_unet \
      --config.data.ct_dir=/data/Lung_CT --config.data.mri_dir=/data/Lung_T2w

- ct_only: the student alone on CT (paper: DSC ~0.73 with U-Net). The MRI folder is still read (unused).
- pmri_only: translator + teacher trained on pMRI; at test time the teacher segments G(CT).
- ct_pmri_concat: translator + a segmenter on the two-channel [CT, G(CT)] input.
Runtime: like configs/cmedl.py (ct_only is about 4x cheaper per step: no translator).
"""

from cmedl_jax import config_base

METHODS = ("ct_only", "pmri_only", "ct_pmri_concat")


def get_config(arg="ct_only,unet"):
  parts = (arg or "ct_only,unet").split(",")
  method = parts[0]
  segmenter = parts[1] if len(parts) > 1 else "unet"
  translator = parts[2] if len(parts) > 2 else "cyclegan"
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  c = config_base.base_config()
  c.method = method
  c.translator = translator
  c.model.segmenter = segmenter
  return c
