"""Seeded synthetic thorax phantoms: labelled CT and unpaired T2w-like MRI (``cmedl-make-phantoms``).

The phantoms stand in for the CT (NSCLC) and MRI sets of the paper so that every part of the system (data
loading, translation, distillation, evaluation in mm) can be exercised end to end on a laptop. They are built to
carry the property CMEDL exploits: tumors that abut the mediastinum have almost no contrast on CT (within ~10 HU
of the surrounding soft tissue) but are bright on T2w MRI, while tumors inside the lung are obvious on both.

Every case is one random anatomy drawn into a tissue-class map on the canonical RAS+ voxel grid:

* body (superellipse cross-section, slight in-plane rotation) with a subcutaneous fat rim and a chest-wall muscle
  layer, ribs and sternum, a thoracic cavity that narrows towards the lung apices and is closed below by
  diaphragm domes (liver/upper abdomen underneath);
* two lungs with a branching tree of vessel-like tubes, a mediastinum (heart with myocardium and blood pool,
  ascending and descending aorta, trachea splitting into main bronchi), a spine (vertebral body with cortical
  shell, cancellous interior, discs, spinal canal and posterior arch);
* 1-3 lobulated ellipsoidal tumors (label 1), each either inside the lung parenchyma or straddling the
  lung/mediastinum border, with physical sizes in mm (8-40 mm diameter by default, shrunk only when the anatomy
  is too small to hold them).

The map is then painted with modality-specific values, blurred by a small point-spread function, modulated by a
smooth field (additive for CT, a multiplicative bias field for MRI) and corrupted by noise (correlated Gaussian
for CT, Rician for MRI). CT and MRI cases are drawn from independent random streams, so the two sets are unpaired.

Arrays returned by the ``make_*`` functions are on the canonical RAS+ voxel grid (what
:func:`cmedl_jax.data.nifti_io.load_case` returns): axis 0 runs towards the patient's right, axis 1 anterior,
axis 2 superior. Positions in ``info`` are in the "phantom frame": mm along these axes from the centre of voxel
(0, 0, 0). The files are written in a DICOM-like non-RAS orientation (see :data:`ORIENTATIONS`), so reading them
back exercises the canonical reorientation.

Determinism: case ``k`` of modality ``m`` uses ``np.random.SeedSequence(seed, spawn_key=(m, k))`` (the same
stream that ``SeedSequence(seed).spawn(2)[m].spawn(n)[k]`` yields), so it is identical whatever the number of
cases, and the same seed gives byte-identical arrays.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from typing import Optional, Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from cmedl_jax.data import dataset_index
from cmedl_jax.data import nifti_io

GENERATOR_VERSION = "1.0"

# Tissue classes of the anatomy map; the index is the class code.
TISSUES = ("air", "fat", "muscle", "lung", "lung_vessel", "mediastinum", "blood", "airway", "cortical_bone",
           "cancellous_bone", "disc", "csf", "liver", "rib", "tumor")
TISSUE_CODE = {name: code for code, name in enumerate(TISSUES)}

# Voxel orders the files are stored in (nibabel axis codes; RAS would make reorientation a no-op). LPS is what
# ITK/SimpleITK write for axial DICOM series (affine diag(-sx, -sy, sz)); LPI stores slices from head to feet;
# LAS is common for dcm2niix output; PLS swaps rows and columns, so the canonical reorientation must transpose.
ORIENTATIONS = ("LPS", "LPI", "LAS", "PLS")

# ((in-plane low, high), (slice low, high)) in mm, drawn per case.
CT_SPACING_RANGE = ((0.7, 1.0), (2.0, 3.0))
MRI_SPACING_RANGE = ((0.9, 1.3), (3.0, 4.0))
TUMOR_DIAMETER_RANGE_MM = (8.0, 40.0)
TUMOR_LOCATIONS = ("lung", "mediastinal")

MODALITY_STREAM = {"CT": 0, "MRI": 1}
CASE_PREFIX = {"CT": "ct", "MRI": "mr"}

# Smallest volumes that still hold a recognisable thorax with a tumor of a few voxels.
_MIN_IN_PLANE_VOXELS = 40
_MIN_SLICES = 10

# Lobulation keeps the radius within [1 - 0.35, 1 + 0.35] of the ellipsoid, so every tumor is star-shaped about its
# centre (hence one connected component).
_MAX_LOBULATION = 0.35


@dataclasses.dataclass
class _Tumor:
  """A lobulated ellipsoid in the phantom frame (mm)."""

  location: str
  side: str
  centre_mm: np.ndarray  # (3,)
  radii_mm: np.ndarray  # (3,) semi-axes before rotation
  rotation: np.ndarray  # (3, 3) columns: the tumor's axes in the phantom frame
  bump_directions: np.ndarray  # (L, 3) unit vectors
  bump_amplitudes: np.ndarray  # (L,)
  bump_sharpness: np.ndarray  # (L,)

  def reach_mm(self):
    return float(self.radii_mm.max() * (1.0 + _MAX_LOBULATION))

  def radial_limit(self, directions):
    """(..., 3) unit directions in the normalised tumor frame -> (...,) boundary radius (1 = plain ellipsoid)."""
    cosines = directions @ self.bump_directions.T
    return 1.0 + (self.bump_amplitudes * np.exp(self.bump_sharpness * (cosines - 1.0))).sum(axis=-1)


@dataclasses.dataclass
class _Anatomy:
  tissues: np.ndarray  # (X, Y, Z) int8 tissue codes
  tumor_ids: np.ndarray  # (X, Y, Z) int8, 0 = no tumor, j + 1 = tumor j
  tumors: list
  params: dict


# ----------------------------------------------------------------------------------------------------------------
# Geometry helpers.


def _superellipse_level(u, v, a, b, power):
  """Generalised radius: <= 1 inside the superellipse |u/a|^p + |v/b|^p <= 1 (float32 arrays)."""
  return ((np.abs(u / a) ** power + np.abs(v / b) ** power) ** (1.0 / power)).astype(np.float32)


def _random_rotation(rng):
  """Uniformly random 3D rotation matrix (from a normalised Gaussian quaternion)."""
  w, x, y, z = rng.standard_normal(4)
  norm = math.sqrt(w * w + x * x + y * y + z * z) or 1.0
  w, x, y, z = w / norm, x / norm, y / norm, z / norm
  return np.array([
      [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
      [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
      [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
  ])


def _fibonacci_sphere(n):
  """(n, 3) nearly uniform unit vectors: quadrature nodes of equal weight 4*pi/n."""
  k = np.arange(n) + 0.5
  polar = np.arccos(1.0 - 2.0 * k / n)
  azimuth = math.pi * (1.0 + math.sqrt(5.0)) * k
  return np.stack([np.sin(polar) * np.cos(azimuth), np.sin(polar) * np.sin(azimuth), np.cos(polar)], axis=-1)


_SPHERE_NODES = _fibonacci_sphere(6000)


def _tumor_volume_mm3(tumor):
  """Exact volume of the continuous tumor shape: abc/3 * integral over the sphere of r(n)^3."""
  mean_cube = float(np.mean(tumor.radial_limit(_SPHERE_NODES) ** 3))
  return 4.0 / 3.0 * math.pi * float(np.prod(tumor.radii_mm)) * mean_cube


def _tumor_mask(tumor, shape, spacing, pad=(0, 0, 0)):
  """Rasterises a tumor (voxel centres inside the continuous shape) in its bounding box.

  Args:
    pad: extra voxels on each side of the box along X, Y, Z (room for a margin around the tumor).

  Returns:
    (box, mask): ``box`` a tuple of 3 slices into the volume, ``mask`` a bool array of the box's shape; or
    ``(None, None)`` when the padded box does not fit entirely inside the volume.
  """
  spacing = np.asarray(spacing, dtype=np.float64)
  reach = tumor.reach_mm()
  lo = np.ceil((tumor.centre_mm - reach) / spacing).astype(int) - np.asarray(pad)
  hi = np.floor((tumor.centre_mm + reach) / spacing).astype(int) + 1 + np.asarray(pad)
  if np.any(lo < 0) or np.any(hi > np.asarray(shape)):
    return None, None
  axes = [np.arange(lo[d], hi[d]) * spacing[d] - tumor.centre_mm[d] for d in range(3)]
  rel = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)  # (bx, by, bz, 3) mm from the centre
  local = (rel @ tumor.rotation) / tumor.radii_mm
  radius = np.linalg.norm(local, axis=-1)
  # Only the shell where lobulation can matter needs the bump evaluation.
  mask = radius <= 1.0 - _MAX_LOBULATION
  ambiguous = (radius <= 1.0 + _MAX_LOBULATION) & ~mask
  directions = local[ambiguous] / radius[ambiguous][:, None]
  mask[ambiguous] = radius[ambiguous] <= tumor.radial_limit(directions)
  return tuple(slice(int(lo[d]), int(hi[d])) for d in range(3)), mask


def _ball(radii_voxels):
  """Ellipsoidal structuring element with the given integer semi-axes (voxels).

  Semi-axes are taken half a voxel longer so that the element always holds the full 3x3x3 neighbourhood when
  every radius is >= 1: two masks kept apart by a dilation with it are never 26-connected.
  """
  grids = np.meshgrid(*[np.arange(-r, r + 1) / (r + 0.5) for r in radii_voxels], indexing="ij")
  return sum(g ** 2 for g in grids) <= 1.0


def _segment_tube(shape, spacing, start, end, radius):
  """Voxels within ``radius`` mm of the segment start-end (mm), as (box, mask) clipped to the volume."""
  spacing = np.asarray(spacing)
  lo = np.maximum(np.floor((np.minimum(start, end) - radius) / spacing).astype(int), 0)
  hi = np.minimum(np.ceil((np.maximum(start, end) + radius) / spacing).astype(int) + 1, shape)
  if np.any(hi <= lo):
    return None, None
  axes = [np.arange(lo[d], hi[d]) * spacing[d] for d in range(3)]
  points = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
  direction = end - start
  t = np.clip(((points - start) @ direction) / max(float(direction @ direction), 1e-9), 0.0, 1.0)
  distance = np.linalg.norm(points - (start + t[..., None] * direction), axis=-1)
  return tuple(slice(int(lo[d]), int(hi[d])) for d in range(3)), distance <= radius


def _smooth_field(rng, shape, degree, region=None):
  """Random low-order polynomial over the volume. (X, Y, Z) float32.

  Zero mean and max |value| = 1 over ``region`` (a bool (X, Y, Z) mask; the whole volume if None), so that the
  stated amplitude is the one seen inside the body rather than in the corners of the field of view.
  """
  coords = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
  xs, ys, zs = coords[0][:, None], coords[1][None, :], coords[2]
  field = np.zeros(shape, dtype=np.float32)
  # Grouping by the power of z keeps the work in 2D except for one multiply-add per z power.
  for k in range(degree + 1):
    plane = np.zeros(shape[:2], dtype=np.float32)
    for i in range(degree + 1 - k):
      for j in range(degree + 1 - k - i):
        if i + j + k > 0:
          plane += np.float32(rng.uniform(-1.0, 1.0)) * (xs ** i) * (ys ** j)
    field += plane[:, :, None] * (zs ** k)[None, None, :]
  inside = field if region is None else field[region]
  field -= inside.mean()
  peak = float(np.abs(inside - inside.mean()).max())
  return field / np.float32(peak) if peak > 0 else field


def _correlated_noise(rng, shape, sd):
  """Gaussian noise with a short in-plane correlation (as reconstructed CT noise), standard deviation ``sd``."""
  noise = rng.standard_normal(shape, dtype=np.float32)
  noise = ndimage.gaussian_filter(noise, sigma=(0.6, 0.6, 0.0), mode="nearest")
  return noise * np.float32(sd / float(noise.std()))


def _check_geometry(shape, spacing):
  shape = tuple(int(n) for n in shape)
  if len(shape) != 3:
    raise ValueError(f"shape must be (X, Y, Z), got {shape}")
  if min(shape[:2]) < _MIN_IN_PLANE_VOXELS or shape[2] < _MIN_SLICES:
    raise ValueError(f"shape {shape} is too small for a thorax phantom: need at least {_MIN_IN_PLANE_VOXELS} "
                     f"voxels in-plane and {_MIN_SLICES} slices")
  spacing = tuple(float(s) for s in spacing)
  if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
    raise ValueError(f"spacing must be 3 positive numbers in mm, got {spacing}")
  return shape, spacing


def draw_spacing(rng, spacing_range):
  """Draws a per-case voxel size (sx, sy, sz) in mm: square pixels, rounded like scanner values.

  Args:
    rng: np.random.Generator.
    spacing_range: ((in-plane low, high), (slice low, high)) in mm.
  """
  (in_lo, in_hi), (sl_lo, sl_hi) = spacing_range
  if not 0 < in_lo <= in_hi or not 0 < sl_lo <= sl_hi:
    raise ValueError(f"spacing range must be ((lo, hi), (lo, hi)) with 0 < lo <= hi, got {spacing_range}")
  in_plane = round(float(rng.uniform(in_lo, in_hi)), 4)
  through_plane = round(float(rng.uniform(sl_lo, sl_hi)) * 20.0) / 20.0  # slice spacings come in 0.05 mm steps
  return (in_plane, in_plane, min(max(through_plane, sl_lo), sl_hi))


# ----------------------------------------------------------------------------------------------------------------
# Anatomy.


def _draw_anatomy(rng, shape, spacing, *, num_tumors=None, tumor_locations=None,
                  tumor_diameter_range_mm=TUMOR_DIAMETER_RANGE_MM):
  """Draws one random thorax as a tissue-class map with tumors (see the module docstring)."""
  nx, ny, nz = shape
  sx, sy, sz = spacing
  fov = np.array([nx * sx, ny * sy, nz * sz])
  uniform = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731

  x = (np.arange(nx, dtype=np.float32) * np.float32(sx))[:, None]  # (X, 1)
  y = (np.arange(ny, dtype=np.float32) * np.float32(sy))[None, :]  # (1, Y)
  z_mm = np.arange(nz, dtype=np.float32) * np.float32(sz)  # (Z,)
  z_norm = z_mm / np.float32(max(fov[2] - sz, 1e-6))  # 0 at the lowest slice, 1 at the top one

  # Body frame: u towards the patient's right, v anterior, rotated slightly about the z axis.
  centre_x = (nx - 1) * sx / 2 + uniform(-0.03, 0.03) * fov[0]
  centre_y = (ny - 1) * sy / 2 + uniform(-0.03, 0.03) * fov[1]
  theta = math.radians(uniform(-6.0, 6.0))
  cos_t, sin_t = math.cos(theta), math.sin(theta)
  u = (cos_t * (x - centre_x) + sin_t * (y - centre_y)).astype(np.float32)  # (X, Y)
  v = (-sin_t * (x - centre_x) + cos_t * (y - centre_y)).astype(np.float32)

  def to_phantom_xy(uu, vv):
    return centre_x + cos_t * uu - sin_t * vv, centre_y + sin_t * uu + cos_t * vv

  body_a = uniform(0.40, 0.45) * fov[0]
  body_b = min(body_a * uniform(0.62, 0.74), 0.44 * fov[1])
  body_power = uniform(2.2, 2.8)
  body_scale = (1.0 + uniform(0.0, 0.06) * (0.5 - z_norm)).astype(np.float32)  # slightly wider inferiorly
  fat_mm = uniform(0.05, 0.10) * body_a
  body = _superellipse_level(u, v, body_a, body_b, body_power)[..., None] <= body_scale
  inner = _superellipse_level(u, v, body_a - fat_mm, body_b - fat_mm, body_power)[..., None] <= body_scale

  # Thoracic cavity, narrowing towards the apices.
  cav_a = (body_a - fat_mm) * uniform(0.80, 0.86)
  cav_b = (body_b - fat_mm) * uniform(0.76, 0.84)
  cav_power = uniform(2.0, 2.4)
  apex_start, apex_scale = uniform(0.55, 0.7), uniform(0.7, 0.85)
  apex = 1.0 - (1.0 - apex_scale) * (np.clip((z_norm - apex_start) / (1.0 - apex_start), 0.0, 1.0) ** 2)
  cav_scale = (body_scale * apex).astype(np.float32)
  cav_level = _superellipse_level(u, v, cav_a, cav_b, cav_power)
  cavity = cav_level[..., None] <= cav_scale

  # Diaphragm domes (right one higher); everything in the cavity below them is liver / upper abdomen.
  dome_height = uniform(0.10, 0.20) * fov[2]
  dome_top_right = uniform(-0.10, 0.20) * fov[2]
  dome_top_left = dome_top_right - uniform(0.02, 0.06) * fov[2]
  mid_u = uniform(-0.03, 0.03) * cav_a
  right = u > mid_u
  dome_u = np.where(right, mid_u + 0.5 * cav_a, mid_u - 0.5 * cav_a)
  dome = (np.where(right, dome_top_right, dome_top_left) - dome_height
          * (((u - dome_u) / cav_a) ** 2 + (v / cav_b) ** 2)).astype(np.float32)
  below_dome = z_mm[None, None, :] < dome[..., None]

  # Spine.
  spine_v = -cav_b * uniform(0.74, 0.82)
  vb_lat = uniform(0.12, 0.14) * cav_a
  vb_ap = vb_lat * uniform(0.85, 0.95)
  voxel_in_plane = max(sx, sy)
  cortex_mm = max(0.18 * vb_ap, 0.8 * voxel_in_plane)
  vb_level = np.sqrt(((u - mid_u) / vb_lat) ** 2 + ((v - spine_v) / vb_ap) ** 2)
  canal_r = 0.45 * vb_lat
  canal_v = spine_v - vb_ap - 1.1 * canal_r
  arch_mm = max(0.35 * vb_ap, voxel_in_plane)
  canal_dist = np.sqrt((u - mid_u) ** 2 + (v - canal_v) ** 2)
  inner_back = -(body_b - fat_mm) * 0.95
  spinous_len = max(min(1.2 * vb_ap, (canal_v - canal_r - arch_mm) - inner_back), 0.0)
  spinous_v = canal_v - canal_r - arch_mm - 0.5 * spinous_len
  spinous = (((u - mid_u) / max(0.15 * vb_lat, voxel_in_plane)) ** 2
             + ((v - spinous_v) / max(0.5 * spinous_len, 1e-3)) ** 2) <= 1.0
  vertebra_period = uniform(0.20, 0.26) * cav_a
  disc_mm = uniform(0.18, 0.25) * vertebra_period
  disc_phase = uniform(0.0, vertebra_period)
  disc_slices = ((z_mm - disc_phase) % vertebra_period) < disc_mm  # (Z,)
  spine_zone = (vb_level <= 1.25) | ((v < spine_v) & (np.abs(u - mid_u) < 1.4 * vb_lat))

  # Mediastinum: a central band widening anteriorly, heart, great vessels and airways.
  band_w0, band_w1 = uniform(0.12, 0.16), uniform(0.05, 0.12)
  band_half_width = cav_a * (band_w0 + band_w1 * np.clip((v / cav_b + 1.0) / 2.0, 0.0, 1.0))
  band = np.abs(u - mid_u) < band_half_width  # (X, Y)

  heart_u, heart_v = mid_u - uniform(0.08, 0.16) * cav_a, uniform(0.12, 0.25) * cav_b
  heart_axes = (uniform(0.36, 0.44) * cav_a, uniform(0.42, 0.50) * cav_b, uniform(0.30, 0.40) * fov[2])
  heart_z = uniform(0.05, 0.25) * fov[2]
  heart_angle = math.radians(uniform(20.0, 40.0))
  hu_ = math.cos(heart_angle) * (u - heart_u) + math.sin(heart_angle) * (v - heart_v)
  hv_ = -math.sin(heart_angle) * (u - heart_u) + math.cos(heart_angle) * (v - heart_v)
  heart_level = ((hu_ / heart_axes[0]) ** 2 + (hv_ / heart_axes[1]) ** 2)[..., None] \
      + (((z_mm - heart_z) / heart_axes[2]) ** 2)[None, None, :]
  heart = (heart_level <= 1.0) & cavity
  blood_pool = heart & (heart_level <= 0.72)  # the outer ~15 % of the radius is myocardium

  asc_u, asc_v, asc_r = mid_u + uniform(0.0, 0.08) * cav_a, uniform(0.15, 0.30) * cav_b, uniform(0.08, 0.10) * cav_a
  asc_from = heart_z + 0.6 * heart_axes[2]
  asc_aorta = (((u - asc_u) ** 2 + (v - asc_v) ** 2) <= asc_r ** 2)[..., None] & (z_mm >= asc_from)
  desc_r = uniform(0.07, 0.09) * cav_a
  desc_u, desc_v = mid_u - vb_lat * uniform(0.9, 1.2), spine_v + vb_ap * uniform(0.6, 1.1)
  desc_aorta = ((u - desc_u) ** 2 + (v - desc_v) ** 2) <= desc_r ** 2  # (X, Y), all slices

  trachea_u, trachea_v = mid_u + uniform(-0.02, 0.02) * cav_a, spine_v + vb_ap + uniform(0.12, 0.20) * cav_b
  trachea_r = uniform(0.06, 0.08) * cav_a
  wall_mm = max(0.15 * trachea_r, 0.7 * voxel_in_plane)
  carina_z = uniform(0.55, 0.75) * fov[2]
  bronchus_len = uniform(0.15, 0.25) * fov[2]
  in_trachea = z_mm >= carina_z
  in_bronchi = (z_mm < carina_z) & (z_mm >= carina_z - bronchus_len)
  bronchus_offset = 0.8 * trachea_r + (carina_z - z_mm) / bronchus_len * 0.22 * cav_a  # (Z,)
  trachea_dist = np.sqrt((u - trachea_u) ** 2 + (v - trachea_v) ** 2)[..., None]
  bronchus_dist = np.minimum(
      np.sqrt((u[..., None] - (trachea_u + bronchus_offset)) ** 2 + ((v - trachea_v) ** 2)[..., None]),
      np.sqrt((u[..., None] - (trachea_u - bronchus_offset)) ** 2 + ((v - trachea_v) ** 2)[..., None]))
  airway_dist = np.where(in_trachea, trachea_dist, np.where(in_bronchi, bronchus_dist, np.inf))
  airway_radius = np.where(in_trachea, trachea_r, 0.75 * trachea_r).astype(np.float32)
  airway_lumen = airway_dist <= airway_radius
  airway_outer = airway_dist <= airway_radius + wall_mm

  mediastinum = (cavity & (band[..., None] | heart | asc_aorta)) | desc_aorta[..., None] | airway_outer
  pleural_gap = max(1, int(round(1.0 / voxel_in_plane)))  # ~1 mm of soft tissue between lung and mediastinum
  mediastinum_grown = ndimage.binary_dilation(
      mediastinum, structure=np.ones((3, 3, 1), dtype=bool), iterations=pleural_gap)
  lungs = cavity & ~mediastinum_grown & ~spine_zone[..., None] & ~below_dome

  # Ribs: a ring just outside the cavity, sloping down anteriorly, interrupted at the sternum and the spine.
  rib_angle = np.arctan2(v / cav_b, u / cav_a)
  rib_period = uniform(0.20, 0.26) * cav_a
  rib_offset = (0.8 * rib_period * (1.0 + np.sin(rib_angle)) / 2.0).astype(np.float32)
  rib_gap = (np.abs(rib_angle - math.pi / 2) < math.radians(20)) | (np.abs(rib_angle + math.pi / 2) < math.radians(12))
  rib_thickness = max(uniform(0.04, 0.06), 1.2 * voxel_in_plane / cav_a)
  rib_ring = (cav_level[..., None] > cav_scale) & (cav_level[..., None] <= cav_scale * (1.0 + rib_thickness))
  ribs = rib_ring & ~rib_gap[..., None] & (
      ((z_mm[None, None, :] + rib_offset[..., None]) % rib_period) < 0.5 * rib_period)
  sternum_v = cav_b * 1.02 + 0.5 * max(0.04 * cav_b, voxel_in_plane)
  sternum = ((((u - mid_u) / (0.12 * cav_a)) ** 2
              + ((v - sternum_v) / max(0.04 * cav_b, voxel_in_plane)) ** 2) <= 1.0)[..., None] \
      & (z_norm > 0.15)[None, None, :] & inner

  code = TISSUE_CODE
  tissues = np.zeros(shape, dtype=np.int8)
  tissues[body] = code["fat"]
  tissues[inner] = code["muscle"]
  tissues[cavity & ~below_dome] = code["mediastinum"]  # all non-lung soft tissue of the chest
  tissues[cavity & below_dome] = code["liver"]
  tissues[lungs] = code["lung"]
  tissues[blood_pool & ~below_dome] = code["blood"]
  tissues[asc_aorta & cavity] = code["blood"]
  tissues[np.broadcast_to(desc_aorta[..., None], shape)] = code["blood"]
  tissues[airway_outer & ~airway_lumen] = code["mediastinum"]
  tissues[airway_lumen] = code["airway"]
  tissues[ribs | sternum] = code["rib"]
  vertebral_body = np.broadcast_to((vb_level <= 1.0)[..., None], shape)
  vb_interior = np.broadcast_to((vb_level <= 1.0 - cortex_mm / vb_ap)[..., None], shape)
  tissues[vertebral_body] = code["cortical_bone"]
  tissues[vb_interior] = code["cancellous_bone"]
  tissues[vertebral_body & disc_slices[None, None, :]] = code["disc"]
  posterior_arch = ((canal_dist <= canal_r + arch_mm) & (canal_dist > canal_r)) | spinous
  tissues[np.broadcast_to(posterior_arch[..., None], shape)] = code["cortical_bone"]
  tissues[np.broadcast_to((canal_dist <= canal_r)[..., None], shape)] = code["csf"]
  tissues[~body] = code["air"]

  # Pulmonary vessels: a branching tree of tubes from each hilum, kept inside the lungs.
  vessels = np.zeros(shape, dtype=bool)
  min_vessel_radius = 0.45 * min(sx, sy)
  for side_sign in (+1.0, -1.0):
    hilum_u = mid_u + side_sign * (band_w0 + 0.05) * cav_a
    hilum_x, hilum_y = to_phantom_xy(hilum_u, uniform(-0.05, 0.15) * cav_b)
    hilum = np.array([hilum_x, hilum_y, uniform(0.45, 0.60) * fov[2]])
    stack = []
    for _ in range(5):
      du = side_sign * uniform(0.5, 1.0)
      dv, dz = uniform(-0.8, 0.8), uniform(-0.8, 0.8)
      dx, dy = cos_t * du - sin_t * dv, sin_t * du + cos_t * dv
      direction = np.array([dx, dy, dz])
      stack.append((hilum, direction / np.linalg.norm(direction), uniform(0.30, 0.42) * cav_a,
                    max(0.035 * cav_a, min_vessel_radius), 0))
    while stack:
      start, direction, length, radius, depth = stack.pop()
      end = start + direction * length
      box, mask = _segment_tube(shape, spacing, start, end, radius)
      if box is not None:
        vessels[box] |= mask
      if depth < 3:
        for _ in range(2):
          child = direction + rng.uniform(-0.6, 0.6, size=3)
          stack.append((end, child / np.linalg.norm(child), 0.75 * length, max(0.7 * radius, min_vessel_radius),
                        depth + 1))
  tissues[vessels & (tissues == code["lung"])] = code["lung_vessel"]

  params = {
      "body_semi_axes_mm": [body_a, body_b],
      "body_centre_mm": [centre_x, centre_y],
      "body_rotation_deg": math.degrees(theta),
      "fat_thickness_mm": fat_mm,
      "cavity_semi_axes_mm": [cav_a, cav_b],
      "heart_semi_axes_mm": list(heart_axes),
      "carina_z_mm": carina_z,
      "diaphragm_top_z_mm": [dome_top_right, dome_top_left],
      "vertebral_body_semi_axes_mm": [vb_lat, vb_ap],
  }
  params = {k: (float(v) if not isinstance(v, list) else [float(x) for x in v]) for k, v in params.items()}

  tumor_ids = np.zeros(shape, dtype=np.int8)
  tumors = _place_tumors(rng, tissues, tumor_ids, spacing, u_axis=(cos_t, sin_t), mid_u=mid_u,
                         to_body_u=lambda px, py: cos_t * (px - centre_x) + sin_t * (py - centre_y),
                         num_tumors=num_tumors, tumor_locations=tumor_locations,
                         diameter_range_mm=tumor_diameter_range_mm)
  return _Anatomy(tissues=tissues, tumor_ids=tumor_ids, tumors=tumors, params=params)


def _draw_tumor_shape(rng, location, side, centre_mm, diameter_mm):
  elongation = rng.uniform(0.75, 1.25, size=3)
  elongation /= np.prod(elongation) ** (1.0 / 3.0)  # keep the mean diameter
  num_bumps = int(rng.integers(3, 7))
  directions = rng.standard_normal((num_bumps, 3))
  directions /= np.linalg.norm(directions, axis=1, keepdims=True)
  amplitudes = rng.uniform(0.05, 0.15, size=num_bumps) * rng.choice([-1.0, 1.0], size=num_bumps)
  amplitudes *= min(1.0, _MAX_LOBULATION / np.abs(amplitudes).sum())
  return _Tumor(location=location, side=side, centre_mm=np.asarray(centre_mm, dtype=np.float64),
                radii_mm=0.5 * diameter_mm * elongation, rotation=_random_rotation(rng),
                bump_directions=directions, bump_amplitudes=amplitudes,
                bump_sharpness=rng.uniform(3.0, 8.0, size=num_bumps))


def _place_tumors(rng, tissues, tumor_ids, spacing, *, u_axis, mid_u, to_body_u, num_tumors, tumor_locations,
                  diameter_range_mm):
  """Places tumors by rejection sampling, shrinking them when the anatomy is too small; draws them in place.

  A lung tumor (grown by a safety margin) must lie entirely in lung parenchyma; a mediastinal tumor must straddle
  the lung/mediastinum border (both tissues inside it) and touch nothing else. No two tumors come within the
  margin of each other, and none touches the volume's faces, so each is one whole connected component.
  """
  shape = tissues.shape
  spacing = np.asarray(spacing, dtype=np.float64)
  code = TISSUE_CODE
  if tumor_locations is not None:
    locations = [str(loc) for loc in tumor_locations]
    bad = [loc for loc in locations if loc not in TUMOR_LOCATIONS]
    if bad or not locations:
      raise ValueError(f"tumor locations must be a non-empty list of {TUMOR_LOCATIONS}, got {tumor_locations}")
  else:
    count = int(rng.integers(1, 4)) if num_tumors is None else int(num_tumors)
    if count < 1:
      raise ValueError(f"num_tumors must be >= 1, got {num_tumors}")
    locations = [TUMOR_LOCATIONS[int(rng.random() >= 0.55)] for _ in range(count)]

  # A gap of lung (or no other tumor) this wide surrounds every tumor: 2 voxels / 1.5 mm in-plane, one slice.
  in_plane_margin = max(2, int(math.ceil(1.5 / spacing[:2].min())))
  margin_voxels = (in_plane_margin, in_plane_margin, 1)
  # Smallest tumor kept when the anatomy is too small for the drawn size: >= ~3 voxels across, ~2 slices.
  floor_radius_mm = max(1.5 * spacing[:2].max(), 0.75 * spacing[2], 2.0)
  lung_codes = [code["lung"], code["lung_vessel"]]
  mediastinal_codes = [code["mediastinum"], code["blood"]]

  lung_voxels = np.argwhere(np.isin(tissues, lung_codes))
  mediastinal_tissue = np.isin(tissues, mediastinal_codes)
  border = np.isin(tissues, lung_codes) & ndimage.binary_dilation(
      mediastinal_tissue, structure=np.ones((3, 3, 1), dtype=bool))
  border_voxels = np.argwhere(border)

  def attempt(location, diameter, tries):
    candidates = lung_voxels if location == "lung" else border_voxels
    for _ in range(tries if len(candidates) else 0):
      voxel = candidates[int(rng.integers(len(candidates)))]
      centre = voxel * spacing + rng.uniform(-0.5, 0.5, size=3) * spacing
      side = "right" if to_body_u(centre[0], centre[1]) > mid_u else "left"
      if location == "mediastinal":
        # Push the centre towards (or slightly past) the border so the tumor bulges into both tissues.
        shift = rng.uniform(0.0, 0.35) * diameter / 2 * (-1.0 if side == "right" else 1.0)
        centre[0] += shift * u_axis[0]
        centre[1] += shift * u_axis[1]
      candidate = _draw_tumor_shape(rng, location, side, centre, diameter)
      if _tumor_fits(candidate, tissues, tumor_ids, spacing, margin_voxels, lung_codes, mediastinal_codes):
        return candidate
    return None

  def draw(tumor):
    box, mask = _tumor_mask(tumor, shape, spacing)
    tumor_ids[box][mask] = len(placed) + 1
    tissues[box][mask] = code["tumor"]
    placed.append(tumor)

  placed = []
  lo_d, hi_d = diameter_range_mm
  floor_diameter = 2.0 * floor_radius_mm
  for location in locations:
    diameter = max(math.exp(rng.uniform(math.log(lo_d), math.log(hi_d))), floor_diameter)
    # Shrink by 15 % after each round of failures, down to the floor size.
    while True:
      tumor = attempt(location, diameter, 25 if diameter > floor_diameter else 60)
      if tumor is not None or diameter <= floor_diameter:
        break
      diameter = max(diameter * 0.85, floor_diameter)
    if tumor is not None:
      draw(tumor)
  if not placed:
    # Tiny anatomies: settle for one floor-sized tumor wherever it fits.
    for location in TUMOR_LOCATIONS:
      tumor = attempt(location, floor_diameter, 200)
      if tumor is not None:
        draw(tumor)
        break
  if not placed:
    raise ValueError(f"could not place any tumor in a {shape} volume with spacing "
                     f"{tuple(float(s) for s in spacing)} mm: the anatomy is too small; use more voxels or a larger "
                     "spacing")
  return placed


def _tumor_fits(tumor, tissues, tumor_ids, spacing, margin_voxels, lung_codes, mediastinal_codes):
  allowed = lung_codes if tumor.location == "lung" else lung_codes + mediastinal_codes
  # Cheap rejection first: the centre and the six points the tumor surely covers (lobulation shrinks the
  # ellipsoid by at most _MAX_LOBULATION) must lie in allowed tissue outside other tumors.
  spacing = np.asarray(spacing, dtype=np.float64)
  probes = tumor.centre_mm + np.concatenate([
      np.zeros((1, 3)), (tumor.rotation * (tumor.radii_mm * (1.0 - _MAX_LOBULATION))).T,
      -(tumor.rotation * (tumor.radii_mm * (1.0 - _MAX_LOBULATION))).T])
  index = np.rint(probes / spacing).astype(int)
  if np.any(index < 0) or np.any(index >= np.asarray(tissues.shape)):
    return False
  if not np.isin(tissues[tuple(index.T)], allowed).all() or tumor_ids[tuple(index.T)].any():
    return False

  box, mask = _tumor_mask(tumor, tissues.shape, spacing, pad=margin_voxels)
  if box is None:
    return False
  grown = ndimage.binary_dilation(mask, structure=_ball(margin_voxels))
  region_tissues = tissues[box][grown]
  if tumor_ids[box][grown].any() or not np.isin(region_tissues, allowed).all():
    return False
  if tumor.location == "lung":
    return True
  # The tumor proper must straddle the border: enough of both tissues, so it is visible against lung but has a
  # long low-contrast interface with the mediastinum.
  inside = tissues[box][mask]
  mediastinal_fraction = float(np.isin(inside, mediastinal_codes).mean())
  lung_fraction = float(np.isin(inside, lung_codes).mean())
  # Some mediastinal soft tissue must surround it, or there would be no low-contrast interface to speak of.
  shell_mediastinum = int((region_tissues == TISSUE_CODE["mediastinum"]).sum()
                          - (inside == TISSUE_CODE["mediastinum"]).sum())
  return 0.25 <= mediastinal_fraction <= 0.8 and lung_fraction >= 0.15 and shell_mediastinum >= 10


# ----------------------------------------------------------------------------------------------------------------
# Painting.


def _paint(anatomy, tissue_values, tumor_values):
  lut = np.array([tissue_values.get(name, 0.0) for name in TISSUES], dtype=np.float32)
  image = lut[anatomy.tissues]
  tumor_lut = np.array([0.0] + list(tumor_values), dtype=np.float32)
  has_tumor = anatomy.tumor_ids > 0
  image[has_tumor] = tumor_lut[anatomy.tumor_ids[has_tumor]]
  return image


def _tumor_records(anatomy, spacing, values, background_values, units_key):
  """JSON-ready description of each tumor, measured on the drawn label."""
  spacing = np.asarray(spacing, dtype=np.float64)
  voxel_volume = float(np.prod(spacing))
  records = []
  for j, tumor in enumerate(anatomy.tumors):
    mask = anatomy.tumor_ids == j + 1
    z_slices = np.flatnonzero(mask.any(axis=(0, 1)))
    volume = _tumor_volume_mm3(tumor)
    records.append({
        "location": tumor.location,
        "side": tumor.side,
        "centre_mm": [round(float(c), 4) for c in tumor.centre_mm],
        "centre_voxel": [round(float(c), 4) for c in tumor.centre_mm / spacing],
        "radius_mm": round((3.0 * volume / (4.0 * math.pi)) ** (1.0 / 3.0), 4),
        "radii_mm": [round(float(r), 4) for r in tumor.radii_mm],
        "axes": [[round(float(c), 6) for c in row] for row in tumor.rotation],
        "lobulation": [{"direction": [round(float(c), 6) for c in d], "amplitude": round(float(a), 6),
                        "sharpness": round(float(k), 6)}
                       for d, a, k in zip(tumor.bump_directions, tumor.bump_amplitudes, tumor.bump_sharpness)],
        "volume_mm3": round(volume, 3),
        "ellipsoid_volume_mm3": round(4.0 / 3.0 * math.pi * float(np.prod(tumor.radii_mm)), 3),
        "num_voxels": int(mask.sum()),
        "voxel_volume_mm3": round(voxel_volume, 6),
        "slices": [int(z_slices.min()), int(z_slices.max())] if len(z_slices) else [],
        units_key: round(float(values[j]), 3),
        "value": round(float(values[j]), 3),
        "background_value": round(float(background_values[j]), 3),
        "contrast": round(float(values[j] - background_values[j]), 3),
    })
  return records


def _blur(image, sigma_voxels, spacing):
  """The scanner's point-spread function, a Gaussian of ``sigma_voxels``: (blurred image, its sigma in mm)."""
  image = ndimage.gaussian_filter(image, sigma=sigma_voxels, mode="nearest")
  return image, tuple(sigma * step for sigma, step in zip(sigma_voxels, spacing))


