"""`cmedl-data examples`: NRRD -> NIfTI geometry, the sdist lookup/download/cache/checksum path, and the errors.

Everything runs offline on small NRRDs written with pynrrd and a fake sdist built here; only
``test_real_sdist_from_pypi`` downloads the real pyradiomics-3.0.1.tar.gz (skipped without network).
"""

import hashlib
import io
import json
import os
import pathlib
import socket
import tarfile

import nibabel as nib
import nrrd
import numpy as np
import pytest

from cmedl_jax.data import cli, dataset_index, examples, nifti_io
from cmedl_jax.errors import DataError

TOP = "pyradiomics-3.0.1"


def _rotation(axis, degrees):
  c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
  i, j = [a for a in range(3) if a != axis]
  r = np.eye(3)
  r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
  return r


# (space, space directions (row a = world step of index axis a), origin): anisotropic in every case, plus a
# flipped axis and an oblique (rotated) grid.
GEOMETRIES = {
    "lps_axis_aligned": ("left-posterior-superior", np.diag([0.7, 0.9, 2.5]), [-120.0, -80.0, -300.0]),
    "lps_flipped_z_x": ("left-posterior-superior", np.diag([-0.8, 0.6, -3.0]), [15.0, -40.0, 20.0]),
    "lps_oblique": ("left-posterior-superior",
                    (_rotation(2, 20.0) @ _rotation(0, -10.0) @ np.diag([0.75, 1.1, 4.0])).T, [-30.0, 12.5, -7.0]),
    "ras_oblique_flipped": ("right-anterior-superior",
                            (_rotation(1, 15.0) @ np.diag([1.2, -0.5, 2.0])).T, [3.0, 4.0, 5.0]),
    "las": ("left-anterior-superior", np.diag([0.5, 0.5, 1.5]), [60.0, 70.0, -80.0]),
}
RAS_SIGNS = {"left-posterior-superior": np.array([-1.0, -1.0, 1.0]),
             "right-anterior-superior": np.array([1.0, 1.0, 1.0]),
             "left-anterior-superior": np.array([-1.0, 1.0, 1.0])}
CHOSEN_VOXELS = [(0, 0, 0), (3, 1, 2), (6, 4, 1), (2, 5, 4)]


def _world_ras(space, directions, origin, index):
  """World position of a voxel computed from the NRRD definition, independently of the module under test."""
  lps_or_other = np.asarray(origin, float) + sum(index[a] * np.asarray(directions, float)[a] for a in range(3))
  return lps_or_other * RAS_SIGNS[space]


def _write_nrrd(path, data, space="left-posterior-superior", directions=np.diag([0.8, 0.8, 2.0]),
                origin=(0.0, 0.0, 0.0)):
  header = {"space": space, "space directions": np.asarray(directions, float),
            "space origin": np.asarray(origin, float), "kinds": ["domain"] * 3, "encoding": "gzip"}
  nrrd.write(str(path), data, header)
  return path


def _ct_and_label(shape=(8, 7, 5), tumor=((2, 5), (2, 5), (1, 4)), extra_label=None):
  """An HU-like CT (air, body at 40 HU) and a label with a box of value 1 (plus optional other values)."""
  image = np.full(shape, -1000, np.int16)
  image[1:-1, 1:-1, :] = 40
  label = np.zeros(shape, np.int16)
  label[tumor[0][0]:tumor[0][1], tumor[1][0]:tumor[1][1], tumor[2][0]:tumor[2][1]] = 1
  image[label == 1] = 60
  if extra_label is not None:
    value, index = extra_label
    label[index] = value
  return image, label


