"""The experiment's report: per-method tables, paired Wilcoxon tests against the reference method, plots.

Inputs are the evaluation CSVs of every run (``<run>/eval/CT/cases.csv`` and ``lesions.csv``, written by
:mod:`cmedl_jax.evaluate`). Statistics pool the held-out cases of all seeds: a method's "mean +- SD" is over its
(seed, case) pairs, and the Wilcoxon signed-rank tests pair method A's (seed, case) with method B's. The spread
between seeds is reported too (SD of the per-seed means), since one seed's runs share their initialisation luck.
HD95 is infinite where a method predicted nothing in a case with a tumor: the mean +- SD is over the finite
values and the table says how many were infinite (the paired test drops those pairs).

Lesion locations ("lung" inside the parenchyma, "mediastinal" abutting the mediastinum, where CT contrast is
~10 HU) come from the phantoms' ``phantoms.json``: each reference lesion is matched to the phantom tumor whose
centre is nearest its centroid (from lesions.csv) in world coordinates.
"""

from __future__ import annotations

import csv
import math
import os
import shutil

import numpy as np

from cmedl_jax.errors import DataError
from cmedl_jax.train import methods as method_table

CASE_METRICS = (("dice", "DSC", True), ("surface_dice_2mm", "sDSC@2mm", True),
                ("surface_dice_4mm", "sDSC@4mm", True), ("hd95_mm", "HD95 (mm)", False))
def _label(method):
  """The method table's report label (the name itself for a method this version does not know)."""
  entry = method_table.METHODS.get(method)
  return entry.label if entry else method


def _read_csv(path):
  if not os.path.exists(path):
    raise DataError(path, "is missing: the run has not finished its evaluation (re-run cmedl-experiment)")
  with open(path) as f:
    return list(csv.DictReader(f))


def _float(value):
  try:
    return float(value)
  except (TypeError, ValueError):
    return math.nan


def collect(runs_dir, methods, seeds):
  """{method: {"cases": [row..], "lesions": [row..]}} with "seed" added to every row (values as floats)."""
  results = {}
  for method in methods:
    cases, lesions = [], []
    for seed in seeds:
      eval_dir = os.path.join(runs_dir, f"{method}_seed{seed}", "eval", "CT")
      for row in _read_csv(os.path.join(eval_dir, "cases.csv")):
        cases.append({"seed": seed, "case": row["case"], **{k: _float(v) for k, v in row.items() if k != "case"}})
      for row in _read_csv(os.path.join(eval_dir, "lesions.csv")):
        lesions.append({"seed": seed, "case": row["case"], "lesion_id": int(row["lesion_id"]),
                        "centroid_voxel": row["centroid_voxel"], "detected": row["detected"] == "True",
                        "dice": _float(row["dice"]), "volume_ml": _float(row["volume_ml"])})
    results[method] = {"cases": cases, "lesions": lesions}
  return results


def lesion_locations(phantom_info_path, test_ct_dir, lesion_rows):
  """{(case, lesion_id): "lung" | "mediastinal"} for the reference lesions of the held-out phantoms.

  Args:
    phantom_info_path: the test phantoms' ``phantoms.json``.
    test_ct_dir: their dataset folder (for each case's canonical affine).
    lesion_rows: rows of a ``lesions.csv`` of these cases (their ``centroid_voxel``, canonical voxel indices).
  """
  import json
  from cmedl_jax.data import dataset_index, nifti_io
  if not os.path.exists(phantom_info_path):
    return {}
  with open(phantom_info_path) as f:
    info = json.load(f)
  index = dataset_index.load_dataset(test_ct_dir, require_labels=True)
  by_id = {c["case_id"]: c for c in info["cases"]["CT"]}
  centroids = {}
  for r in lesion_rows:
    centroids.setdefault(r["case"], {})[r["lesion_id"]] = [float(c) for c in r["centroid_voxel"].split(";")]
  locations = {}
  for case in index.cases:
    if case.case_id not in by_id or case.case_id not in centroids:
      continue
    tumors = by_id[case.case_id]["tumors"]
    phantom_affine = np.asarray(by_id[case.case_id]["affine_ras"])
    centres = np.array([(phantom_affine @ np.r_[t["centre_voxel"], 1.0])[:3] for t in tumors])
    image, _ = nifti_io.load_case(case.image)  # the canonical affine the evaluation's voxel indices refer to
    for lesion_id, centroid in centroids[case.case_id].items():
      world = (image.affine @ np.r_[centroid, 1.0])[:3]
      nearest = int(np.argmin(np.linalg.norm(centres - world, axis=1)))
      locations[(case.case_id, lesion_id)] = tumors[nearest]["location"]
  return locations


