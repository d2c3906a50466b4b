"""Tests of the synthetic thorax phantoms (cmedl_jax.data.phantoms, cmedl-make-phantoms)."""

import json
import os

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from cmedl_jax.data import dataset_index
from cmedl_jax.data import nifti_io
from cmedl_jax.data import phantoms

# Small but anatomically roomy enough for tumors of several voxels: 102 x 102 x 60 mm.
GEN_SHAPE = (64, 64, 20)
GEN_SPACING = (1.6, 1.6, 3.0)
SEEDS = (0, 1, 2)
DATASET_SHAPE = (48, 48, 16)
DATASET_SEED = 7
CODE = phantoms.TISSUE_CODE
IN_PLANE_3X3 = np.ones((3, 3, 1), dtype=bool)


def _generate(make, seed):
  return make(np.random.default_rng(seed), GEN_SHAPE, GEN_SPACING, tumor_locations=["lung", "mediastinal"],
              return_tissues=True)


@pytest.fixture(scope="module")
def ct_cases():
  return [_generate(phantoms.make_ct_phantom, seed) for seed in SEEDS]


@pytest.fixture(scope="module")
def mri_cases():
  return [_generate(phantoms.make_mri_phantom, seed + 100) for seed in SEEDS]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  out = tmp_path_factory.mktemp("phantoms") / "out"
  summary = phantoms.write_phantom_dataset(out, num_ct=3, num_mri=2, seed=DATASET_SEED, shape=DATASET_SHAPE)
  return out, summary


def _components(label):
  return ndimage.label(label == 1, structure=np.ones((3, 3, 3), dtype=bool))


def _tumor_masks(label, info):
  """Component of each info tumor (found through its centre voxel), in info order."""
  components, _ = _components(label)
  masks = []
  for tumor in info["tumors"]:
    centre = tuple(int(round(c)) for c in tumor["centre_voxel"])
    component_id = components[centre]
    assert component_id > 0, f"tumor centre {centre} is not labelled"
    masks.append(components == component_id)
  return masks


def _core(tissues, name, iterations=1):
  """Voxels of a tissue away from its borders (the PSF blur mixes neighbouring tissues at the edges)."""
  return ndimage.binary_erosion(tissues == CODE[name], structure=IN_PLANE_3X3, iterations=iterations)


def _shell(mask, in_plane=3):
  structure = phantoms._ball((in_plane, in_plane, 1))
  return ndimage.binary_dilation(mask, structure=structure) & ~mask


# ------------------------------------------------------------------------------------------------ labels


@pytest.mark.parametrize("modality", ["CT", "MRI"])
def test_label_is_exactly_the_drawn_tumors(modality, ct_cases, mri_cases):
  for image, label, info, tissues in (ct_cases if modality == "CT" else mri_cases):
    assert image.dtype == np.float32 and label.dtype == np.int16 and tissues.dtype == np.int8
    assert image.shape == label.shape == tissues.shape == GEN_SHAPE
    assert set(np.unique(label).tolist()) == {0, 1}
    np.testing.assert_array_equal(label == 1, tissues == CODE["tumor"])
    _, num_components = _components(label)
    assert num_components == len(info["tumors"]) == 2
    masks = _tumor_masks(label, info)
    assert not (masks[0] & masks[1]).any(), "two tumors share one connected component"
    for tumor, mask in zip(info["tumors"], masks):
      assert mask.sum() == tumor["num_voxels"]
      slices = np.flatnonzero(mask.any(axis=(0, 1)))
      assert len(slices) >= 2 and [slices.min(), slices.max()] == tumor["slices"]
      # The voxelised volume matches the continuous shape's volume (and roughly the plain ellipsoid's).
      voxel_volume = tumor["num_voxels"] * np.prod(GEN_SPACING)
      assert voxel_volume == pytest.approx(tumor["volume_mm3"], rel=0.25)
      assert voxel_volume == pytest.approx(tumor["ellipsoid_volume_mm3"], rel=0.45)
    assert [t["location"] for t in info["tumors"]] == ["lung", "mediastinal"]


def test_voxelised_volume_matches_analytic_volume_in_aggregate(ct_cases, mri_cases):
  voxel_total, analytic_total = 0.0, 0.0
  for _, _, info, _ in list(ct_cases) + list(mri_cases):
    for tumor in info["tumors"]:
      voxel_total += tumor["num_voxels"] * tumor["voxel_volume_mm3"]
      analytic_total += tumor["volume_mm3"]
  assert voxel_total == pytest.approx(analytic_total, rel=0.05)


