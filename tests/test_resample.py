"""In-plane resampling (cmedl_jax.data.resample) on analytic spheres, ramps and grids."""

import numpy as np
import pytest

from cmedl_jax.data import resample


def _sphere(shape, spacing, centre_mm, radius_mm):
  """Binary sphere sampled at voxel centres of a grid whose first voxel edge is at 0 mm."""
  axes = [(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing)]
  x, y, z = np.meshgrid(*axes, indexing="ij")
  return ((x - centre_mm[0]) ** 2 + (y - centre_mm[1]) ** 2 + (z - centre_mm[2]) ** 2 <= radius_mm ** 2)


def _dice(a, b):
  return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_shape_keeps_the_field_of_view_and_targets_the_spacing():
  assert resample.resampled_inplane_shape((512, 400), (0.7, 0.9), (1.0, 1.0)) == (358, 360)
  assert resample.target_inplane(()) is None and resample.target_inplane(0) is None
  assert resample.target_inplane(1.5) == (1.5, 1.5) and resample.target_inplane((1, 2)) == (1.0, 2.0)
  with pytest.raises(ValueError, match="positive"):
    resample.target_inplane((1.0, -1.0))


def test_resampled_affine_maps_voxel_centres_of_the_same_field_of_view():
  affine = np.array([[-0.7, 0, 0, 10], [0, 0.9, 0, -5], [0, 0, 2.5, 3], [0, 0, 0, 1]], float)
  new = resample.resampled_affine(affine, (100, 50), (70, 45))
  # The first voxel edge (index -0.5) and the last (index n - 0.5) of both grids are the same world points.
  for old_index, new_index in (((-0.5, -0.5, 0), (-0.5, -0.5, 0)), ((99.5, 49.5, 4), (69.5, 44.5, 4))):
    np.testing.assert_allclose(affine @ [*old_index, 1], new @ [*new_index, 1], atol=1e-9)
  np.testing.assert_allclose(np.linalg.norm(new[:3, :3], axis=0), (0.7 * 100 / 70, 0.9 * 50 / 45, 2.5))


@pytest.mark.parametrize("interpolation", ["linear", "cubic"])
def test_image_interpolation_reproduces_a_linear_ramp_inside(interpolation):
  x = np.arange(60, dtype=np.float32)[:, None, None] * 0.8 * 3.0  # 3 units per mm along x, 0.8 mm pixels
  volume = np.broadcast_to(x, (60, 40, 3)).astype(np.float32)
  out = resample.resample_image(volume, (40, 40), interpolation)  # 0.8 -> 1.2 mm along x
  centres_mm = (np.arange(40) + 0.5) * 1.2 - 0.4  # new pixel centres, in the source's centre coordinates
  np.testing.assert_allclose(out[3:-3, 5, 1], centres_mm[3:-3] * 3.0, rtol=1e-4)


@pytest.mark.parametrize("interpolation,min_dice", [("linear_per_class", 0.98), ("nearest", 0.96)])
def test_label_resampling_of_a_sphere_matches_the_sphere_on_the_new_grid(interpolation, min_dice):
  spacing, target = (0.6, 0.6, 2.0), (1.5, 1.5)
  source = _sphere((200, 200, 20), spacing, (61.0, 57.0, 20.0), 25.0).astype(np.uint8)
  new_shape = resample.resampled_inplane_shape((200, 200), spacing[:2], target)
  out = resample.resample_labels(source, new_shape, interpolation)
  expected = _sphere(new_shape + (20,), (120.0 / new_shape[0], 120.0 / new_shape[1], 2.0), (61.0, 57.0, 20.0), 25.0)
  assert out.dtype == source.dtype and set(np.unique(out)) <= {0, 1}
  assert _dice(out.astype(bool), expected) >= min_dice
  # Volume kept to within 2 % (4/3 pi r^3 on the discrete z grid is what both sample).
  assert abs(out.sum() * 1.5 * 1.5 * 2.0 - expected.sum() * 1.5 * 1.5 * 2.0) / (expected.sum() * 4.5) < 0.02


def test_per_class_linear_keeps_three_classes_and_round_trips():
  spacing = (0.8, 0.8, 2.0)
  labels = _sphere((120, 120, 8), spacing, (48, 48, 8), 30).astype(np.int16)
  labels[_sphere((120, 120, 8), spacing, (48, 48, 8), 12)] = 2
  down = resample.resample_labels(labels, (64, 64), classes=(0, 1, 2))
  back = resample.resample_labels(down, (120, 120), classes=(0, 1, 2))
  assert set(np.unique(down)) == {0, 1, 2}
  for value in (1, 2):
    assert _dice(back == value, labels == value) > 0.93


def test_probabilities_resample_back_and_same_shape_is_identity():
  probs = np.random.default_rng(0).random((30, 20, 2, 3)).astype(np.float32)
  assert resample.resample_probabilities(probs, (30, 20)) is not None
  np.testing.assert_array_equal(resample.resample_probabilities(probs, (30, 20)), probs)
  up = resample.resample_probabilities(probs, (60, 40))
  assert up.shape == (60, 40, 2, 3)
  np.testing.assert_allclose(up.mean(axis=(0, 1)), probs.mean(axis=(0, 1)), atol=0.02)
