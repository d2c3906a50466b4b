"""Preprocessing and the unpaired grain pipeline: values, shapes, determinism, sharding, checkpointing."""

import numpy as np
import pytest

from cmedl_jax.data import augment, dataset_index, nifti_io, pipeline, preprocess, store

# ---------------------------------------------------------------- normalisation and crops


def test_ct_window_maps_hu_linearly_to_unit_range():
  hu = np.array([-2000.0, -1000.0, -250.0, 500.0, 3000.0])
  np.testing.assert_allclose(preprocess.normalize_ct(hu), [-1.0, -1.0, 0.0, 1.0, 1.0], atol=1e-6)


def test_mri_percentile_normalisation_matches_numpy():
  rng = np.random.default_rng(0)
  x = rng.gamma(2.0, 100.0, size=(20, 20, 10)).astype(np.float32)
  lo, hi = np.percentile(x, [0.5, 99.5])
  expected = (np.clip(x, lo, hi) - lo) / (hi - lo) * 2 - 1
  out = preprocess.normalize_mri(x)
  np.testing.assert_allclose(out, expected, atol=1e-5)
  assert out.min() == -1.0 and out.max() == 1.0
  # Percentile clipping: ~0.5% of voxels saturate at each end.
  assert 0.002 < np.mean(out == 1.0) < 0.01
  np.testing.assert_array_equal(preprocess.normalize_mri(np.full((3, 3), 7.0)), -np.ones((3, 3)))


def test_normalize_dispatches_on_modality():
  x = np.array([0.0, 500.0])
  np.testing.assert_allclose(preprocess.normalize(x, "ct"), preprocess.normalize_ct(x))
  np.testing.assert_allclose(preprocess.normalize(x, "T2"), preprocess.normalize_mri(x))


def test_axial_slices_round_trip():
  v = np.arange(2 * 3 * 4).reshape(2, 3, 4)
  s = preprocess.axial_slices(v)
  assert s.shape == (4, 2, 3)
  np.testing.assert_array_equal(s[2], v[:, :, 2])
  np.testing.assert_array_equal(preprocess.stack_axial(s), v)


def test_crop_pads_outside_and_copies_inside():
  img = np.arange(25, dtype=np.float32).reshape(5, 5)
  out = preprocess.crop_2d(img, (-1, 3), 3, pad_value=-9)
  expected = np.array([[-9, -9, -9], [3, 4, -9], [8, 9, -9]], np.float32)
  np.testing.assert_array_equal(out, expected)


def test_foreground_crop_contains_the_centre_and_stays_inside():
  rng = np.random.default_rng(0)
  for _ in range(200):
    shape = tuple(rng.integers(20, 60, size=2))
    center = tuple(int(rng.integers(0, s)) for s in shape)
    size = int(rng.integers(8, 20))
    r, c = preprocess.random_crop_origin(rng, shape, size, center)
    assert r <= center[0] < r + size and c <= center[1] < c + size
    assert 0 <= r <= shape[0] - size and 0 <= c <= shape[1] - size


def test_crop_of_small_image_is_centred():
  rng = np.random.default_rng(0)
  assert preprocess.random_crop_origin(rng, (10, 30), 16) [0] == -3


# ---------------------------------------------------------------- the unpaired pipeline


def _volume(rng, shape, tumor):
  hu = rng.uniform(-1000, 400, size=shape).astype(np.float32)
  label = np.zeros(shape, np.uint8)
  if tumor:
    x, y, z = tumor
    label[x:x + 3, y:y + 4, z] = 1
  return hu, label


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
  """3 labelled CT volumes (tumor on one slice each) and 2 MRI volumes, written as NIfTI and preprocessed."""
  root = tmp_path_factory.mktemp("data")
  rng = np.random.default_rng(0)
  affine = np.diag([-0.8, -0.8, 2.5, 1.0])  # LPS-like: reoriented on load
  ct_ids = ["ct0", "ct1", "ct2"]
  for i, case in enumerate(ct_ids):
    hu, label = _volume(rng, (40, 36, 6), (5 + 3 * i, 7, i + 1))
    nifti_io.save_nifti(dataset_index.image_path(root / "CT", case), hu, affine)
    nifti_io.save_nifti(dataset_index.label_path(root / "CT", case), label, affine)
  dataset_index.write_dataset_json(root / "CT", ct_ids, modality="CT")
  for case in ["mr0", "mr1"]:
    nifti_io.save_nifti(root / "MRI" / f"{case}.nii.gz", rng.gamma(2, 100, size=(30, 30, 5)), affine)
  cache = tmp_path_factory.mktemp("cache")
  ct = store.prepare(root / "CT", store.PreprocessSettings("CT"), cache_dir=cache, labels="required", progress=False)
  mri = store.prepare(root / "MRI", store.PreprocessSettings("MRI"), cache_dir=cache, labels="ignore",
                      progress=False)
  return ct, mri


