"""The preprocessed store (cmedl_jax.data.store): values, freshness, settings, concurrency, geometry, errors."""

import os
import pickle
import subprocess
import sys
import time

import numpy as np
import pytest

from cmedl_jax.data import dataset_index, nifti_io, preprocess, resample, store
from cmedl_jax.errors import DataError


def _write_dataset(root, n=3, shape=(40, 36, 5), spacing=0.8, seed=0):
  rng = np.random.default_rng(seed)
  affine = np.diag([-spacing, -spacing, 2.5, 1.0])
  ids = [f"case{i}" for i in range(n)]
  for i, case in enumerate(ids):
    hu = rng.uniform(-1000, 400, size=shape).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[5 + i:12 + i, 6:14, 1:3] = 1
    nifti_io.save_nifti(dataset_index.image_path(root, case), hu, affine)
    nifti_io.save_nifti(dataset_index.label_path(root, case), label, affine)
  dataset_index.write_dataset_json(root, ids, modality="CT")
  return ids


def _prepare(root, cache, settings=store.PreprocessSettings("CT")):
  return store.prepare(root, settings, cache_dir=cache, labels="required", progress=False)


def test_native_spacing_store_equals_reading_and_normalising_the_files(tmp_path):
  ids = _write_dataset(tmp_path / "CT")
  s = _prepare(tmp_path / "CT", tmp_path / "cache")
  assert s.case_ids == ids and s.num_slices == 15
  for c, case in enumerate(ids):
    image, label = nifti_io.load_case(dataset_index.image_path(tmp_path / "CT", case),
                                      dataset_index.label_path(tmp_path / "CT", case))
    np.testing.assert_array_equal(s.image(c), preprocess.axial_slices(preprocess.normalize_ct(image.data)))
    np.testing.assert_array_equal(s.label(c), preprocess.axial_slices(label.data))
    assert isinstance(s.image(c).base, np.memmap) and not s.image(c).flags.writeable  # file-backed, no copy
    # Class locations are exactly the label's voxels (fewer than max_locations).
    np.testing.assert_array_equal(s.locations(c, 1), np.argwhere(np.asarray(s.label(c)) == 1))
  assert s.slice_at(0) == (0, 0) and s.slice_at(5) == (1, 0) and s.slice_at(14) == (2, 4)
  assert s.entry(0)["source"]["image"]["sha256"]
  # A pickled store (what grain workers receive) is metadata, not volumes.
  assert len(pickle.dumps(s)) < 20_000


def test_second_open_reads_nothing_and_changed_files_are_redone(tmp_path):
  root, cache = tmp_path / "CT", tmp_path / "cache"
  ids = _write_dataset(root)
  first = _prepare(root, cache)
  old_file = os.path.join(first.folder, "cases", first.entry(1)["image"])
  mtimes = {n: os.stat(os.path.join(first.folder, "cases", n)).st_mtime_ns
            for n in os.listdir(os.path.join(first.folder, "cases"))}
  again = _prepare(root, cache)
  assert {n: os.stat(os.path.join(again.folder, "cases", n)).st_mtime_ns for n in mtimes} == mtimes
  # Rewrite case1 with other voxels: only it is redone, under a new name, and the old file goes.
  time.sleep(0.01)
  hu = np.full((40, 36, 5), 100.0, np.float32)
  nifti_io.save_nifti(dataset_index.image_path(root, ids[1]), hu, np.diag([-0.8, -0.8, 2.5, 1.0]))
  redone = _prepare(root, cache)
  np.testing.assert_array_equal(redone.image(1), preprocess.normalize_ct(np.full((5, 40, 36), 100.0)))
  assert not os.path.exists(old_file)
  assert redone.entry(0)["image"] == first.entry(0)["image"]
  assert os.stat(os.path.join(redone.folder, "cases", redone.entry(0)["image"])).st_mtime_ns == \
      mtimes[first.entry(0)["image"]]


