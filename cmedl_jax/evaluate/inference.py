"""Test-time inference: the method's test-time forward (CMEDL: the student) over whole CT volumes.

Volumes are cut into axial slices, padded in-plane to a multiple of the network's stride and grouped into
fixed-shape batches (the last one padded, with a mask of the real slices), so one compiled function serves every
batch of a volume. Batches are split over the local devices when the batch size allows it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from cmedl_jax import ops
from cmedl_jax.data import preprocess, resample
from cmedl_jax.errors import DataError
from cmedl_jax.train import checkpointing, methods, networks
from cmedl_jax.train import state as state_lib
from cmedl_jax.train import step as step_lib
from cmedl_jax.utils import files

log = logging.getLogger(__name__)

# In-plane sizes are padded to a multiple of this: enough for every segmenter (DenseFCN downsamples 5 times).
SPATIAL_MULTIPLE = 32


@dataclasses.dataclass
class Predictor:
  """What test-time inference needs from a run.

  Attributes:
    cfg: the run's resolved config.
    nets: its networks.
    variables: {"params": ..., "batch_stats": ...} of the method's test-time networks.
    step: the checkpoint step.
    kernels: the CPU implementation of the ops inference traces (:mod:`cmedl_jax.ops`).
  """

  cfg: Any
  nets: networks.Networks
  variables: dict
  step: int
  kernels: ops.Kernels = ops.Kernels()

  @property
  def method(self) -> methods.Method:
    return methods.get(self.cfg.method)


def run_kernels(cfg) -> ops.Kernels:
  """The kernels inference uses for a run: its ``conv_backend`` and ``conv_algorithm``, except that "onednn"
  becomes "auto" (a run trained where the library builds may be evaluated where it does not: "auto" falls back to
  "xla" with a warning). Runs saved before the fields existed get the defaults."""
  kernels = ops.from_config(cfg)
  return ops.Kernels("auto", kernels.algorithm) if kernels.backend == "onednn" else kernels


def _run_method(cfg, workdir):
  """The method table's entry of a saved run, or a DataError naming the run when this version has no such method."""
  try:
    return methods.get(cfg.get("method"))
  except ValueError as e:
    raise DataError(workdir, f"the run was trained with a method this version does not have ({e}); evaluate it "
                             "with the cmedl_jax version that trained it") from None


def load_predictor(workdir, step=None, kernels: ops.Kernels | None = None) -> Predictor:
  """Restores the test-time networks of the run in ``workdir`` (latest checkpoint unless ``step``).

  Only their params and batch statistics are read (the checkpoint's ``model`` item); a run saved before that item
  existed is read from its whole train state instead.

  Args:
    workdir: the run folder.
    step: the checkpoint: a step number, "best" (the best by validation, WORKDIR/best) or None (the latest).
    kernels: the CPU implementation of the ops; default :func:`run_kernels` of the run's config.

  Raises:
    FileNotFoundError: no checkpoint (or no best checkpoint: the run was trained without validation).
    DataError: the run's method is not in this version's method table.
  """
  best = step == "best"
  subdir = checkpointing.BEST if best else checkpointing.CHECKPOINTS
  if best and not files.exists(files.join(workdir, subdir)):
    raise FileNotFoundError(f"{files.join(workdir, subdir)}: no best checkpoint; it is kept by runs "
                            "that validate during training (data.val_cases or eval.val_dir)")
  ckpt = checkpointing.RunCheckpointer(workdir, async_save=False, subdir=subdir)
  try:
    step = ckpt.latest_step() if step is None or best else int(step)
    if step is None:
      raise FileNotFoundError(f"{ckpt.directory}: no checkpoint found; train first (cmedl-train)")
    cfg = ml_collections.ConfigDict(ckpt.restore_config(step))
    _run_method(cfg, workdir)
    nets = methods.build_networks(cfg)
    size = cfg.data.crop_size
    kernels = kernels or run_kernels(cfg)
    replicated = NamedSharding(step_lib.make_mesh(), P())
    with ops.use(kernels):
      if ckpt.has_model(step):
        abstract = jax.eval_shape(lambda k: methods.test_time_variables(
            cfg, *networks.init_variables(nets, k, (size, size, 1))), jax.random.key(0))
        variables = ckpt.restore_model(step, checkpointing.abstract_like(abstract, replicated))
      else:
        log.info("%s: checkpoint %d has no test-time item (saved by an earlier version): reading its train state",
                 workdir, step)
        optimizers = state_lib.make_optimizers(cfg, nets)
        abstract = jax.eval_shape(lambda k: state_lib.create_train_state(nets, cfg, optimizers, k, (size, size, 1)),
                                  jax.random.key(0))
        state = ckpt.restore_state_only(step, checkpointing.abstract_like(abstract, replicated))
        variables = methods.test_time_variables(cfg, state.params, state.batch_stats)
  finally:
    ckpt.close()
  return Predictor(cfg=cfg, nets=nets, variables=variables, step=step, kernels=kernels)


def _make_forward(predictor: Predictor):
  nets, predict = predictor.nets, predictor.method.predict

  def forward(variables, x):
    """(B, H, W, 1) normalised CT -> (B, H, W, K) float32 class probabilities."""
    return jax.nn.softmax(predict(nets, variables, x).astype(jnp.float32), axis=-1)

  return jax.jit(ops.using(predictor.kernels, forward))