def test_stores_hold_normalised_slices(stores):
  ct, mri = stores
  assert len(ct) == 3 and ct.image(0).shape == (6, 40, 36) and ct.image(0).dtype == np.float32
  assert -1.0 <= ct.image(0).min() and ct.image(0).max() <= 1.0
  assert not mri.labelled and mri.modality == "MRI" and mri.image(0).min() == -1.0
  np.testing.assert_allclose(ct.spacings[0], (0.8, 0.8, 2.5), rtol=1e-6)
  # One tumor slice per CT volume, at the written voxels (12 of them; the stored locations are all of them).
  assert ct.foreground_classes == (1,) and ct.cases_with_class(1).tolist() == [0, 1, 2]
  for c in range(3):
    locations = ct.locations(c, 1)
    assert len(locations) == 12 and set(locations[:, 0].tolist()) == {c + 1}
    assert np.all(np.asarray(ct.label(c))[tuple(locations.T)] == 1)


def _take(dataset, n):
  it = pipeline.make_train_iterator(dataset)
  return [next(it) for _ in range(n)]


def test_batch_shapes_dtypes_and_ranges(stores):
  ct, mri = stores
  ds = pipeline.make_train_dataset(ct, mri, global_batch_size=4, crop_size=32, seed=0, process_index=0,
                                   process_count=1)
  batch = ds[0]
  assert batch["ct"].shape == (4, 32, 32, 1) and batch["ct"].dtype == np.float32
  assert batch["mri"].shape == (4, 32, 32, 1) and batch["ct_label"].shape == (4, 32, 32)
  assert batch["ct_label"].dtype == np.int32
  assert set(np.unique(batch["ct_label"])) <= {0, 1}
  for key in ("ct", "mri"):
    assert -1.0 <= batch[key].min() and batch[key].max() <= 1.0


def test_crops_are_taken_from_the_recorded_slices(stores):
  """Each example's crop must literally be a window of the slice its provenance fields name."""
  ct, mri = stores
  ds = pipeline.make_train_dataset(ct, mri, global_batch_size=8, crop_size=24, seed=3, process_index=0,
                                   process_count=1)
  batch = ds[1]
  for i in range(8):
    src = ct.image(batch["ct_case"][i])[batch["ct_slice"][i]]
    crop = batch["ct"][i, ..., 0]
    found = any(np.array_equal(src[r:r + 24, c:c + 24], crop)
                for r in range(src.shape[0] - 23) for c in range(src.shape[1] - 23))
    assert found, f"example {i} is not a crop of its recorded CT slice"
    label_src = ct.label(batch["ct_case"][i])[batch["ct_slice"][i]]
    assert batch["ct_label"][i].sum() <= label_src.sum()


def test_foreground_oversampling_rate(stores):
  ct, mri = stores
  n = 400
  for fraction in (0.0, 1.0, 0.5):
    maker = pipeline.UnpairedExampleMaker(ct, mri, seed=0, crop_size=16, foreground_fraction=fraction)
    has_tumor = np.mean([maker(g)["ct_label"].any() for g in range(n)])
    # Only 3 of 18 slices have tumor: uniform sampling alone gives <= 1/6.
    if fraction == 0.0:
      assert has_tumor < 0.25
    elif fraction == 1.0:
      assert has_tumor == 1.0
    else:
      assert 0.4 < has_tumor < 0.75


