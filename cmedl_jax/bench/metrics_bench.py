"""Benchmark: jitted surface metrics vs DeepMind's ``surface-distance`` on one synthetic CT-sized pair.

    python -m cmedl_jax.bench metrics [--size 512,512,100] [--spacing 0.8,0.8,2.5] [--repeats 5] [--case far-apart]

Builds a reference tumour (a lumpy ellipsoid) and a prediction (the tumour shifted by 2 voxels and dilated once,
plus a small false-positive blob away from it), or with ``--case far-apart`` two boxes in opposite corners, then
times on that input, as the median of ``--repeats`` interleaved runs:

* jitted: :func:`cmedl_jax.metrics.jax_surface.surface_metrics_jax` (DSC, sDSC at the tolerances, HD95) after a
  warm-up call, waiting with ``block_until_ready``, with its default windows and on the whole volume
  (``roi_fractions=()``);
* reference: DeepMind ``compute_surface_distances`` + ``compute_surface_dice_at_tolerance`` per tolerance +
  ``compute_robust_hausdorff(95)`` + ``compute_dice_coefficient``;
* host: :func:`cmedl_jax.metrics.surface.segmentation_metrics` (numpy/scipy, this package).

and prints the times, the ratio jitted / reference, and the metric values of each so they can be compared.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
from scipy import ndimage


def _ints(text):
  return tuple(int(v) for v in text.split(","))


def _floats(text):
  return tuple(float(v) for v in text.split(","))


def synthetic_pair(shape, seed=0):
  """A lumpy ellipsoidal tumour (reference) and an imperfect prediction of it, both bool arrays of ``shape``.

  The tumour's semi-axes are 10% of the in-plane size and 15% of the slices (at least 3 voxels); the prediction
  is the tumour shifted by 2 voxels along axis 0, dilated once, with a small blob away from it.
  """
  rng = np.random.default_rng(seed)
  shape = tuple(shape)
  radii = np.maximum(3.0, np.array([0.1 * shape[0], 0.1 * shape[1], 0.15 * shape[2]]))
  box = tuple(min(int(2 * r + 9), n) for r, n in zip(radii, shape))
  grid = np.meshgrid(*[np.arange(b) - (b - 1) / 2 for b in box], indexing="ij")
  radius2 = sum((g / r) ** 2 for g, r in zip(grid, radii))
  bumps = ndimage.gaussian_filter(rng.standard_normal(box), 3.0)
  ref = np.zeros(shape, bool)
  window = tuple(slice((n - b) // 2, (n - b) // 2 + b) for n, b in zip(shape, box))
  ref[window] = radius2 + 4.0 * bumps < 1.0
  pred = ndimage.binary_dilation(np.roll(ref, 2, axis=0))
  blob = tuple(slice(int(0.2 * n), int(0.2 * n) + max(2, n // 40)) for n in shape)
  pred[blob] = True
  return pred, ref


def _deepmind_metrics(pred, ref, spacing, tolerances):
  from surface_distance import metrics as deepmind  # pylint: disable=import-outside-toplevel
  distances = deepmind.compute_surface_distances(ref, pred, spacing)
  return {
      "dice": float(deepmind.compute_dice_coefficient(ref, pred)),
      "surface_dice": [float(deepmind.compute_surface_dice_at_tolerance(distances, t)) for t in tolerances],
      "hd95": float(deepmind.compute_robust_hausdorff(distances, 95)),
  }


def far_apart_pair(shape):
  """Worst case for the jitted search windows: two boxes in opposite corners, the union spanning the volume."""
  ref = np.zeros(shape, bool)
  pred = np.zeros(shape, bool)
  ref[tuple(slice(int(0.08 * n), int(0.2 * n) + 1) for n in shape)] = True
  pred[tuple(slice(int(0.75 * n), int(0.9 * n) + 1) for n in shape)] = True
  return pred, ref


def _format(values):
  return (f"dice {values['dice']:.6f}  sDSC " + " ".join(f"{v:.6f}" for v in values["surface_dice"])
          + f"  HD95 {values['hd95']:.4f} mm")


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m cmedl_jax.bench metrics", description=__doc__.split("\n")[0])
  parser.add_argument("--size", type=_ints, default=(512, 512, 100), help="volume shape, e.g. 512,512,100")
  parser.add_argument("--spacing", type=_floats, default=(0.8, 0.8, 2.5), help="voxel size in mm")
  parser.add_argument("--tolerances", type=_floats, default=(1.0, 2.0), help="sDSC tolerances in mm")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--skip-reference", action="store_true", help="do not run DeepMind's package")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--case", choices=("tumour", "far-apart"), default="tumour",
                      help="tumour: imperfect prediction of one lesion plus a small false positive (typical); "
                      "far-apart: two boxes in opposite corners (worst case for the jitted search windows)")
  args = parser.parse_args(argv)
  if len(args.size) != 3 or len(args.spacing) != 3:
    parser.error("--size and --spacing need 3 comma-separated values")

  import jax  # pylint: disable=import-outside-toplevel
  from cmedl_jax.metrics import jax_surface, surface  # pylint: disable=import-outside-toplevel

  pred, ref = synthetic_pair(args.size, args.seed) if args.case == "tumour" else far_apart_pair(args.size)
  print(f"case {args.case}, volume {args.size}, spacing {args.spacing} mm, tolerances {args.tolerances} mm, "
        f"pred {int(pred.sum())} voxels, ref {int(ref.sum())} voxels; device {jax.devices()[0].device_kind} "
        f"x{jax.device_count()}, median of {args.repeats} interleaved repeats")
  pred_device, ref_device = jax.device_put(pred), jax.device_put(ref)

  def jitted(roi_fractions):
    def run():
      out = jax.block_until_ready(jax_surface.surface_metrics_jax(
          pred_device, ref_device, args.spacing, args.tolerances, roi_fractions=roi_fractions))
      return {"dice": float(out["dice"]), "surface_dice": [float(v) for v in out["surface_dice"]],
              "hd95": float(out["hd95"])}
    return run

  def host():
    m = surface.segmentation_metrics(pred, ref, args.spacing, args.tolerances)
    return {"dice": m.dice, "surface_dice": [m.surface_dice[t] for t in args.tolerances], "hd95": m.hd95_mm}

  candidates = {"jitted": jitted(jax_surface.DEFAULT_ROI_FRACTIONS), "jitted whole volume": jitted(()),
                "host numpy/scipy": host}
  if not args.skip_reference:
    try:
      import surface_distance  # pylint: disable=import-outside-toplevel,unused-import
      candidates["reference (DeepMind)"] = lambda: _deepmind_metrics(pred, ref, args.spacing, args.tolerances)
    except ImportError:
      print("reference: surface-distance is not installed (pip install surface-distance==0.1)")

  values, first_call, times = {}, {}, {name: [] for name in candidates}
  for name, run in candidates.items():  # warm-up: compiles the jitted variants
    start = time.perf_counter()
    values[name] = run()
    first_call[name] = time.perf_counter() - start
  # Interleaved, so that load from other processes hits every candidate alike.
  for _ in range(args.repeats):
    for name, run in candidates.items():
      start = time.perf_counter()
      run()
      times[name].append(time.perf_counter() - start)
  seconds = {name: statistics.median(t) for name, t in times.items()}
  for name in candidates:
    extra = f"  (first call {first_call[name]:.1f} s)" if name.startswith("jitted") else ""
    print(f"{name + ':':22s} {seconds[name]:8.3f} s  {_format(values[name])}{extra}")
  reference = seconds.get("reference (DeepMind)")
  if reference:
    print(f"ratio jitted/reference: {seconds['jitted'] / reference:.3f} "
          f"(whole volume {seconds['jitted whole volume'] / reference:.3f}, "
          f"host {seconds['host numpy/scipy'] / reference:.3f})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