def _fake_sdist(path, cases=("lung1", "lung2"), *, drop=(), top=TOP, extra_label=None):
  """A small .tar.gz laid out like the pyradiomics sdist (data/lungN_image.nrrd + data/lungN_label.nrrd)."""
  path = pathlib.Path(path)
  work = path.parent / (path.name + ".src")
  work.mkdir(parents=True, exist_ok=True)
  with tarfile.open(path, "w:gz") as tar:
    for n, case in enumerate(cases):
      image, label = _ct_and_label(shape=(8 + n, 7, 5), extra_label=extra_label)
      geometry = dict(directions=np.diag([0.6 + 0.1 * n, 0.6 + 0.1 * n, 5.0]), origin=(-146.0, -325.0, -777.5))
      for kind, data in (("image", image), ("label", label)):
        member = f"{top}/data/{case}_{kind}.nrrd"
        if member in drop:
          continue
        _write_nrrd(work / f"{case}_{kind}.nrrd", data, **geometry)
        tar.add(work / f"{case}_{kind}.nrrd", arcname=member)
    readme = b"test cases\n"
    info = tarfile.TarInfo(f"{top}/data/README.md")
    info.size = len(readme)
    tar.addfile(info, io.BytesIO(readme))
  return str(path)


def _sha256(path):
  return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Geometry


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_nrrd_affine_matches_world_coordinates(tmp_path, name):
  space, directions, origin = GEOMETRIES[name]
  data = np.arange(7 * 6 * 5, dtype=np.int16).reshape(7, 6, 5)
  path = _write_nrrd(tmp_path / "x.nrrd", data, space, directions, origin)
  read, affine, _ = examples.read_nrrd(path)
  np.testing.assert_array_equal(read, data)
  for index in CHOSEN_VOXELS:
    np.testing.assert_allclose((affine @ [*index, 1.0])[:3], _world_ras(space, directions, origin, index),
                               atol=1e-9)
  np.testing.assert_allclose(np.sqrt((affine[:3, :3] ** 2).sum(0)), np.linalg.norm(directions, axis=1))


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_converted_nifti_puts_voxels_at_the_same_world_position(tmp_path, name):
  """Voxel values tagged in the NRRD are found, after conversion and canonical reorientation, at the world
  position the NRRD header gives them."""
  space, directions, origin = GEOMETRIES[name]
  image, label = _ct_and_label(shape=(7, 6, 5))
  tags = {index: 1000 + 100 * k for k, index in enumerate(CHOSEN_VOXELS)}
  for index, value in tags.items():
    image[index] = value
  _write_nrrd(tmp_path / "i.nrrd", image, space, directions, origin)
  _write_nrrd(tmp_path / "l.nrrd", label, space, directions, origin)
  case = examples.convert_case(tmp_path / "i.nrrd", tmp_path / "l.nrrd", tmp_path / "ds", "c1")

  stored = nib.load(case.image_path)  # as written: the NRRD's voxel order
  assert stored.get_data_dtype() == np.int16
  canonical = nifti_io.load_volume(case.image_path)  # reoriented to RAS+
  for index, value in tags.items():
    expected = _world_ras(space, directions, origin, index)
    np.testing.assert_allclose(nib.affines.apply_affine(stored.affine, index), expected, atol=1e-3)
    found = np.argwhere(canonical.data == value)
    assert len(found) == 1
    np.testing.assert_allclose(nib.affines.apply_affine(canonical.affine, found[0]), expected, atol=1e-3)
  np.testing.assert_allclose(sorted(case.spacing), sorted(np.linalg.norm(directions, axis=1)), rtol=1e-6)
  ct, lab = nifti_io.load_case(case.image_path, case.label_path, allowed_labels={0, 1})
  assert int(lab.data.sum()) == int((label == 1).sum()) == case.tumor_voxels
  assert case.tumor_ml == pytest.approx(case.tumor_voxels * abs(np.linalg.det(directions)) / 1000.0)


def test_lps_axis_aligned_affine_is_the_expected_matrix():
  header = {"dimension": 3, "space": "left-posterior-superior",
            "space directions": np.diag([0.5703125, 0.5703125, 5.0]), "space origin": np.array([-146.0, -325.0,
                                                                                                    -777.5])}
  expected = np.array([[-0.5703125, 0, 0, 146.0], [0, -0.5703125, 0, 325.0], [0, 0, 5.0, -777.5], [0, 0, 0, 1]])
  np.testing.assert_allclose(examples.nrrd_affine(header), expected)


