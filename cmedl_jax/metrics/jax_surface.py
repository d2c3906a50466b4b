"""Jitted DSC, surface Dice and HD95 (DeepMind convention) that run entirely on the device.

Same definitions and empty-case policy as :mod:`cmedl_jax.metrics.surface` (the host reference), computed with
fixed shapes and no host callbacks, so it can sit inside an evaluation step on GPU/TPU:

1. Neighbour codes of every corner of the voxel grid from shifted copies of the zero-padded masks; surfel areas
   from the same marching-cubes table, evaluated on device for the (traced) spacing.
2. Exact squared Euclidean distance transform of both surfel sets with anisotropic spacing, separable along the
   axes in scipy's order (axis 0 first, so per-axis terms are added in the same order): along axis 0 exactly in
   O(n) with a scan that tracks the nearest surfel on either side; along every further axis a windowed min-plus
   ``d2[i] = min_{|k| <= K} d2[i + k] + (k * s)^2``. Memory is O(volume), no (n, n) intermediate (the peak for
   a CT-sized volume: docs/performance.md).
3. sDSC by masked sums; the area-weighted percentile by bisection over the bit patterns of the (non-negative)
   float distances: the smallest surfel distance whose cumulative area fraction reaches ``percent / 100``, i.e.
   DeepMind's ``searchsorted`` rule on the sorted surfels, clamped to the largest distance like DeepMind, without
   sorting.

Why the windowed min-plus is exact (search radius R mm, window K_a = ceil(R / s_a) + 1 grid steps, capped at the
extent of the bounding box of ``pred | ref``): a surfel whose true distance d is <= R has its nearest surfel within
d / s_a <= K_a steps on every axis, so the min-plus finds it; every other value is a distance to some real surfel,
hence an over-estimate, hence still > R. So all distances <= R are exact and the others stay > R, which leaves
sDSC exact for tolerances <= R, and the weighted percentile exact whenever it comes out <= R. R starts at
``max(max tolerance, 4 * max spacing)``; good segmentations finish in that round, with windows of a few voxels.
Otherwise the round's percentile, an upper bound of the true one (distances only over-estimate), becomes R, which
settles it in the next round (8 R if it was inf); windows that cover the bounding box settle everything.

Windows (``roi_fractions``, static, default (0.25, 0.5)): the computation runs on the smallest window of
``ceil(fraction * shape)`` voxels (per axis) that contains ``pred | ref`` (``lax.switch`` over the candidate
windows and the whole volume), placed with ``dynamic_slice``; results are identical, the work shrinks with the
window.

Precision: float32 unless ``jax_enable_x64`` is on. In float32 the results agree with the float64 host
implementation to ~1e-6 relative, except where a surface distance equals a tolerance, or a cumulative area
fraction equals the percentile, exactly in real arithmetic: there the comparison is decided by rounding (in either
implementation). With x64 enabled such ties agree with the host as well.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cmedl_jax.metrics import surface

# Offsets handled per iteration of the min-plus loop: amortizes loop overhead, costs at most _BLOCK - 1 extra.
_BLOCK = 4
# The first search radius is at least this many voxels of the coarsest axis.
_FIRST_RADIUS_VOXELS = 4.0

DEFAULT_ROI_FRACTIONS = (0.25, 0.5)


def _float_dtype():
  return jnp.asarray(0.0).dtype  # float64 under jax_enable_x64, else float32


# Arrays below hold the prediction and the reference together, stacked on a trailing axis of size 2.


def _neighbour_codes(masks: jax.Array) -> jax.Array:
  """(n0, n1[, n2], 2) bool -> (n0 + 1, n1 + 1[, n2 + 1], 2) int32 codes in DeepMind's bit order."""
  spatial = masks.shape[:-1]
  ndim = len(spatial)
  padded = jnp.pad(masks.astype(jnp.int32), [(1, 1)] * ndim + [(0, 0)])
  codes = jnp.zeros(tuple(n + 1 for n in spatial) + masks.shape[-1:], jnp.int32)
  for offset in itertools.product((0, 1), repeat=ndim):
    bit = (2 ** ndim - 1) - sum(o << (ndim - 1 - i) for i, o in enumerate(offset))
    window = tuple(slice(o, o + n + 1) for o, n in zip(offset, spatial))
    codes = codes | (padded[window] << bit)
  return codes