def _mean_sd(values):
  values = np.asarray([v for v in values if np.isfinite(v)], np.float64)
  if values.size == 0:
    return "n/a"
  return f"{values.mean():.3f} ± {values.std(ddof=1) if values.size > 1 else 0.0:.3f}"


def _per_seed_sd(rows, key):
  by_seed = {}
  for r in rows:
    if np.isfinite(r[key]):
      by_seed.setdefault(r["seed"], []).append(r[key])
  means = [np.mean(v) for v in by_seed.values()]
  return f"{np.std(means, ddof=1):.3f}" if len(means) > 1 else "n/a"


def paired_tests(results, reference):
  """{method: {metric: paired_wilcoxon result}} of ``reference`` vs every other method, on (seed, case) pairs."""
  from cmedl_jax.evaluate import scoring
  tests = {}
  ref_rows = results[reference]["cases"]
  for method, data in results.items():
    if method == reference:
      continue
    tests[method] = {}
    for key, _, _ in CASE_METRICS:
      a = {f"{r['seed']}/{r['case']}": r[key] for r in ref_rows}
      b = {f"{r['seed']}/{r['case']}": r[key] for r in data["cases"]}
      try:
        tests[method][key] = scoring.paired_wilcoxon(a, b)
      except ValueError as e:
        tests[method][key] = {"error": str(e)}
  return tests


def _plots(results, locations, out_dir):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  methods = list(results)
  names = [_label(m) for m in methods]
  paths = []
  fig, axes = plt.subplots(1, 3, figsize=(13, 4))
  for ax, (key, title, _) in zip(axes, (CASE_METRICS[0], CASE_METRICS[1], CASE_METRICS[3])):
    data = [[r[key] for r in results[m]["cases"] if np.isfinite(r[key])] for m in methods]
    ax.boxplot(data, showmeans=True)
    ax.set_xticks(range(1, len(methods) + 1), names)
    for i, values in enumerate(data, start=1):  # the (seed, case) points themselves
      jitter = np.random.default_rng(i).uniform(-0.12, 0.12, len(values))
      ax.scatter(np.full(len(values), i) + jitter, values, s=9, alpha=0.5)
    ax.set_title(f"{title} per held-out case (all seeds)")
    ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  paths.append(os.path.join(out_dir, "results_cases.png"))
  fig.savefig(paths[-1], dpi=110)
  plt.close(fig)
  if locations:
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / 2
    for j, where in enumerate(("lung", "mediastinal")):
      means, sds = [], []
      for m in methods:
        values = [r["dice"] for r in results[m]["lesions"] if locations.get((r["case"], r["lesion_id"])) == where]
        means.append(np.mean(values) if values else 0.0)
        sds.append(np.std(values) if values else 0.0)
      ax.bar(np.arange(len(methods)) + (j - 0.5) * width, means, width, yerr=sds, capsize=3,
             label=f"{where} tumors")
    ax.set_xticks(range(len(methods)), names)
    ax.set_ylabel("per-lesion DSC (mean ± SD)")
    ax.set_ylim(0, 1.25)  # room for the legend above the bars
    ax.legend(loc="upper center", ncol=2)
    ax.set_title("Per-lesion DSC by tumor location")
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "results_lesions.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
  return paths


def _fmt_p(p):
  return "n/a" if p is None else (f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}")