@pytest.mark.parametrize("header, message", [
    ({"dimension": 3, "space directions": np.eye(3)}, "no 'space' field"),
    ({"dimension": 3, "space": "scanner-xyz", "space directions": np.eye(3)}, "space 'scanner-xyz'"),
    ({"dimension": 3, "space": "LPS"}, "no 'space directions'"),
    ({"dimension": 3, "space": "LPS", "space directions": np.diag([1.0, 0.0, 1.0])}, "singular"),
    ({"dimension": 2, "space": "LPS", "space directions": np.eye(2)}, "2D NRRD"),
])
def test_unusable_nrrd_geometry_is_an_error(header, message):
  with pytest.raises(DataError, match=message) as e:
    examples.nrrd_affine(header, "some/file.nrrd")
  assert e.value.path == "some/file.nrrd"


# ---------------------------------------------------------------------------------------------------------------
# Labels and intensities


def test_binarize_label_keeps_value_1_only_and_reports_the_others():
  label = np.array([[0, 1, 2], [1, 3, 3], [0, 0, 1]], np.int16)
  mask, others = examples.binarize_label(label)
  assert mask.dtype == np.uint8
  np.testing.assert_array_equal(mask, [[0, 1, 0], [1, 0, 0], [0, 0, 1]])
  assert others == {2: 1, 3: 2}


def test_other_label_values_become_background_and_are_printed(tmp_path, capsys):
  tar = _fake_sdist(tmp_path / "s.tar.gz", cases=("lung1",), extra_label=(2, (0, 0, 0)))
  cases = examples.convert_sdist(tar, tmp_path / "ds")
  assert cases[0].other_label_values == {2: 1}
  assert "other label values set to background: {2: 1}" in capsys.readouterr().out
  label = nifti_io.load_volume(cases[0].label_path, is_label=True)
  assert set(np.unique(label.data).tolist()) == {0, 1}


def test_label_without_tumor_value_names_the_file(tmp_path):
  image, label = _ct_and_label()
  label[label == 1] = 2
  _write_nrrd(tmp_path / "i.nrrd", image)
  _write_nrrd(tmp_path / "l.nrrd", label)
  with pytest.raises(DataError, match="no voxel with the tumor label 1") as e:
    examples.convert_case(tmp_path / "i.nrrd", tmp_path / "l.nrrd", tmp_path / "ds", "c", label_name="L")
  assert e.value.path == "L"


def test_label_on_another_grid_names_both_files(tmp_path):
  image, label = _ct_and_label()
  _write_nrrd(tmp_path / "i.nrrd", image, origin=(0.0, 0.0, 0.0))
  _write_nrrd(tmp_path / "l.nrrd", label, origin=(0.0, 0.0, 2.0))  # shifted by one slice
  with pytest.raises(DataError, match="grid differs") as e:
    examples.convert_case(tmp_path / "i.nrrd", tmp_path / "l.nrrd", tmp_path / "ds", "c")
  assert e.value.path == str(tmp_path / "l.nrrd") and str(tmp_path / "i.nrrd") in str(e.value)


def test_shifted_intensities_are_refused(tmp_path):
  image, label = _ct_and_label()
  _write_nrrd(tmp_path / "i.nrrd", (image.astype(np.int32) + 1024).astype(np.uint16))  # unsigned HU + 1024
  _write_nrrd(tmp_path / "l.nrrd", label)
  with pytest.raises(DataError, match="Hounsfield") as e:
    examples.convert_case(tmp_path / "i.nrrd", tmp_path / "l.nrrd", tmp_path / "ds", "c")
  assert e.value.path == str(tmp_path / "i.nrrd")


# ---------------------------------------------------------------------------------------------------------------
# The command, end to end on a fake sdist