def _surfel_area_table(spacing: jax.Array) -> jax.Array:
  """(ndim,) spacing -> (2^(2^ndim),) surfel area per neighbour code, as surface.surfel_area_table."""
  dtype = spacing.dtype
  if spacing.shape[0] == 3:
    vectors = jnp.asarray(surface.surfel_area_vectors_3d(), dtype)
    scale = jnp.stack([spacing[1] * spacing[2], spacing[0] * spacing[2], spacing[0] * spacing[1]]) / 8.0
    return jnp.sqrt(jnp.sum(jnp.square(vectors * scale), axis=-1)).sum(axis=-1)
  coefficients = jnp.asarray(surface.contour_length_coefficients_2d(), dtype)
  pieces = jnp.stack([0.5 * jnp.sqrt(spacing[0] ** 2 + spacing[1] ** 2), spacing[0], spacing[1]])
  # Elementwise, not a matmul: GPU matmuls may run in reduced precision.
  return jnp.sum(coefficients * pieces, axis=-1)


def _axis0_squared_distance(points: jax.Array, step: jax.Array) -> jax.Array:
  """Squared distance along axis 0 to the nearest point on the same line (inf if none), exact, O(n)."""
  n = points.shape[0]
  index = jnp.arange(n, dtype=jnp.int32)

  def remember_last(last, row_and_index):
    row, i = row_and_index
    last = jnp.where(row, i, last)
    return last, last

  # A scan over the leading axis needs no transpose and is linear (XLA's cummax is not, on CPU).
  _, before = lax.scan(remember_last, jnp.full(points.shape[1:], -2 * n, jnp.int32), (points, index))
  _, after = lax.scan(remember_last, jnp.full(points.shape[1:], 3 * n, jnp.int32), (points, index), reverse=True)
  index = index.reshape((n,) + (1,) * (points.ndim - 1))
  gap = jnp.minimum(index - before, after - index)
  distance = gap.astype(step.dtype) * step
  return jnp.where(gap <= n, distance * distance, jnp.inf)


def _windowed_min_plus(squared: jax.Array, axis: int, step: jax.Array, window: jax.Array) -> jax.Array:
  """``out[i] = min_{|k| <= window} squared[i + k] + (k * step)^2`` along ``axis``."""
  n = squared.shape[axis]
  if n == 1:
    return squared
  pad = [(0, 0)] * squared.ndim
  pad[axis] = (n - 1, n - 1)
  padded = jnp.pad(squared, pad, constant_values=jnp.inf)

  def add_offsets(block, best):
    for b in range(_BLOCK):
      k = jnp.minimum(block * _BLOCK + b + 1, n - 1)
      shift = k.astype(step.dtype) * step
      ahead = lax.dynamic_slice_in_dim(padded, n - 1 + k, n, axis)
      behind = lax.dynamic_slice_in_dim(padded, n - 1 - k, n, axis)
      best = jnp.minimum(best, jnp.minimum(ahead, behind) + shift * shift)
    return best

  num_blocks = (jnp.minimum(window, n - 1) + _BLOCK - 1) // _BLOCK
  return lax.fori_loop(0, num_blocks, add_offsets, squared)


def _bounding_box(mask: jax.Array):
  """First and last foreground index per axis, (ndim,) int32 each (meaningless for an empty mask)."""
  first, last = [], []
  for axis in range(mask.ndim):
    line = jnp.any(mask, axis=tuple(a for a in range(mask.ndim) if a != axis))
    first.append(jnp.argmax(line))
    last.append(mask.shape[axis] - 1 - jnp.argmax(line[::-1]))
  return jnp.stack(first).astype(jnp.int32), jnp.stack(last).astype(jnp.int32)


