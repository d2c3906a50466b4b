"""Scoring predictions against references: per case, per lesion, summaries, and paired comparisons.

Outputs of :func:`write_results` in the output folder:

- ``summary.json``: nnU-Net-like (``metric_per_case`` with ``prediction_file``, ``reference_file`` and
  ``metrics`` keyed by label ``"1"``; ``mean`` and ``foreground_mean``), plus ``per_lesion`` aggregates, the
  metric settings and the empty-case policy;
- ``cases.csv``: one row per case (DSC, sDSC at each tolerance, HD95, voxel counts, lesions, detected lesions,
  false-positive components);
- ``lesions.csv``: one row per reference lesion (connected component);
- ``false_positives.csv``: one row per predicted component that touches no lesion.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from typing import Sequence

import numpy as np

from cmedl_jax import metrics
from cmedl_jax.data import dataset_index, nifti_io
from cmedl_jax.errors import DataError

log = logging.getLogger(__name__)

DEFAULT_TOLERANCES_MM = (2.0, 4.0)


def score_case(case_id, pred, ref, spacing_mm, *, tolerances_mm=DEFAULT_TOLERANCES_MM, convention="deepmind",
               empty_policy="inf", connectivity=None):
  """Per-volume and per-lesion metrics of one case.

  Args:
    case_id: the case's name (goes into every row).
    pred, ref: (X, Y, Z) binary masks on the same grid.
    spacing_mm: (3,) voxel size.

  Returns:
    (case row dict, list of lesion row dicts, list of false-positive row dicts).
  """
  volume = metrics.segmentation_metrics(pred, ref, spacing_mm, tolerances_mm, convention, empty_policy)
  lesions = metrics.evaluate_lesions(pred, ref, spacing_mm, tolerances_mm, connectivity=connectivity,
                                     convention=convention, empty_policy=empty_policy)
  row = {"case": case_id, **volume.as_row(), "lesions": len(lesions.lesions),
         "lesions_detected": lesions.num_detected, "false_positive_components": len(lesions.false_positives)}
  lesion_rows = [{"case": case_id, **r} for r in lesions.lesion_rows()]
  fp_rows = [{"case": case_id, **r} for r in lesions.false_positive_rows()]
  return row, lesion_rows, fp_rows


def _stats(values):
  values = np.asarray([v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))],
                      dtype=np.float64)
  if values.size == 0:
    return {"n": 0, "mean": None, "std": None, "median": None}
  finite = values[np.isfinite(values)]
  # An infinite value (HD95 of a missed lesion) makes the mean and SD infinite, deliberately: see the empty policy.
  std = float(finite.std(ddof=0)) if finite.size == values.size else math.inf
  return {"n": int(values.size), "mean": float(values.mean()), "std": std,
          "median": float(np.median(values)), "n_infinite": int(values.size - finite.size),
          "mean_finite": float(finite.mean()) if finite.size else None}


def summarise(case_rows, lesion_rows, fp_rows):
  numeric = [k for k, v in case_rows[0].items() if isinstance(v, (int, float)) and k != "case"] if case_rows else []
  lesion_numeric = ([k for k, v in lesion_rows[0].items() if isinstance(v, (int, float, bool)) and k not in
                     ("case", "lesion_id")] if lesion_rows else [])
  return {
      "mean": {k: _stats([r[k] for r in case_rows]) for k in numeric},
      "per_lesion": {k: _stats([float(r[k]) for r in lesion_rows]) for k in lesion_numeric},
      "num_cases": len(case_rows),
      "num_lesions": len(lesion_rows),
      "num_false_positive_components": len(fp_rows),
  }


def _json_safe(x):
  if isinstance(x, dict):
    return {str(k): _json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_json_safe(v) for v in x]
  if isinstance(x, (np.floating, float)):
    x = float(x)
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf" if x < 0 else "nan")
  if isinstance(x, np.integer):
    return int(x)
  if isinstance(x, np.bool_):
    return bool(x)
  return x


def _write_csv(path, rows):
  fields = []
  for row in rows:
    fields += [k for k in row if k not in fields]
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fields or ["case"])
    writer.writeheader()
    for row in rows:
      writer.writerow({k: (list(v) if isinstance(v, tuple) else v) for k, v in row.items()})


def write_results(out_dir, case_rows, lesion_rows, fp_rows, *, files=None, settings=None):
  """Writes summary.json, cases.csv, lesions.csv and false_positives.csv; returns the summary dict."""
  os.makedirs(out_dir, exist_ok=True)
  summary = summarise(case_rows, lesion_rows, fp_rows)
  files = files or {}
  per_case = [{"prediction_file": files.get(r["case"], (None, None))[0],
               "reference_file": files.get(r["case"], (None, None))[1], "case": r["case"],
               "metrics": {"1": {k: v for k, v in r.items() if k != "case"}}} for r in case_rows]
  means = {k: v["mean"] for k, v in summary["mean"].items()}
  document = {"metric_per_case": per_case, "mean": {"1": means}, "foreground_mean": means,
              "statistics": summary, "settings": settings or {},
              "empty_policy": {"both_empty": {"dice": metrics.BOTH_EMPTY_DICE,
                                              "surface_dice": metrics.BOTH_EMPTY_SURFACE_DICE,
                                              "hd95_mm": metrics.BOTH_EMPTY_HAUSDORFF_MM},
                               "one_empty": {"dice": metrics.ONE_EMPTY_DICE,
                                             "surface_dice": metrics.ONE_EMPTY_SURFACE_DICE,
                                             "hd95_mm": (settings or {}).get("empty_policy", "inf")}}}
  with open(os.path.join(out_dir, "summary.json"), "w") as f:
    json.dump(_json_safe(document), f, indent=2)
  _write_csv(os.path.join(out_dir, "cases.csv"), case_rows)
  _write_csv(os.path.join(out_dir, "lesions.csv"), lesion_rows)
  _write_csv(os.path.join(out_dir, "false_positives.csv"), fp_rows)
  return summary


def _prediction_files(pred_dir):
  out = {}
  for name in sorted(os.listdir(pred_dir)):
    for ending in dataset_index.NIFTI_ENDINGS:
      if name.endswith(ending):
        out[name[:-len(ending)]] = os.path.join(pred_dir, name)
        break
  return out


def score_folder(pred_dir, ref_dir, out_dir, *, tolerances_mm=DEFAULT_TOLERANCES_MM, convention="deepmind",
                 empty_policy="inf", connectivity=None, foreground_label=1, progress=print):
  """Scores every prediction ``PRED_DIR/CASE.nii[.gz]`` against the reference label of CASE in ``ref_dir``.

  ``ref_dir`` is a dataset folder (its labelsTr) or a plain folder of label files. Label maps are binarised at
  ``>= foreground_label``. Predictions and references must lie on the same grid.

  Raises:
    DataError: missing folders, no predictions, a prediction without reference (named), grid mismatch.
  """
  if not os.path.isdir(pred_dir):
    raise DataError(pred_dir, "prediction folder does not exist")
  predictions = _prediction_files(pred_dir)
  if not predictions:
    raise DataError(pred_dir, "contains no NIfTI predictions (.nii/.nii.gz)")
  index = dataset_index.load_dataset(ref_dir)
  references = {c.case_id: (c.label or c.image) for c in index.cases}
  missing = sorted(set(predictions) - set(references))
  if missing:
    raise DataError(pred_dir, f"{len(missing)} prediction(s) have no reference in {ref_dir}: {missing[:5]}")
  case_rows, lesion_rows, fp_rows, files = [], [], [], {}
  for i, (case_id, pred_path) in enumerate(predictions.items()):
    pred, ref = nifti_io.load_case(pred_path, references[case_id])  # same-grid check, names both files
    ref_mask = ref.data >= foreground_label
    pred_mask = pred.data >= foreground_label
    row, lesions, fps = score_case(case_id, pred_mask, ref_mask, ref.spacing, tolerances_mm=tolerances_mm,
                                   convention=convention, empty_policy=empty_policy, connectivity=connectivity)
    case_rows.append(row)
    lesion_rows += lesions
    fp_rows += fps
    files[case_id] = (pred_path, references[case_id])
    if progress:
      progress(f"[{i + 1}/{len(predictions)}] {case_id}: DSC {row['dice']:.3f}, HD95 {row['hd95_mm']:.2f} mm")
  settings = {"tolerances_mm": list(tolerances_mm), "hd95_convention": convention, "empty_policy": empty_policy,
              "lesion_connectivity": connectivity or "full"}
  return write_results(out_dir, case_rows, lesion_rows, fp_rows, files=files, settings=settings)


def read_case_csv(path, metric):
  """{case: value} of one metric column of a cases.csv."""
  if not os.path.exists(path):
    raise DataError(path, "results file does not exist")
  with open(path) as f:
    rows = list(csv.DictReader(f))
  if not rows:
    raise DataError(path, "has no rows")
  if metric not in rows[0]:
    raise DataError(path, f"has no column {metric!r}; columns: {list(rows[0])}")
  return {r["case"]: float(r[metric]) for r in rows}


def paired_wilcoxon(a: dict, b: dict, *, alternative="two-sided"):
  """Paired Wilcoxon signed-rank test on the cases present in both ``a`` and ``b`` ({case: value}).

  Returns:
    dict with n, the means and medians of each, the median of the differences a - b, the statistic and p-value
    (scipy.stats.wilcoxon, zero differences dropped as in Wilcoxon's original test: zero_method="wilcox").
  """
  from scipy import stats
  common = sorted(set(a) & set(b))
  if len(common) < 2:
    raise ValueError(f"need at least 2 cases present in both result sets, found {len(common)}")
  x = np.array([a[c] for c in common])
  y = np.array([b[c] for c in common])
  finite = np.isfinite(x) & np.isfinite(y)
  if not finite.all():
    log.warning("%d case(s) with non-finite values are left out of the test", int((~finite).sum()))
    x, y = x[finite], y[finite]
  diff = x - y
  result = {"n": int(x.size), "mean_a": float(x.mean()), "mean_b": float(y.mean()), "median_a": float(np.median(x)),
            "median_b": float(np.median(y)), "median_difference": float(np.median(diff))}
  if np.all(diff == 0):
    result.update(statistic=None, p_value=1.0)
  else:
    test = stats.wilcoxon(x, y, zero_method="wilcox", alternative=alternative)
    result.update(statistic=float(test.statistic), p_value=float(test.pvalue))
  return result


def format_summary(summary, tolerances_mm: Sequence[float]):
  m = summary["mean"]
  parts = [f"{summary['num_cases']} case(s)"]
  for key, label in [("dice", "DSC")] + [(metrics.surface.surface_dice_key(t), f"sDSC@{t:g}mm")
                                         for t in tolerances_mm] + [("hd95_mm", "HD95 mm")]:
    if key in m and m[key]["n"]:
      s = m[key]
      value = f"{s['mean']:.3f} +- {s['std']:.3f}" if math.isfinite(s["mean"]) else (
          f"inf ({s['n_infinite']} inf; finite mean {s['mean_finite']})")
      parts.append(f"{label} {value}")
  return ", ".join(parts)