def test_ct_and_mri_are_sampled_independently(stores):
  ct, mri = stores
  maker = pipeline.UnpairedExampleMaker(ct, mri, seed=0, crop_size=16, foreground_fraction=0.0)
  pairs = np.array([(int(maker(g)["ct_case"]), int(maker(g)["mri_case"])) for g in range(600)])
  table = np.histogram2d(pairs[:, 0], pairs[:, 1], bins=[3, 2])[0]
  expected = np.outer(table.sum(1), table.sum(0)) / table.sum()
  chi2 = ((table - expected) ** 2 / expected).sum()
  assert chi2 < 13.8  # chi2(2 dof) 0.999 quantile


def test_same_seed_same_stream_other_seed_other_stream(stores):
  ct, mri = stores
  kwargs = dict(global_batch_size=4, crop_size=32, process_index=0, process_count=1)
  a = _take(pipeline.make_train_dataset(ct, mri, seed=7, **kwargs), 3)
  b = _take(pipeline.make_train_dataset(ct, mri, seed=7, **kwargs), 3)
  c = _take(pipeline.make_train_dataset(ct, mri, seed=8, **kwargs), 3)
  for x, y in zip(a, b):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  assert not np.array_equal(a[0]["ct"], c[0]["ct"])


def test_process_shards_concatenate_to_the_single_process_batch(stores):
  ct, mri = stores
  single = pipeline.make_train_dataset(ct, mri, global_batch_size=8, crop_size=16, seed=1, process_index=0,
                                       process_count=1)
  shards = [pipeline.make_train_dataset(ct, mri, global_batch_size=8, crop_size=16, seed=1, process_index=p,
                                        process_count=4) for p in range(4)]
  for step in (0, 5):
    assert shards[0][step]["ct"].shape[0] == 2
    for key in single[step]:
      np.testing.assert_array_equal(np.concatenate([s[step][key] for s in shards]), single[step][key])
  with pytest.raises(ValueError, match="does not divide"):
    pipeline.make_train_dataset(ct, mri, global_batch_size=6, crop_size=16, process_index=0, process_count=4)


def test_iterator_state_restores_the_stream(stores):
  ct, mri = stores
  ds = pipeline.make_train_dataset(ct, mri, global_batch_size=4, crop_size=16, seed=2, process_index=0,
                                   process_count=1)
  it = pipeline.make_train_iterator(ds)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(2)]
  resumed = pipeline.make_train_iterator(ds)
  resumed.set_state(state)
  for x, y in zip(expected, [next(resumed) for _ in range(2)]):
    np.testing.assert_array_equal(x["ct"], y["ct"])
    np.testing.assert_array_equal(x["mri_case"], y["mri_case"])


def test_worker_processes_do_not_change_the_stream(stores):
  ct, mri = stores
  ds = pipeline.make_train_dataset(ct, mri, global_batch_size=4, crop_size=16, seed=5, process_index=0,
                                   process_count=1, num_batches=6, augment=augment.Augment())
  in_process = list(pipeline.make_train_iterator(ds))
  with_workers = list(pipeline.make_train_iterator(ds, num_workers=2))
  assert len(in_process) == len(with_workers) == 6
  for x, y in zip(in_process, with_workers):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


def test_unlabelled_ct_is_refused(stores):
  _, mri = stores
  with pytest.raises(ValueError, match="has no labels"):
    pipeline.UnpairedExampleMaker(mri, mri, seed=0, crop_size=16)


def test_augmentation_changes_crops_not_the_drawn_slices(stores):
  ct, mri = stores
  kwargs = dict(seed=4, crop_size=24, foreground_fraction=0.5)
  plain = pipeline.UnpairedExampleMaker(ct, mri, **kwargs)
  augmented = pipeline.UnpairedExampleMaker(ct, mri, augment=augment.Augment(), **kwargs)
  changed = 0
  for g in range(40):
    a, b = plain(g), augmented(g)
    for key in ("ct_case", "ct_slice", "mri_case", "mri_slice"):
      assert a[key] == b[key]
    changed += not np.array_equal(a["ct"], b["ct"])
    assert -1.0 <= b["ct"].min() and b["ct"].max() <= 1.0 and set(np.unique(b["ct_label"])) <= {0, 1}
  assert changed > 20  # flips alone change 3 of 4 crops
