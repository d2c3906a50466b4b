"""Validation during training: the case split, the jitted evaluation of the live test-time networks.

Validation cases are either a labelled CT folder of their own (``eval.val_dir``) or ``data.val_cases`` cases
split off the CT training set by a permutation seeded with ``data.seed``. The split is written to
``WORKDIR/splits.json`` on the first start and read back on every resume, so a run never moves a case between
training and validation; the training stream is built from the training cases alone.

Every ``train.val_every`` steps (and at the last step) the method's test-time networks (CMEDL: the student)
segment every validation volume of the preprocessed store -- at the run's target spacing, normalised as training
saw them, in fixed-shape jitted batches (:class:`cmedl_jax.evaluate.inference.VolumeSegmenter`) -- and DSC and
surface Dice at ``eval.tolerances_mm`` are computed on the device by :mod:`cmedl_jax.metrics.jax_surface`, on the
preprocessed grid (``cmedl-evaluate`` scores on each scan's own grid). The foreground is every label > 0, as in
``cmedl-evaluate``. Per-case values are averaged over the cases. Validation reads the state and touches nothing
of it, of its random keys or of the data stream: the training losses are the same with and without it.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np

from cmedl_jax import distributed
from cmedl_jax.errors import ConfigError, DataError
from cmedl_jax.evaluate import inference
from cmedl_jax.metrics import jax_surface
from cmedl_jax.utils import files

log = logging.getLogger(__name__)

SPLITS_FILE = "splits.json"
BEST_METRICS = ("dice", "surface_dice")  # eval.best_metric: surface_dice is at the first of eval.tolerances_mm


def split_cases(case_ids, num_val, seed):
  """(training ids, validation ids), both sorted: ``num_val`` cases drawn by a permutation seeded with ``seed``.

  Raises:
    ConfigError: ``num_val`` leaves no training case.
  """
  ids = sorted(case_ids)
  num_val = int(num_val)
  if num_val >= len(ids):
    raise ConfigError("data.val_cases", f"{num_val}: the CT set has {len(ids)} case(s); at least one must stay "
                                        "for training")
  order = np.random.default_rng([int(seed), 0x5A1]).permutation(len(ids))
  val = {ids[i] for i in order[:num_val]}
  return [c for c in ids if c not in val], sorted(val)


def load_or_write_splits(workdir, ct_ids, data_cfg, val_dir, *, write=True, resuming=False):
  """The run's split: read from WORKDIR/splits.json when it exists, else made and (``write``) written.

  The recorded split is kept on resume; a config that would split the CT set otherwise (another
  ``data.val_cases`` or ``data.seed``) is an error naming the file, since it would change the training set
  mid-run. A run without checkpoints makes its split anew. The CT folder may move (the split is by case id).

  Args:
    workdir: the run folder.
    ct_ids: the case ids of the CT training folder.
    data_cfg: the config's ``data`` section.
    val_dir: the validation folder (``eval.val_dir``) or "".
    write: write the file (the main process).
    resuming: the run has checkpoints (the recorded split binds it; a run saved before splits existed trained on
      every case).

  Returns:
    {"train": [ids], "val": [ids of the split-off cases], "val_dir": folder or None, ...}.

  Raises:
    ConfigError: a recorded split that the config contradicts, or one whose cases are missing.
  """
  path = files.join(workdir, SPLITS_FILE)
  key = {"val_cases": int(data_cfg.val_cases), "seed": int(data_cfg.seed)}
  if resuming and files.exists(path):
    splits = json.loads(files.read_text(path))
    recorded = {k: splits.get(k) for k in key}
    if recorded != key:
      changed = ", ".join(f"{k}: {recorded[k]!r} -> {key[k]!r}" for k in key if recorded[k] != key[k])
      raise ConfigError("data", f"{path} records the split this run trains with, and the config differs ({changed});"
                                " resume with the recorded settings or start a new workdir")
    missing = sorted(set(splits["train"] + splits["val"]) - set(ct_ids))
    if missing:
      raise ConfigError("data.ct_dir", f"{path}: case(s) {', '.join(missing[:5])} of the recorded split are no "
                                       f"longer in {data_cfg.ct_dir}; restore them or start a new workdir")
    added = sorted(set(ct_ids) - set(splits["train"]) - set(splits["val"]))
    if added:
      log.warning("%d CT case(s) added to %s since the run started are not used (split: %s)", len(added),
                  data_cfg.ct_dir, path)
  else:
    if resuming and key["val_cases"]:
      raise ConfigError("data.val_cases", f"{workdir} was started without a split (it trains on every CT case); "
                                          "validation cases can only be split off in a new run (or use eval.val_dir)")
    train, val = split_cases(ct_ids, key["val_cases"], key["seed"]) if key["val_cases"] else (sorted(ct_ids), [])
    splits = {**key, "train": train, "val": val}
  splits["ct_dir"] = os.path.realpath(data_cfg.ct_dir)
  splits["val_dir"] = os.path.abspath(val_dir) if val_dir else None
  if write:
    files.write_json(path, splits)
  return splits


class Validator:
  """Scores the test-time networks on the validation store (see the module docstring)."""

  def __init__(self, cfg, nets, kernels, val_store):
    """
    Args:
      cfg: the run's config.
      nets: its networks.
      kernels: the ops' CPU implementation the run traces with.
      val_store: labelled :class:`cmedl_jax.data.store.PreprocessedStore` of the validation cases.
    """
    if not val_store.labelled:
      raise DataError(val_store.folder, "validation cases need labels")
    self.store = val_store
    self.tolerances = tuple(float(t) for t in cfg.eval.tolerances_mm)
    predictor = inference.Predictor(cfg=cfg, nets=nets, variables=None, step=0, kernels=kernels)
    self.segmenter = inference.VolumeSegmenter(predictor, cfg.eval.batch_size)

  def metric_names(self):
    return ["dice"] + [f"surface_dice_{t:g}mm" for t in self.tolerances]

  def per_case(self, variables, progress=False):
    """[{case, dice, surface_dice_<t>mm...}] of every validation case, with ``variables`` of the test-time nets.

    Args:
      variables: {"params", "batch_stats"} of the method's test-time networks on this process's devices.
      progress: show a progress bar over the cases (it goes when done).
    """
    self.segmenter.variables = variables
    rows = []
    cases = enumerate(self.store.case_ids)
    if progress:
      from tqdm import tqdm
      cases = tqdm(cases, total=len(self.store), desc="validate", leave=False, dynamic_ncols=True)
    for c, case_id in cases:
      probabilities = self.segmenter.slice_probabilities(self.store.image(c))  # (Z, X, Y, K)
      prediction = np.argmax(probabilities, axis=-1) > 0
      reference = np.asarray(self.store.label(c)) > 0
      sx, sy, sz = self.store.spacings[c]
      m = jax.device_get(jax_surface.surface_metrics_jax(prediction, reference, (sz, sx, sy), self.tolerances))
      rows.append({"case": case_id, "dice": float(m["dice"]),
                   **{f"surface_dice_{t:g}mm": float(v) for t, v in zip(self.tolerances, m["surface_dice"])}})
    return rows

  def __call__(self, variables, progress=False):
    """{metric: mean over the validation cases} (see :meth:`per_case`)."""
    rows = self.per_case(variables, progress)
    return {name: float(np.mean([r[name] for r in rows])) for name in self.metric_names()}


def best_metric_name(cfg):
  """The column of the validation metrics that picks the best checkpoint (higher is better)."""
  if cfg.eval.best_metric == "dice":
    return "dice"
  return f"surface_dice_{float(cfg.eval.tolerances_mm[0]):g}mm"


def local_variables(variables):
  """The test-time variables (replicated global arrays) as this process's devices hold them, for inference over
  the local devices: in a multi-process run the global arrays span devices this process cannot address."""
  return distributed.process_local_copy(variables) if jax.process_count() > 1 else variables
