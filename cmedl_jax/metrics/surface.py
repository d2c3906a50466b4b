"""Overlap and surface metrics of binary segmentations, on the host (numpy + scipy).

Masks are 2D ``(H, W)`` or 3D ``(X, Y, Z)`` arrays of bool (or of integers holding only 0 and 1); ``spacing_mm``
has one positive entry per array axis. Three metrics:

* Dice (DSC): ``2 |P & R| / (|P| + |R|)``.
* Surface Dice at tolerance tau (sDSC, Nikolov et al. 2018; DeepMind ``surface-distance``): the surface of each
  mask is cut into surfels (marching-cubes triangles in 3D, line segments in 2D) that carry their area (length)
  in mm^2 (mm); sDSC = (area of R's surfels within tau of P's surface + area of P's surfels within tau of R's
  surface) / (area of R's surface + area of P's surface).
* HD95, the 95th-percentile Hausdorff distance, in one of three conventions (``convention=``):

  ===========  ===============================================  ==========  ======================================
  convention   surface points                                   weights     HD95
  ===========  ===============================================  ==========  ======================================
  "deepmind"   surfels: corners of the voxel grid whose 2x2x2   surfel      max over the two directions of the
  (default)    (2x2) neighbourhood is mixed                     area (mm^2) area-weighted 95th percentile:
                                                                            ``compute_robust_hausdorff``
  "monai"      boundary voxels: ``m & ~binary_erosion(m)``,     1 each      max over the two directions of
               cross-shaped (face-connected) structure                      ``np.percentile(d, 95)`` (linear
                                                                            interpolation); MONAI
                                                                            ``compute_hausdorff_distance``
  "medpy"      boundary voxels as for "monai" (medpy            1 each      ``np.percentile`` (linear) of both
               ``connectivity=1``)                                          directions pooled: medpy ``hd95``
  ===========  ===============================================  ==========  ======================================

  In every convention the distance from a surface point to the other surface is the exact Euclidean distance
  (scipy ``distance_transform_edt`` with ``sampling=spacing_mm``) to the nearest surface point of the other mask.
  sDSC always uses the DeepMind surfels.

Empty-case policy (explicit, identical for the host and the JAX implementation):

  ==================  ======  =======  ===================================================
  case                Dice    sDSC     HD95 (any convention)
  ==================  ======  =======  ===================================================
  both masks empty    1.0     1.0      0.0
  exactly one empty   0.0     0.0      ``inf`` (``empty_policy="inf"``, the default) or
                                       ``nan`` (``empty_policy="nan"``)
  ==================  ======  =======  ===================================================

Both empty means "correctly found nothing", which is a perfect result. ``inf`` is the default for exactly one
empty mask because it is what DeepMind's ``compute_robust_hausdorff`` returns (the default convention), and
because a missed (or hallucinated) tumour must never look good: ``inf`` propagates into means and sorts last in
rank statistics, whereas ``nan`` is silently dropped by ``nanmean`` and by MONAI's reductions. Choose ``"nan"``
when the downstream analysis should treat such a case as undefined and count it separately. (The reference
libraries differ here: DeepMind gives NaN Dice/sDSC and inf HD95 for both empty; MONAI gives NaN HD95 for both
empty and inf for one; medpy raises. This module overrides all of them with the table above.)

Reproduces DeepMind's ``compute_surface_distances`` / ``compute_surface_dice_at_tolerance`` /
``compute_robust_hausdorff`` (github.com/deepmind/surface-distance), medpy 0.5.2 ``metric.binary.hd95`` and
MONAI ``compute_hausdorff_distance(percentile=95)``; see docs/metrics.md. MONAI casts distances to float32, this
module keeps float64, so MONAI-convention numbers agree with MONAI to about 1e-7 relative.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Literal, Sequence

import numpy as np
from scipy import ndimage

Convention = Literal["deepmind", "monai", "medpy"]
EmptyPolicy = Literal["inf", "nan"]

CONVENTIONS = ("deepmind", "monai", "medpy")
EMPTY_POLICIES = ("inf", "nan")
DEFAULT_CONVENTION = "deepmind"
DEFAULT_EMPTY_POLICY = "inf"

# The empty-case table of the module docstring, as constants shared with the JAX implementation.
BOTH_EMPTY_DICE = 1.0
BOTH_EMPTY_SURFACE_DICE = 1.0
BOTH_EMPTY_HAUSDORFF_MM = 0.0
ONE_EMPTY_DICE = 0.0
ONE_EMPTY_SURFACE_DICE = 0.0


def one_empty_hausdorff_mm(empty_policy: EmptyPolicy = DEFAULT_EMPTY_POLICY) -> float:
  """HD95 when exactly one mask is empty: ``inf`` or ``nan`` according to ``empty_policy``."""
  check_choice("empty_policy", empty_policy, EMPTY_POLICIES)
  return math.inf if empty_policy == "inf" else math.nan


# ---------------------------------------------------------------------------------------------------------------
# Surfel tables.
#
# A surfel sits on a corner of the voxel grid and is determined by which of the 2^ndim voxels around that corner
# are inside the mask. The "neighbour code" numbers these configurations exactly as DeepMind does: the voxel at
# offset (a, b, c) in the 2x2x2 neighbourhood sets bit 7 - (4a + 2b + c) (in 2D, offset (a, b) sets bit
# 3 - (2a + b)).
#
# 3D: the surfel is the marching-cubes surface inside the 2x2x2 cell, with vertices on the midpoints of the cell
# edges whose two voxels differ. Its area at spacing (s0, s1, s2) is the sum over its triangles of
# |(n0 s1 s2, n1 s0 s2, n2 s0 s1)|, where n is the triangle's area vector at unit spacing. The 256 codes fall
# into 14 classes under the 48 symmetries of the cube and inside/outside complement; each class is listed once
# below and expanded by symmetry. Triangulations only matter for the two non-planar polygons (the L of three
# corners and the chain of four corners); they follow DeepMind's table so that areas agree with it exactly
# (checked in tests/test_metrics.py against surface_distance.lookup_tables).
# ---------------------------------------------------------------------------------------------------------------


def _cap(corner: str) -> tuple[str, str, str]:
  """Triangle cutting off one corner: the midpoints of its three edges (doubled coordinates)."""
  doubled = [2 * int(c) for c in corner]
  midpoints = []
  for axis in range(3):
    point = list(doubled)
    point[axis] = 1
    midpoints.append("".join(str(p) for p in point))
  return tuple(midpoints)


# (inside corners "abc", triangles as three vertices "xyz" in doubled coordinates: 1 is an edge midpoint).
_BASE_CASES_3D = (
    (("111",), (_cap("111"),)),  # one corner
    (("110", "111"), (("120", "210", "212"), ("120", "212", "122"))),  # an edge: rectangle
    (("101", "110"), (_cap("101"), _cap("110"))),  # face diagonal: corners kept apart
    # L of three corners on the face a=1: pentagon = flat triangle on the three edges leaving that face + quad.
    (("101", "110", "111"), (("102", "120", "122"), ("102", "201", "210"), ("102", "210", "120"))),
    (("100", "101", "110", "111"), (("100", "102", "122"), ("100", "122", "120"))),  # a face: square
    (("011", "101", "110"), (_cap("011"), _cap("101"), _cap("110"))),  # three isolated corners
    # A corner and its three neighbours: planar regular hexagon.
    (("011", "101", "110", "111"),
     (("012", "102", "201"), ("012", "201", "210"), ("012", "210", "120"), ("012", "120", "021"))),
    (("011", "100"), (_cap("011"), _cap("100"))),  # two opposite corners
    (("011", "100", "111"), (("012", "212", "221"), ("012", "221", "021"), _cap("100"))),  # edge + corner
    # Chain of three edges: skew hexagon = triangle on alternate vertices + three ears.
    (("011", "100", "110", "111"),
     (("012", "120", "201"), ("012", "021", "120"), ("120", "100", "201"), ("201", "212", "012"))),
    # L of three corners + an isolated corner.
    (("011", "100", "101", "110"),
     (("102", "120", "100"), ("102", "212", "221"), ("102", "221", "120"), _cap("011"))),
    # Two parallel edges on opposite sides of the cell: two rectangles.
    (("010", "011", "100", "101"),
     (("010", "120", "122"), ("010", "122", "012"), ("100", "210", "212"), ("100", "212", "102"))),
    (("001", "010", "100", "111"), (_cap("001"), _cap("010"), _cap("100"), _cap("111"))),  # four corners
)

_MAX_TRIANGLES = 4


def _neighbour_code(corners) -> int:
  return sum(1 << (7 - (4 * a + 2 * b + c)) for a, b, c in corners)


@functools.lru_cache(maxsize=None)
def surfel_area_vectors_3d() -> np.ndarray:
  """Absolute triangle area vectors of every 3D neighbour code at unit spacing, in units of 1/8 voxel face.

  Returns:
    (256, 4, 3) int array: for each code up to 4 triangles (zero rows pad), each |area vector| * 8 per axis.
  """
  table = {}
  for corners, triangles in _BASE_CASES_3D:
    corner_points = [tuple(int(c) for c in corner) for corner in corners]
    vectors = []
    for triangle in triangles:
      v0, v1, v2 = (np.array([int(c) for c in vertex]) for vertex in triangle)
      # In doubled coordinates the cross product is 8x the area vector: exactly the 1/8 units wanted.
      vectors.append(tuple(int(x) for x in np.abs(np.cross(v1 - v0, v2 - v0))))
    for perm in itertools.permutations(range(3)):
      for flips in itertools.product((0, 1), repeat=3):
        moved = [tuple(p[perm[i]] ^ flips[i] for i in range(3)) for p in corner_points]
        moved_vectors = sorted(tuple(v[perm[i]] for i in range(3)) for v in vectors)
        code = _neighbour_code(moved)
        for c in (code, 255 - code):  # the complement has the same surface
          if table.setdefault(c, moved_vectors) != moved_vectors:
            raise AssertionError(f"inconsistent surfel table for code {c}")
  table[0] = table[255] = []
  if len(table) != 256:
    raise AssertionError(f"surfel table covers {len(table)} of 256 codes")
  out = np.zeros((256, _MAX_TRIANGLES, 3), np.int64)
  for code, vectors in table.items():
    if vectors:
      out[code, :len(vectors)] = vectors
  return out


@functools.lru_cache(maxsize=None)
def contour_length_coefficients_2d() -> np.ndarray:
  """Contour length of every 2D neighbour code as integer combination of (half diagonal, s0, s1).

  One inside (or outside) pixel: a segment cutting the corner, half a pixel diagonal. Two pixels side by side:
  a straight segment across the cell, s1 long when they share a row (differ along axis 1), s0 when they share a
  column. Two diagonal pixels: two corner segments.

  Returns:
    (16, 3) int array of coefficients of (0.5 * sqrt(s0^2 + s1^2), s0, s1).
  """
  out = np.zeros((16, 3), np.int64)
  for code in range(16):
    inside = [(a, b) for a in (0, 1) for b in (0, 1) if code >> (3 - (2 * a + b)) & 1]
    if len(inside) in (1, 3):
      out[code] = (1, 0, 0)
    elif len(inside) == 2:
      (a0, b0), (a1, b1) = inside
      if a0 == a1:
        out[code] = (0, 0, 1)
      elif b0 == b1:
        out[code] = (0, 1, 0)
      else:
        out[code] = (2, 0, 0)
  return out


def surfel_area_table(spacing_mm: Sequence[float]) -> np.ndarray:
  """Surfel area (3D, mm^2) or contour length (2D, mm) of every neighbour code at this spacing.

  Args:
    spacing_mm: (ndim,) voxel size, ndim in {2, 3}.

  Returns:
    (256,) float64 in 3D, (16,) in 2D.
  """
  s = np.asarray(spacing_mm, np.float64)
  if s.shape == (3,):
    scale = np.array([s[1] * s[2], s[0] * s[2], s[0] * s[1]]) / 8.0
    return np.sqrt(np.sum(np.square(surfel_area_vectors_3d() * scale), axis=-1)).sum(axis=-1)
  if s.shape == (2,):
    pieces = np.array([0.5 * math.sqrt(s[0] ** 2 + s[1] ** 2), s[0], s[1]])
    return np.sum(contour_length_coefficients_2d() * pieces, axis=-1)
  raise ValueError(f"spacing_mm must have 2 or 3 entries, got {len(s)}")


# ---------------------------------------------------------------------------------------------------------------
# Validation.
# ---------------------------------------------------------------------------------------------------------------


def check_choice(name, value, choices):
  if value not in choices:
    raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def as_mask(name: str, array) -> np.ndarray:
  """Returns ``array`` as a bool numpy array; accepts bool, or integers that are all 0 or 1."""
  array = np.asarray(array)
  if array.dtype == bool:
    return array
  if np.issubdtype(array.dtype, np.integer) and np.all((array == 0) | (array == 1)):
    return array.astype(bool)
  raise ValueError(
      f"{name} must be a binary mask (bool, or integers 0/1), got dtype {array.dtype}; threshold or argmax "
      "probabilities first")


def check_shapes(pred_shape, ref_shape, spacing_entries: int) -> None:
  """Raises ValueError unless both masks have one 2D or 3D shape and the spacing has one entry per axis.

  Shapes only, so the jitted metrics check traced masks and spacings with it too.
  """
  pred_shape, ref_shape = tuple(pred_shape), tuple(ref_shape)
  if pred_shape != ref_shape:
    raise ValueError(f"pred and ref must have the same shape, got pred {pred_shape} and ref {ref_shape}")
  if len(pred_shape) not in (2, 3):
    raise ValueError(f"masks must be 2D or 3D, got {len(pred_shape)}D of shape {pred_shape}")
  if spacing_entries != len(pred_shape):
    raise ValueError(
        f"spacing_mm must have one entry per mask axis ({len(pred_shape)} for shape {pred_shape}), got "
        f"{spacing_entries}")


def check_spacing_values(spacing: Sequence[float]) -> None:
  if not all(math.isfinite(s) and s > 0 for s in spacing):
    raise ValueError(f"spacing_mm entries must be finite and > 0, got {tuple(spacing)}")


def validate_inputs(pred, ref, spacing_mm) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
  """Checks a pair of masks and their spacing; returns (pred, ref) as bool arrays and spacing as floats.

  Raises:
    ValueError: masks that are not binary, of different shapes, not 2D/3D, or a spacing of the wrong length or
      with entries that are not finite and positive.
  """
  pred = as_mask("pred", pred)
  ref = as_mask("ref", ref)
  spacing = tuple(float(s) for s in np.atleast_1d(np.asarray(spacing_mm, dtype=np.float64)))
  check_shapes(pred.shape, ref.shape, len(spacing))
  check_spacing_values(spacing)
  return pred, ref, spacing


def check_tolerance(tolerance_mm, name: str = "tolerance_mm") -> float:
  tolerance = float(tolerance_mm)
  if not (math.isfinite(tolerance) and tolerance >= 0):
    raise ValueError(f"{name} must be finite and >= 0, got {tolerance_mm}")
  return tolerance


def check_percent(percent) -> float:
  percent = float(percent)
  if not 0.0 <= percent <= 100.0:  # also rejects nan
    raise ValueError(f"percent must be in [0, 100], got {percent}")
  return percent


# ---------------------------------------------------------------------------------------------------------------
# Surfaces and distances.
# ---------------------------------------------------------------------------------------------------------------


def neighbour_codes(mask: np.ndarray) -> np.ndarray:
  """Neighbour code of every corner of the voxel grid, the mask being surrounded by background.

  Args:
    mask: (n0, n1[, n2]) bool.

  Returns:
    (n0 + 1, n1 + 1[, n2 + 1]) uint8 code; corner i lies between voxels i - 1 and i on every axis.
  """
  ndim = mask.ndim
  padded = np.pad(mask.astype(np.uint8), 1)  # codes fit in 8 bits (3D) or 4 (2D)
  codes = np.zeros(tuple(n + 1 for n in mask.shape), np.uint8)
  for offset in itertools.product((0, 1), repeat=ndim):
    bit = (2 ** ndim - 1) - sum(o << (ndim - 1 - i) for i, o in enumerate(offset))
    window = tuple(slice(o, o + n + 1) for o, n in zip(offset, mask.shape))
    codes |= padded[window] << bit
  return codes


def surfels(mask: np.ndarray, spacing_mm: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
  """DeepMind surfels of a mask.

  Args:
    mask: (n0, n1[, n2]) bool.
    spacing_mm: (ndim,).

  Returns:
    (is_surfel, area): both of shape (n0 + 1, n1 + 1[, n2 + 1]); area in mm^2 (3D) or mm (2D), 0 off surface.
  """
  codes = neighbour_codes(mask)
  full = 2 ** (2 ** mask.ndim) - 1
  is_surfel = (codes != 0) & (codes != full)
  area = np.zeros(codes.shape, np.float64)
  area[is_surfel] = surfel_area_table(spacing_mm)[codes[is_surfel]]
  return is_surfel, area


def boundary_voxels(mask: np.ndarray) -> np.ndarray:
  """Voxels of ``mask`` with a face neighbour outside it (outside the array counts as background).

  This is ``mask ^ binary_erosion(mask)`` with the cross-shaped structure, as in MONAI ``get_mask_edges`` and
  medpy ``__surface_distances(connectivity=1)``.
  """
  structure = ndimage.generate_binary_structure(mask.ndim, 1)
  return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _union_bounding_box(a: np.ndarray, b: np.ndarray):
  """Slices of the bounding box of ``a | b``, or None when both are empty."""
  boxes = ndimage.find_objects((a | b).astype(np.int8))
  return boxes[0] if boxes else None


@dataclasses.dataclass(frozen=True)
class SurfaceDistances:
  """Distances from each surface point of one mask to the other mask's surface, sorted ascending.

  Attributes:
    distances_ref_to_pred_mm: (n_ref,) float64, from the reference surface to the predicted surface.
    distances_pred_to_ref_mm: (n_pred,) float64.
    weights_ref: (n_ref,) surfel areas (mm^2, "deepmind" 3D), contour lengths (mm, "deepmind" 2D) or ones
      (voxel conventions), in the order of ``distances_ref_to_pred_mm``.
    weights_pred: (n_pred,).
    convention: which surface points these are.
  """

  distances_ref_to_pred_mm: np.ndarray
  distances_pred_to_ref_mm: np.ndarray
  weights_ref: np.ndarray
  weights_pred: np.ndarray
  convention: str


def _sorted_pairs(distances, weights):
  # Ties in distance are broken by weight, as DeepMind's sorted(zip(distances, areas)) does; the order inside a
  # tie changes the rounding of the cumulative sums the percentile is read from.
  order = np.lexsort((weights, distances))
  return distances[order], weights[order]


def compute_surface_distances(pred, ref, spacing_mm, convention: Convention = DEFAULT_CONVENTION
                             ) -> SurfaceDistances:
  """Surface points of both masks and their distances to the other surface.

  Works on the bounding box of ``pred | ref`` (every surface point lies in it, distances are translation
  invariant), like DeepMind's implementation. If a mask is empty its arrays are empty and the other mask's
  distances are ``inf``.

  Args:
    pred: (n0, n1[, n2]) binary predicted mask.
    ref: same shape, binary reference mask.
    spacing_mm: (ndim,) voxel size.
    convention: "deepmind" (weighted surfels) or "monai"/"medpy" (boundary voxels, weight 1).

  Returns:
    SurfaceDistances.
  """
  pred, ref, spacing = validate_inputs(pred, ref, spacing_mm)
  check_choice("convention", convention, CONVENTIONS)
  box = _union_bounding_box(pred, ref)
  if box is None:
    empty = np.zeros((0,), np.float64)
    return SurfaceDistances(empty, empty, empty, empty, convention)
  pred, ref = pred[box], ref[box]
  if convention == "deepmind":
    pred_points, pred_weights = surfels(pred, spacing)
    ref_points, ref_weights = surfels(ref, spacing)
  else:
    pred_points, ref_points = boundary_voxels(pred), boundary_voxels(ref)
    pred_weights, ref_weights = pred_points.astype(np.float64), ref_points.astype(np.float64)

  def distance_to(points):
    if not points.any():
      return np.full(points.shape, np.inf)
    return ndimage.distance_transform_edt(~points, sampling=spacing)

  ref_to_pred, weights_ref = _sorted_pairs(distance_to(pred_points)[ref_points], ref_weights[ref_points])
  pred_to_ref, weights_pred = _sorted_pairs(distance_to(ref_points)[pred_points], pred_weights[pred_points])
  return SurfaceDistances(ref_to_pred, pred_to_ref, weights_ref, weights_pred, convention)


# ---------------------------------------------------------------------------------------------------------------
# Metrics from distances.
# ---------------------------------------------------------------------------------------------------------------


def weighted_percentile(sorted_distances: np.ndarray, weights: np.ndarray, percent: float) -> float:
  """DeepMind's area-weighted percentile: the distance of the first surfel (in ascending order) at which the
  cumulative weight fraction reaches ``percent / 100``; the largest distance if rounding keeps it below.

  Args:
    sorted_distances: (n,) ascending, n >= 1.
    weights: (n,) non-negative, in the same order.
    percent: in [0, 100].
  """
  cumulative = np.cumsum(weights) / np.sum(weights)
  index = np.searchsorted(cumulative, percent / 100.0)
  return float(sorted_distances[min(index, len(sorted_distances) - 1)])


def surface_dice_from_distances(distances: SurfaceDistances, tolerance_mm: float) -> float:
  """sDSC at ``tolerance_mm`` (a surface point counts when its distance is <= the tolerance).

  Both surfaces empty -> 1.0 and one empty -> 0.0 (the module's empty-case policy).
  """
  tolerance = check_tolerance(tolerance_mm)
  d = distances
  n_ref, n_pred = len(d.distances_ref_to_pred_mm), len(d.distances_pred_to_ref_mm)
  if n_ref == 0 and n_pred == 0:
    return BOTH_EMPTY_SURFACE_DICE
  if n_ref == 0 or n_pred == 0:
    return ONE_EMPTY_SURFACE_DICE
  overlap = (np.sum(d.weights_ref[d.distances_ref_to_pred_mm <= tolerance])
             + np.sum(d.weights_pred[d.distances_pred_to_ref_mm <= tolerance]))
  return float(overlap / (np.sum(d.weights_ref) + np.sum(d.weights_pred)))


def robust_hausdorff_from_distances(distances: SurfaceDistances, percent: float = 95.0,
                                    empty_policy: EmptyPolicy = DEFAULT_EMPTY_POLICY) -> float:
  """Percentile Hausdorff distance (mm) in the convention the distances were computed with."""
  percent = check_percent(percent)
  d = distances
  n_ref, n_pred = len(d.distances_ref_to_pred_mm), len(d.distances_pred_to_ref_mm)
  if n_ref == 0 and n_pred == 0:
    return BOTH_EMPTY_HAUSDORFF_MM
  if n_ref == 0 or n_pred == 0:
    return one_empty_hausdorff_mm(empty_policy)
  if d.convention == "deepmind":
    return max(weighted_percentile(d.distances_ref_to_pred_mm, d.weights_ref, percent),
               weighted_percentile(d.distances_pred_to_ref_mm, d.weights_pred, percent))
  if d.convention == "monai":
    return float(max(np.percentile(d.distances_pred_to_ref_mm, percent),
                     np.percentile(d.distances_ref_to_pred_mm, percent)))
  # medpy pools the two directed distance sets (result->reference first; the order does not matter).
  pooled = np.concatenate([d.distances_pred_to_ref_mm, d.distances_ref_to_pred_mm])
  return float(np.percentile(pooled, percent))


# ---------------------------------------------------------------------------------------------------------------
# Public metrics on masks.
# ---------------------------------------------------------------------------------------------------------------


def dice(pred, ref) -> float:
  """Dice similarity coefficient of two binary masks of equal shape (any ndim); 1.0 when both are empty."""
  pred, ref = as_mask("pred", pred), as_mask("ref", ref)
  if pred.shape != ref.shape:
    raise ValueError(f"pred and ref must have the same shape, got pred {pred.shape} and ref {ref.shape}")
  total = int(pred.sum()) + int(ref.sum())
  if total == 0:
    return BOTH_EMPTY_DICE
  return 2.0 * int(np.logical_and(pred, ref).sum()) / total


def surface_dice(pred, ref, spacing_mm, tolerance_mm: float) -> float:
  """Surface Dice at ``tolerance_mm`` with DeepMind surfels (see the module docstring)."""
  check_tolerance(tolerance_mm)
  return surface_dice_from_distances(compute_surface_distances(pred, ref, spacing_mm, "deepmind"), tolerance_mm)


def robust_hausdorff(pred, ref, spacing_mm, percent: float, convention: Convention = DEFAULT_CONVENTION,
                     empty_policy: EmptyPolicy = DEFAULT_EMPTY_POLICY) -> float:
  """Percentile Hausdorff distance in mm (``percent=100`` is the Hausdorff distance)."""
  check_percent(percent)
  check_choice("empty_policy", empty_policy, EMPTY_POLICIES)
  distances = compute_surface_distances(pred, ref, spacing_mm, convention)
  return robust_hausdorff_from_distances(distances, percent, empty_policy)


def hd95(pred, ref, spacing_mm, convention: Convention = DEFAULT_CONVENTION,
         empty_policy: EmptyPolicy = DEFAULT_EMPTY_POLICY) -> float:
  """95th-percentile Hausdorff distance in mm; ``convention`` and ``empty_policy`` as in the module docstring."""
  return robust_hausdorff(pred, ref, spacing_mm, 95.0, convention, empty_policy)


def surface_dice_key(tolerance_mm: float) -> str:
  """Column name of the sDSC at a tolerance, e.g. ``surface_dice_1mm``, ``surface_dice_2.5mm``."""
  return f"surface_dice_{float(tolerance_mm):g}mm"


@dataclasses.dataclass(frozen=True)
class SegmentationMetrics:
  """Metrics of one (prediction, reference) pair.

  Attributes:
    dice: DSC.
    surface_dice: tolerance in mm -> sDSC.
    hd95_mm: HD95 in the requested convention.
    pred_voxels: foreground voxels of the prediction.
    ref_voxels: foreground voxels of the reference.
  """

  dice: float
  surface_dice: dict
  hd95_mm: float
  pred_voxels: int
  ref_voxels: int

  def as_row(self) -> dict:
    """Flat dict for a CSV row: dice, surface_dice_<tol>mm..., hd95_mm, pred_voxels, ref_voxels."""
    row = {"dice": self.dice}
    row.update({surface_dice_key(t): v for t, v in self.surface_dice.items()})
    row.update(hd95_mm=self.hd95_mm, pred_voxels=self.pred_voxels, ref_voxels=self.ref_voxels)
    return row


def segmentation_metrics(pred, ref, spacing_mm, tolerances_mm: Sequence[float] = (1.0, 2.0),
                         convention: Convention = DEFAULT_CONVENTION,
                         empty_policy: EmptyPolicy = DEFAULT_EMPTY_POLICY) -> SegmentationMetrics:
  """DSC, sDSC at each tolerance and HD95 of one pair, computing the surface distances once per convention."""
  pred, ref, spacing = validate_inputs(pred, ref, spacing_mm)
  check_choice("convention", convention, CONVENTIONS)
  check_choice("empty_policy", empty_policy, EMPTY_POLICIES)
  tolerances = [check_tolerance(t) for t in tolerances_mm]
  surfel_distances = compute_surface_distances(pred, ref, spacing, "deepmind")
  hd_distances = (surfel_distances if convention == "deepmind"
                  else compute_surface_distances(pred, ref, spacing, convention))
  return SegmentationMetrics(
      dice=dice(pred, ref),
      surface_dice={t: surface_dice_from_distances(surfel_distances, t) for t in tolerances},
      hd95_mm=robust_hausdorff_from_distances(hd_distances, 95.0, empty_policy),
      pred_voxels=int(pred.sum()),
      ref_voxels=int(ref.sum()),
  )