def test_examples_command_on_a_local_sdist(tmp_path, capsys):
  tar = _fake_sdist(tmp_path / "pyradiomics-3.0.1.tar.gz")
  out = tmp_path / "examples"
  rc = cli.main(["examples", "--out", str(out), "--sdist", tar, "--sha256", _sha256(tar),
                 "--cache", str(tmp_path / "cache")])
  printed = capsys.readouterr().out
  assert rc == 0, printed
  assert "lung1: shape (8, 7, 5), spacing 0.6x0.6x5 mm" in printed
  assert "lung2: shape (9, 7, 5)" in printed and "tumor 27 voxels" in printed
  root = out / "CT"
  assert f"wrote 2 case(s) to {root}" in printed
  index = dataset_index.load_dataset(root, require_labels=True)
  assert [c.case_id for c in index.cases] == ["lung1", "lung2"] and index.modality == "CT"
  assert cli.check(root, require_labels=True) == []
  meta = json.loads((root / "dataset.json").read_text())
  assert meta["source"]["members"]["lung1"] == [f"{TOP}/data/lung1_image.nrrd", f"{TOP}/data/lung1_label.nrrd"]
  ct, label = nifti_io.load_case(index.cases[0].image, index.cases[0].label, allowed_labels={0, 1})
  assert ct.data.min() == -1000 and ct.data.max() == 60  # HU kept, not rescaled
  assert int(label.data.sum()) == 27
  np.testing.assert_allclose(ct.spacing, (0.6, 0.6, 5.0), rtol=1e-6)
  assert not (tmp_path / "cache").exists()  # a local file is used in place


def test_local_sdist_is_checked_against_the_known_digest(tmp_path, capsys):
  tar = _fake_sdist(tmp_path / "pyradiomics-3.0.1.tar.gz")
  rc = cli.main(["examples", "--out", str(tmp_path / "o"), "--sdist", tar])
  err = capsys.readouterr().err
  assert rc == 1
  assert f"ERROR {tar}: sha256 mismatch: expected {examples.SDIST_SHA256}" in err
  assert not (tmp_path / "o").exists()


def test_missing_label_member_names_the_tarball_and_the_member(tmp_path):
  tar = _fake_sdist(tmp_path / "s.tar.gz", drop=(f"{TOP}/data/lung2_label.nrrd",))
  with pytest.raises(DataError, match=f"has {TOP}/data/lung2_image.nrrd but not its label "
                                      f"{TOP}/data/lung2_label.nrrd") as e:
    examples.convert_sdist(tar, tmp_path / "ds")
  assert e.value.path == tar


def test_tarball_without_lung_cases_is_an_error(tmp_path, capsys):
  tar = _fake_sdist(tmp_path / "s.tar.gz", cases=("brain1",))
  with pytest.raises(DataError, match="contains no lung case") as e:
    examples.convert_sdist(tar, tmp_path / "ds")
  assert e.value.path == tar
  rc = cli.main(["examples", "--out", str(tmp_path / "o"), "--sdist", tar, "--sha256", "any"])
  assert rc == 1 and f"ERROR {tar}: contains no lung case" in capsys.readouterr().err


def test_requested_case_that_is_missing_is_an_error(tmp_path):
  tar = _fake_sdist(tmp_path / "s.tar.gz", cases=("lung1",))
  with pytest.raises(DataError, match="has no case lung2.*found: lung1") as e:
    examples.convert_sdist(tar, tmp_path / "ds", cases=["lung1", "lung2"])
  assert e.value.path == tar


def test_not_a_tarball_is_an_error(tmp_path):
  bad = tmp_path / "pyradiomics-3.0.1.tar.gz"
  bad.write_bytes(b"\x1f\x8b not really gzip")
  with pytest.raises(DataError, match="cannot read as a tar archive") as e:
    examples.convert_sdist(str(bad), tmp_path / "ds")
  assert e.value.path == str(bad)


# ---------------------------------------------------------------------------------------------------------------
# PyPI lookup, download, cache and checksum (file:// URLs: offline)


def _fake_pypi(tmp_path, tar, sha256):
  """A per-project PyPI JSON document (the form used when the per-release one is unavailable)."""
  entry = {"filename": "pyradiomics-3.0.1.tar.gz", "packagetype": "sdist", "url": pathlib.Path(tar).as_uri(),
           "digests": {"sha256": sha256}, "size": os.path.getsize(tar)}
  doc = {"info": {"version": "3.1.0"}, "urls": [], "releases": {"3.0.1": [entry]}}
  path = tmp_path / "pypi.json"
  path.write_text(json.dumps(doc))
  missing = (tmp_path / "no-such-release.json").as_uri()  # first URL fails like a 404: the next one is tried
  return (missing, path.as_uri())