def test_tumor_size_is_physical_whatever_the_spacing():
  # Same field of view sampled at two resolutions: a 14 mm tumor stays ~14 mm (not 14 voxels).
  equivalent_diameters = []
  for shape, spacing in (((80, 80, 24), (2.0, 2.0, 3.0)), ((120, 120, 36), (4 / 3, 4 / 3, 2.0))):
    _, label, info = phantoms.make_ct_phantom(np.random.default_rng(5), shape, spacing, tumor_locations=["lung"],
                                              tumor_diameter_range_mm=(14.0, 14.0))
    volume = label.sum() * np.prod(spacing)
    equivalent_diameters.append((6.0 * volume / np.pi) ** (1.0 / 3.0))
    assert 2 * info["tumors"][0]["radius_mm"] == pytest.approx(14.0, rel=0.2)
  assert equivalent_diameters[0] == pytest.approx(14.0, rel=0.25)
  assert equivalent_diameters[1] == pytest.approx(equivalent_diameters[0], rel=0.15)


# ------------------------------------------------------------------------------------------------ contrast


def test_ct_tissue_values_and_tumor_contrast(ct_cases):
  for hu, label, info, tissues in ct_cases:
    assert np.array_equal(hu, np.rint(hu)) and hu.min() >= -1024 and hu.max() <= 3071
    mean = lambda name: float(hu[_core(tissues, name)].mean())  # noqa: E731
    assert mean("air") == pytest.approx(-1000, abs=10)
    assert -900 < mean("lung") < -750
    # The fat rim may be too thin to have a core at this resolution: its median still reads as fat.
    assert -110 <= info["tissue_values"]["fat"] <= -85 and -250 < np.median(hu[tissues == CODE["fat"]]) < -60
    assert 20 < mean("mediastinum") < 60
    assert 600 <= info["tissue_values"]["cortical_bone"] and hu[tissues == CODE["cortical_bone"]].mean() > 250
    lung = np.isin(tissues, [CODE["lung"]])
    mediastinum = tissues == CODE["mediastinum"]
    for tumor, mask in zip(info["tumors"], _tumor_masks(label, info)):
      shell = _shell(mask)
      if tumor["location"] == "lung":
        interior = ndimage.binary_erosion(mask, structure=IN_PLANE_3X3)
        surrounding = shell & lung
        assert surrounding.sum() > 20
        assert hu[interior].mean() - hu[surrounding].mean() > 600
        assert 30 <= tumor["hu"] <= 50
      else:
        # Compare away from the lung interface, where the PSF blur (sigma 0.5 voxel) mixes in lung.
        away_from_lung = ~ndimage.binary_dilation(lung | (tissues == CODE["lung_vessel"]), structure=IN_PLANE_3X3)
        interior = mask & away_from_lung
        adjacent = shell & mediastinum & away_from_lung
        assert interior.sum() > 3 and adjacent.sum() > 3
        difference = hu[interior].mean() - hu[adjacent].mean()
        # Standard error of the difference, x1.5 for the in-plane correlation of CT noise: small tumors have few
        # interior voxels.
        standard_error = 1.5 * np.sqrt(hu[interior].var() / interior.sum() + hu[adjacent].var() / adjacent.sum())
        assert abs(difference) < 20 + 2 * standard_error
        assert abs(difference - tumor["contrast"]) < 3 + 4 * standard_error
        assert abs(tumor["contrast"]) <= 15
        # It abuts the mediastinum and bulges into the lung.
        assert (shell & mediastinum).any() and (shell & lung).any()


def test_mri_tissue_values_and_tumor_contrast(mri_cases):
  for intensity, label, info, tissues in mri_cases:
    assert intensity.min() >= 0 and intensity.max() < 4000
    assert np.array_equal(intensity, np.rint(intensity))
    mean = lambda name: float(intensity[_core(tissues, name)].mean())  # noqa: E731
    assert mean("lung") < 0.3 * mean("mediastinum")
    assert np.median(intensity[tissues == CODE["fat"]]) > 1.5 * mean("mediastinum")
    values = info["tissue_values"]
    assert values["cortical_bone"] < 0.2 * values["mediastinum"] and values["csf"] > values["fat"]
    assert values["blood"] < 0.5 * values["mediastinum"]  # T2 "black blood"
    mediastinum = tissues == CODE["mediastinum"]
    for tumor, mask in zip(info["tumors"], _tumor_masks(label, info)):
      adjacent = _shell(mask, in_plane=6) & mediastinum
      if tumor["location"] == "mediastinal":
        assert adjacent.sum() > 5
      reference = intensity[adjacent].mean() if adjacent.sum() > 5 else mean("mediastinum")
      assert intensity[mask].mean() / reference > 1.5