def _phantom(image, anatomy, return_tissues, *, modality, units, spacing, values, tumors, psf_sigma_mm,
             **artefacts):
  """(image, label, info[, tissues]) of a drawn phantom; ``info`` records the drawing, ``artefacts`` (noise and
  fields, JSON-ready) last."""
  label = (anatomy.tumor_ids > 0).astype(np.int16)
  info = {
      "modality": modality,
      "units": units,
      "shape": list(image.shape),
      "spacing_mm": [float(s) for s in spacing],
      "tissue_values": {k: round(v, 3) for k, v in values.items() if k != "tumor"},
      "anatomy": anatomy.params,
      "tumors": tumors,
      "psf_sigma_mm": [round(s, 4) for s in psf_sigma_mm],
      **artefacts,
  }
  if return_tissues:
    return image, label, info, anatomy.tissues
  return image, label, info


def _resolve_spacing(rng, spacing, default_range):
  return draw_spacing(rng, default_range) if spacing is None else tuple(float(s) for s in spacing)


def make_ct_phantom(rng, shape=(128, 128, 48), spacing=None, *, num_tumors=None, tumor_locations=None,
                    tumor_diameter_range_mm=TUMOR_DIAMETER_RANGE_MM, return_tissues=False):
  """Draws one CT thorax in Hounsfield units.

  Args:
    rng: np.random.Generator; the case is a pure function of its state.
    shape: (X, Y, Z) voxels on the canonical RAS+ grid (Z = axial slices).
    spacing: (sx, sy, sz) mm; None draws it from :data:`CT_SPACING_RANGE`.
    num_tumors: number of tumors requested (default 1-3 at random); fewer are placed only when they cannot fit.
    tumor_locations: explicit list of "lung" / "mediastinal", one per tumor (overrides ``num_tumors``).
    tumor_diameter_range_mm: mean diameters are drawn log-uniformly from this range.
    return_tissues: also return the (X, Y, Z) int8 tissue-class map (codes in :data:`TISSUE_CODE`).

  Returns:
    (hu, label, info[, tissues]): ``hu`` (X, Y, Z) float32 integral HU values in [-1024, 3071]; ``label``
    (X, Y, Z) int16, 1 exactly on the drawn tumors and 0 elsewhere; ``info`` a JSON-serialisable dict with the
    spacing, tissue values, anatomy parameters, noise settings and the tumor list.
  """
  spacing = _resolve_spacing(rng, spacing, CT_SPACING_RANGE)
  shape, spacing = _check_geometry(shape, spacing)
  uniform = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731
  mediastinum_hu = uniform(30.0, 45.0)
  values = {
      "air": -1000.0, "fat": uniform(-110.0, -85.0), "muscle": uniform(45.0, 60.0), "lung": uniform(-870.0, -820.0),
      "lung_vessel": uniform(30.0, 50.0), "mediastinum": mediastinum_hu, "blood": mediastinum_hu + uniform(0.0, 8.0),
      "airway": -1000.0, "cortical_bone": uniform(650.0, 800.0), "cancellous_bone": uniform(180.0, 280.0),
      "disc": uniform(70.0, 100.0), "csf": uniform(5.0, 15.0), "liver": uniform(50.0, 65.0),
      "rib": uniform(400.0, 550.0), "tumor": 0.0,
  }
  anatomy = _draw_anatomy(rng, shape, spacing, num_tumors=num_tumors, tumor_locations=tumor_locations,
                          tumor_diameter_range_mm=tumor_diameter_range_mm)
  tumor_hu, background = [], []
  for tumor in anatomy.tumors:
    if tumor.location == "lung":
      tumor_hu.append(uniform(30.0, 50.0))
      background.append(values["lung"])
    else:
      # The clinically hard case: nearly isodense with the mediastinal soft tissue it abuts.
      tumor_hu.append(mediastinum_hu + float(rng.choice([-1.0, 1.0])) * uniform(3.0, 10.0))
      background.append(mediastinum_hu)

  noise_sd = uniform(15.0, 20.0)
  low_frequency_hu = uniform(5.0, 15.0)
  image, psf_sigma_mm = _blur(_paint(anatomy, values, tumor_hu), (0.5, 0.5, 0.3), spacing)
  image += np.float32(low_frequency_hu) * _smooth_field(rng, shape, degree=2)
  image += _correlated_noise(rng, shape, noise_sd)
  hu = np.clip(np.rint(image), -1024.0, 3071.0).astype(np.float32)
  return _phantom(
      hu, anatomy, return_tissues, modality="CT", units="HU", spacing=spacing, values=values,
      tumors=_tumor_records(anatomy, spacing, tumor_hu, background, "hu"), psf_sigma_mm=psf_sigma_mm,
      noise={"kind": "gaussian (in-plane correlated)", "sd": round(noise_sd, 3)},
      low_frequency={"kind": "additive degree-2 polynomial", "max_abs": round(low_frequency_hu, 3)})


