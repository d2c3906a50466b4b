"""Per-lesion evaluation on volumes whose answers are known by construction."""

import csv
import io
import math

import numpy as np
import pytest

from cmedl_jax import metrics
from cmedl_jax.metrics import lesions

SPACING = (0.8, 0.8, 2.5)
VOXEL_ML = 0.8 * 0.8 * 2.5 / 1000.0
SHAPE = (40, 40, 24)


def put_box(mask, lo, hi):
  mask[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
  return mask


@pytest.fixture(name="scene")
def fixture_scene():
  """Three lesions: found exactly, missed, found shifted by one voxel; plus one false-positive blob.

  Labels follow the first voxel in C order: (5, 5, 3) -> 1, (5, 28, 15) -> 2, (25, 5, 3) -> 3.
  """
  ref = np.zeros(SHAPE, bool)
  put_box(ref, (5, 5, 3), (11, 11, 7))  # lesion 1: 6x6x4
  put_box(ref, (5, 28, 15), (8, 31, 18))  # lesion 2: 3x3x3, missed
  put_box(ref, (25, 5, 3), (31, 12, 8))  # lesion 3: 6x7x5
  pred = np.zeros(SHAPE, bool)
  put_box(pred, (5, 5, 3), (11, 11, 7))
  put_box(pred, (26, 5, 3), (32, 12, 8))
  put_box(pred, (30, 30, 18), (33, 34, 20))  # false positive: 3x4x2
  return pred, ref


def test_lesions_and_false_positives(scene):
  pred, ref = scene
  result = metrics.evaluate_lesions(pred, ref, SPACING, (1.0, 2.0))
  exact, missed, shifted = result.lesions
  assert [l.lesion_id for l in result.lesions] == [1, 2, 3]
  assert result.num_detected == 2 and result.num_predicted_components == 3

  assert exact.voxels == 144 and exact.volume_ml == pytest.approx(144 * VOXEL_ML)
  assert exact.detected and exact.dice == 1.0 and exact.hd95_mm == 0.0
  assert exact.surface_dice == {1.0: 1.0, 2.0: 1.0}
  assert exact.predicted_voxels == 144
  assert exact.centroid_voxel == pytest.approx((7.5, 7.5, 4.5))

  assert shifted.detected and shifted.dice == pytest.approx(5 / 6)
  assert shifted.hd95_mm == pytest.approx(0.8)  # one voxel along axis 0
  assert shifted.surface_dice[1.0] == 1.0
  assert shifted.volume_ml == pytest.approx(210 * VOXEL_ML)

  assert not missed.detected and missed.matched_components == ()
  assert missed.dice == 0.0 and missed.surface_dice == {1.0: 0.0, 2.0: 0.0} and missed.hd95_mm == math.inf
  assert missed.predicted_voxels == 0 and missed.predicted_volume_ml == 0.0

  (false_positive,) = result.false_positives
  assert false_positive.voxels == 24 and false_positive.volume_ml == pytest.approx(24 * VOXEL_ML)
  assert false_positive.centroid_voxel == pytest.approx((31.0, 31.5, 18.5))


def test_missed_lesion_nan_policy_and_convention(scene):
  pred, ref = scene
  result = metrics.evaluate_lesions(pred, ref, SPACING, (1.0,), convention="medpy", empty_policy="nan")
  assert math.isnan(result.lesions[1].hd95_mm)
  assert result.lesions[2].hd95_mm == pytest.approx(0.8)


def test_metrics_use_only_the_overlapping_components(scene):
  # The per-lesion numbers do not change when the rest of the volume does.
  pred, ref = scene
  alone_pred = np.zeros(SHAPE, bool)
  put_box(alone_pred, (26, 5, 3), (32, 12, 8))
  alone_ref = put_box(np.zeros(SHAPE, bool), (25, 5, 3), (31, 12, 8))
  in_scene = metrics.evaluate_lesions(pred, ref, SPACING, (1.0,)).lesions[2]
  alone = metrics.segmentation_metrics(alone_pred, alone_ref, SPACING, (1.0,))
  assert (in_scene.dice, in_scene.surface_dice, in_scene.hd95_mm) == (alone.dice, alone.surface_dice, alone.hd95_mm)


def test_a_component_merging_two_lesions_counts_for_both():
  ref = np.zeros(SHAPE, bool)
  put_box(ref, (5, 5, 5), (10, 10, 10))
  put_box(ref, (14, 5, 5), (19, 10, 10))
  pred = put_box(np.zeros(SHAPE, bool), (5, 5, 5), (19, 10, 10))  # one bridge over both
  first, second = metrics.evaluate_lesions(pred, ref, SPACING).lesions
  assert first.matched_components == second.matched_components == (1,)
  assert first.predicted_voxels == 14 * 25
  assert first.dice == pytest.approx(2 * 125 / (125 + 14 * 25))
  assert second.dice == pytest.approx(first.dice)


def test_connectivity():
  ref = np.zeros(SHAPE, bool)
  put_box(ref, (5, 5, 5), (8, 8, 8))
  put_box(ref, (8, 8, 8), (11, 11, 11))  # touches the first one only at a corner
  pred = ref.copy()
  assert len(metrics.evaluate_lesions(pred, ref, SPACING).lesions) == 1  # 26-connectivity by default
  assert len(metrics.evaluate_lesions(pred, ref, SPACING, connectivity=2).lesions) == 2  # edges, not corners
  six = metrics.evaluate_lesions(pred, ref, SPACING, connectivity=1)
  assert len(six.lesions) == 2 and six.num_predicted_components == 2 and not six.false_positives
  with pytest.raises(ValueError, match="connectivity"):
    metrics.evaluate_lesions(pred, ref, SPACING, connectivity=4)


def test_2d_and_empty_reference():
  ref = put_box(np.zeros((30, 30), bool), (3, 3), (9, 9))
  pred = put_box(np.zeros((30, 30), bool), (3, 4), (9, 10))
  result = metrics.evaluate_lesions(pred, ref, (0.7, 1.9), (2.0,))
  (lesion,) = result.lesions
  assert lesion.dice == pytest.approx(5 / 6) and lesion.hd95_mm == pytest.approx(1.9)
  assert lesion.volume_ml == pytest.approx(36 * 0.7 * 1.9 / 1000)

  nothing = metrics.evaluate_lesions(pred, np.zeros_like(ref), (0.7, 1.9))
  assert nothing.lesions == [] and len(nothing.false_positives) == 1


def test_rows_write_as_csv(scene):
  pred, ref = scene
  result = metrics.evaluate_lesions(pred, ref, SPACING, (1.0, 2.5))
  rows = result.lesion_rows()
  assert list(rows[0]) == ["lesion_id", "voxels", "volume_ml", "centroid_voxel", "detected", "matched_components",
                           "predicted_voxels", "predicted_volume_ml", "dice", "surface_dice_1mm",
                           "surface_dice_2.5mm", "hd95_mm"]
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
  writer.writeheader()
  writer.writerows(rows)
  read_back = list(csv.DictReader(io.StringIO(buffer.getvalue())))
  assert [r["detected"] for r in read_back] == ["True", "False", "True"]
  assert read_back[1]["hd95_mm"] == "inf" and read_back[2]["matched_components"] == "2"
  assert result.false_positive_rows() == [{
      "component_id": 3, "voxels": 24, "volume_ml": pytest.approx(24 * VOXEL_ML), "centroid_voxel": "31.00;31.50;18.50"
  }]


def test_validates_inputs():
  with pytest.raises(ValueError, match="same shape"):
    lesions.evaluate_lesions(np.zeros((4, 4, 4), bool), np.zeros((4, 4, 3), bool), SPACING)
  with pytest.raises(ValueError, match="one entry per mask axis"):
    lesions.evaluate_lesions(np.zeros((4, 4, 4), bool), np.zeros((4, 4, 4), bool), (1.0, 1.0))
