"""NIfTI reading and writing with validation.

Volumes are held in nibabel's closest canonical orientation (RAS+), so that array axis 2 runs inferior->superior
and ``data[:, :, k]`` is an axial slice whatever the scanner wrote. The original orientation, affine and header
are kept on the :class:`Volume` so that predictions can be written back exactly on the input's grid
(:func:`save_like`): same shape, same affine, same qform/sform codes, and voxel order.

Every problem found on reading raises :class:`cmedl_jax.errors.DataError` naming the file.
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from typing import Iterable, Optional

import nibabel as nib
import numpy as np

from cmedl_jax.errors import DataError
from cmedl_jax.utils import files

# Affines of an image and its label are compared with this tolerance (mm, and unitless for direction cosines):
# float32 header round trips and different writing tools (ITK vs nibabel) disagree at about 1e-6 relative.
AFFINE_ATOL = 1e-3


@dataclasses.dataclass
class Volume:
  """A 3D volume in canonical (RAS+) orientation.

  Attributes:
    data: (X, Y, Z) array in RAS+ voxel order; float32 for images, int16/uint8 for labels.
    affine: (4, 4) voxel->world (mm) matrix of ``data``.
    spacing: (3,) voxel size in mm along X, Y, Z of ``data``.
    path: the file it was read from ('' for volumes made in memory).
    original_affine: (4, 4) affine of the file as stored.
    original_header: the file's NIfTI header (copied), reused when writing predictions.
  """

  data: np.ndarray
  affine: np.ndarray
  spacing: tuple
  path: str = ""
  original_affine: Optional[np.ndarray] = None
  original_header: Optional[nib.Nifti1Header] = None

  @property
  def shape(self):
    return self.data.shape


def _spacing_from_affine(affine):
  return tuple(float(s) for s in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))


def _load_image(path):
  path = os.fspath(path)
  if not os.path.exists(path):
    raise DataError(path, "file does not exist")
  if os.path.isdir(path):
    raise DataError(path, "is a folder, expected a NIfTI file (.nii or .nii.gz)")
  try:
    img = nib.load(path)
    # Force reading now: nibabel is lazy, and a truncated .nii.gz only fails when the data are touched.
    data = np.asanyarray(img.dataobj)
  except (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError) as e:
    raise DataError(path, f"cannot read as NIfTI (corrupt, truncated or not a NIfTI file): {e}") from e
  if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
    raise DataError(path, f"is a {type(img).__name__}, expected NIfTI-1/2")
  return img, data


def _squeeze_to_3d(path, data):
  """Accepts (X, Y), (X, Y, Z) and trailing singleton dims such as (X, Y, Z, 1)."""
  while data.ndim > 3 and data.shape[-1] == 1:
    data = data[..., 0]
  if data.ndim == 2:
    data = data[:, :, None]
  if data.ndim != 3:
    raise DataError(path, f"has shape {data.shape}; expected a 3D volume (multi-channel/4D images are not "
                          "supported: split channels into separate _0000, _0001 files)")
  return data


def _raw_zooms(path, img):
  """pixdim[1:ndim+1] as stored: nibabel silently replaces zero spacing by 1 when loading, which would hide a
  broken header, so the header is read again without its fixes."""
  with nib.openers.ImageOpener(path) as f:
    raw = type(img.header).from_fileobj(f, check=False)
  return np.asarray(raw["pixdim"][1:1 + min(3, len(img.shape))], dtype=np.float64)


def _check_geometry(path, img):
  zooms = _raw_zooms(path, img)
  if not np.all(np.isfinite(zooms)) or np.any(zooms == 0):
    raise DataError(path, f"has missing or zero voxel spacing (pixdim {tuple(zooms.tolist())}); "
                          "metrics in mm need a valid spacing: fix the header (pixdim[1:4])")
  affine = img.affine
  if affine is None or not np.all(np.isfinite(affine)):
    raise DataError(path, "has a missing or non-finite affine (qform/sform)")
  spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
  if np.any(spacing <= 0) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
    raise DataError(path, f"has a singular affine (column norms {tuple(np.round(spacing, 6).tolist())} mm): "
                          "zero spacing along an axis")


def load_volume(path, *, is_label=False, allowed_labels: Optional[Iterable[int]] = None,
                canonical=True) -> Volume:
  """Reads and validates one NIfTI volume.

  Args:
    path: a .nii or .nii.gz file.
    is_label: validate as a label map: integral values only, returned as int16.
    allowed_labels: for label maps, the set of permitted values (e.g. the dataset.json labels); any other value
      is an error that lists the offending values.
    canonical: reorient to RAS+ (the default; training and evaluation assume it).

  Returns:
    The volume; images as float32.

  Raises:
    DataError: unreadable/corrupt file, not 3D, missing or zero spacing, NaN/Inf voxels, non-integer or
      unexpected label values.
  """
  path = os.fspath(path)
  img, data = _load_image(path)
  data = _squeeze_to_3d(path, data)
  _check_geometry(path, img)
  original_affine = img.affine.copy()
  if canonical:
    ornt = nib.orientations.io_orientation(img.affine)
    # inv_ornt_aff needs the shape *before* reorientation (flips are about the original axis lengths).
    affine = img.affine @ nib.orientations.inv_ornt_aff(ornt, data.shape)
    data = nib.orientations.apply_orientation(data, ornt)
  else:
    affine = img.affine.copy()

  if np.issubdtype(data.dtype, np.floating):
    bad = ~np.isfinite(data)
    if bad.any():
      raise DataError(path, f"contains {int(bad.sum())} NaN/Inf voxel(s) (first at index "
                            f"{tuple(int(i) for i in np.argwhere(bad)[0])} in RAS order)")
  if is_label:
    data = _as_label(path, data, allowed_labels)
  else:
    data = np.ascontiguousarray(data, dtype=np.float32)
  return Volume(data=data, affine=affine, spacing=_spacing_from_affine(affine), path=path,
                original_affine=original_affine, original_header=img.header.copy())


def _as_label(path, data, allowed_labels):
  if np.issubdtype(data.dtype, np.floating):
    non_integer = data != np.round(data)
    if non_integer.any():
      examples = np.unique(data[non_integer])[:5]
      raise DataError(path, f"label map has {int(non_integer.sum())} non-integer voxel(s) (e.g. "
                            f"{examples.tolist()}); was an image passed as a label, or was it resampled with "
                            "linear interpolation instead of nearest neighbour?")
  values = np.unique(data)
  if allowed_labels is not None:
    allowed = set(int(v) for v in allowed_labels)
    unexpected = [int(v) for v in values if int(v) not in allowed]
    if unexpected:
      raise DataError(path, f"label map has unexpected value(s) {unexpected[:10]}; allowed: {sorted(allowed)}")
  if values.min() < np.iinfo(np.int16).min or values.max() > np.iinfo(np.int16).max:
    raise DataError(path, f"label values {values.min()}..{values.max()} do not fit int16")
  return np.ascontiguousarray(data, dtype=np.int16)


def load_case(image_path, label_path=None, *, allowed_labels=None):
  """Reads an image and (optionally) its label map, checking that they share one voxel grid.

  Returns:
    (image Volume, label Volume or None).

  Raises:
    DataError: as :func:`load_volume`, plus shape or affine mismatch between image and label (names both).
  """
  image = load_volume(image_path)
  if label_path is None:
    return image, None
  label = load_volume(label_path, is_label=True, allowed_labels=allowed_labels)
  if image.shape != label.shape:
    raise DataError(label_path, f"label shape {label.shape} differs from image shape {image.shape} "
                                f"of {image_path} (both in RAS order)")
  if not np.allclose(image.affine, label.affine, atol=AFFINE_ATOL):
    raise DataError(label_path, f"label affine differs from the affine of {image_path}:\n"
                                f"label:\n{np.round(label.affine, 4)}\nimage:\n{np.round(image.affine, 4)}\n"
                                "image and label must lie on the same voxel grid")
  return image, label


def save_nifti(path, data, affine, *, header=None, dtype=None):
  """Writes a NIfTI file (creates parent folders). Both qform and sform are set to ``affine`` (code 1, scanner).

  The file is written under a temporary name and renamed: a reader (or a kill) never sees half a file.
  """
  path = os.fspath(path)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  data = np.asarray(data if dtype is None else np.asarray(data).astype(dtype))
  img = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64), header=header)
  if header is None:
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
  img.header.set_data_dtype(data.dtype)
  if header is not None:
    # A copied header may carry the input's scaling; predictions are stored unscaled.
    img.header.set_slope_inter(1.0, 0.0)
  tmp = files.temporary_name(path, ending=next((e for e in (".nii.gz", ".nii") if path.endswith(e)), ""))
  nib.save(img, tmp)
  os.replace(tmp, path)
  return path


def to_original_orientation(data, reference: Volume):
  """Maps an array on ``reference``'s canonical grid back to the voxel order of the file it came from."""
  if reference.original_affine is None:
    return np.asarray(data)
  ornt = nib.orientations.io_orientation(reference.original_affine)
  return nib.orientations.apply_orientation(np.asarray(data), nib.orientations.ornt_transform(
      nib.orientations.axcodes2ornt("RAS"), ornt))


def save_like(path, data, reference: Volume, *, dtype=np.uint8):
  """Writes ``data`` (on ``reference``'s canonical grid, e.g. a predicted mask, or (X, Y, Z, K) probabilities)
  with the reference file's affine and header, in the reference file's voxel order: the prediction overlays the
  input in any viewer."""
  data = np.asarray(data)
  if data.shape[:3] != reference.shape:
    raise ValueError(f"prediction shape {data.shape} differs from the reference volume {reference.shape} "
                     f"({reference.path})")
  if reference.original_affine is None:
    return save_nifti(path, data, reference.affine, dtype=dtype)
  header = reference.original_header.copy() if reference.original_header is not None else None
  return save_nifti(path, to_original_orientation(data, reference), reference.original_affine,
                    header=header, dtype=dtype)

