"""NIfTI IO: round trips with non-trivial affines, canonical orientation, and every bad-input case."""

import gzip
import os
import struct

import nibabel as nib
import numpy as np
import pytest

from cmedl_jax.data import nifti_io
from cmedl_jax.errors import DataError

# LPS-like (DICOM conversion) affine with an oblique tilt, anisotropic spacing and an origin offset.
OBLIQUE_LPS = np.array([[-0.78, 0.0, 0.05, 120.0],
                        [0.0, -0.78, 0.0, 95.5],
                        [0.02, 0.0, 2.5, -310.0],
                        [0.0, 0.0, 0.0, 1.0]])
# Axes permuted: array axis 0 runs superior->inferior, axis 1 left->right, axis 2 posterior->anterior.
PERMUTED = np.array([[0.0, 0.9, 0.0, -50.0],
                     [0.0, 0.0, 1.1, 20.0],
                     [-3.0, 0.0, 0.0, 40.0],
                     [0.0, 0.0, 0.0, 1.0]])


def _write(path, data, affine, **kwargs):
  nifti_io.save_nifti(path, data, affine, **kwargs)
  return str(path)


def _world_coords(affine, shape):
  """(N, 3) world coordinates of every voxel centre, C order."""
  idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
  return idx @ affine[:3, :3].T + affine[:3, 3]


@pytest.mark.parametrize("affine", [OBLIQUE_LPS, PERMUTED, np.diag([0.7, 0.7, 2.0, 1.0])])
def test_canonical_load_keeps_every_voxel_at_its_world_position(tmp_path, affine):
  rng = np.random.default_rng(0)
  data = rng.normal(size=(6, 7, 5)).astype(np.float32)
  vol = nifti_io.load_volume(_write(tmp_path / "a.nii.gz", data, affine))
  # RAS+: the affine's dominant direction per axis is positive and on the diagonal.
  assert np.all(np.argmax(np.abs(vol.affine[:3, :3]), axis=0) == [0, 1, 2])
  assert np.all(np.diag(vol.affine)[:3] > 0)
  # Independent check: the value at each world position is unchanged by the reorientation.
  world_in = _world_coords(affine, data.shape)
  world_out = _world_coords(vol.affine, vol.shape)
  order_in = np.lexsort(np.round(world_in, 3).T)
  order_out = np.lexsort(np.round(world_out, 3).T)
  np.testing.assert_allclose(world_in[order_in], world_out[order_out], atol=1e-3)
  np.testing.assert_array_equal(data.reshape(-1)[order_in], vol.data.reshape(-1)[order_out])
  np.testing.assert_allclose(sorted(vol.spacing), sorted(np.linalg.norm(affine[:3, :3], axis=0)), rtol=1e-5)


@pytest.mark.parametrize("affine", [OBLIQUE_LPS, PERMUTED])
def test_prediction_written_like_input_overlays_it(tmp_path, affine):
  rng = np.random.default_rng(1)
  data = rng.integers(-1000, 500, size=(9, 8, 6)).astype(np.int16)
  src = _write(tmp_path / "ct.nii.gz", data, affine)
  vol = nifti_io.load_volume(src)
  prediction = (vol.data > 0).astype(np.uint8)  # computed on the canonical grid
  out = nifti_io.save_like(tmp_path / "pred.nii.gz", prediction, vol)
  written = nib.load(out)
  original = nib.load(src)
  np.testing.assert_allclose(written.affine, original.affine, atol=1e-5)
  assert written.shape == original.shape
  np.testing.assert_array_equal(np.asarray(written.dataobj), (data > 0).astype(np.uint8))
  assert written.get_data_dtype() == np.uint8
  assert int(written.header["sform_code"]) == int(original.header["sform_code"])


def test_image_label_round_trip_and_dtypes(tmp_path):
  img = _write(tmp_path / "i.nii.gz", np.arange(60, dtype=np.float32).reshape(3, 4, 5), OBLIQUE_LPS)
  lab = np.zeros((3, 4, 5), np.uint8)
  lab[1, 2, 3] = 1
  image, label = nifti_io.load_case(img, _write(tmp_path / "l.nii.gz", lab, OBLIQUE_LPS), allowed_labels={0, 1})
  assert image.data.dtype == np.float32 and label.data.dtype == np.int16
  assert label.data.sum() == 1 and image.data[label.data == 1].item() == 1 * 20 + 2 * 5 + 3
  np.testing.assert_allclose(image.spacing, np.linalg.norm(OBLIQUE_LPS[:3, :3], axis=0), rtol=1e-6)


def test_two_dimensional_and_trailing_singleton_inputs_become_3d(tmp_path):
  v2 = nifti_io.load_volume(_write(tmp_path / "a.nii", np.ones((4, 5), np.float32), np.diag([1, 1, 1, 1.])))
  v4 = nifti_io.load_volume(_write(tmp_path / "b.nii", np.ones((4, 5, 3, 1), np.float32), np.eye(4)))
  assert v2.shape == (4, 5, 1) and v4.shape == (4, 5, 3)


# ---------------------------------------------------------------- bad input: every message names the file


def _expect(path, match, fn=nifti_io.load_volume, **kwargs):
  with pytest.raises(DataError, match=match) as info:
    fn(path, **kwargs)
  assert str(path) in str(info.value)
  return info.value