def make_mri_phantom(rng, shape=(128, 128, 48), spacing=None, *, num_tumors=None, tumor_locations=None,
                     tumor_diameter_range_mm=TUMOR_DIAMETER_RANGE_MM, return_tissues=False):
  """Draws one T2-weighted-like MRI thorax (arbitrary units, non-negative).

  Lungs, cortical bone, air and flowing blood are dark, fat, CSF and discs bright, muscle and mediastinum
  intermediate, and tumors bright (about twice the mediastinum). A multiplicative polynomial bias field
  (+-20-30 %) and Rician noise are applied.

  Args: as :func:`make_ct_phantom` (``spacing`` None draws from :data:`MRI_SPACING_RANGE`).

  Returns:
    (intensity, label, info[, tissues]): ``intensity`` (X, Y, Z) float32 integral values >= 0; the rest as
    :func:`make_ct_phantom`.
  """
  spacing = _resolve_spacing(rng, spacing, MRI_SPACING_RANGE)
  shape, spacing = _check_geometry(shape, spacing)
  uniform = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731
  gain = uniform(0.85, 1.1)  # receiver gain: MRI units have no absolute meaning
  base = {
      "air": 0.0, "fat": uniform(950.0, 1150.0), "muscle": uniform(220.0, 300.0), "lung": uniform(25.0, 50.0),
      "lung_vessel": uniform(40.0, 80.0), "mediastinum": uniform(380.0, 460.0), "blood": uniform(60.0, 140.0),
      "airway": 0.0, "cortical_bone": uniform(20.0, 50.0), "cancellous_bone": uniform(450.0, 600.0),
      "disc": uniform(750.0, 950.0), "csf": uniform(1250.0, 1450.0), "liver": uniform(300.0, 380.0),
      "rib": uniform(150.0, 250.0), "tumor": 0.0,
  }
  values = {k: v * gain for k, v in base.items()}
  anatomy = _draw_anatomy(rng, shape, spacing, num_tumors=num_tumors, tumor_locations=tumor_locations,
                          tumor_diameter_range_mm=tumor_diameter_range_mm)
  tumor_values = [uniform(850.0, 1050.0) * gain for _ in anatomy.tumors]
  background = [values["lung"] if t.location == "lung" else values["mediastinum"] for t in anatomy.tumors]

  bias_amplitude = uniform(0.20, 0.30)
  noise_sigma = uniform(12.0, 25.0) * gain
  image, psf_sigma_mm = _blur(_paint(anatomy, values, tumor_values), (0.6, 0.6, 0.4), spacing)
  body = anatomy.tissues != TISSUE_CODE["air"]
  bias = 1.0 + np.float32(bias_amplitude) * _smooth_field(rng, shape, degree=3, region=body)
  image *= np.maximum(bias, np.float32(0.2))  # outside the body the polynomial may exceed the amplitude
  real = image + np.float32(noise_sigma) * rng.standard_normal(shape, dtype=np.float32)
  imaginary = np.float32(noise_sigma) * rng.standard_normal(shape, dtype=np.float32)
  intensity = np.clip(np.rint(np.sqrt(real * real + imaginary * imaginary)), 0.0, 32767.0).astype(np.float32)
  return _phantom(
      intensity, anatomy, return_tissues, modality="MRI", units="arbitrary (T2w-like)", spacing=spacing,
      values=values, tumors=_tumor_records(anatomy, spacing, tumor_values, background, "intensity"),
      psf_sigma_mm=psf_sigma_mm, noise={"kind": "rician", "sigma": round(noise_sigma, 3)},
      bias_field={"kind": "multiplicative 1 + degree-3 polynomial", "max_abs_deviation": round(bias_amplitude, 4)})


