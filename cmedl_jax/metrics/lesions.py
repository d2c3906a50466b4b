"""Per-lesion evaluation: each connected component of the reference is scored on its own.

Rule (also in docs/metrics.md):

* Lesions are the connected components of the reference (``scipy.ndimage.label``); predicted components are
  labelled with the same connectivity. ``connectivity`` counts as in ``generate_binary_structure``: ``None`` (the
  default) is full connectivity, i.e. 26-neighbourhood in 3D and 8 in 2D; 1 is faces only (6 in 3D, 4 in 2D).
* The prediction for lesion i is the union of the whole predicted components that overlap lesion i (share at least
  one voxel with it). Lesion i is *detected* when there is at least one.
* DSC, sDSC and HD95 of lesion i compare that prediction with lesion i alone (other lesions are not part of its
  reference), with the metrics and empty-case policy of :mod:`cmedl_jax.metrics.surface`: a missed lesion gets
  DSC 0, sDSC 0 and HD95 inf (or nan with ``empty_policy="nan"``). A predicted component that merges two lesions
  counts in full for both, so merging is penalized in each.
* False positives are the predicted components that overlap no lesion, reported with their volume.

Volumes are in ml: voxels * prod(spacing_mm) / 1000. Results are dataclasses with ``as_row()`` for CSV writing.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np
from scipy import ndimage

from cmedl_jax.metrics import surface


@dataclasses.dataclass(frozen=True)
class LesionMetrics:
  """Metrics of one reference lesion.

  Attributes:
    lesion_id: label of the lesion (1..n, scipy.ndimage.label order: first voxel in C order).
    voxels: lesion size in voxels.
    volume_ml: lesion volume.
    centroid_voxel: centre of mass in voxel coordinates.
    detected: whether any predicted component overlaps the lesion.
    matched_components: labels of the predicted components that overlap it.
    predicted_voxels: voxels of those components (in full, including parts outside the lesion).
    predicted_volume_ml: their volume.
    dice: DSC of the matched components vs the lesion.
    surface_dice: tolerance (mm) -> sDSC.
    hd95_mm: HD95 in the chosen convention.
  """

  lesion_id: int
  voxels: int
  volume_ml: float
  centroid_voxel: tuple
  detected: bool
  matched_components: tuple
  predicted_voxels: int
  predicted_volume_ml: float
  dice: float
  surface_dice: dict
  hd95_mm: float

  def as_row(self) -> dict:
    """Flat dict for a CSV row (tuples joined with ';', sDSC as surface_dice_<tol>mm columns)."""
    row = {
        "lesion_id": self.lesion_id,
        "voxels": self.voxels,
        "volume_ml": self.volume_ml,
        "centroid_voxel": ";".join(f"{c:.2f}" for c in self.centroid_voxel),
        "detected": self.detected,
        "matched_components": ";".join(str(c) for c in self.matched_components),
        "predicted_voxels": self.predicted_voxels,
        "predicted_volume_ml": self.predicted_volume_ml,
        "dice": self.dice,
    }
    row.update({surface.surface_dice_key(t): v for t, v in self.surface_dice.items()})
    row["hd95_mm"] = self.hd95_mm
    return row


@dataclasses.dataclass(frozen=True)
class FalsePositiveComponent:
  """A predicted component that overlaps no reference lesion.

  Attributes:
    component_id: its label among the predicted components.
    voxels: size in voxels.
    volume_ml: volume.
    centroid_voxel: centre of mass in voxel coordinates.
  """

  component_id: int
  voxels: int
  volume_ml: float
  centroid_voxel: tuple

  def as_row(self) -> dict:
    return {"component_id": self.component_id, "voxels": self.voxels, "volume_ml": self.volume_ml,
            "centroid_voxel": ";".join(f"{c:.2f}" for c in self.centroid_voxel)}


@dataclasses.dataclass(frozen=True)
class LesionEvaluation:
  """Per-lesion results of one volume.

  Attributes:
    lesions: one entry per reference lesion, by lesion_id.
    false_positives: predicted components overlapping no lesion, by component_id.
    num_predicted_components: all predicted components.
  """

  lesions: list
  false_positives: list
  num_predicted_components: int

  @property
  def num_detected(self) -> int:
    return sum(lesion.detected for lesion in self.lesions)

  def lesion_rows(self) -> list:
    return [lesion.as_row() for lesion in self.lesions]

  def false_positive_rows(self) -> list:
    return [component.as_row() for component in self.false_positives]


def _structure(ndim: int, connectivity: Optional[int]) -> np.ndarray:
  connectivity = ndim if connectivity is None else int(connectivity)
  if not 1 <= connectivity <= ndim:
    raise ValueError(f"connectivity must be in [1, {ndim}] for {ndim}D masks (or None for {ndim}), "
                     f"got {connectivity}")
  return ndimage.generate_binary_structure(ndim, connectivity)


def _union_box(boxes: Sequence[tuple]) -> tuple:
  return tuple(slice(min(b[a].start for b in boxes), max(b[a].stop for b in boxes)) for a in range(len(boxes[0])))


def _centroids(labels: np.ndarray, count: int) -> list:
  if count == 0:
    return []
  centres = ndimage.center_of_mass(np.ones(labels.shape, np.int8), labels, range(1, count + 1))
  return [tuple(float(c) for c in centre) for centre in centres]


def evaluate_lesions(pred, ref, spacing_mm, tolerances_mm: Sequence[float] = (1.0, 2.0), *,
                     connectivity: Optional[int] = None,
                     convention: surface.Convention = surface.DEFAULT_CONVENTION,
                     empty_policy: surface.EmptyPolicy = surface.DEFAULT_EMPTY_POLICY) -> LesionEvaluation:
  """Scores every reference lesion and lists false-positive predicted components (rule in the module docstring).

  Args:
    pred: (n0, n1[, n2]) binary predicted mask.
    ref: same shape, binary reference mask.
    spacing_mm: (ndim,) voxel size.
    tolerances_mm: sDSC tolerances.
    connectivity: neighbourhood of connected components; None = full (26 in 3D, 8 in 2D), 1 = faces.
    convention: HD95 convention ("deepmind", "monai", "medpy").
    empty_policy: HD95 of a missed lesion: "inf" or "nan".

  Returns:
    LesionEvaluation.
  """
  pred, ref, spacing = surface.validate_inputs(pred, ref, spacing_mm)
  structure = _structure(pred.ndim, connectivity)
  voxel_ml = float(np.prod(spacing)) / 1000.0

  ref_labels, num_lesions = ndimage.label(ref, structure)
  pred_labels, num_components = ndimage.label(pred, structure)
  ref_boxes = ndimage.find_objects(ref_labels)
  pred_boxes = ndimage.find_objects(pred_labels)
  ref_sizes = np.bincount(ref_labels.ravel(), minlength=num_lesions + 1)
  pred_sizes = np.bincount(pred_labels.ravel(), minlength=num_components + 1)

  overlap = ref & pred
  pairs = np.unique(np.stack([ref_labels[overlap], pred_labels[overlap]]), axis=1)
  matches = {lesion: [] for lesion in range(1, num_lesions + 1)}
  for lesion, component in pairs.T:
    matches[int(lesion)].append(int(component))
  matched_anywhere = {int(c) for c in pairs[1]}

  lesions = []
  for lesion, centroid in zip(range(1, num_lesions + 1), _centroids(ref_labels, num_lesions)):
    components = matches[lesion]
    # Metrics are translation invariant and every surface point lies in this box, so crop to it.
    box = _union_box([ref_boxes[lesion - 1]] + [pred_boxes[c - 1] for c in components])
    lesion_ref = ref_labels[box] == lesion
    lesion_pred = np.isin(pred_labels[box], components) if components else np.zeros_like(lesion_ref)
    metrics = surface.segmentation_metrics(lesion_pred, lesion_ref, spacing, tolerances_mm, convention,
                                           empty_policy)
    predicted_voxels = int(sum(pred_sizes[c] for c in components))
    lesions.append(LesionMetrics(
        lesion_id=lesion,
        voxels=int(ref_sizes[lesion]),
        volume_ml=float(ref_sizes[lesion]) * voxel_ml,
        centroid_voxel=centroid,
        detected=bool(components),
        matched_components=tuple(components),
        predicted_voxels=predicted_voxels,
        predicted_volume_ml=predicted_voxels * voxel_ml,
        dice=metrics.dice,
        surface_dice=metrics.surface_dice,
        hd95_mm=metrics.hd95_mm,
    ))

  false_positives = [
      FalsePositiveComponent(component_id=c, voxels=int(pred_sizes[c]), volume_ml=float(pred_sizes[c]) * voxel_ml,
                             centroid_voxel=centroid)
      for c, centroid in zip(range(1, num_components + 1), _centroids(pred_labels, num_components))
      if c not in matched_anywhere
  ]
  return LesionEvaluation(lesions=lesions, false_positives=false_positives,
                          num_predicted_components=num_components)