def test_lookup_download_and_cache(tmp_path, capsys):
  tar = _fake_sdist(tmp_path / "src" / "pyradiomics-3.0.1.tar.gz")
  urls = _fake_pypi(tmp_path, tar, _sha256(tar))
  cache = tmp_path / "cache"
  root, cases = examples.prepare_examples(tmp_path / "out", cache=str(cache), json_urls=urls)
  printed = capsys.readouterr().out
  assert "downloading pyradiomics-3.0.1.tar.gz:" in printed and "(100%)" in printed
  assert "warning: PyPI lists sha256" in printed  # the fake digest is not the real file's
  assert (cache / "pyradiomics-3.0.1.tar.gz").read_bytes() == pathlib.Path(tar).read_bytes()
  assert not list(cache.glob("*.part"))
  assert [c.case_id for c in cases] == ["lung1", "lung2"] and cli.check(root, require_labels=True) == []
  # Second time: the cached file is used, nothing is downloaded.
  os.remove(tar)
  examples.prepare_examples(tmp_path / "out2", cache=str(cache), json_urls=urls)
  assert f"using cached {cache / 'pyradiomics-3.0.1.tar.gz'}" in capsys.readouterr().out


def test_download_with_wrong_checksum_names_the_file_and_is_not_cached(tmp_path):
  tar = _fake_sdist(tmp_path / "src" / "pyradiomics-3.0.1.tar.gz")
  urls = _fake_pypi(tmp_path, tar, "0" * 64)
  cache = tmp_path / "cache"
  with pytest.raises(DataError, match="sha256 mismatch: expected 0{64}") as e:
    examples.fetch_sdist(cache=str(cache), json_urls=urls, progress_out=io.StringIO())
  assert e.value.path == str(cache / "pyradiomics-3.0.1.tar.gz.bad")
  assert not (cache / "pyradiomics-3.0.1.tar.gz").exists()  # a bad download never becomes the cached file


def test_lookup_without_the_file_is_an_error(tmp_path):
  path = tmp_path / "pypi.json"
  path.write_text(json.dumps({"info": {"version": "3.0.1"}, "urls": [], "releases": {}}))
  with pytest.raises(DataError, match="lists no pyradiomics-3.0.1.tar.gz.*--sdist PATH"):
    examples.find_sdist((path.as_uri(),))


def test_unreachable_url_is_an_error_naming_it(tmp_path):
  url = (tmp_path / "absent.tar.gz").as_uri()
  with pytest.raises(DataError, match="cannot download") as e:
    examples.fetch_sdist(url, cache=str(tmp_path / "cache"), sha256="any", progress_out=io.StringIO())
  assert e.value.path == url


# ---------------------------------------------------------------------------------------------------------------
# The real file (network)


def _pypi_reachable():
  try:
    socket.create_connection(("files.pythonhosted.org", 443), timeout=3).close()
    return True
  except OSError:
    return False


@pytest.mark.slow
@pytest.mark.skipif(not _pypi_reachable(), reason="needs network access to PyPI")
def test_real_sdist_from_pypi(tmp_path):
  """Downloads pyradiomics-3.0.1.tar.gz (33 MB, checked against PyPI's sha256) and converts lung1."""
  tar = examples.fetch_sdist(cache=str(tmp_path / "cache"), progress_out=io.StringIO())
  assert examples.sha256_of(tar) == examples.SDIST_SHA256
  assert list(examples.list_lung_cases(tar)) == ["lung1", "lung2"]
  (case,) = examples.convert_sdist(tar, tmp_path / "CT", cases=["lung1"], progress_out=io.StringIO())
  assert case.shape == (512, 512, 48) and case.tumor_voxels == 837
  np.testing.assert_allclose(case.spacing, (0.5703125, 0.5703125, 5.0))
  assert case.hu_range == (-1024.0, 3071.0) and case.other_label_values == {}
