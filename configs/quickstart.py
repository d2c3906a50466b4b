"""Quickstart: CMEDL (CycleGAN + tiny U-Nets) on generated thorax phantoms, CPU, a few minutes.

Launch (argument: translator=cyclegan|cut, default cyclegan):
  cmedl-train --config configs/quickstart.py --workdir runs/quickstart

Expected: the student scores about DSC 0.4-0.5 on the 4 held-out phantoms (runs/quickstart/eval/CT-<hash>/
step_600); a second run on the same machine and thread count logs bitwise the same values (docs/RESULTS.md has
longer runs). Crops are augmented (the base config's set) and the phantoms keep their own pixel size.
Runtime: ~3 minutes on 2 CPU cores (8 CT + 8 MRI phantoms generated into runs/phantoms, 600 steps at 64 px).
lambda_hint is 0.1, not the design's 1: in a run this short the teacher is still poor when the hint pulls.
"""

from cmedl_jax import config_base
from cmedl_jax.train.methods import TRANSLATORS

CHOICES = {"translator": tuple(TRANSLATORS)}
DEFAULTS = {"translator": "cyclegan"}


def get_config(arg=None):
  args = config_base.parse_arg(arg, CHOICES, DEFAULTS, "configs/quickstart.py")
  c = config_base.base_config()
  c.translator = args["translator"]
  c.data.make_phantoms = True
  c.data.ct_dir = "runs/phantoms/CT"
  c.data.mri_dir = "runs/phantoms/MRI"
  c.data.phantoms.out = "runs/phantoms"
  c.data.phantoms.update(num_ct=8, num_mri=8, num_test=4, size=96, slices=24)
  c.eval.data_dir = "runs/phantoms/test/CT"  # the 4 held-out phantoms, evaluated when training ends
  c.data.crop_size = 64
  c.data.global_batch_size = 8
  c.data.foreground_fraction = 0.5
  c.model.segmenter_kwargs = {"features": (8, 16, 32, 32)}
  c.model.generator.update(base_features=8, num_blocks=3)
  c.model.discriminator.update(base_features=8)
  c.model.nce.update(num_patches=64, mlp_features=64)
  c.pool_size = 50
  c.optim.seg.lr = 1e-3
  c.loss.lambda_hint = 0.1  # see the docstring
  c.train.update(total_steps=600, log_every=20, checkpoint_every=200, preview_every=200)
  return c