def test_other_settings_use_another_folder(tmp_path):
  root, cache = tmp_path / "CT", tmp_path / "cache"
  _write_dataset(root)
  a = _prepare(root, cache)
  b = _prepare(root, cache, store.PreprocessSettings("CT", ct_window=(-500.0, 500.0)))
  c = _prepare(root, cache, store.PreprocessSettings("CT", target_spacing_mm=(1.6, 1.6)))
  assert len({a.folder, b.folder, c.folder}) == 3
  assert not np.array_equal(a.image(0), b.image(0))


def test_target_spacing_resamples_images_labels_and_geometry(tmp_path):
  root = tmp_path / "CT"
  _write_dataset(root, n=1, shape=(40, 36, 4))
  s = _prepare(root, tmp_path / "cache", store.PreprocessSettings("CT", target_spacing_mm=(1.6, 1.6)))
  assert tuple(s.shapes[0]) == (4, 20, 18)
  np.testing.assert_allclose(s.spacings[0], (1.6, 1.6, 2.5))
  image, label = nifti_io.load_case(dataset_index.image_path(root, "case0"), dataset_index.label_path(root, "case0"))
  expected = resample.resample_image(image.data, (20, 18))
  np.testing.assert_allclose(s.image(0), preprocess.axial_slices(preprocess.normalize_ct(expected)), atol=1e-6)
  np.testing.assert_array_equal(s.label(0), preprocess.axial_slices(resample.resample_labels(label.data, (20, 18))))
  np.testing.assert_allclose(s.affine(0), resample.resampled_affine(image.affine, (40, 36), (20, 18)))
  assert s.entry(0)["source_shape"] == [40, 36, 4]


def test_cache_inside_the_dataset_is_refused(tmp_path):
  _write_dataset(tmp_path / "CT", n=1)
  with pytest.raises(DataError, match="must not lie inside the dataset folder"):
    _prepare(tmp_path / "CT", tmp_path / "CT" / "cache")


def test_bad_case_names_the_file_and_earlier_cases_stay_usable(tmp_path):
  root, cache = tmp_path / "CT", tmp_path / "cache"
  ids = _write_dataset(root)
  bad = dataset_index.label_path(root, ids[2])
  nifti_io.save_nifti(bad, np.full((40, 36, 5), 7, np.uint8), np.diag([-0.8, -0.8, 2.5, 1.0]))
  with pytest.raises(DataError, match="unexpected value") as e:
    _prepare(root, cache)
  assert bad in str(e.value)
  # Nothing half-written: every file in the cache is a complete .npy, no temporary left behind.
  folder = store.cache_folder(root, store.PreprocessSettings("CT"), cache)
  names = os.listdir(os.path.join(folder, "cases"))
  assert names and all(n.endswith(".npy") for n in names)
  for n in names:
    np.load(os.path.join(folder, "cases", n))


_CONCURRENT = """
import sys
from cmedl_jax.data import store
s = store.prepare(sys.argv[1], store.PreprocessSettings("CT"), cache_dir=sys.argv[2], labels="required",
                  progress=False)
print(s.folder, float(sum(s.image(c).sum() for c in range(len(s)))))
"""