def weighted_percentile(distances: jax.Array, weights: jax.Array, fraction: jax.Array) -> jax.Array:
  """DeepMind's area-weighted percentile of each column, without sorting.

  Args:
    distances: (m, batch) non-negative; entries with zero weight are ignored.
    weights: (m, batch) >= 0.
    fraction: percent / 100.

  Returns:
    (batch,) the smallest distance d of positive weight with weight(distances <= d) / total >= fraction, or the
    largest one when rounding keeps every fraction below it; 0 for a column without weight.
  """
  int_dtype = jnp.int64 if distances.dtype == jnp.float64 else jnp.int32
  # For non-negative IEEE floats the bit pattern, read as an integer, is ordered like the value.
  bits = lax.bitcast_convert_type(distances, int_dtype)
  total = jnp.sum(weights, axis=0)
  weighted = weights > 0
  # Search (low, high]: the answer is a weighted distance, at least the smallest (DeepMind's index 0).
  low = jnp.min(jnp.where(weighted, bits, jnp.iinfo(int_dtype).max), axis=0) - 1
  high = jnp.max(jnp.where(weighted, bits, 0), axis=0)
  low = jnp.minimum(low, high - 1)  # a column without weight: nothing to search

  def unresolved(bounds):
    low, high = bounds
    return jnp.any(high - low > 1)

  def halve(bounds):
    low, high = bounds
    middle = low + (high - low) // 2
    below = jnp.sum(jnp.where(bits <= middle, weights, 0), axis=0)
    reached = below / total >= fraction
    return jnp.where(reached, low, middle), jnp.where(reached, middle, high)

  _, high = lax.while_loop(unresolved, halve, (low, high))
  return lax.bitcast_convert_type(high, distances.dtype)


def _surface_distances(is_surfel, areas, spacing, extents, fraction, first_radius):
  """Distances of every surfel to the other surface, exact up to the search radius that settles the percentile.

  Returns:
    (distances (m, 2), percentiles (2,)): column 0 from pred surfels to the ref surface, column 1 the reverse.
  """
  axis0 = _axis0_squared_distance(is_surfel, spacing[0])
  weights = areas.reshape(-1, 2)

  def attempt(radius):
    windows = jnp.minimum(jnp.ceil(radius / spacing).astype(jnp.int32) + 1, extents)
    squared = axis0
    for axis in range(1, spacing.shape[0]):
      squared = _windowed_min_plus(squared, axis, spacing[axis], windows[axis])
    # Column 0 of `squared` is the distance map of pred's surfels: read it at ref's surfels, and vice versa.
    distances = jnp.sqrt(jnp.where(is_surfel, squared[..., ::-1], 0.0)).reshape(-1, 2)
    percentiles = weighted_percentile(distances, weights, fraction)
    settled = jnp.all(percentiles <= radius) | jnp.all(windows[1:] >= extents[1:])
    return distances, percentiles, settled

  def unsettled(state):
    return ~state[-1]

  def widen(state):
    radius, _, percentiles, _ = state
    # Computed distances only over-estimate, so the computed percentile bounds the true one from above: searching
    # that far settles it in the next round. Where a window held no surfel at all it is inf: widen a lot instead.
    largest = jnp.max(percentiles)
    radius = jnp.where(jnp.isfinite(largest), largest, 8.0 * radius)
    return (radius,) + attempt(radius)

  state = (first_radius,) + attempt(first_radius)
  _, distances, percentiles, _ = lax.while_loop(unsettled, widen, state)
  return distances, percentiles


