"""Intensity normalisation, axial slicing and 2D crops.

Conventions used everywhere (training, evaluation, previews):
- volumes are canonical RAS+ (X, Y, Z) arrays (see :mod:`cmedl_jax.data.nifti_io`);
- the k-th axial slice is ``volume[:, :, k]``, an (X, Y) array that networks see as (H, W);
- images are float32 in [-1, 1]; label maps are integers.
"""

from __future__ import annotations

import numpy as np

CT_WINDOW_HU = (-1000.0, 500.0)
MRI_PERCENTILES = (0.5, 99.5)


def scale_to_unit_range(x, low, high):
  """Clips ``x`` to [low, high] and maps it linearly to [-1, 1] (float32)."""
  if not high > low:
    raise ValueError(f"normalisation range must satisfy high > low, got ({low}, {high})")
  low, high = np.float32(low), np.float32(high)
  x = np.clip(np.asarray(x, dtype=np.float32), low, high)
  # Divide (not multiply by a reciprocal) so that x == high maps to exactly 1.
  return ((x - low) / (high - low) * np.float32(2.0) - np.float32(1.0)).astype(np.float32)


def normalize_ct(hu, window=CT_WINDOW_HU):
  """CT in Hounsfield units -> [-1, 1] through the fixed window (default [-1000, 500] HU: air to dense tissue)."""
  return scale_to_unit_range(hu, float(window[0]), float(window[1]))


def normalize_mri(intensity, percentiles=MRI_PERCENTILES):
  """MRI (arbitrary units) -> [-1, 1], clipping at the scan's own low/high percentiles.

  MRI intensities have no physical scale, so each scan is normalised by its own distribution (all voxels of the
  volume). A constant scan maps to -1 everywhere rather than dividing by zero.
  """
  x = np.asarray(intensity, dtype=np.float32)
  low, high = np.percentile(x, percentiles)
  if not high > low:
    return np.full(x.shape, -1.0, dtype=np.float32)
  return scale_to_unit_range(x, float(low), float(high))


def normalize(volume, modality, *, ct_window=CT_WINDOW_HU, mri_percentiles=MRI_PERCENTILES):
  """Dispatches on modality: "CT" uses the HU window, anything else (MRI, T1, T2, ...) uses percentiles."""
  if str(modality).upper() == "CT":
    return normalize_ct(volume, ct_window)
  return normalize_mri(volume, mri_percentiles)


def axial_slices(volume):
  """(X, Y, Z) -> (Z, X, Y): the axial slices in order, as a batch of 2D images."""
  return np.moveaxis(np.asarray(volume), 2, 0)


def stack_axial(slices):
  """(Z, X, Y) -> (X, Y, Z): inverse of :func:`axial_slices`."""
  return np.moveaxis(np.asarray(slices), 0, 2)


def crop_2d(image, top_left, size, pad_value):
  """Extracts a (size, size) window starting at ``top_left`` (may extend past the borders, padded).

  Args:
    image: (H, W, ...) array.
    top_left: (row, col) of the window's first pixel; negative or past-the-end values pad with ``pad_value``.
    size: int or (h, w).
    pad_value: value for pixels outside the image.

  Returns:
    (h, w, ...) array of image's dtype.
  """
  h, w = (size, size) if np.isscalar(size) else size
  r0, c0 = int(top_left[0]), int(top_left[1])
  out = np.full((h, w) + image.shape[2:], pad_value, dtype=image.dtype)
  src_r0, src_c0 = max(r0, 0), max(c0, 0)
  src_r1, src_c1 = min(r0 + h, image.shape[0]), min(c0 + w, image.shape[1])
  if src_r1 > src_r0 and src_c1 > src_c0:
    out[src_r0 - r0:src_r1 - r0, src_c0 - c0:src_c1 - c0] = image[src_r0:src_r1, src_c0:src_c1]
  return out


def random_crop_origin(rng, image_shape, size, center=None):
  """Top-left corner of a random (size, size) crop.

  Without ``center`` the crop lies uniformly inside the image (or is centred with padding where the image is
  smaller than the crop). With ``center`` (row, col) the crop contains that pixel at a uniformly random position
  inside the crop, clamped so the crop stays inside the image where possible: nnU-Net-style foreground sampling.
  """
  origin = []
  for axis in range(2):
    extent, crop = int(image_shape[axis]), int(size)
    if center is None:
      if extent <= crop:
        origin.append(-((crop - extent) // 2))
      else:
        origin.append(int(rng.integers(0, extent - crop + 1)))
    else:
      low = int(center[axis]) - crop + 1
      high = int(center[axis])
      if extent >= crop:  # keep inside the image when it can be
        low, high = max(low, 0), min(high, extent - crop)
      else:
        low = high = -((crop - extent) // 2)
      origin.append(int(rng.integers(low, high + 1)))
  return tuple(origin)
