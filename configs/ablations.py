"""CMEDL ablations: no_hint (lambda_hint = 0) and no_seg_into_g (lambda_seg = 0: the teacher's loss no longer
shapes the translator).

Launch (argument: key=value pairs, defaults ablation=no_hint,translator=cyclegan,segmenter=unet):
  cmedl-train --config configs/ablations.py:ablation=no_hint --workdir runs/ablation_no_hint \
      --config.data.ct_dir=/data/Lung_CT --config.data.mri_dir=/data/Lung_T2w

Expected: both fall between CT-only and full CMEDL in the paper's ablation. Runtime as configs/cmedl.py.
"""

from cmedl_jax import config_base
from cmedl_jax.models.build import SEGMENTERS
from cmedl_jax.train.methods import TRANSLATORS

ABLATIONS = {"no_hint": ("lambda_hint", 0.0), "no_seg_into_g": ("lambda_seg", 0.0)}
CHOICES = {"ablation": tuple(ABLATIONS), "translator": tuple(TRANSLATORS), "segmenter": tuple(SEGMENTERS)}
DEFAULTS = {"ablation": "no_hint", "translator": "cyclegan", "segmenter": "unet"}


def get_config(arg=None):
  args = config_base.parse_arg(arg, CHOICES, DEFAULTS, "configs/ablations.py")
  c = config_base.base_config()
  c.data.target_spacing_mm = config_base.PAPER_TARGET_SPACING_MM  # one physical scale for CT and MRI
  c.translator = args["translator"]
  c.model.segmenter = args["segmenter"]
  field, value = ABLATIONS[args["ablation"]]
  c.loss[field] = value
  return c