def _metrics(pred, ref, spacing, tolerances, fraction, one_empty_hd):
  """All metrics on the given arrays (no cropping)."""
  dtype = spacing.dtype
  pred_voxels = jnp.sum(pred, dtype=jnp.int32)
  ref_voxels = jnp.sum(ref, dtype=jnp.int32)
  both_empty = (pred_voxels == 0) & (ref_voxels == 0)
  one_empty = (pred_voxels == 0) != (ref_voxels == 0)

  codes = _neighbour_codes(jnp.stack([pred, ref], axis=-1))
  full = 2 ** (2 ** pred.ndim) - 1
  is_surfel = (codes != 0) & (codes != full)
  areas = jnp.where(is_surfel, _surfel_area_table(spacing)[codes], 0.0)

  first, last = _bounding_box(pred | ref)
  # All surfels of both masks lie within this many grid steps per axis; with an empty mask the distances are
  # discarded (empty-case policy), so nothing is searched.
  extents = jnp.where(both_empty | one_empty, 0, last - first + 1)
  max_tolerance = jnp.max(tolerances, initial=0.0)
  first_radius = jnp.maximum(max_tolerance, _FIRST_RADIUS_VOXELS * jnp.max(spacing))
  distances, percentiles = _surface_distances(is_surfel, areas, spacing, extents, fraction, first_radius)

  weights = areas.reshape(-1, 2)
  total_area = jnp.sum(weights)
  within = [jnp.sum(jnp.where(distances <= tolerances[i], weights, 0.0)) / total_area
            for i in range(tolerances.shape[0])]
  surface_dice = jnp.stack(within) if within else jnp.zeros((0,), dtype)
  hd = jnp.max(percentiles)

  overlap = jnp.sum(pred & ref, dtype=jnp.int32)
  dice = 2.0 * overlap.astype(dtype) / jnp.maximum((pred_voxels + ref_voxels).astype(dtype), 1.0)

  dice = jnp.where(both_empty, surface.BOTH_EMPTY_DICE, jnp.where(one_empty, surface.ONE_EMPTY_DICE, dice))
  surface_dice = jnp.where(both_empty, surface.BOTH_EMPTY_SURFACE_DICE,
                           jnp.where(one_empty, surface.ONE_EMPTY_SURFACE_DICE, surface_dice))
  hd = jnp.where(both_empty, surface.BOTH_EMPTY_HAUSDORFF_MM, jnp.where(one_empty, one_empty_hd, hd))
  return {"dice": dice.astype(dtype), "surface_dice": surface_dice.astype(dtype), "hd95": hd.astype(dtype),
          "pred_voxels": pred_voxels, "ref_voxels": ref_voxels}


def roi_shapes(shape: Sequence[int], fractions: Sequence[float]) -> list[tuple[int, ...]]:
  """Candidate windows, smallest first: ``ceil(f * n)`` voxels per axis for each fraction, whole-volume ones
  dropped."""
  shapes = []
  for fraction in sorted(fractions):
    if not 0.0 < fraction <= 1.0:
      raise ValueError(f"roi_fractions must be in (0, 1], got {fraction}")
    roi = tuple(min(n, max(1, math.ceil(fraction * n))) for n in shape)
    if roi != tuple(shape) and roi not in shapes:
      shapes.append(roi)
  return shapes