# ----------------------------------------------------------------------------------------------------------------
# Cases, orientation and files.


def case_id(modality, index):
  return f"{CASE_PREFIX[modality]}_{index:03d}"


def case_rng(seed, modality, index):
  """The generator of case ``index`` of ``modality``: independent of how many cases are made."""
  if modality not in MODALITY_STREAM:
    raise ValueError(f"modality must be one of {sorted(MODALITY_STREAM)}, got {modality!r}")
  return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(MODALITY_STREAM[modality], int(index))))


def orient_for_storage(data, canonical_affine, axcodes):
  """Re-expresses a canonical (RAS+) array in another voxel order, as a DICOM converter would have stored it.

  Args:
    data: (X, Y, Z) array in RAS+ voxel order.
    canonical_affine: (4, 4) voxel->world affine of ``data``.
    axcodes: target axis codes, e.g. "LPS".

  Returns:
    (stored_data, stored_affine): the same image on the same world grid; loading it with canonical
    reorientation gives back ``data`` and ``canonical_affine`` exactly.
  """
  transform = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(("R", "A", "S")),
                                              nib.orientations.axcodes2ornt(tuple(axcodes)))
  stored = nib.orientations.apply_orientation(np.asarray(data), transform)
  affine = np.asarray(canonical_affine, dtype=np.float64) @ nib.orientations.inv_ornt_aff(transform, data.shape)
  return np.ascontiguousarray(stored), affine


