"""Test-time inference: the method's test-time forward (CMEDL: the student) over whole CT volumes.

Volumes are cut into axial slices, padded in-plane to a multiple of the network's stride and grouped into
fixed-shape batches (the last one padded, with a mask of the real slices), so one compiled function serves every
batch of a volume. Batches are split over the local devices when the batch size allows it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from cmedl_jax import ops
from cmedl_jax.data import preprocess
from cmedl_jax.errors import DataError
from cmedl_jax.train import checkpointing, methods, networks
from cmedl_jax.train import state as state_lib
from cmedl_jax.train import step as step_lib

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
    step: the checkpoint; default the latest.
    kernels: the CPU implementation of the ops; default :func:`run_kernels` of the run's config.

  Raises:
    FileNotFoundError: no checkpoint.
    DataError: the run's method is not in this version's method table.
  """
  ckpt = checkpointing.RunCheckpointer(workdir, async_save=False)
  try:
    step = ckpt.latest_step() if step is None else int(step)
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
    """(B, H, W, 1) normalised CT -> (B, H, W) int32 labels."""
    return jnp.argmax(predict(nets, variables, x), axis=-1).astype(jnp.int32)

  return jax.jit(ops.using(predictor.kernels, forward))


class VolumeSegmenter:
  """Segments normalised CT volumes slice by slice with one compiled function per in-plane shape."""

  def __init__(self, predictor: Predictor, batch_size=None):
    self.predictor = predictor
    n_dev = jax.local_device_count()
    batch_size = int(batch_size or predictor.cfg.eval.batch_size)
    self.batch_size = max(n_dev, int(math.ceil(batch_size / n_dev)) * n_dev)  # splits evenly over devices
    self.sharding = NamedSharding(step_lib.make_mesh(jax.local_devices()), P("data"))
    self._forward = _make_forward(predictor)

  def __call__(self, ct_hu):
    """(X, Y, Z) CT in HU (canonical orientation) -> (X, Y, Z) uint8 label map."""
    window = tuple(self.predictor.cfg.data.ct_window)
    slices = preprocess.axial_slices(preprocess.normalize_ct(ct_hu, window))  # (Z, X, Y)
    z, h, w = slices.shape
    hp, wp = (int(math.ceil(s / SPATIAL_MULTIPLE)) * SPATIAL_MULTIPLE for s in (h, w))
    n_batches = int(math.ceil(z / self.batch_size))
    padded = np.full((n_batches * self.batch_size, hp, wp, 1), -1.0, np.float32)  # -1 = air after the window
    padded[:z, :h, :w, 0] = slices
    valid = np.arange(n_batches * self.batch_size) < z  # the mask of real slices
    out = np.zeros((n_batches * self.batch_size, hp, wp), np.uint8)
    for b in range(n_batches):
      rows = slice(b * self.batch_size, (b + 1) * self.batch_size)
      x = jax.device_put(padded[rows], self.sharding)
      out[rows] = np.asarray(self._forward(self.predictor.variables, x)).astype(np.uint8)
    return preprocess.stack_axial(out[valid][:, :h, :w])


def segment_at_inplane_spacing(segmenter, ct_hu, spacing_mm, target_mm):
  """Segments ``ct_hu`` resampled in-plane to ``target_mm`` pixels; the label map comes back on the input grid.

  For a network trained at another pixel size than the scan's (e.g. phantoms vs real CT): the slices are
  resampled linearly (slice positions unchanged), segmented, and the labels taken back to every input voxel from
  the resampled pixel whose centre is nearest.

  Args:
    segmenter: a :class:`VolumeSegmenter` (or any (X, Y, Z) HU -> (X, Y, Z) labels callable).
    ct_hu: (X, Y, Z) CT in HU.
    spacing_mm: (3,) voxel size of ``ct_hu``.
    target_mm: in-plane pixel size to segment at (mm, > 0).

  Returns:
    (X, Y, Z) uint8 labels on the input grid.
  """
  from scipy import ndimage
  if not target_mm or float(target_mm) <= 0:
    raise ValueError(f"the in-plane spacing must be a positive number of mm, got {target_mm!r}")
  x, y, _ = ct_hu.shape
  shape = [max(1, int(round(n * float(s) / float(target_mm)))) for n, s in zip((x, y), spacing_mm[:2])]
  if shape == [x, y]:
    return segmenter(ct_hu)
  resampled = ndimage.zoom(np.asarray(ct_hu, np.float32), (shape[0] / x, shape[1] / y, 1.0), order=1,
                           grid_mode=True, mode="nearest")
  labels = segmenter(resampled)
  # Nearest resampled pixel centre of each input voxel centre (grid_mode: pixel edges of both grids align).
  rows = np.minimum(((np.arange(x) + 0.5) * labels.shape[0] / x).astype(int), labels.shape[0] - 1)
  cols = np.minimum(((np.arange(y) + 0.5) * labels.shape[1] / y).astype(int), labels.shape[1] - 1)
  return np.ascontiguousarray(labels[rows][:, cols]).astype(np.uint8)


def default_output_dir(workdir, data_dir):
  return os.path.join(workdir, "eval", os.path.basename(os.path.normpath(data_dir)))
