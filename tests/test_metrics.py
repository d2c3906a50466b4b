"""Host metrics (cmedl_jax.metrics.surface) against analytic answers and independent implementations."""

import math

import numpy as np
import pytest
from scipy import ndimage

from cmedl_jax import metrics
from cmedl_jax.metrics import surface

# surface-distance 0.1 imports from scipy.ndimage namespaces that scipy deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:Please import:DeprecationWarning")

SPACING_3D = (0.8, 1.1, 2.5)
SPACING_2D = (0.7, 1.9)


def random_blobs(seed, shape, threshold=0.3, sigma=2.0):
  """Two independent smooth random masks (several lumpy components each)."""
  rng = np.random.default_rng(seed)
  return tuple(ndimage.gaussian_filter(rng.standard_normal(shape), sigma) > threshold * 0.5 for _ in range(2))


def box(shape, lo, hi):
  mask = np.zeros(shape, bool)
  mask[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
  return mask


# ----------------------------------------------------------------------------------------------------- Dice


def test_dice_of_half_overlapping_boxes():
  a = box((20, 20, 20), (0, 0, 0), (10, 10, 10))
  b = box((20, 20, 20), (5, 0, 0), (15, 10, 10))
  assert metrics.dice(a, b) == pytest.approx(0.5)
  c = box((20, 20, 20), (0, 0, 0), (10, 10, 5))  # inside a, half its size: 2 * 500 / 1500
  assert metrics.dice(a, c) == pytest.approx(2 / 3)


def test_dice_2d_accepts_integer_masks():
  a = box((10, 10), (0, 0), (4, 4)).astype(np.uint8)
  b = box((10, 10), (0, 0), (4, 2)).astype(np.int64)
  assert metrics.dice(a, b) == pytest.approx(2 * 8 / 24)


# ------------------------------------------------------------------------------------------------ Surfels


def test_surfel_areas_of_a_box_match_the_marching_cubes_surface():
  # Marching-cubes surface of an n0 x n1 x n2 box: faces shrunk by half a voxel, bevels along the 12 edges and
  # a triangle at each of the 8 corners.
  n, s = (5, 7, 4), SPACING_3D
  mask = box((12, 12, 12), (2, 3, 1), (7, 10, 5))
  faces = 2 * sum((n[i] - 1) * s[i] * (n[j] - 1) * s[j] for i, j in ((0, 1), (1, 2), (0, 2)))
  bevels = 4 * sum((n[i] - 1) * s[i] * 0.5 * math.hypot(s[j], s[k]) for i, j, k in ((0, 1, 2), (1, 0, 2), (2, 0, 1)))
  corners = math.sqrt((s[1] * s[2]) ** 2 + (s[0] * s[2]) ** 2 + (s[0] * s[1]) ** 2)
  _, area = surface.surfels(mask, s)
  assert area.sum() == pytest.approx(faces + bevels + corners, rel=1e-12)


def test_contour_length_of_a_rectangle():
  n, s = (6, 9), SPACING_2D
  mask = box((12, 14), (3, 2), (9, 11))
  expected = 2 * ((n[0] - 1) * s[0] + (n[1] - 1) * s[1]) + 4 * 0.5 * math.hypot(*s)
  _, length = surface.surfels(mask, s)
  assert length.sum() == pytest.approx(expected, rel=1e-12)


def test_surfel_tables_equal_deepmind_lookup_tables():
  lookup_tables = pytest.importorskip("surface_distance.lookup_tables")
  for spacing in [(1.0, 1.0, 1.0), SPACING_3D, (3.0, 0.7, 0.45)]:
    np.testing.assert_allclose(surface.surfel_area_table(spacing),
                               lookup_tables.create_table_neighbour_code_to_surface_area(spacing), rtol=1e-14)
  for spacing in [(1.0, 1.0), SPACING_2D]:
    np.testing.assert_allclose(surface.surfel_area_table(spacing),
                               lookup_tables.create_table_neighbour_code_to_contour_length(spacing), rtol=1e-14)


# ------------------------------------------------------------------------------------- Analytic distances


@pytest.mark.parametrize("convention", surface.CONVENTIONS)
@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 3])
def test_shifted_box_hd95_is_shift_times_spacing(convention, axis, k):
  # Every surface point is within k * s of the other surface, and the trailing face (1/6 of the surface) is
  # exactly k * s away, so the 95th percentile is k * s in every convention.
  ref = box((24, 24, 24), (4, 4, 4), (14, 15, 13))
  pred = np.roll(ref, k, axis=axis)
  assert metrics.hd95(pred, ref, SPACING_3D, convention=convention) == pytest.approx(k * SPACING_3D[axis])
  assert metrics.hd95(ref, pred, SPACING_3D, convention=convention) == pytest.approx(k * SPACING_3D[axis])


