"""Evaluation command lines.

    cmedl-evaluate --workdir RUN --data CT_DIR [--out DIR] [--step N|best] [--overwrite]
        the run's test-time network (CMEDL: the student) over whole volumes of CT_DIR, at the run's target
        spacing: prediction NIfTIs, per-case and per-lesion metrics on each scan's grid
    cmedl-evaluate-folder PRED_DIR REF_DIR [--out DIR]
        scores any folder of predictions (e.g. from a PyTorch baseline) the same way
    cmedl-compare A/cases.csv B/cases.csv [--metric dice]
        paired Wilcoxon signed-rank test between two methods on their common cases

Common options: --tolerances 2,4 (surface Dice, mm), --convention deepmind|monai|medpy (HD95),
--empty-policy inf|nan (HD95 when exactly one mask is empty), --connectivity full|faces (lesions).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from cmedl_jax.errors import DataError

log = logging.getLogger(__name__)


def parse_step(text):
  """A ``--step`` argument: a checkpoint step number or "best" (argparse ``type``)."""
  if text == "best":
    return text
  try:
    return int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"a step number or best, got {text!r}") from None


def _add_metric_options(parser):
  parser.add_argument("--tolerances", default="2,4", help="surface Dice tolerances in mm, comma-separated")
  parser.add_argument("--convention", default="deepmind", choices=["deepmind", "monai", "medpy"],
                      help="HD95 convention (default: DeepMind surface-distance)")
  parser.add_argument("--empty-policy", default="inf", choices=["inf", "nan"],
                      help="HD95 when exactly one of prediction/reference is empty")
  parser.add_argument("--connectivity", default="full", choices=["full", "faces"],
                      help="lesion connected components: full (26-neighbourhood) or faces (6)")


def _metric_kwargs(args):
  try:
    tolerances = tuple(float(t) for t in args.tolerances.split(",") if t.strip())
  except ValueError:
    raise SystemExit(f"--tolerances must be numbers in mm separated by commas, got {args.tolerances!r}")
  return dict(tolerances_mm=tolerances, convention=args.convention, empty_policy=args.empty_policy,
              connectivity=None if args.connectivity == "full" else 1)


def main_evaluate(argv=None):
  parser = argparse.ArgumentParser(prog="cmedl-evaluate", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="the training run folder (with checkpoints/)")
  parser.add_argument("--data", required=True, help="labelled CT dataset folder to evaluate on")
  parser.add_argument("--out", default=None,
                      help="output folder (default WORKDIR/eval/<data folder name>-<path hash>/step_<N>)")
  parser.add_argument("--overwrite", action="store_true", help="replace the results of an earlier evaluation")
  parser.add_argument("--step", type=parse_step, default=None,
                      help="checkpoint step, or best (the best by validation; default: the latest)")
  parser.add_argument("--batch-size", type=int, default=None, help="slices per inference batch")
  parser.add_argument("--inplane-spacing", type=float, default=None, metavar="MM",
                      help="segment at this in-plane pixel size (mm) instead of the run's data.target_spacing_mm; "
                           "predictions and metrics stay on each scan's grid")
  _add_metric_options(parser)
  args = parser.parse_args(argv)
  if args.inplane_spacing is not None and not args.inplane_spacing > 0:
    parser.error(f"--inplane-spacing must be a positive number of mm, got {args.inplane_spacing}")
  logging.basicConfig(level=logging.WARNING, format="%(message)s")
  from cmedl_jax.evaluate import run, scoring
  from cmedl_jax.utils import compilation_cache
  compilation_cache.enable_persistent_cache()
  kwargs = _metric_kwargs(args)
  try:
    out_dir, summary = run.evaluate_run(args.workdir, args.data, args.out, step=args.step, batch_size=args.batch_size,
                                    inplane_spacing_mm=args.inplane_spacing, overwrite=args.overwrite, **kwargs)
  except (DataError, FileNotFoundError) as e:
    print(f"ERROR {e}", file=sys.stderr)
    return 1
  print(scoring.format_summary(summary, kwargs["tolerances_mm"]))
  print(f"wrote {out_dir}/summary.json, cases.csv, lesions.csv, false_positives.csv, predictions/")
  return 0


def main_evaluate_folder(argv=None):
  parser = argparse.ArgumentParser(prog="cmedl-evaluate-folder", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("pred_dir", help="folder of CASE.nii.gz predictions")
  parser.add_argument("ref_dir", help="dataset folder (labelsTr) or folder of reference label files")
  parser.add_argument("--out", default=None, help="output folder (default PRED_DIR/../eval_<name>)")
  _add_metric_options(parser)
  args = parser.parse_args(argv)
  from cmedl_jax.evaluate import scoring
  kwargs = _metric_kwargs(args)
  out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.pred_dir)),
                                 "eval_" + os.path.basename(os.path.normpath(args.pred_dir)))
  try:
    summary = scoring.score_folder(args.pred_dir, args.ref_dir, out, **kwargs)
  except DataError as e:
    print(f"ERROR {e}", file=sys.stderr)
    return 1
  print(scoring.format_summary(summary, kwargs["tolerances_mm"]))
  print(f"wrote {out}/summary.json, cases.csv, lesions.csv, false_positives.csv")
  return 0


def main_compare(argv=None):
  parser = argparse.ArgumentParser(prog="cmedl-compare", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("a", help="cases.csv of method A")
  parser.add_argument("b", help="cases.csv of method B")
  parser.add_argument("--metric", default="dice", help="column to compare (dice, surface_dice_2mm, hd95_mm, ...)")
  parser.add_argument("--alternative", default="two-sided", choices=["two-sided", "greater", "less"])
  parser.add_argument("--json", action="store_true", help="print the result as JSON")
  args = parser.parse_args(argv)
  from cmedl_jax.evaluate import scoring
  try:
    result = scoring.paired_wilcoxon(scoring.read_case_csv(args.a, args.metric),
                                     scoring.read_case_csv(args.b, args.metric), alternative=args.alternative)
  except (DataError, ValueError) as e:
    print(f"ERROR {e}", file=sys.stderr)
    return 1
  if args.json:
    print(json.dumps(result, indent=2))
  else:
    print(f"{args.metric}: n={result['n']}  A mean {result['mean_a']:.4f} (median {result['median_a']:.4f})  "
          f"B mean {result['mean_b']:.4f} (median {result['median_b']:.4f})  median(A-B) "
          f"{result['median_difference']:+.4f}  Wilcoxon signed-rank p={result['p_value']:.4g} "
          f"({args.alternative})")
  return 0
