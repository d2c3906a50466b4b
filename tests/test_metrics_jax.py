"""The jitted metrics (cmedl_jax.metrics.jax_surface) agree with the host implementation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from cmedl_jax import metrics
from cmedl_jax.metrics import jax_surface, surface

SHAPE_3D, SPACING_3D = (28, 32, 24), (0.8, 1.1, 2.5)
SHAPE_2D, SPACING_2D = (40, 36), (0.7, 1.9)
# Tolerances that no lattice distance of these spacings equals: in float32 a distance exactly equal to the
# tolerance may round to either side (see the jax_surface docstring); the x64 test covers such ties.
TOLERANCES = (0.5137, 1.0213, 2.3119)


def random_blobs(seed, shape, threshold=0.15, sigma=2.0):
  rng = np.random.default_rng(seed)
  return tuple(ndimage.gaussian_filter(rng.standard_normal(shape), sigma) > threshold for _ in range(2))


def host_metrics(pred, ref, spacing, percent=95.0, empty_policy="inf"):
  return {
      "dice": metrics.dice(pred, ref),
      "surface_dice": [metrics.surface_dice(pred, ref, spacing, t) for t in TOLERANCES],
      "hd95": metrics.robust_hausdorff(pred, ref, spacing, percent, empty_policy=empty_policy),
  }


def assert_agree(device, host):
  np.testing.assert_allclose(float(device["dice"]), host["dice"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(device["surface_dice"]), host["surface_dice"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(device["hd95"]), host["hd95"], rtol=1e-5, atol=1e-5)


def cases(shape):
  """Random pairs plus the hard ones: a far-away stray voxel (needs the search radius to grow) and empties."""
  out = [random_blobs(seed, shape) for seed in range(3)]
  pred, ref = random_blobs(9, shape)
  stray = pred.copy()
  stray[(0,) * len(shape)] = True
  out.append((stray, ref))
  empty = np.zeros(shape, bool)
  out += [(empty, ref), (pred, empty), (empty, empty)]
  return out


@pytest.mark.parametrize("shape,spacing", [(SHAPE_3D, SPACING_3D), (SHAPE_2D, SPACING_2D)])
def test_agrees_with_host(shape, spacing):
  for pred, ref in cases(shape):
    for percent in (95.0, 100.0, 50.0, 0.0):
      device = jax_surface.surface_metrics_jax(pred, ref, spacing, TOLERANCES, percent=percent)
      assert_agree(device, host_metrics(pred, ref, spacing, percent))
    assert int(device["pred_voxels"]) == pred.sum() and int(device["ref_voxels"]) == ref.sum()


def test_weighted_percentile_matches_host_rule():
  # Unsorted, with zero-weight entries that must be ignored, and a fraction reached exactly at a surfel.
  rng = np.random.default_rng(0)
  distances = rng.permutation(np.arange(1.0, 21.0))
  padded = np.stack([np.r_[distances, 0.0, 50.0], np.r_[distances[::-1], 7.0, 99.0]], axis=1)
  weights = np.stack([np.r_[np.ones(20), 0.0, 0.0]] * 2, axis=1)
  for percent, expected in ((95.0, 19.0), (95.0001, 20.0), (100.0, 20.0), (0.0, 1.0), (50.0, 10.0)):
    out = jax_surface.weighted_percentile(jnp.asarray(padded, jnp.float32), jnp.asarray(weights, jnp.float32),
                                          jnp.float32(percent / 100.0))
    np.testing.assert_array_equal(np.asarray(out), [expected, expected])
    assert surface.weighted_percentile(np.sort(distances), np.ones(20), percent) == expected


def test_whole_volume_and_windows_agree():
  # Small blobs fit the 0.25 window, a blob plus a far voxel needs the whole volume: same numbers either way.
  pred, ref = random_blobs(4, SHAPE_3D, threshold=0.55)
  stray = pred.copy()
  stray[-1, -1, -1] = True
  for p in (pred, stray):
    host = host_metrics(p, ref, SPACING_3D)
    for fractions in ((), (0.25, 0.5)):
      assert_agree(jax_surface.surface_metrics_jax(p, ref, SPACING_3D, TOLERANCES, roi_fractions=fractions), host)


def test_nan_empty_policy():
  pred, ref = random_blobs(5, SHAPE_2D)
  empty = np.zeros(SHAPE_2D, bool)
  one = jax_surface.surface_metrics_jax(empty, ref, SPACING_2D, TOLERANCES, empty_policy="nan")
  assert math.isnan(float(one["hd95"])) and float(one["dice"]) == 0.0
  np.testing.assert_array_equal(np.asarray(one["surface_dice"]), 0.0)
  both = jax_surface.surface_metrics_jax(empty, empty, SPACING_2D, TOLERANCES, empty_policy="nan")
  assert float(both["hd95"]) == 0.0 and float(both["dice"]) == 1.0
  np.testing.assert_array_equal(np.asarray(both["surface_dice"]), 1.0)
  assert_agree(jax_surface.surface_metrics_jax(pred, ref, SPACING_2D, TOLERANCES, empty_policy="nan"),
               host_metrics(pred, ref, SPACING_2D))


def test_analytic_shift_on_device():
  ref = np.zeros(SHAPE_3D, bool)
  ref[5:15, 6:18, 4:12] = True
  pred = np.roll(ref, 2, axis=2)
  out = jax_surface.surface_metrics_jax(pred, ref, SPACING_3D, (5.0 + 1e-4, 4.99, 0.0))
  assert float(out["hd95"]) == pytest.approx(2 * SPACING_3D[2], rel=1e-6)
  surface_dice = np.asarray(out["surface_dice"])
  assert surface_dice[0] == pytest.approx(1.0, abs=1e-7)
  np.testing.assert_allclose(
      surface_dice[1:], [metrics.surface_dice(pred, ref, SPACING_3D, t) for t in (4.99, 0.0)], rtol=1e-5)
  assert surface_dice[1] < 1.0
  assert float(out["dice"]) == pytest.approx(6 / 8, rel=1e-6)


def test_runs_inside_jit_with_traced_spacing():
  pred, ref = random_blobs(6, SHAPE_3D)

  @jax.jit
  def evaluate(pred, ref, spacing):
    return jax_surface.surface_metrics_jax(pred, ref, spacing, TOLERANCES)

  assert_agree(evaluate(pred, ref, jnp.asarray(SPACING_3D)), host_metrics(pred, ref, SPACING_3D))


def test_x64_matches_host_at_lattice_ties():
  # 2.3 mm is a lattice distance at spacing (1.3, 0.6, 0.9): offset (1, 1, 2) gives 1.3^2 + 0.6^2 + 1.8^2 = 2.3^2.
  # Whether such a surfel counts as within the tolerance is decided by float64 rounding, which x64 reproduces.
  spacing, tolerances = (1.3, 0.6, 0.9), (1.0, 2.3)
  pred, ref = random_blobs(10, (20, 24, 18))
  with jax.enable_x64(True):
    out = jax_surface.surface_metrics_jax(pred, ref, spacing, tolerances)
    assert out["hd95"].dtype == jnp.float64
  for t, value in zip(tolerances, np.asarray(out["surface_dice"])):
    assert value == pytest.approx(metrics.surface_dice(pred, ref, spacing, t), abs=1e-12)
  assert float(out["hd95"]) == pytest.approx(metrics.hd95(pred, ref, spacing), abs=1e-12)


@pytest.mark.parametrize("kwargs,message", [
    (dict(ref=np.zeros((4, 4, 5), bool)), "same shape"),
    (dict(spacing_mm=(1.0, 1.0)), "one entry per mask axis"),
    (dict(spacing_mm=(1.0, 0.0, 1.0)), "finite and > 0"),
    (dict(tolerances_mm=(-1.0,)), "tolerances_mm"),
    (dict(percent=120.0), "percent"),
    (dict(empty_policy="zero"), "empty_policy"),
    (dict(roi_fractions=(0.0,)), "roi_fractions"),
])
def test_invalid_inputs_raise(kwargs, message):
  args = dict(pred=np.zeros((4, 4, 4), bool), ref=np.zeros((4, 4, 4), bool), spacing_mm=(1.0, 1.0, 1.0))
  args.update(kwargs)
  with pytest.raises(ValueError, match=message):
    jax_surface.surface_metrics_jax(**args)