@pytest.mark.parametrize("convention", surface.CONVENTIONS)
@pytest.mark.parametrize("axis", [0, 2])
def test_boxes_grown_along_one_axis_hd95_is_growth_times_spacing(convention, axis):
  k = 2
  ref = box((24, 24, 24), (6, 6, 6), (16, 17, 15))
  lo, hi = [6, 6, 6], [16, 17, 15]
  lo[axis] -= k
  hi[axis] += k
  pred = box((24, 24, 24), lo, hi)
  assert metrics.hd95(pred, ref, SPACING_3D, convention=convention) == pytest.approx(k * SPACING_3D[axis])
  # The end faces are k * s apart, everything else closer: sDSC is 1 exactly from that tolerance on.
  assert metrics.surface_dice(pred, ref, SPACING_3D, k * SPACING_3D[axis] + 1e-9) == 1.0
  assert metrics.surface_dice(pred, ref, SPACING_3D, k * SPACING_3D[axis] * 0.99) < 1.0


@pytest.mark.parametrize("convention", surface.CONVENTIONS)
def test_shifted_square_2d(convention):
  ref = box((30, 30), (5, 5), (17, 17))
  pred = np.roll(ref, 2, axis=1)
  assert metrics.hd95(pred, ref, SPACING_2D, convention=convention) == pytest.approx(2 * SPACING_2D[1])
  assert metrics.dice(pred, ref) == pytest.approx(10 / 12)


def test_identical_masks():
  ref, _ = random_blobs(0, (20, 22, 18))
  assert metrics.dice(ref, ref) == 1.0
  assert metrics.surface_dice(ref, ref, SPACING_3D, 0.0) == 1.0
  for convention in surface.CONVENTIONS:
    assert metrics.hd95(ref, ref, SPACING_3D, convention=convention) == 0.0


def test_far_apart_boxes_have_zero_surface_dice():
  a = box((40, 10, 10), (1, 2, 2), (6, 7, 7))
  b = box((40, 10, 10), (20, 2, 2), (25, 7, 7))
  assert metrics.surface_dice(a, b, SPACING_3D, 5.0) == 0.0
  # Surfels sit on voxel corners 1..6 (a) and 20..25 (b) along axis 0: the farthest face of each is 19 corners
  # from the nearest face of the other.
  assert metrics.robust_hausdorff(a, b, SPACING_3D, 100.0) == pytest.approx(19 * 0.8)


def test_concentric_spheres_hd95_is_close_to_radius_difference():
  shape = (60, 50, 24)
  grids = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, SPACING_3D)], indexing="ij")
  radius = np.sqrt(sum(g ** 2 for g in grids))
  for inner, outer in [(10.0, 14.0), (12.0, 20.0)]:
    for convention in surface.CONVENTIONS:
      hd = metrics.hd95(radius <= outer, radius <= inner, SPACING_3D, convention=convention)
      assert abs(hd - (outer - inner)) <= max(SPACING_3D)


def test_weighted_percentile_takes_the_first_surfel_reaching_the_fraction():
  # 19/20 of the weight is reached exactly at the 19th surfel: DeepMind's searchsorted (side="left") picks it.
  distances, weights = np.arange(1.0, 21.0), np.ones(20)
  assert surface.weighted_percentile(distances, weights, 95.0) == 19.0
  assert surface.weighted_percentile(distances, weights, 95.0001) == 20.0
  assert surface.weighted_percentile(distances, np.r_[np.ones(19), 1e-9], 100.0) == 20.0
  deepmind = pytest.importorskip("surface_distance.metrics")
  as_dict = {"distances_gt_to_pred": distances, "distances_pred_to_gt": distances[:1],
             "surfel_areas_gt": weights, "surfel_areas_pred": weights[:1]}
  assert deepmind.compute_robust_hausdorff(as_dict, 95) == 19.0


# -------------------------------------------------------------------------------------------- Empty cases


@pytest.mark.parametrize("convention", surface.CONVENTIONS)
def test_both_empty(convention):
  empty = np.zeros((8, 9, 10), bool)
  assert metrics.dice(empty, empty) == 1.0
  assert metrics.surface_dice(empty, empty, SPACING_3D, 1.0) == 1.0
  assert metrics.hd95(empty, empty, SPACING_3D, convention=convention) == 0.0
  assert metrics.hd95(empty, empty, SPACING_3D, convention=convention, empty_policy="nan") == 0.0