def make_case(modality, index, *, seed=0, shape=(128, 128, 48), spacing_range=None):
  """Generates case ``index`` of ``modality`` ("CT" or "MRI") exactly as :func:`write_phantom_dataset` writes it.

  Returns:
    (image, label, info) on the canonical RAS+ grid; ``info`` adds to the ``make_*_phantom`` info the case id,
    the stored orientation, the canonical and stored affines, and each tumor's centre in world mm.
  """
  rng = case_rng(seed, modality, index)
  spacing = draw_spacing(rng, spacing_range or (CT_SPACING_RANGE if modality == "CT" else MRI_SPACING_RANGE))
  orientation = ORIENTATIONS[int(rng.integers(len(ORIENTATIONS)))]
  extent = (np.asarray(shape, dtype=np.float64) - 1) * np.asarray(spacing)
  # Scanner coordinates: the volume sits near the isocentre in-plane, and the table position sets z.
  origin = -extent / 2 + np.array([rng.uniform(-30.0, 30.0), rng.uniform(-30.0, 30.0), rng.uniform(-250.0, 50.0)])
  origin = np.round(origin, 3)
  make = make_ct_phantom if modality == "CT" else make_mri_phantom
  image, label, info = make(rng, shape, spacing)
  canonical_affine = np.diag([*spacing, 1.0])
  canonical_affine[:3, 3] = origin
  _, stored_affine = orient_for_storage(np.zeros(shape, dtype=np.uint8), canonical_affine, orientation)
  for tumor in info["tumors"]:
    tumor["centre_world_mm"] = [round(float(c), 4) for c in np.asarray(tumor["centre_mm"]) + origin]
  info = {"case_id": case_id(modality, index), "index": int(index), **info, "orientation": orientation,
          "affine_ras": canonical_affine.tolist(), "affine_stored": np.round(stored_affine, 6).tolist()}
  return image, label, info