def test_mri_has_a_bias_field_and_rician_background(mri_cases):
  intensity, _, info, tissues = mri_cases[0]
  fat = intensity[_core(tissues, "fat")]
  # A +-20-30 % bias field spreads one tissue's intensity well beyond its noise.
  assert np.percentile(fat, 95) / np.percentile(fat, 5) > 1.2
  background = intensity[_core(tissues, "air", iterations=3)]
  sigma = info["noise"]["sigma"]
  # Rayleigh background: mean sigma * sqrt(pi / 2), never negative.
  assert background.mean() == pytest.approx(sigma * np.sqrt(np.pi / 2), rel=0.15)


# ------------------------------------------------------------------------------------------------ geometry


@pytest.mark.parametrize("axcodes", phantoms.ORIENTATIONS)
def test_orient_for_storage_round_trips_through_load_volume(axcodes, tmp_path):
  data = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7)
  affine = np.diag([0.8, 0.8, 2.5, 1.0])
  affine[:3, 3] = (-20.0, 31.5, -140.0)
  stored, stored_affine = phantoms.orient_for_storage(data, affine, axcodes)
  assert nib.aff2axcodes(stored_affine) == tuple(axcodes)
  assert not np.array_equal(stored, data) or stored.shape != data.shape
  path = nifti_io.save_nifti(tmp_path / "x.nii.gz", stored, stored_affine, dtype=np.int16)
  loaded = nifti_io.load_volume(path)
  np.testing.assert_array_equal(loaded.data, data)
  np.testing.assert_allclose(loaded.affine, affine, atol=1e-4)


def test_dataset_is_readable_and_matches_the_generator(dataset):
  out, summary = dataset
  ct = dataset_index.load_dataset(out / "CT", require_labels=True)
  mri = dataset_index.load_dataset(out / "MRI")
  assert ct.modality == "CT" and mri.modality == "MRI"
  assert [c.case_id for c in ct.cases] == ["ct_000", "ct_001", "ct_002"]
  assert [c.case_id for c in mri.cases] == ["mr_000", "mr_001"]
  assert mri.labelled and ct.labels == {"background": 0, "tumor": 1}
  with open(out / "phantoms.json") as f:
    assert json.load(f) == summary
  assert summary["seed"] == DATASET_SEED and summary["version"] == phantoms.GENERATOR_VERSION

  for modality, index in ((ct, "CT"), (mri, "MRI")):
    for case, info in zip(modality.cases, summary["cases"][index]):
      image, label = nifti_io.load_case(case.image, case.label, allowed_labels=modality.labels.values())
      expected_image, expected_label, expected_info = phantoms.make_case(
          index, info["index"], seed=DATASET_SEED, shape=DATASET_SHAPE)
      assert expected_info == {k: v for k, v in info.items() if k not in ("image", "label")}
      np.testing.assert_array_equal(image.data, expected_image)
      np.testing.assert_array_equal(label.data, expected_label)
      # Spacing: anisotropic, and read back as drawn.
      np.testing.assert_allclose(image.spacing, info["spacing_mm"], rtol=1e-5)
      assert image.spacing[2] > 1.5 * image.spacing[0]
      # Stored in a DICOM-like orientation, not RAS; canonical reorientation restores the RAS grid.
      stored_codes = nib.aff2axcodes(image.original_affine)
      assert stored_codes != ("R", "A", "S") and "".join(stored_codes) == info["orientation"]
      np.testing.assert_allclose(image.original_affine, info["affine_stored"], atol=1e-4)
      np.testing.assert_allclose(image.affine, info["affine_ras"], atol=1e-4)
      # Tumors, located in world mm, land on labelled voxels of the loaded (RAS) grid.
      world_to_voxel = np.linalg.inv(label.affine)
      for tumor in info["tumors"]:
        voxel = world_to_voxel @ np.append(tumor["centre_world_mm"], 1.0)
        assert label.data[tuple(np.rint(voxel[:3]).astype(int))] == 1
      if index == "CT":
        # The label still lies on soft tissue after reorientation (a flipped label would sit on lung or air).
        assert -350 < image.data[label.data == 1].mean() < 150
      else:
        assert image.data[label.data == 1].mean() > 2 * np.median(image.data[image.data > 100])