def test_concurrent_processes_agree_and_do_not_corrupt_the_cache(tmp_path):
  root, cache = tmp_path / "CT", tmp_path / "cache"
  _write_dataset(root, n=6)
  procs = [subprocess.Popen([sys.executable, "-c", _CONCURRENT, str(root), str(cache)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for _ in range(3)]
  outputs = [p.communicate(timeout=300) for p in procs]
  assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outputs]
  assert len({o[0] for o in outputs}) == 1
  reference = _prepare(root, cache)
  expected = float(sum(reference.image(c).sum() for c in range(len(reference))))
  assert outputs[0][0].split()[1] == repr(expected)


def test_preprocess_command_prepares_what_training_then_finds_fresh(tmp_path, capsys):
  from cmedl_jax.data import cli
  _write_dataset(tmp_path / "CT", n=2)
  rng = np.random.default_rng(1)
  for case in ("mr0", "mr1"):
    nifti_io.save_nifti(tmp_path / "MRI" / f"{case}.nii.gz", rng.gamma(2, 100, size=(30, 30, 4)),
                        np.diag([0.8, 0.8, 2.5, 1.0]))
  cache = tmp_path / "cache"
  assert cli.main(["preprocess", "--ct", str(tmp_path / "CT"), "--mri", str(tmp_path / "MRI"), "--cache-dir",
                   str(cache), "--target-spacing", "1.6"]) == 0
  out = capsys.readouterr().out
  assert "2 CT case(s)" in out and "2 MRI case(s)" in out
  settings = store.PreprocessSettings("CT", target_spacing_mm=(1.6, 1.6))
  folder = store.cache_folder(tmp_path / "CT", settings, cache, labelled=True)
  manifest_mtime = os.stat(os.path.join(folder, store.MANIFEST)).st_mtime_ns
  s = _prepare(tmp_path / "CT", cache, settings)  # training's call: fresh, nothing redone
  assert s.folder == folder and os.stat(os.path.join(folder, store.MANIFEST)).st_mtime_ns == manifest_mtime
  assert s.shapes[0].tolist() == [5, 20, 18]  # 40 x 36 pixels of 0.8 mm -> 1.6 mm
  assert cli.main(["preprocess", str(tmp_path / "CT"), "--cache-dir", str(cache), "--target-spacing", "x"]) == 1
  assert "--target-spacing" in capsys.readouterr().err


def test_missing_or_cut_cache_files_and_a_new_label_set_are_redone(tmp_path):
  root, cache = tmp_path / "CT", tmp_path / "cache"
  ids = _write_dataset(root)
  s = _prepare(root, cache)
  expected = np.array(s.image(1))
  # A scratch purge removes one file and truncates another: those cases are redone, bitwise the same.
  os.remove(os.path.join(s.folder, "cases", s.entry(1)["image"]))
  with open(os.path.join(s.folder, "cases", s.entry(2)["label"]), "r+b") as f:
    f.truncate(100)
  again = _prepare(root, cache)
  np.testing.assert_array_equal(again.image(1), expected)
  assert np.asarray(again.label(2)).shape == (5, 40, 36)
  # dataset.json gains a class: every case is redone with the new label set.
  dataset_index.write_dataset_json(root, ids, modality="CT", labels={"background": 0, "tumor": 1, "node": 2})
  relabelled = _prepare(root, cache)
  assert relabelled.labels == {"background": 0, "tumor": 1, "node": 2}


def test_a_source_changed_while_being_read_is_an_error(tmp_path, monkeypatch):
  root = tmp_path / "CT"
  ids = _write_dataset(root, n=1)
  real = store.preprocess_case

  def touching(case, *args):
    result = real(case, *args)
    os.utime(case.image, ns=(1, 1))  # the file is rewritten meanwhile
    return result

  monkeypatch.setattr(store, "preprocess_case", touching)
  with pytest.raises(DataError, match="changed while it was being preprocessed") as e:
    _prepare(root, tmp_path / "cache")
  assert dataset_index.image_path(root, ids[0]) in str(e.value)


def test_open_memory_maps_are_bounded(tmp_path, monkeypatch):
  monkeypatch.setattr(store, "MAX_OPEN_MAPS", 2)
  _write_dataset(tmp_path / "CT", n=3)
  s = _prepare(tmp_path / "CT", tmp_path / "cache")
  values = [float(np.asarray(s.image(c)).sum()) for c in (0, 1, 2, 0)]
  assert len(s._maps) == 2 and values[0] == values[3]
  assert list(s._maps) == [(2, "image"), (0, "image")]  # the least recently used was closed
  np.testing.assert_array_equal(s.locations(0, 1), np.argwhere(np.asarray(s.label(0)) == 1))