def _prepare_out_dir(out_dir, overwrite):
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise FileExistsError(f"{out_dir}: exists and is not a folder")
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    if not overwrite:
      raise FileExistsError(f"{out_dir}: folder is not empty; pass --overwrite (overwrite=True) to replace the "
                            "phantoms in it, or choose another folder")
    # Replace only what this tool writes; anything else the user keeps there stays.
    for name in ("CT", "MRI"):
      path = os.path.join(out_dir, name)
      if os.path.isdir(path):
        shutil.rmtree(path)
      elif os.path.exists(path):
        os.remove(path)
    if os.path.exists(os.path.join(out_dir, "phantoms.json")):
      os.remove(os.path.join(out_dir, "phantoms.json"))
  os.makedirs(out_dir, exist_ok=True)


def _describe(modality, position, total, info):
  tumors = ", ".join(f"{t['location']} {2 * t['radius_mm']:.0f} mm" for t in info["tumors"])
  sx, sy, sz = info["spacing_mm"]
  count = len(info["tumors"])
  return (f"{modality} {position}/{total} {info['case_id']}: {count} tumor{'s' if count != 1 else ''} ({tumors}), "
          f"spacing {sx:.2f}x{sy:.2f}x{sz:.2f} mm, stored {info['orientation']}")