def test_ct_and_mri_sets_are_unpaired(dataset):
  out, summary = dataset
  ct_infos, mri_infos = summary["cases"]["CT"], summary["cases"]["MRI"]
  assert not {c["case_id"] for c in ct_infos} & {c["case_id"] for c in mri_infos}
  for ct_info, mri_info in zip(ct_infos, mri_infos):
    assert ct_info["anatomy"] != mri_info["anatomy"]
    assert ct_info["tumors"][0]["centre_mm"] != mri_info["tumors"][0]["centre_mm"]
  with open(out / "MRI" / "dataset.json") as f:
    assert json.load(f)["phantom"]["unpaired"] is True
  with open(out / "CT" / "dataset.json") as f:
    assert json.load(f)["phantom"]["unpaired"] is False


# ------------------------------------------------------------------------------------------------ determinism


def _stored_arrays(root):
  arrays = {}
  for folder in ("imagesTr", "labelsTr"):
    for name in sorted(os.listdir(root / folder)):
      arrays[f"{folder}/{name}"] = np.asanyarray(nib.load(root / folder / name).dataobj).tobytes()
  return arrays


def test_same_seed_same_bytes_and_case_k_independent_of_count(dataset, tmp_path):
  out, summary = dataset
  again = phantoms.write_phantom_dataset(tmp_path / "again", num_ct=2, num_mri=0, seed=DATASET_SEED,
                                         shape=DATASET_SHAPE)
  assert again["cases"]["CT"] == summary["cases"]["CT"][:2]
  first, second = _stored_arrays(out / "CT"), _stored_arrays(tmp_path / "again" / "CT")
  assert set(second) < set(first)
  for name, data in second.items():
    assert data == first[name], name
  assert not (tmp_path / "again" / "MRI").exists()

  one = phantoms.make_case("CT", 4, seed=DATASET_SEED, shape=DATASET_SHAPE)
  two = phantoms.make_case("CT", 4, seed=DATASET_SEED, shape=DATASET_SHAPE)
  other_seed = phantoms.make_case("CT", 4, seed=DATASET_SEED + 1, shape=DATASET_SHAPE)
  assert one[0].tobytes() == two[0].tobytes() and one[1].tobytes() == two[1].tobytes() and one[2] == two[2]
  assert one[0].shape != other_seed[0].shape or not np.array_equal(one[0], other_seed[0])


# ------------------------------------------------------------------------------------------------ CLI, errors


def test_cli_refuses_a_non_empty_folder_then_overwrites_only_its_own_files(tmp_path, capsys):
  out = tmp_path / "out"
  out.mkdir()
  (out / "notes.txt").write_text("keep me")
  small = ["--size", "48", "--slices", "12", "--num-mri", "1"]
  with pytest.raises(SystemExit) as excinfo:
    phantoms.main(["--out", str(out), "--num-ct", "2", *small])
  assert excinfo.value.code == 2
  assert "--overwrite" in capsys.readouterr().err
  assert sorted(os.listdir(out)) == ["notes.txt"]

  assert phantoms.main(["--out", str(out), "--num-ct", "2", "--overwrite", *small]) == 0
  printed = capsys.readouterr().out
  assert "CT 2/2 ct_001" in printed and "MRI 1/1 mr_000" in printed and "Wrote 2 CT + 1 MRI" in printed
  assert phantoms.main(["--out", str(out), "--num-ct", "1", "--overwrite", "--quiet", *small]) == 0
  assert (out / "notes.txt").read_text() == "keep me"
  assert sorted(os.listdir(out / "CT" / "imagesTr")) == ["ct_000_0000.nii.gz"]  # stale cases removed
  assert len(dataset_index.load_dataset(out / "CT", require_labels=True)) == 1


def test_bad_arguments_give_clear_errors(tmp_path, capsys):
  with pytest.raises(SystemExit):
    phantoms.main(["--out", str(tmp_path / "a"), "--size", "16"])
  assert "--size" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    phantoms.main(["--out", str(tmp_path / "b"), "--num-ct", "0", "--num-mri", "0"])
  with pytest.raises(ValueError, match="too small"):
    phantoms.make_ct_phantom(np.random.default_rng(0), (16, 16, 4), (1.0, 1.0, 1.0))
  with pytest.raises(ValueError, match="locations"):
    phantoms.make_mri_phantom(np.random.default_rng(0), GEN_SHAPE, GEN_SPACING, tumor_locations=["liver"])
  with pytest.raises(ValueError, match="spacing"):
    phantoms.make_ct_phantom(np.random.default_rng(0), GEN_SHAPE, (1.0, 0.0, 1.0))
