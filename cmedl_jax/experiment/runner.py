"""``cmedl-experiment``: CMEDL vs the baselines on the phantoms, several seeds, evaluated per lesion.

    cmedl-experiment --out runs/experiment [--methods cmedl,ct_only,pmri_only,ct_pmri_concat] [--seeds 0,1,2]
        [--steps 600] [--config configs/quickstart.py] [--num-test 8] [--report docs/RESULTS.md]

Every (method, seed) run uses the same phantoms (OUT/phantoms: training CT + unpaired MRI, and held-out test CTs
in OUT/phantoms/test/CT) and the config file's networks and schedule with ``method``, ``seed`` and
``data.seed`` overridden; runs go to OUT/runs/<method>_seed<k> and are evaluated on the held-out CTs when they
finish (OUT/runs/<method>_seed<k>/eval/CT). A finished run (its summary.json exists) is not trained again, an
interrupted one resumes from its checkpoint, so the command can be re-run after a stop. At the end the report
(tables, paired Wilcoxon tests, plots) is written, see :mod:`cmedl_jax.experiment.report`.

Runtime with configs/quickstart.py on a 2-core CPU: ~2-3 minutes per CMEDL run of 600 steps (fewer for
ct_only), ~25 minutes for 4 methods x 3 seeds.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from cmedl_jax import config_base
from cmedl_jax.errors import ConfigError, DataError
from cmedl_jax.train import methods

log = logging.getLogger(__name__)

EVAL_SUBDIR = os.path.join("eval", "CT")  # of each run's workdir: the held-out evaluation

METHODS = tuple(methods.METHODS)


def run_name(method, seed):
  return f"{method}_seed{seed}"


def experiment_config(base, out_dir, method, seed, steps=None, num_test=None):
  """The config of one run: ``base`` with the method, seeds and the experiment's shared phantom folders."""
  cfg = base.copy_and_resolve_references()
  cfg.method = method
  cfg.seed = int(seed)
  cfg.data.seed = int(seed)
  phantoms = os.path.join(os.path.abspath(out_dir), "phantoms")
  cfg.data.make_phantoms = True
  cfg.data.phantoms.out = phantoms
  cfg.data.ct_dir = os.path.join(phantoms, "CT")
  cfg.data.mri_dir = os.path.join(phantoms, "MRI")
  if num_test is not None:
    cfg.data.phantoms.num_test = int(num_test)
  if not cfg.data.phantoms.get("num_test", 0):
    raise ValueError("the experiment needs held-out phantoms: set --num-test > 0")
  cfg.eval.data_dir = os.path.join(phantoms, "test", "CT")
  cfg.eval.out_dir = EVAL_SUBDIR  # a fixed place the report reads
  if steps is not None:
    cfg.train.total_steps = int(steps)
  return cfg


def _csv_list(text, cast=str):
  return [cast(x.strip()) for x in text.split(",") if x.strip()]


def main(argv=None):
  parser = argparse.ArgumentParser(prog="cmedl-experiment", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="runs/experiment", help="experiment folder (default runs/experiment)")
  parser.add_argument("--config", default="configs/quickstart.py", help="config file (default the quickstart's)")
  parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
  parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
  parser.add_argument("--steps", type=int, default=None, help="train steps per run (default: the config's)")
  parser.add_argument("--num-test", type=int, default=8, help="held-out test phantoms (default 8)")
  parser.add_argument("--reference", default="cmedl", help="method the others are tested against (default cmedl)")
  parser.add_argument("--report", default=None, help="also write the report Markdown here (e.g. docs/RESULTS.md); "
                      "it is always written to OUT/RESULTS.md")
  parser.add_argument("--report-only", action="store_true", help="only rebuild the report from finished runs")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
  logging.getLogger("cmedl_jax").setLevel(logging.INFO)

  methods = _csv_list(args.methods)
  unknown = [m for m in methods if m not in METHODS]
  if unknown or not methods:
    parser.error(f"--methods: unknown {unknown}; choose from {METHODS}")
  try:
    seeds = _csv_list(args.seeds, int)
  except ValueError:
    parser.error(f"--seeds must be integers separated by commas, got {args.seeds!r}")
  if args.reference not in methods:
    parser.error(f"--reference {args.reference!r} is not among --methods {methods}")

  from cmedl_jax.experiment import report
  from cmedl_jax.utils import compilation_cache
  compilation_cache.enable_persistent_cache()
  try:
    base = config_base.load_config_file(args.config)
  except (ConfigError, DataError) as e:
    print(f"ERROR {e}", file=sys.stderr)
    return 1
  runs_dir = os.path.join(args.out, "runs")
  if not args.report_only:
    from cmedl_jax.train import job, trainer
    todo = [(m, s) for s in seeds for m in methods]
    t_start = time.time()
    for k, (method, seed) in enumerate(todo):
      workdir = os.path.join(runs_dir, run_name(method, seed))
      if os.path.exists(os.path.join(workdir, EVAL_SUBDIR, "summary.json")):
        print(f"[{k + 1}/{len(todo)}] {run_name(method, seed)}: finished earlier, kept", flush=True)
        continue
      cfg = experiment_config(base, args.out, method, seed, args.steps, args.num_test)
      t0 = time.time()
      print(f"[{k + 1}/{len(todo)}] {run_name(method, seed)}: training {cfg.train.total_steps} steps -> {workdir}",
            flush=True)
      try:
        result = job.train_and_evaluate(cfg, workdir, progress=False)
      except (ConfigError, DataError, trainer.NonFiniteLossError) as e:
        print(f"ERROR {run_name(method, seed)}: {e}", file=sys.stderr)
        return 1
      if result.train.stopped_by_signal:
        print("stopped by SIGTERM; run the same command again to go on", file=sys.stderr)
        return 1
      s = result.eval_summary["mean"]
      print(f"[{k + 1}/{len(todo)}] {run_name(method, seed)}: {time.time() - t0:.0f} s, held-out DSC "
            f"{s['dice']['mean']:.3f}, HD95 {s['hd95_mm']['mean']:.2f} mm "
            f"(elapsed {(time.time() - t_start) / 60:.1f} min)", flush=True)
  try:
    results = report.collect(runs_dir, methods, seeds)
  except DataError as e:
    print(f"ERROR {e}", file=sys.stderr)
    return 1
  phantom_info = os.path.join(args.out, "phantoms", "test", "phantoms.json")
  settings = {"config": args.config, "steps": args.steps or base.train.total_steps, "seeds": seeds,
              "num_test": args.num_test, "reference": args.reference}
  paths = report.write_report(results, args.out, reference=args.reference, phantom_info=phantom_info,
                              settings=settings, extra_markdown=args.report)
  for path in paths:
    print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
