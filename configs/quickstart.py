"""Quickstart: CMEDL (CycleGAN + tiny U-Nets) on generated thorax phantoms, CPU, a few minutes.

Launch:
  cmedl-train --config configs/quickstart.py --workdir runs/quickstart
  (arg selects the translator: configs/quickstart.py:cut)

Expected: phantoms are generated into runs/phantoms on the first run; 300 steps of batch 8 at 64x64 px;
student_seg falls from ~1.7 to below ~0.6 and the previews in runs/quickstart/previews show student masks on
the tumors. Runtime: ~3-5 minutes on a 2-core CPU (compilation ~1 minute of it).
"""

from cmedl_jax import config_base


def get_config(arg="cyclegan"):
  c = config_base.base_config()
  c.translator = arg or "cyclegan"
  c.data.make_phantoms = True
  c.data.ct_dir = "runs/phantoms/CT"
  c.data.mri_dir = "runs/phantoms/MRI"
  c.data.phantoms.out = "runs/phantoms"
  c.data.phantoms.update(num_ct=8, num_mri=8, num_test=4, size=96, slices=24)
  c.eval.data_dir = "runs/phantoms/test/CT"  # 4 held-out phantoms, evaluated when training ends
  c.data.crop_size = 64
  c.data.global_batch_size = 8
  c.data.foreground_fraction = 0.5
  c.model.segmenter_kwargs = {"features": (8, 16, 32, 32)}
  c.model.generator.update(base_features=8, num_blocks=3)
  c.model.discriminator.update(base_features=8)
  c.model.nce.update(num_patches=64, mlp_features=64)
  c.pool_size = 50
  c.optim.seg.lr = 1e-3
  c.train.update(total_steps=300, log_every=10, checkpoint_every=100, preview_every=100)
  return c
