"""CMEDL ablations: no_hint (lambda_hint = 0) and no_seg_into_g (lambda_seg = 0: the teacher's loss no longer
shapes the translator).

Launch (arg = "ABLATION[,TRANSLATOR,SEGMENTER]"):
  cmedl-train --config configs/ablations.py:no_hint --workdir runs/ablation_no_hint \
      --config.data.ct_dir=/data/Lung_CT --config.data.mri_dir=/data/Lung_T2w

Expected: both fall between CT-only and full CMEDL in the paper's ablation. Runtime as configs/cmedl.py.
"""

from cmedl_jax import config_base

ABLATIONS = {"no_hint": ("lambda_hint", 0.0), "no_seg_into_g": ("lambda_seg", 0.0)}


def get_config(arg="no_hint"):
  parts = (arg or "no_hint").split(",")
  if parts[0] not in ABLATIONS:
    raise ValueError(f"ablation must be one of {sorted(ABLATIONS)}, got {parts[0]!r}")
  c = config_base.base_config()
  c.translator = parts[1] if len(parts) > 1 else "cyclegan"
  c.model.segmenter = parts[2] if len(parts) > 2 else "unet"
  field, value = ABLATIONS[parts[0]]
  c.loss[field] = value
  return c