def test_missing_file(tmp_path):
  _expect(tmp_path / "nope.nii.gz", "does not exist")


def test_folder_instead_of_file(tmp_path):
  _expect(tmp_path, "is a folder")


def test_corrupt_not_nifti(tmp_path):
  path = tmp_path / "bad.nii.gz"
  path.write_bytes(b"this is not a nifti file at all")
  _expect(path, "cannot read as NIfTI")


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])  # gzip-compressed and uncompressed
def test_truncated_file(tmp_path, suffix):
  good = _write(tmp_path / f"good{suffix}", np.random.rand(20, 20, 20).astype(np.float32), np.eye(4))
  blob = open(good, "rb").read()
  path = tmp_path / f"truncated{suffix}"
  path.write_bytes(blob[:len(blob) // 2])
  _expect(path, "cannot read as NIfTI")


def test_nan_and_inf_voxels(tmp_path):
  data = np.zeros((4, 4, 4), np.float32)
  data[1, 2, 3] = np.nan
  data[0, 0, 0] = np.inf
  err = _expect(_write(tmp_path / "nan.nii.gz", data, np.eye(4)), "2 NaN/Inf voxel")
  assert "(0, 0, 0)" in str(err)


def _patch_header(path, pixdim, qform_code, sform_code):
  """Overwrites pixdim[1:4] and the form codes in an uncompressed NIfTI-1 file, bypassing nibabel (which would
  repair them on save): this is what a broken converter leaves on disk."""
  blob = bytearray(open(path, "rb").read())
  blob[80:92] = struct.pack("<3f", *pixdim)  # pixdim[1..3] start at byte 76 + 4
  blob[252:254] = struct.pack("<h", qform_code)
  blob[254:256] = struct.pack("<h", sform_code)
  open(path, "wb").write(bytes(blob))


@pytest.mark.parametrize("pixdim,qform,sform", [
    ((1.0, 0.0, 1.0), 0, 0),    # zero spacing, affine derived from pixdim -> singular
    ((0.0, 0.0, 0.0), 0, 0),    # missing spacing altogether
    ((1.0, 0.0, 1.0), 0, 1),    # valid sform, but the header's spacing is zero
])
def test_zero_or_missing_spacing(tmp_path, pixdim, qform, sform):
  path = _write(tmp_path / "bad_spacing.nii", np.zeros((3, 3, 3), np.float32), np.eye(4))
  _patch_header(path, pixdim, qform, sform)
  _expect(path, "spacing|singular")


def test_non_integer_label(tmp_path):
  lab = np.zeros((4, 4, 4), np.float32)
  lab[1, 1, 1] = 0.5
  _expect(_write(tmp_path / "soft.nii.gz", lab, np.eye(4)), "non-integer", is_label=True)


def test_unexpected_label_value(tmp_path):
  lab = np.zeros((4, 4, 4), np.uint8)
  lab[0, 0, 0], lab[1, 1, 1] = 1, 7
  err = _expect(_write(tmp_path / "seven.nii.gz", lab, np.eye(4)), r"unexpected value\(s\) \[7\]",
                is_label=True, allowed_labels={0, 1})
  assert "allowed: [0, 1]" in str(err)


def test_image_label_shape_mismatch(tmp_path):
  img = _write(tmp_path / "img.nii.gz", np.zeros((4, 5, 6), np.float32), np.eye(4))
  lab = _write(tmp_path / "lab.nii.gz", np.zeros((4, 5, 7), np.uint8), np.eye(4))
  err = _expect(lab, "label shape .* differs from image shape", fn=lambda p: nifti_io.load_case(img, p))
  assert img in str(err)


def test_image_label_affine_mismatch(tmp_path):
  img = _write(tmp_path / "img.nii.gz", np.zeros((4, 5, 6), np.float32), OBLIQUE_LPS)
  shifted = OBLIQUE_LPS.copy()
  shifted[0, 3] += 5.0
  lab = _write(tmp_path / "lab.nii.gz", np.zeros((4, 5, 6), np.uint8), shifted)
  _expect(lab, "label affine differs", fn=lambda p: nifti_io.load_case(img, p))


def test_label_flipped_orientation_is_not_a_mismatch(tmp_path):
  """The same grid stored in another voxel order is the same grid after canonical reorientation."""
  data = np.zeros((4, 5, 6), np.uint8)
  data[0, 1, 2] = 1
  img = _write(tmp_path / "img.nii.gz", data.astype(np.float32), OBLIQUE_LPS)
  flip = np.diag([-1.0, 1.0, 1.0, 1.0])
  flip[0, 3] = data.shape[0] - 1  # voxel i -> (n-1-i): the same world positions
  lab = _write(tmp_path / "lab.nii.gz", data[::-1], OBLIQUE_LPS @ flip)
  image, label = nifti_io.load_case(img, lab)
  np.testing.assert_array_equal(image.data > 0, label.data > 0)


def test_gzip_magic_but_garbage_inside(tmp_path):
  path = tmp_path / "garbage.nii.gz"
  with gzip.open(path, "wb") as f:
    f.write(os.urandom(600))
  _expect(path, "cannot read as NIfTI")