def write_phantom_dataset(out_dir, *, num_ct=12, num_mri=12, seed=0, shape=(128, 128, 48), ct_spacing_range=None,
                          mri_spacing_range=None, overwrite=False, progress=None):
  """Writes a labelled CT set and an unpaired MRI set of phantoms.

  Layout: ``out_dir/CT`` and ``out_dir/MRI`` as nnU-Net/MSD dataset folders (``dataset.json``,
  ``imagesTr/<id>_0000.nii.gz``, ``labelsTr/<id>.nii.gz``), and ``out_dir/phantoms.json`` with the seed, generator
  version and every case's info. Images are int16 (HU for CT), labels uint8.

  Args:
    out_dir: output folder; must be empty or absent unless ``overwrite``.
    num_ct, num_mri: number of cases of each modality (0 skips that set).
    seed: master seed; case k of a modality is the same whatever the number of cases.
    shape: (X, Y, Z) canonical voxels of every case.
    ct_spacing_range, mri_spacing_range: ((in-plane lo, hi), (slice lo, hi)) mm; defaults
      :data:`CT_SPACING_RANGE`, :data:`MRI_SPACING_RANGE`.
    overwrite: replace ``CT/``, ``MRI/`` and ``phantoms.json`` in a non-empty ``out_dir``.
    progress: optional callable receiving one line per case.

  Returns:
    The content of ``phantoms.json`` (a dict).

  Raises:
    FileExistsError: non-empty ``out_dir`` without ``overwrite``.
    ValueError: bad counts, shape or spacing.
  """
  out_dir = os.path.abspath(os.fspath(out_dir))
  if int(num_ct) < 0 or int(num_mri) < 0 or int(num_ct) + int(num_mri) == 0:
    raise ValueError(f"need num_ct >= 0, num_mri >= 0 and at least one case, got {num_ct} CT and {num_mri} MRI")
  shape = tuple(int(n) for n in shape)
  _check_geometry(shape, (1.0, 1.0, 1.0))
  _prepare_out_dir(out_dir, overwrite)
  spacing_ranges = {"CT": ct_spacing_range or CT_SPACING_RANGE, "MRI": mri_spacing_range or MRI_SPACING_RANGE}
  summary = {
      "generator": "cmedl_jax.data.phantoms",
      "version": GENERATOR_VERSION,
      "seed": int(seed),
      "shape": list(shape),
      "spacing_ranges_mm": {m: [list(r) for r in spacing_ranges[m]] for m in spacing_ranges},
      "orientations": list(ORIENTATIONS),
      "tissues": list(TISSUES),
      "cases": {"CT": [], "MRI": []},
  }
  for modality, count in (("CT", int(num_ct)), ("MRI", int(num_mri))):
    if count == 0:
      continue
    root = os.path.join(out_dir, modality)
    ids = []
    for index in range(count):
      image, label, info = make_case(modality, index, seed=seed, shape=shape,
                                     spacing_range=spacing_ranges[modality])
      affine_ras = np.asarray(info["affine_ras"])
      stored_image, stored_affine = orient_for_storage(image, affine_ras, info["orientation"])
      stored_label, _ = orient_for_storage(label, affine_ras, info["orientation"])
      image_file = dataset_index.image_path(root, info["case_id"])
      label_file = dataset_index.label_path(root, info["case_id"])
      nifti_io.save_nifti(image_file, stored_image, stored_affine, dtype=np.int16)
      nifti_io.save_nifti(label_file, stored_label, stored_affine, dtype=np.uint8)
      info["image"] = os.path.relpath(image_file, out_dir)
      info["label"] = os.path.relpath(label_file, out_dir)
      summary["cases"][modality].append(info)
      ids.append(info["case_id"])
      if progress is not None:
        progress(_describe(modality, index + 1, count, info))
    unpaired_note = ("Unpaired: these MRI anatomies are drawn from random streams independent of the CT set "
                     "(different patients, different case ids); the labels are provided for testing only.")
    dataset_index.write_dataset_json(
        root, ids, modality=modality, has_labels=True,
        name=f"CMEDL synthetic thorax phantoms ({modality})",
        description=(f"Seeded synthetic {'CT (HU)' if modality == 'CT' else 'T2w-like MRI'} thorax phantoms with "
                     f"lung and mediastinal tumors; seed {int(seed)}, generator {GENERATOR_VERSION}."),
        extra={"phantom": {"seed": int(seed), "generator_version": GENERATOR_VERSION,
                           "unpaired": modality == "MRI",
                           **({"note": unpaired_note} if modality == "MRI" else {})}})
  with open(os.path.join(out_dir, "phantoms.json"), "w") as f:
    json.dump(summary, f, indent=1)
  return summary