class VolumeSegmenter:
  """Segments CT volumes slice by slice with one compiled function per in-plane shape.

  Scans are resampled in-plane to the run's ``data.target_spacing_mm`` (or ``target_spacing_mm``) as training
  saw them, segmented, and the class probabilities resampled back linearly to the scan's grid, where the label
  is their argmax: predictions and metrics are always on the scan's own grid.
  """

  def __init__(self, predictor: Predictor, batch_size=None, target_spacing_mm=None, mirror_tta=False):
    """
    Args:
      predictor: the restored run.
      batch_size: slices per batch (default the run's ``eval.batch_size``), rounded up to the local devices.
      target_spacing_mm: in-plane pixel size to segment at, overriding the run's (None: the run's).
      mirror_tta: average the probabilities over the 4 in-plane mirrorings (test-time augmentation).
    """
    self.predictor = predictor
    self.variables = predictor.variables  # the networks' variables; a trainer's validation swaps in the live ones
    n_dev = jax.local_device_count()
    batch_size = int(batch_size or predictor.cfg.eval.batch_size)
    self.batch_size = max(n_dev, int(math.ceil(batch_size / n_dev)) * n_dev)  # splits evenly over devices
    self.sharding = NamedSharding(step_lib.make_mesh(jax.local_devices()), P("data"))
    self._forward = _make_forward(predictor)
    data = predictor.cfg.data
    self.target_spacing_mm = resample.target_inplane(
        target_spacing_mm if target_spacing_mm is not None else data.get("target_spacing_mm", ()))
    self.image_interpolation = data.get("image_interpolation", "linear")
    self.mirror_tta = bool(mirror_tta)

  def _predict(self, slices):
    """(Z, H, W) normalised slices -> (Z, H, W, K) probabilities, in fixed-shape padded batches."""
    z, h, w = slices.shape
    hp, wp = (int(math.ceil(s / SPATIAL_MULTIPLE)) * SPATIAL_MULTIPLE for s in (h, w))
    out = None
    for start in range(0, z, self.batch_size):
      n = min(self.batch_size, z - start)
      batch = np.full((self.batch_size, hp, wp, 1), -1.0, np.float32)  # -1 = air after the window; the rows
      batch[:n, :h, :w, 0] = slices[start:start + n]                   # past n (padding) are dropped below
      probs = np.asarray(self._forward(self.variables, jax.device_put(batch, self.sharding)))
      if out is None:
        out = np.empty((z, h, w, probs.shape[-1]), np.float32)
      out[start:start + n] = probs[:n, :h, :w]
    return out

  def slice_probabilities(self, slices):
    """:meth:`_predict`, averaged over the in-plane mirrorings of the slices when ``mirror_tta`` is set."""
    if not self.mirror_tta:
      return self._predict(slices)
    total = 0.0
    for axes in ((), (1,), (2,), (1, 2)):
      flipped = np.flip(slices, axes) if axes else slices
      probs = self._predict(np.ascontiguousarray(flipped))
      total = total + (np.flip(probs, axes) if axes else probs)
    return (total / 4.0).astype(np.float32)

  def probabilities(self, ct_hu, spacing_mm=None):
    """(X, Y, Z) CT in HU (canonical orientation) -> (X, Y, Z, K) float32 class probabilities on its grid.

    Args:
      ct_hu: the scan.
      spacing_mm: its voxel size; needed when segmenting at a target spacing.
    """
    return probabilities_on_scan_grid(self.slice_probabilities, ct_hu, spacing_mm, self.target_spacing_mm,
                                      tuple(self.predictor.cfg.data.ct_window), self.image_interpolation)

  def __call__(self, ct_hu, spacing_mm=None):
    """(X, Y, Z) CT in HU -> (X, Y, Z) uint8 label map (argmax of :meth:`probabilities`)."""
    return np.argmax(self.probabilities(ct_hu, spacing_mm), axis=-1).astype(np.uint8)


def probabilities_on_scan_grid(slice_probabilities, ct_hu, spacing_mm, target_spacing_mm, ct_window,
                               image_interpolation="linear"):
  """Segments a scan at ``target_spacing_mm`` and returns the class probabilities on the scan's own grid.

  The scan is resampled in-plane (slice positions unchanged), normalised with ``ct_window``, segmented slice by
  slice, and the probabilities are resampled back linearly (:mod:`cmedl_jax.data.resample`).

  Args:
    slice_probabilities: (Z, H, W) normalised slices -> (Z, H, W, K) probabilities.
    ct_hu: (X, Y, Z) CT in HU.
    spacing_mm: (3,) voxel size of ``ct_hu`` (unused when ``target_spacing_mm`` is None).
    target_spacing_mm: (x, y) pixel size to segment at, or None for the scan's own.
    ct_window: the run's HU window.
    image_interpolation: "linear" | "cubic".

  Returns:
    (X, Y, Z, K) float32.
  """
  x, y, _ = ct_hu.shape
  shape = (x, y)
  if target_spacing_mm is not None:
    if spacing_mm is None:
      raise ValueError("segmenting at a target spacing needs the scan's spacing_mm")
    shape = resample.resampled_inplane_shape((x, y), spacing_mm[:2], target_spacing_mm)
  image = resample.resample_image(ct_hu, shape, image_interpolation)
  probs = slice_probabilities(preprocess.axial_slices(preprocess.normalize_ct(image, ct_window)))
  return resample.resample_probabilities(np.moveaxis(probs, 0, 2), (x, y))