@pytest.mark.parametrize("convention", surface.CONVENTIONS)
@pytest.mark.parametrize("empty_is_pred", [True, False])
def test_exactly_one_empty(convention, empty_is_pred):
  full = box((8, 9, 10), (2, 2, 2), (5, 6, 7))
  empty = np.zeros_like(full)
  pred, ref = (empty, full) if empty_is_pred else (full, empty)
  assert metrics.dice(pred, ref) == 0.0
  assert metrics.surface_dice(pred, ref, SPACING_3D, 100.0) == 0.0
  assert metrics.hd95(pred, ref, SPACING_3D, convention=convention) == math.inf
  assert math.isnan(metrics.hd95(pred, ref, SPACING_3D, convention=convention, empty_policy="nan"))
  row = metrics.segmentation_metrics(pred, ref, SPACING_3D, (1.0,), convention, "nan").as_row()
  assert row["dice"] == 0.0 and row["surface_dice_1mm"] == 0.0 and math.isnan(row["hd95_mm"])


# ------------------------------------------------------------------------------------------- Validation


@pytest.mark.parametrize("pred,ref,spacing,message", [
    (np.zeros((4, 4, 4), bool), np.zeros((4, 4, 5), bool), (1, 1, 1), "same shape"),
    (np.zeros((4, 4, 4), bool), np.zeros((4, 4, 4), bool), (1, 1), "one entry per mask axis"),
    (np.zeros((4, 4), bool), np.zeros((4, 4), bool), (1, 1, 1), "one entry per mask axis"),
    (np.zeros((4, 4, 4), bool), np.zeros((4, 4, 4), bool), (1, 0, 1), "finite and > 0"),
    (np.zeros((4, 4, 4), bool), np.zeros((4, 4, 4), bool), (1, -2, 1), "finite and > 0"),
    (np.zeros((4, 4, 4), bool), np.zeros((4, 4, 4), bool), (1, np.nan, 1), "finite and > 0"),
    (np.zeros(4, bool), np.zeros(4, bool), (1,), "2D or 3D"),
    (np.full((4, 4), 0.7), np.zeros((4, 4), bool), (1, 1), "binary mask"),
    (np.full((4, 4), 2), np.zeros((4, 4), bool), (1, 1), "binary mask"),
])
def test_invalid_inputs_raise(pred, ref, spacing, message):
  with pytest.raises(ValueError, match=message):
    metrics.hd95(pred, ref, spacing)
  with pytest.raises(ValueError, match=message):
    metrics.surface_dice(pred, ref, spacing, 1.0)


def test_invalid_options_raise():
  a = np.zeros((4, 4), bool)
  with pytest.raises(ValueError, match="convention"):
    metrics.hd95(a, a, (1, 1), convention="itk")
  with pytest.raises(ValueError, match="empty_policy"):
    metrics.hd95(a, a, (1, 1), empty_policy="zero")
  with pytest.raises(ValueError, match="tolerance_mm"):
    metrics.surface_dice(a, a, (1, 1), -1.0)
  with pytest.raises(ValueError, match="percent"):
    metrics.robust_hausdorff(a, a, (1, 1), 101.0)
  with pytest.raises(ValueError, match="same shape"):
    metrics.dice(a, np.zeros((4, 5), bool))


# ---------------------------------------------------------------------------- Independent implementations


BLOB_CASES = [(seed, (32, 36, 28), SPACING_3D) for seed in range(3)] + [
    (10, (30, 26, 34), (1.3, 0.6, 0.9)), (20, (48, 40), SPACING_2D), (21, (40, 52), (1.0, 1.0))]


@pytest.mark.parametrize("seed,shape,spacing", BLOB_CASES)
def test_matches_deepmind_surface_distance(seed, shape, spacing):
  deepmind = pytest.importorskip("surface_distance.metrics")
  pred, ref = random_blobs(seed, shape)
  expected = deepmind.compute_surface_distances(ref, pred, spacing)
  ours = metrics.compute_surface_distances(pred, ref, spacing)
  np.testing.assert_allclose(ours.distances_ref_to_pred_mm, expected["distances_gt_to_pred"], rtol=1e-12)
  np.testing.assert_allclose(ours.distances_pred_to_ref_mm, expected["distances_pred_to_gt"], rtol=1e-12)
  np.testing.assert_allclose(ours.weights_ref, expected["surfel_areas_gt"], rtol=1e-12)
  np.testing.assert_allclose(ours.weights_pred, expected["surfel_areas_pred"], rtol=1e-12)
  for tolerance in (0.5, 1.0, 2.0, 3.3):
    assert metrics.surface_dice(pred, ref, spacing, tolerance) == pytest.approx(
        deepmind.compute_surface_dice_at_tolerance(expected, tolerance), abs=1e-6)
  for percent in (50.0, 95.0, 100.0):
    assert metrics.robust_hausdorff(pred, ref, spacing, percent) == pytest.approx(
        deepmind.compute_robust_hausdorff(expected, percent), abs=1e-6)
  assert metrics.hd95(pred, ref, spacing) == pytest.approx(deepmind.compute_robust_hausdorff(expected, 95), abs=1e-6)
  assert metrics.dice(pred, ref) == pytest.approx(deepmind.compute_dice_coefficient(ref, pred), abs=1e-12)


