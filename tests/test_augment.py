"""Training-crop augmentation (cmedl_jax.data.augment) against independent computations."""

import math

import numpy as np

from cmedl_jax.data import augment, preprocess

NONE = augment.IntensityAugment(brightness_prob=0, contrast_prob=0, gamma_prob=0, noise_prob=0)


def _only(**kwargs):
  base = dict(flip_prob=0.0, rotate_prob=0.0, scale_prob=0.0, ct=NONE, mri=NONE)
  base.update(kwargs)
  return augment.Augment(**base)


def test_disabled_or_zero_probability_is_the_plain_crop():
  rng = np.random.default_rng(0)
  image = rng.random((50, 40)).astype(np.float32)
  label = (image > 0.5).astype(np.uint8)
  for aug in (augment.Augment(enabled=False), _only()):
    out, lab = augment.sample_crop(np.random.default_rng(1), aug, image, label, (5, -3), 24, -1.0)
    np.testing.assert_array_equal(out, preprocess.crop_2d(image, (5, -3), 24, -1.0))
    np.testing.assert_array_equal(lab, preprocess.crop_2d(label, (5, -3), 24, 0))


def test_flips_mirror_image_and_label_together():
  image = np.arange(30 * 30, dtype=np.float32).reshape(30, 30)
  label = (image % 7 == 0).astype(np.uint8)
  out, lab = augment.sample_crop(np.random.default_rng(0), _only(flip_prob=1.0), image, label, (3, 4), 16, -1.0)
  np.testing.assert_array_equal(out, image[3:19, 4:20][::-1, ::-1])
  np.testing.assert_array_equal(lab, label[3:19, 4:20][::-1, ::-1])


def test_rotation_turns_a_ramp_by_the_drawn_angle():
  rows, cols = np.meshgrid(np.arange(200.0), np.arange(200.0), indexing="ij")
  image = (0.01 * rows).astype(np.float32)  # gradient along +row
  aug = _only(rotate_prob=1.0, rotate_max_deg=60.0)
  out, _ = augment.sample_crop(np.random.default_rng(5), aug, image, None, (70, 70), 48, -1.0)
  drawn = math.radians(np.random.default_rng(5).uniform(-60.0, 60.0))  # the first draw is the angle
  grid_r, grid_c = np.meshgrid(np.arange(48.0), np.arange(48.0), indexing="ij")
  design = np.stack([grid_r.ravel(), grid_c.ravel(), np.ones(48 * 48)], 1)
  coef = np.linalg.lstsq(design, out.ravel().astype(np.float64), rcond=None)[0]
  # Output pixel (i, j) samples source row centre + cos(a) i' - sin(a) j': d/di = 0.01 cos a, d/dj = -0.01 sin a.
  np.testing.assert_allclose(coef[:2], [0.01 * math.cos(drawn), -0.01 * math.sin(drawn)], atol=1e-6)


def test_scaling_magnifies_a_disk_by_the_drawn_factor():
  rows, cols = np.meshgrid(np.arange(160.0), np.arange(160.0), indexing="ij")
  label = ((rows - 79.5) ** 2 + (cols - 79.5) ** 2 <= 20.0 ** 2).astype(np.uint8)
  aug = _only(scale_prob=1.0, scale_range=(1.3, 1.31))
  _, lab = augment.sample_crop(np.random.default_rng(2), aug, label.astype(np.float32), label, (48, 48), 64, 0.0)
  assert abs(lab.sum() / label.sum() - 1.305 ** 2) < 0.05


def _replayed_draws(seed, aug):
  """The values augment.intensity draws, in its documented order: (apply?, value) per transform."""
  g = np.random.default_rng(seed)
  out = {}
  for name in ("brightness", "contrast", "gamma"):
    g.random()
    out[name] = g.uniform(*getattr(aug, f"{name}_range"))
  g.random()
  out["noise_std"] = g.uniform(0.0, aug.noise_std_max)
  return out


def test_intensity_transforms_equal_their_formulas():
  rng = np.random.default_rng(0)
  x = rng.uniform(-0.8, 0.6, (32, 32)).astype(np.float32)
  u = (x + 1) / 2
  gamma_only = augment.IntensityAugment(brightness_prob=0, contrast_prob=0, gamma_prob=1, gamma_range=(2.0, 2.0001),
                                        noise_prob=0)
  out = augment.intensity(np.random.default_rng(3), gamma_only, x)
  gamma = _replayed_draws(3, gamma_only)["gamma"]
  lo, hi = u.min(), u.max()
  np.testing.assert_allclose(out, (((u - lo) / (hi - lo)) ** gamma * (hi - lo) + lo) * 2 - 1, atol=1e-5)
  bright = augment.IntensityAugment(brightness_prob=1, brightness_range=(1.2, 1.2001), contrast_prob=0, gamma_prob=0,
                                    noise_prob=0)
  np.testing.assert_allclose(augment.intensity(np.random.default_rng(1), bright, x),
                             np.clip(u * 1.2 * 2 - 1, -1, 1), atol=2e-4)
  noisy = augment.IntensityAugment(brightness_prob=0, contrast_prob=0, gamma_prob=0, noise_prob=1, noise_std_max=0.1)
  big = np.zeros((256, 256), np.float32)
  diff = (augment.intensity(np.random.default_rng(4), noisy, big) + 1) / 2 - 0.5
  assert abs(diff.std() - _replayed_draws(4, noisy)["noise_std"]) < 0.003
  assert augment.intensity(np.random.default_rng(0), noisy, x).min() >= -1.0


def test_same_generator_same_result():
  x = np.random.default_rng(0).uniform(-1, 1, (40, 40)).astype(np.float32)
  label = (x > 0).astype(np.uint8)
  a = augment.sample_crop(np.random.default_rng(9), augment.Augment(), x, label, (2, 2), 32, -1.0)
  b = augment.sample_crop(np.random.default_rng(9), augment.Augment(), x, label, (2, 2), 32, -1.0)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