def main(argv: Optional[Sequence[str]] = None):
  parser = argparse.ArgumentParser(
      prog="cmedl-make-phantoms",
      description="Write seeded synthetic thorax phantoms: a labelled CT set (OUT/CT) and an unpaired T2w-like "
                  "MRI set (OUT/MRI) in the nnU-Net/MSD layout, plus OUT/phantoms.json.")
  parser.add_argument("--out", required=True, help="output folder (must be empty or absent unless --overwrite)")
  parser.add_argument("--num-ct", type=int, default=12, help="number of CT cases (default 12)")
  parser.add_argument("--num-mri", type=int, default=12, help="number of MRI cases (default 12)")
  parser.add_argument("--seed", type=int, default=0, help="master seed (default 0)")
  parser.add_argument("--size", type=int, default=128, help="in-plane voxels, X = Y (default 128)")
  parser.add_argument("--slices", type=int, default=48, help="axial slices, Z (default 48)")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace CT/, MRI/ and phantoms.json in a non-empty output folder")
  parser.add_argument("--quiet", action="store_true", help="print only the summary")
  args = parser.parse_args(argv)
  if args.num_ct < 0 or args.num_mri < 0 or args.num_ct + args.num_mri == 0:
    parser.error(f"--num-ct and --num-mri must be >= 0 with at least one case (got {args.num_ct}, {args.num_mri})")
  if args.size < _MIN_IN_PLANE_VOXELS or args.slices < _MIN_SLICES:
    parser.error(f"--size must be >= {_MIN_IN_PLANE_VOXELS} and --slices >= {_MIN_SLICES} "
                 f"(got {args.size}, {args.slices})")
  start = time.perf_counter()
  try:
    summary = write_phantom_dataset(
        args.out, num_ct=args.num_ct, num_mri=args.num_mri, seed=args.seed,
        shape=(args.size, args.size, args.slices), overwrite=args.overwrite,
        progress=None if args.quiet else lambda line: print(line, flush=True))
  except (FileExistsError, ValueError, OSError) as e:
    parser.error(str(e))
  elapsed = time.perf_counter() - start
  out = os.path.abspath(args.out)
  counts = {m: sum(len(c["tumors"]) for c in summary["cases"][m]) for m in ("CT", "MRI")}
  print(f"Wrote {args.num_ct} CT + {args.num_mri} MRI phantom cases ({args.size}x{args.size}x{args.slices} voxels, "
        f"seed {args.seed}) to {out} in {elapsed:.1f} s: {counts['CT']} CT tumors, {counts['MRI']} MRI tumors.\n"
        f"  CT (labelled):  {os.path.join(out, 'CT')}\n"
        f"  MRI (unpaired): {os.path.join(out, 'MRI')}\n"
        f"  per-case details: {os.path.join(out, 'phantoms.json')}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
