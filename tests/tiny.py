"""Tiny configurations shared by the training tests (32 px, widths of 4-8 channels)."""

import numpy as np

from cmedl_jax import config_base


def tiny_config(method="cmedl", translator="cyclegan", crop=32, batch=8):
  c = config_base.base_config()
  c.method, c.translator = method, translator
  c.data.crop_size, c.data.global_batch_size = crop, batch
  c.model.segmenter_kwargs = {"features": (4, 8, 8)}
  c.model.generator.update(base_features=4, num_blocks=1)
  c.model.discriminator.update(base_features=4)
  c.model.nce.update(num_patches=16, mlp_features=8)
  c.pool_size = 4
  c.train.update(total_steps=10, log_every=1, checkpoint_every=2, preview_every=0, async_checkpoint=False)
  return c


def random_batch(seed=0, batch=8, crop=32):
  rng = np.random.default_rng(seed)
  label = np.zeros((batch, crop, crop), np.int32)
  for i in range(batch):
    r, c = rng.integers(4, crop - 10, size=2)
    label[i, r:r + 6, c:c + 5] = 1
  ct = np.clip(rng.normal(0, 0.3, (batch, crop, crop, 1)) + 0.5 * label[..., None], -1, 1).astype(np.float32)
  mri = np.clip(rng.normal(0, 0.4, (batch, crop, crop, 1)), -1, 1).astype(np.float32)
  return {"ct": ct, "ct_label": label, "mri": mri}


def phantom_config(phantom_dirs, total_steps=4, **train):
  """The tiny config reading the session's phantom folders."""
  cfg = tiny_config()
  cfg.data.ct_dir, cfg.data.mri_dir = phantom_dirs
  cfg.train.update(total_steps=total_steps, **train)
  return cfg
