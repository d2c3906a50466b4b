"""Evaluation of a trained run on a labelled dataset: predictions as NIfTI, per-case and per-lesion metrics.

The library function behind ``cmedl-evaluate`` and the evaluation at the end of ``cmedl-train``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import time

from cmedl_jax import ops
from cmedl_jax.data import dataset_index, nifti_io
from cmedl_jax.errors import DataError
from cmedl_jax.evaluate import inference, scoring
from cmedl_jax.utils import files


def default_output_dir(workdir, data_dir, step):
  """WORKDIR/eval/<data folder name>-<hash of its absolute path>/step_<N>: one folder per data folder and step,
  so evaluating another folder of the same name, or another checkpoint, never replaces earlier results."""
  data_dir = os.path.realpath(os.fspath(data_dir))
  name = os.path.basename(data_dir) + "-" + hashlib.sha256(data_dir.encode()).hexdigest()[:8]
  return files.join(workdir, "eval", name, f"step_{int(step)}")


def evaluate_run(workdir, data_dir, out_dir=None, *, step=None, batch_size=None, inplane_spacing_mm=None,
                 kernels: ops.Kernels | None = None, overwrite=False, progress=print, **metric_kwargs):
  """Predicts every case of ``data_dir`` with the run's test-time forward, writes NIfTIs and scores them.

  Args:
    workdir: the run folder.
    data_dir: a labelled CT dataset folder.
    out_dir: where results go (default :func:`default_output_dir`).
    step: the checkpoint (default the latest).
    batch_size: slices per inference batch (default the run's ``eval.batch_size``).
    inplane_spacing_mm: segment each scan resampled in-plane to this pixel size, overriding the run's
      ``data.target_spacing_mm`` (predictions and metrics stay on the scan's own grid); None: the run's.
    kernels: the CPU implementation of the ops (default: the run's, :func:`inference.run_kernels`).
    overwrite: replace the results of an earlier evaluation in ``out_dir`` (otherwise that is an error).
    progress: called with one line per case (None: silent).
    **metric_kwargs: :func:`cmedl_jax.evaluate.scoring.score_case` options (tolerances_mm, convention, ...).

  Returns:
    (out_dir, summary dict as written to summary.json).

  Raises:
    DataError: an unusable dataset, a run this version cannot read, or results already in ``out_dir``
      (without ``overwrite``); nothing is written then.
  """
  index = dataset_index.load_dataset(data_dir, require_labels=True)
  predictor = inference.load_predictor(workdir, step, kernels)
  out_dir = out_dir or default_output_dir(workdir, data_dir, predictor.step)
  if files.exists(files.join(out_dir, "summary.json")) and not overwrite:
    raise DataError(out_dir, "holds the results of an earlier evaluation; pass --overwrite (overwrite=True) to "
                             "replace them, or --out to write elsewhere")
  # Results for object storage (a gs:// workdir) are written to a local folder first, then uploaded; the folder
  # goes when this ends, also on an error.
  with contextlib.ExitStack() as stack:
    staging = stack.enter_context(tempfile.TemporaryDirectory(prefix="cmedl_eval_")) if files.is_url(out_dir) else None
    local_out = staging or out_dir
    segmenter = inference.VolumeSegmenter(predictor, batch_size, target_spacing_mm=inplane_spacing_mm)
    allowed = set(index.labels.values())
    case_rows, lesion_rows, fp_rows, predictions = [], [], [], {}
    t0 = time.time()
    for i, case in enumerate(index.cases):
      image, label = nifti_io.load_case(case.image, case.label, allowed_labels=allowed)
      prediction = segmenter(image.data, image.spacing)
      name = f"{case.case_id}.nii.gz"
      nifti_io.save_like(os.path.join(local_out, "predictions", name), prediction, image)
      row, lesions, fps = scoring.score_case(case.case_id, prediction > 0, label.data > 0, image.spacing,
                                             **metric_kwargs)
      case_rows.append(row)
      lesion_rows += lesions
      fp_rows += fps
      predictions[case.case_id] = (files.join(out_dir, "predictions", name), case.label)
      if progress:
        progress(f"[{i + 1}/{len(index.cases)}] {case.case_id}: DSC {row['dice']:.3f}, HD95 {row['hd95_mm']:.2f} mm, "
                 f"lesions {row['lesions_detected']}/{row['lesions']} detected, "
                 f"{row['false_positive_components']} false-positive component(s)")
    settings = {"workdir": files.absolute(workdir), "checkpoint_step": predictor.step,
                "method": predictor.cfg.method, "test_time_networks": list(predictor.method.test_time_networks),
                "data": os.path.abspath(data_dir),
                "inplane_spacing_mm": (None if segmenter.target_spacing_mm is None
                                       else list(segmenter.target_spacing_mm)),
                "tolerances_mm": list(metric_kwargs.get("tolerances_mm", ())),
                "hd95_convention": metric_kwargs.get("convention", "deepmind"),
                "empty_policy": metric_kwargs.get("empty_policy", "inf"),
                "lesion_connectivity": metric_kwargs.get("connectivity") or "full",
                "seconds": round(time.time() - t0, 2)}
    summary = scoring.write_results(local_out, case_rows, lesion_rows, fp_rows, files=predictions, settings=settings)
    if staging:
      files.copy_tree(staging, out_dir)
  return out_dir, summary