def markdown(results, tests, locations, reference, settings, plot_names):
  """The report's Markdown text."""
  methods = list(results)
  lines = ["# Results: CMEDL vs baselines on the synthetic thorax phantoms", ""]
  s = settings
  lines += [f"Generated by `cmedl-experiment` (config `{s['config']}`, {s['steps']} steps per run, seeds "
            f"{', '.join(map(str, s['seeds']))}, {s['num_test']} held-out test phantoms). Each cell pools the "
            "(seed, case) pairs: mean ± SD; \"seed SD\" is the SD of the per-seed means. HD95 over finite values; "
            "`inf` counts the cases where the method predicted no tumor at all.", ""]
  header = ["method", "n"] + [t for _, t, _ in CASE_METRICS] + ["DSC seed SD", "HD95 inf", "lesions detected",
                                                                 "FP comps / case"]
  lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for m in methods:
    rows, lesions = results[m]["cases"], results[m]["lesions"]
    detected = sum(r["detected"] for r in lesions)
    fps = np.mean([r["false_positive_components"] for r in rows]) if rows else math.nan
    cells = [_label(m), str(len(rows))] + [_mean_sd([r[k] for r in rows]) for k, _, _ in CASE_METRICS]
    cells += [_per_seed_sd(rows, "dice"), str(sum(1 for r in rows if math.isinf(r["hd95_mm"]))),
              f"{detected}/{len(lesions)}", f"{fps:.2f}"]
    lines.append("| " + " | ".join(cells) + " |")
  lines += ["", f"## Paired Wilcoxon signed-rank tests: {_label(reference)} vs each baseline", "",
            "Two-sided, pairs = (seed, held-out case); median difference = reference minus baseline.", ""]
  header = ["baseline"] + [f"{t}: median diff, p" for _, t, _ in CASE_METRICS]
  lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for m, by_metric in tests.items():
    cells = [_label(m)]
    for key, _, _ in CASE_METRICS:
      t = by_metric[key]
      cells.append(t["error"] if "error" in t else f"{t['median_difference']:+.3f}, p = {_fmt_p(t['p_value'])} "
                   f"(n = {t['n']})")
    lines.append("| " + " | ".join(cells) + " |")
  if locations:
    lines += ["", "## Per lesion, by tumor location", "",
              "Per-lesion DSC (mean ± SD over lesions of all seeds) and detection rate.", "",
              "| method | lung tumors: DSC | detected | mediastinal tumors: DSC | detected |", "|---|---|---|---|---|"]
    for m in methods:
      cells = [_label(m)]
      for where in ("lung", "mediastinal"):
        ls = [r for r in results[m]["lesions"] if locations.get((r["case"], r["lesion_id"])) == where]
        cells += [_mean_sd([r["dice"] for r in ls]), f"{sum(r['detected'] for r in ls)}/{len(ls)}"]
      lines.append("| " + " | ".join(cells) + " |")
  if plot_names:
    lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in plot_names]
  return "\n".join(lines) + "\n"


def write_report(results, out_dir, *, reference="cmedl", phantom_info=None, settings=None, extra_markdown=None):
  """Writes OUT/RESULTS.md, OUT/results.csv and the plots (and a copy of the report at ``extra_markdown``).

  Returns:
    The paths written.
  """
  os.makedirs(out_dir, exist_ok=True)
  test_ct = os.path.join(os.path.dirname(phantom_info), "CT") if phantom_info else None
  # Every run scored the same reference lesions: any run's rows give their centroids.
  reference_lesions = next(iter(results.values()))["lesions"] if results else []
  locations = lesion_locations(phantom_info, test_ct, reference_lesions) if phantom_info else {}
  tests = paired_tests(results, reference) if reference in results and len(results) > 1 else {}
  plots = _plots(results, locations, out_dir)
  written = []
  with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["method", "seed", "case"] + [k for k, _, _ in CASE_METRICS] + ["false_positive_components"])
    for m, data in results.items():
      for r in data["cases"]:
        writer.writerow([m, r["seed"], r["case"]] + [r[k] for k, _, _ in CASE_METRICS] +
                        [r["false_positive_components"]])
  written.append(os.path.join(out_dir, "results.csv"))
  text = markdown(results, tests, locations, reference, settings or {}, [os.path.basename(p) for p in plots])
  with open(os.path.join(out_dir, "RESULTS.md"), "w") as f:
    f.write(text)
  written += [os.path.join(out_dir, "RESULTS.md")] + plots
  if extra_markdown:
    target = os.path.dirname(os.path.abspath(extra_markdown))
    os.makedirs(target, exist_ok=True)
    with open(extra_markdown, "w") as f:
      f.write(text)
    written.append(extra_markdown)
    for p in plots:
      shutil.copy(p, os.path.join(target, os.path.basename(p)))
      written.append(os.path.join(target, os.path.basename(p)))
  return written