def test_one_empty_matches_deepmind(monkeypatch):
  deepmind = pytest.importorskip("surface_distance.metrics")
  # surface-distance 0.1 still spells np.Inf, which numpy 2 removed.
  monkeypatch.setattr(np, "Inf", np.inf, raising=False)
  full = box((10, 10, 10), (2, 2, 2), (6, 7, 5))
  empty = np.zeros_like(full)
  for pred, ref in [(full, empty), (empty, full)]:
    expected = deepmind.compute_surface_distances(ref, pred, SPACING_3D)
    assert metrics.hd95(pred, ref, SPACING_3D) == deepmind.compute_robust_hausdorff(expected, 95) == math.inf
    assert metrics.surface_dice(pred, ref, SPACING_3D, 1.0) == deepmind.compute_surface_dice_at_tolerance(
        expected, 1.0) == 0.0


@pytest.mark.parametrize("seed,shape,spacing", BLOB_CASES)
def test_medpy_convention_matches_medpy(seed, shape, spacing):
  binary = pytest.importorskip("medpy.metric.binary")
  pred, ref = random_blobs(seed, shape)
  assert metrics.hd95(pred, ref, spacing, convention="medpy") == pytest.approx(
      binary.hd95(pred, ref, voxelspacing=spacing), abs=1e-6)


def _face_boundary_by_shifts(mask):
  """Foreground voxels with a face neighbour in the background or outside the array (no erosion)."""
  padded = np.pad(mask, 1)
  inner = tuple(slice(1, -1) for _ in range(mask.ndim))
  boundary = np.zeros_like(mask)
  for axis in range(mask.ndim):
    for step in (-1, 1):
      boundary |= mask & ~np.roll(padded, step, axis=axis)[inner]
  return boundary


def _brute_force_distances(from_points, to_points, spacing):
  a = np.argwhere(from_points) * np.asarray(spacing)
  b = np.argwhere(to_points) * np.asarray(spacing)
  return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)).min(axis=1)


@pytest.mark.parametrize("seed,shape,spacing", [(3, (18, 20, 16), SPACING_3D), (4, (30, 26), SPACING_2D)])
def test_monai_and_medpy_conventions_match_a_brute_force_reference(seed, shape, spacing):
  # MONAI is not installed in the test environment (it needs torch): this re-derives its definition with
  # pairwise distances and explicit neighbour tests instead of EDT and erosion.
  pred, ref = random_blobs(seed, shape)
  pred_to_ref = _brute_force_distances(_face_boundary_by_shifts(pred), _face_boundary_by_shifts(ref), spacing)
  ref_to_pred = _brute_force_distances(_face_boundary_by_shifts(ref), _face_boundary_by_shifts(pred), spacing)
  monai = max(np.percentile(pred_to_ref, 95), np.percentile(ref_to_pred, 95))
  medpy = np.percentile(np.concatenate([pred_to_ref, ref_to_pred]), 95)
  assert metrics.hd95(pred, ref, spacing, convention="monai") == pytest.approx(monai, abs=1e-9)
  assert metrics.hd95(pred, ref, spacing, convention="medpy") == pytest.approx(medpy, abs=1e-9)
  assert monai != pytest.approx(medpy)  # the case tells the two conventions apart


def test_segmentation_metrics_row():
  pred, ref = random_blobs(7, (20, 24, 18))
  result = metrics.segmentation_metrics(pred, ref, SPACING_3D, (1.0, 2.5))
  row = result.as_row()
  assert list(row) == ["dice", "surface_dice_1mm", "surface_dice_2.5mm", "hd95_mm", "pred_voxels", "ref_voxels"]
  assert row["dice"] == metrics.dice(pred, ref)
  assert row["surface_dice_2.5mm"] == metrics.surface_dice(pred, ref, SPACING_3D, 2.5)
  assert row["hd95_mm"] == metrics.hd95(pred, ref, SPACING_3D)
  assert metrics.segmentation_metrics(pred, ref, SPACING_3D, (), "medpy").hd95_mm == metrics.hd95(
      pred, ref, SPACING_3D, convention="medpy")