@functools.partial(jax.jit, static_argnames=("empty_policy", "roi_fractions"))
def _surface_metrics(pred, ref, spacing, tolerances, fraction, empty_policy, roi_fractions):
  compute = functools.partial(_metrics, spacing=spacing, tolerances=tolerances, fraction=fraction,
                              one_empty_hd=surface.one_empty_hausdorff_mm(empty_policy))
  windows = roi_shapes(pred.shape, roi_fractions)
  if not windows:
    return compute(pred, ref)
  union = pred | ref
  first, last = _bounding_box(union)
  extent = last - first + 1
  shape = jnp.asarray(pred.shape)

  def on_window(roi):
    def run(pred, ref):
      size = jnp.asarray(roi)
      # Centre the window on the masks; outside it both masks are background, exactly as padding assumes.
      start = jnp.clip(first - (size - extent) // 2, 0, shape - size)
      starts = tuple(start[i] for i in range(pred.ndim))
      return compute(lax.dynamic_slice(pred, starts, roi), lax.dynamic_slice(ref, starts, roi))
    return run

  empty = ~jnp.any(union)
  fits = [empty | jnp.all(extent <= jnp.asarray(roi)) for roi in windows] + [jnp.asarray(True)]
  branch = jnp.argmax(jnp.stack(fits))  # the smallest window that holds both masks, else the whole volume
  return lax.switch(branch, [on_window(roi) for roi in windows] + [compute], pred, ref)


def surface_metrics_jax(pred, ref, spacing_mm, tolerances_mm: Sequence[float] = (1.0, 2.0), *,
                        percent: float = 95.0, empty_policy: surface.EmptyPolicy = surface.DEFAULT_EMPTY_POLICY,
                        roi_fractions: Sequence[float] = DEFAULT_ROI_FRACTIONS) -> dict:
  """DSC, sDSC per tolerance and HD95 (DeepMind convention) of one pair, jitted.

  Compiles once per (shape, number of tolerances, empty_policy, roi_fractions); spacing, tolerances and percent
  are traced, so volumes with different spacings reuse the compiled function. Can be called inside ``jax.jit``
  (value checks of spacing/tolerances/percent are then skipped).

  Args:
    pred: (n0, n1[, n2]) bool predicted mask (nonzero is foreground).
    ref: same shape, reference mask.
    spacing_mm: (ndim,) voxel size in mm.
    tolerances_mm: (t,) sDSC tolerances in mm.
    percent: Hausdorff percentile in [0, 100] (100: Hausdorff distance).
    empty_policy: HD95 when exactly one mask is empty: "inf" (default) or "nan".
    roi_fractions: static; windows (fractions of the shape per axis) to compute on when ``pred | ref`` fits;
      ``()`` always computes on the whole volume. Results do not depend on it.

  Returns:
    dict of arrays: "dice" (), "surface_dice" (t,), "hd95" () in mm, "pred_voxels" (), "ref_voxels" ().

  Raises:
    ValueError: shape mismatch, not 2D/3D, wrong spacing length, a bad roi fraction or empty_policy, and for
      concrete values: spacing not finite and > 0, negative tolerance, percent outside [0, 100].
  """
  surface.check_choice("empty_policy", empty_policy, surface.EMPTY_POLICIES)
  pred, ref = jnp.asarray(pred), jnp.asarray(ref)
  dtype = _float_dtype()
  spacing = jnp.asarray(spacing_mm, dtype).reshape(-1)
  tolerances = jnp.asarray(tolerances_mm, dtype).reshape(-1)
  surface.check_shapes(pred.shape, ref.shape, spacing.shape[0])
  roi_fractions = tuple(float(f) for f in roi_fractions)
  roi_shapes(pred.shape, roi_fractions)  # validates the fractions
  _check_concrete_values(spacing_mm, tolerances_mm, percent)
  return _surface_metrics(pred.astype(bool), ref.astype(bool), spacing, tolerances,
                          jnp.asarray(percent, dtype) / 100.0, empty_policy, roi_fractions)


def _check_concrete_values(spacing_mm, tolerances_mm, percent):
  """The host metrics' value checks, where the values are concrete."""
  try:
    spacing = tuple(float(s) for s in np.asarray(spacing_mm, np.float64).reshape(-1))
    tolerances = [float(t) for t in np.asarray(tolerances_mm, np.float64).reshape(-1)]
    percent = float(percent)
  except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    return  # traced inside an outer jit: nothing to check here
  surface.check_spacing_values(spacing)
  for tolerance in tolerances:
    surface.check_tolerance(tolerance, "tolerances_mm")
  surface.check_percent(percent)
