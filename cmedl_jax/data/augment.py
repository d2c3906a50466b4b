"""Seeded 2D data augmentation of training crops (nnU-Net's set, at smaller magnitudes for thoracic CT/MRI).

Each example's augmentation is a pure function of its own generator (``np.random.default_rng([seed, g, k])``
in :mod:`cmedl_jax.data.pipeline`), like the rest of the stream: worker processes, restarts and the number of
JAX processes change nothing. Every transform draws its random numbers whether or not it applies, so changing
one probability never changes another transform's values.

Spatial (the CT crop and its label together; the MRI crop on its own):
- rotation by a uniform angle in [-rotate_max_deg, rotate_max_deg] (probability ``rotate_prob``) and isotropic
  scaling by a factor in ``scale_range`` (``scale_prob``; > 1 zooms in), about the crop's centre, sampled from the
  whole slice (images linearly, labels by nearest neighbour; outside the slice: air / background);
- mirroring of each in-plane axis (``flip_prob`` each).

Intensity (per modality; on u = (x + 1) / 2 in [0, 1], mapped back and clipped to [-1, 1]):
- brightness: u * m, m in ``brightness_range`` (``brightness_prob``);
- contrast: (u - mean) * c + mean, clipped to the crop's range before the change (``contrast_prob``);
- gamma: the crop's range mapped to [0, 1], raised to gamma in ``gamma_range``, mapped back (``gamma_prob``);
- Gaussian noise of standard deviation uniform in [0, noise_std_max] (``noise_prob``).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import ndimage

from cmedl_jax.data import preprocess


@dataclasses.dataclass(frozen=True)
class IntensityAugment:
  brightness_prob: float = 0.15
  brightness_range: tuple = (0.75, 1.25)
  contrast_prob: float = 0.15
  contrast_range: tuple = (0.75, 1.25)
  gamma_prob: float = 0.3
  gamma_range: tuple = (0.7, 1.5)
  noise_prob: float = 0.1
  noise_std_max: float = 0.1


@dataclasses.dataclass(frozen=True)
class Augment:
  """The augmentation of one training example (see the module docstring); ``enabled=False`` is the identity."""

  enabled: bool = True
  flip_prob: float = 0.5
  rotate_prob: float = 0.2
  rotate_max_deg: float = 15.0
  scale_prob: float = 0.2
  scale_range: tuple = (0.85, 1.25)
  ct: IntensityAugment = IntensityAugment()
  mri: IntensityAugment = IntensityAugment()

  @classmethod
  def from_config(cls, cfg):
    """From a config's ``data.augment`` section."""
    def intensity(section):
      return IntensityAugment(**{f.name: _tuple(section[f.name]) for f in dataclasses.fields(IntensityAugment)})
    fields = {f.name: _tuple(cfg[f.name]) for f in dataclasses.fields(cls) if f.name not in ("ct", "mri")}
    return cls(**fields, ct=intensity(cfg.ct), mri=intensity(cfg.mri))


def _tuple(value):
  return tuple(value) if isinstance(value, (list, tuple)) else value


def sample_crop(rng, aug: Augment, image, label, origin, size, pad_value):
  """A (size, size) crop of ``image`` (and ``label``) at ``origin``, rotated/scaled/mirrored as ``aug`` draws.

  Args:
    rng: the example's generator.
    aug: the augmentation settings.
    image: (H, W) slice (may be a memory map).
    label: (H, W) label slice or None.
    origin: (row, col) of the unaugmented crop's first pixel (:func:`preprocess.random_crop_origin`).
    size: crop side.
    pad_value: the image's value outside the slice.

  Returns:
    (image crop (size, size) float32, label crop (size, size) or None).
  """
  angle = math.radians(rng.uniform(-aug.rotate_max_deg, aug.rotate_max_deg))
  rotate = rng.random() < aug.rotate_prob
  zoom = rng.uniform(*aug.scale_range)
  scale = rng.random() < aug.scale_prob
  flips = rng.random(2) < aug.flip_prob
  if aug.enabled and (rotate or scale):
    half = (size - 1) / 2.0
    centre = np.array([origin[0] + half, origin[1] + half])
    a = angle if rotate else 0.0
    s = zoom if scale else 1.0
    matrix = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]) / s
    grid = np.stack(np.meshgrid(np.arange(size) - half, np.arange(size) - half, indexing="ij"))
    coords = np.einsum("ij,jhw->ihw", matrix, grid) + centre[:, None, None]
    out_image = ndimage.map_coordinates(np.asarray(image, np.float32), coords, order=1, mode="constant",
                                        cval=pad_value).astype(np.float32)
    out_label = None if label is None else ndimage.map_coordinates(np.asarray(label), coords, order=0,
                                                                   mode="constant", cval=0)
  else:
    out_image = preprocess.crop_2d(image, origin, size, pad_value)
    out_label = None if label is None else preprocess.crop_2d(label, origin, size, 0)
  if aug.enabled:
    for axis in (0, 1):
      if flips[axis]:
        out_image = np.flip(out_image, axis)
        out_label = None if out_label is None else np.flip(out_label, axis)
  return np.ascontiguousarray(out_image), None if out_label is None else np.ascontiguousarray(out_label)


def intensity(rng, aug: IntensityAugment, x, enabled=True):
  """Applies the intensity transforms to a crop ``x`` in [-1, 1]; returns float32 in [-1, 1]."""
  draws = {name: (rng.random(), rng.uniform(*getattr(aug, f"{name}_range")))
           for name in ("brightness", "contrast", "gamma")}
  noise_applies, noise_std = rng.random() < aug.noise_prob, rng.uniform(0.0, aug.noise_std_max)
  if not enabled:
    return x
  u = (np.asarray(x, np.float32) + 1.0) * 0.5
  if draws["brightness"][0] < aug.brightness_prob:
    u = u * np.float32(draws["brightness"][1])
  if draws["contrast"][0] < aug.contrast_prob:
    low, high, mean = u.min(), u.max(), u.mean()
    u = np.clip((u - mean) * np.float32(draws["contrast"][1]) + mean, low, high)
  if draws["gamma"][0] < aug.gamma_prob:
    low, high = u.min(), u.max()
    if high > low:
      u = ((u - low) / (high - low)) ** np.float32(draws["gamma"][1]) * (high - low) + low
  if noise_applies:
    u = u + rng.normal(0.0, noise_std, size=u.shape).astype(np.float32)
  return np.clip(u * 2.0 - 1.0, -1.0, 1.0).astype(np.float32)
