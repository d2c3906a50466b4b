"""In-plane resampling of volumes to a target pixel size, and back.

Training, evaluation and prediction see every scan at one physical scale, ``data.target_spacing_mm`` (the pixel
size the crops and the CT->MRI translation assume); slice positions are never changed. Grids follow scipy's
``grid_mode``: the first and last pixel *edges* of the source and the resampled grid coincide, so the field of
view is kept exactly and the resampled pixel size is ``n * s / n'`` with ``n' = round(n * s / t)`` pixels (within
half a pixel of the target ``t``; the exact value is recorded with each case).

Interpolation (stated, and tested on analytic spheres in tests/test_resample.py):
- images: "linear" (default) or "cubic" (B-spline, with its prefilter; may overshoot at edges, which the CT
  window / MRI percentile clipping after resampling removes);
- label maps: "linear_per_class" (default, nnU-Net's: each class's indicator is resampled linearly and each
  pixel takes the class of largest value; smooth boundaries, no class lost to aliasing) or "nearest".
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from scipy import ndimage

IMAGE_ORDERS = {"linear": 1, "cubic": 3}
LABEL_INTERPOLATIONS = ("linear_per_class", "nearest")


def resampled_inplane_shape(shape_xy, spacing_xy, target_xy) -> tuple:
  """(X', Y') pixel counts of the grid whose pixel size is nearest ``target_xy`` over the same field of view."""
  return tuple(max(1, int(round(int(n) * float(s) / float(t)))) for n, s, t in zip(shape_xy, spacing_xy, target_xy))


def target_inplane(target_spacing_mm) -> Optional[tuple]:
  """The config's ``data.target_spacing_mm`` as an (x, y) pair in mm, or None (keep the native pixel size).

  Accepts None / () / 0 (native), one number (square pixels) or two numbers.
  """
  if target_spacing_mm is None:
    return None
  values = [float(v) for v in np.atleast_1d(target_spacing_mm)]
  if not values or values == [0.0]:
    return None
  if len(values) == 1:
    values = values * 2
  if len(values) != 2 or not all(v > 0 for v in values):
    raise ValueError(f"target spacing must be one or two positive numbers of mm (in-plane), got {target_spacing_mm!r}")
  return tuple(values)


def resampled_affine(affine, shape_xy, new_shape_xy):
  """The (4, 4) voxel->world affine of the in-plane resampled grid (grid_mode: edges kept, z unchanged)."""
  scale = np.ones(3)
  scale[:2] = np.asarray(shape_xy, np.float64) / np.asarray(new_shape_xy, np.float64)
  index_map = np.eye(4)
  index_map[:3, :3] = np.diag(scale)
  index_map[:3, 3] = 0.5 * scale - 0.5  # centre of new voxel i lies at source index (i + 0.5) * scale - 0.5
  return np.asarray(affine, np.float64) @ index_map


def _zoom_slices(volume, new_shape_xy, order):
  """(X, Y, Z) -> (X', Y', Z), one axial slice at a time (memory of one slice per call)."""
  x, y, z = volume.shape
  out = np.empty(tuple(new_shape_xy) + (z,), np.float32)
  factors = (new_shape_xy[0] / x, new_shape_xy[1] / y)
  for k in range(z):
    out[:, :, k] = ndimage.zoom(np.asarray(volume[:, :, k], np.float32), factors, order=order, grid_mode=True,
                                mode="nearest", prefilter=order > 1)
  return out


def resample_image(volume, new_shape_xy, interpolation="linear"):
  """Resamples an (X, Y, Z) image in-plane to ``new_shape_xy`` (float32). Border pixels extend the edge values."""
  if interpolation not in IMAGE_ORDERS:
    raise ValueError(f"image interpolation must be one of {', '.join(IMAGE_ORDERS)}, got {interpolation!r}")
  if tuple(new_shape_xy) == tuple(volume.shape[:2]):
    return np.asarray(volume, np.float32)
  return _zoom_slices(volume, new_shape_xy, IMAGE_ORDERS[interpolation])


def resample_probabilities(probs, new_shape_xy):
  """(X, Y, Z, K) per-class probabilities (or scores) -> (X', Y', Z, K), linearly, class by class."""
  if tuple(new_shape_xy) == tuple(probs.shape[:2]):
    return np.asarray(probs, np.float32)
  return np.stack([_zoom_slices(probs[..., k], new_shape_xy, 1) for k in range(probs.shape[-1])], axis=-1)


def resample_labels(labels, new_shape_xy, interpolation="linear_per_class", classes: Sequence[int] = None):
  """Resamples an (X, Y, Z) integer label map in-plane to ``new_shape_xy`` (same dtype).

  Args:
    labels: (X, Y, Z) integer array.
    new_shape_xy: (X', Y').
    interpolation: "linear_per_class" or "nearest" (see the module docstring).
    classes: the label values to consider (default: those present); ties go to the first in this order.
  """
  if interpolation not in LABEL_INTERPOLATIONS:
    raise ValueError(f"label interpolation must be one of {', '.join(LABEL_INTERPOLATIONS)}, got {interpolation!r}")
  labels = np.asarray(labels)
  if tuple(new_shape_xy) == tuple(labels.shape[:2]):
    return labels
  if interpolation == "nearest":
    x, y, _ = labels.shape
    # Nearest source pixel centre of each new pixel centre (grid_mode geometry, no interpolation arithmetic).
    rows = np.minimum(((np.arange(new_shape_xy[0]) + 0.5) * x / new_shape_xy[0]).astype(int), x - 1)
    cols = np.minimum(((np.arange(new_shape_xy[1]) + 0.5) * y / new_shape_xy[1]).astype(int), y - 1)
    return np.ascontiguousarray(labels[rows][:, cols])
  classes = [int(c) for c in (np.unique(labels) if classes is None else classes)]
  out = np.zeros(tuple(new_shape_xy) + labels.shape[2:], labels.dtype)
  best = np.full(out.shape, -np.inf, np.float32)
  for value in classes:
    score = _zoom_slices((labels == value).astype(np.float32), new_shape_xy, 1)
    better = score > best
    out[better] = value
    best = np.maximum(best, score)
  return out
