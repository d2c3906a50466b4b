"""A training job as ``cmedl-train`` runs it: the data (phantoms when asked for), the trainer's loop, and the
evaluation of the finished run on ``config.eval.data_dir``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Optional

import jax

from cmedl_jax import config_validation, distributed
from cmedl_jax.errors import DataError
from cmedl_jax.evaluate import run as evaluate_run_lib
from cmedl_jax.train import trainer
from cmedl_jax.utils import files

log = logging.getLogger(__name__)


@dataclasses.dataclass
class JobResult:
  """The trainer's result, the evaluation folder and summary (None when the run was not evaluated)."""

  train: trainer.TrainResult
  eval_dir: Optional[str] = None
  eval_summary: Optional[dict] = None


def ensure_phantoms(data_cfg):
  """Generates the phantoms of ``config.data.phantoms`` when ``data.make_phantoms`` is set and a folder is missing.

  Returns:
    (CT folder, MRI folder): ``data.ct_dir`` / ``data.mri_dir``, or the generated ``<out>/CT`` / ``<out>/MRI``
    where those are unset or missing.
  """
  d = data_cfg
  ct_dir, mri_dir = d.ct_dir, d.mri_dir
  if not d.make_phantoms or (ct_dir and os.path.isdir(ct_dir) and mri_dir and os.path.isdir(mri_dir)):
    return ct_dir, mri_dir
  from cmedl_jax.data import phantoms
  out = d.phantoms.out or os.path.join(os.path.dirname(os.path.abspath(ct_dir or ".")), "phantoms")
  shape = (d.phantoms.size, d.phantoms.size, d.phantoms.slices)
  ct_dir, mri_dir = os.path.join(out, "CT"), os.path.join(out, "MRI")
  if not (os.path.isdir(ct_dir) and os.path.isdir(mri_dir)):
    log.info("generating phantoms into %s", out)
    phantoms.write_phantom_dataset(out, num_ct=d.phantoms.num_ct, num_mri=d.phantoms.num_mri, seed=d.phantoms.seed,
                                   shape=shape)
  test_dir = os.path.join(out, "test")
  if d.phantoms.num_test and not os.path.isdir(os.path.join(test_dir, "CT")):
    # Held-out cases: another seed gives other anatomies (case k is a function of (seed, k)).
    log.info("generating %d held-out test phantoms into %s", d.phantoms.num_test, test_dir)
    phantoms.write_phantom_dataset(test_dir, num_ct=d.phantoms.num_test, num_mri=0, seed=d.phantoms.seed + 1,
                                   shape=shape)
  return ct_dir, mri_dir


def _earlier_summary(out_dir):
  """(summary.json of an earlier evaluation in ``out_dir`` or None, the checkpoint step it evaluated)."""
  path = files.join(out_dir, "summary.json")
  if not files.exists(path):
    return None, None
  summary = json.loads(files.read_text(path))
  return summary, summary.get("settings", {}).get("checkpoint_step")


def _check_eval_out_dir(cfg, workdir):
  """A fixed ``eval.out_dir`` holding another step's results fails now, not after training (they are kept)."""
  if not (cfg.eval.data_dir and cfg.eval.out_dir):
    return
  out_dir = files.join(workdir, cfg.eval.out_dir)
  summary, step = _earlier_summary(out_dir)
  if summary is not None and step != int(cfg.train.total_steps):
    raise DataError(files.join(out_dir, "summary.json"), f"holds the evaluation of step {step}; this run ends at "
                    f"step {cfg.train.total_steps}: set eval.out_dir to another folder (or leave it empty for one "
                    "per step)")


def train_and_evaluate(cfg, workdir, *, progress=True) -> JobResult:
  """Validates ``cfg``, prepares the data, trains (or resumes) and evaluates the finished run.

  Raises:
    cmedl_jax.errors.ConfigError, cmedl_jax.errors.DataError, trainer.NonFiniteLossError: see
      :func:`cmedl_jax.train.trainer.train`.
  """
  config_validation.validate(cfg, num_devices=jax.device_count())
  _check_eval_out_dir(cfg, workdir)
  # [multi-process] Process 0 writes any phantoms before the others look, so no two processes write the same
  # files; a process on a filesystem of its own then writes its own (identical) copy. (Barriers are no-ops for a
  # single process.)
  is_main = jax.process_index() == 0
  if not is_main:
    distributed.barrier("cmedl_data_ready")
  ct_dir, mri_dir = ensure_phantoms(cfg.data)
  if is_main:
    distributed.barrier("cmedl_data_ready")
  if (ct_dir, mri_dir) != (cfg.data.ct_dir, cfg.data.mri_dir):
    cfg = cfg.copy_and_resolve_references()
    with cfg.unlocked():
      cfg.data.ct_dir, cfg.data.mri_dir = ct_dir, mri_dir
  result = trainer.train(cfg, workdir, progress=progress)
  finished = result.final_step == int(cfg.train.total_steps) and not result.stopped_by_signal
  if not (cfg.eval.data_dir and finished):
    return JobResult(result)
  if jax.process_count() > 1:
    # [multi-process] Evaluation restores the checkpoint alone on process 0, where orbax would wait for the other
    # processes: it is a single-process job.
    if is_main:
      log.warning("multi-process run: evaluate it with a single process: cmedl-evaluate --workdir %s --data %s",
                  workdir, cfg.eval.data_dir)
    return JobResult(result)
  out_dir = cfg.eval.out_dir and files.join(workdir, cfg.eval.out_dir)
  out_dir = out_dir or evaluate_run_lib.default_output_dir(workdir, cfg.eval.data_dir, result.final_step)
  summary, step = _earlier_summary(out_dir)
  if summary is not None and step == result.final_step:
    # A finished run started again: its evaluation of this step (deterministic) is kept.
    log.info("step %d was evaluated on %s before: results kept in %s", result.final_step, cfg.eval.data_dir, out_dir)
    return JobResult(result, out_dir, summary["statistics"])
  # Another step's results in a fixed eval.out_dir: evaluate_run refuses to replace them, naming the folder.
  out_dir, summary = evaluate_run_lib.evaluate_run(
      workdir, cfg.eval.data_dir, out_dir, progress=log.info, tolerances_mm=tuple(cfg.eval.tolerances_mm),
      convention=cfg.eval.hd95_convention)
  log.info("evaluation written to %s", out_dir)
  return JobResult(result, out_dir, summary)
