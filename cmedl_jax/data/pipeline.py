"""The unpaired CT/MRI training input pipeline (grain ``MapDataset``).

Each example pairs a labelled CT slice crop with an MRI slice crop drawn independently (a different patient, an
independent random choice): the unpaired setting of CMEDL. Example ``g`` of the global stream is a pure function of
``(seed, g)``: its random generator is ``np.random.default_rng([seed, g])``. That makes the stream

- deterministic for a seed whatever the number of grain worker processes,
- identical whatever the number of JAX processes: process ``p`` of ``P`` builds, for global batch ``b``, the rows
  ``b * G + p * G/P ... b * G + (p + 1) * G/P - 1`` (``G`` = global batch size), so concatenating the processes'
  local batches in process order (what ``jax.make_array_from_process_local_data`` does) gives the global batch of a
  single process;
- checkpointable: the iterator's state is the number of local batches consumed (``get_state``/``set_state``).

Foreground oversampling (nnU-Net style): with probability ``foreground_fraction`` the CT crop is centred
(at a random offset) on a random tumor voxel of a random slice that contains tumor; otherwise the slice and crop
are uniform.

Batches are dicts of numpy arrays::

    ct        (B, S, S, 1) float32 in [-1, 1]
    ct_label  (B, S, S)    int32
    mri       (B, S, S, 1) float32 in [-1, 1]
    ct_case, ct_slice, mri_case, mri_slice  (B,) int32   provenance (indices into the stores)
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from typing import Optional

import grain
import numpy as np

from cmedl_jax.data import dataset_index, nifti_io, preprocess

log = logging.getLogger(__name__)

# A MapDataset needs a length; this is "forever" for any training run (2**40 examples).
ENDLESS = 2 ** 40


@dataclasses.dataclass
class SliceStore:
  """Normalised volumes of one dataset, held as axial slice stacks.

  Attributes:
    modality: "CT" or the MRI channel name.
    case_ids: (N,) case ids in index order.
    images: list of (Z, X, Y) float32 arrays in [-1, 1].
    labels: list of (Z, X, Y) int16 arrays, or None for unlabelled sets.
    spacings: list of (3,) voxel sizes in mm (X, Y, Z).
  """

  modality: str
  case_ids: list
  images: list
  labels: Optional[list]
  spacings: list

  @property
  def slice_table(self):
    """(M, 2) int32 array of (case index, slice index) for every axial slice."""
    return np.array([(c, z) for c, img in enumerate(self.images) for z in range(img.shape[0])], dtype=np.int32)

  def foreground_table(self, foreground_label=1):
    """(K, 2) int32 (case, slice) pairs of slices that contain ``foreground_label`` (labels >= it count too)."""
    if self.labels is None:
      return np.zeros((0, 2), np.int32)
    rows = [(c, z) for c, lab in enumerate(self.labels)
            for z in np.flatnonzero((lab >= foreground_label).any(axis=(1, 2)))]
    return np.array(rows, dtype=np.int32).reshape(-1, 2)


def load_store(root, *, modality=None, require_labels=False, ct_window=preprocess.CT_WINDOW_HU,
               mri_percentiles=preprocess.MRI_PERCENTILES, log_every=10) -> SliceStore:
  """Reads, validates and normalises every case of a dataset folder.

  Args:
    root: dataset folder (see :mod:`cmedl_jax.data.dataset_index`).
    modality: "CT" or an MRI name; defaults to the dataset.json channel name (CT when it says so).
    require_labels: every case must be labelled (the CT training set).
    ct_window, mri_percentiles: normalisation settings, see :mod:`cmedl_jax.data.preprocess`.
    log_every: progress message period in cases.

  Raises:
    DataError: from indexing or reading (see :mod:`cmedl_jax.data.nifti_io`).
  """
  index = dataset_index.load_dataset(root, require_labels=require_labels)
  modality = modality or index.modality or "CT"
  allowed = set(index.labels.values())
  images, labels, spacings = [], [], []
  for i, case in enumerate(index.cases):
    use_label = require_labels or (case.label is not None and index.labelled)
    image, label = nifti_io.load_case(case.image, case.label if use_label else None, allowed_labels=allowed)
    images.append(preprocess.axial_slices(preprocess.normalize(image.data, modality, ct_window=ct_window,
                                                               mri_percentiles=mri_percentiles)))
    if label is not None:
      labels.append(preprocess.axial_slices(label.data))
    spacings.append(image.spacing)
    if log_every and ((i + 1) % log_every == 0 or i + 1 == len(index.cases)):
      log.info("loaded %d/%d %s volumes from %s", i + 1, len(index.cases), modality, root)
  return SliceStore(modality=modality, case_ids=[c.case_id for c in index.cases], images=images,
                    labels=labels if labels and len(labels) == len(images) else None, spacings=spacings)


class UnpairedExampleMaker:
  """Maps a global example index to one unpaired {ct, ct_label, mri} example (picklable for grain workers)."""

  def __init__(self, ct: SliceStore, mri: SliceStore, *, seed, crop_size, foreground_fraction=0.33,
               foreground_label=1):
    if ct.labels is None:
      raise ValueError(f"the CT set ({len(ct.images)} cases) has no labels; CMEDL trains on labelled CT")
    self.ct, self.mri = ct, mri
    self.seed, self.crop_size = int(seed), int(crop_size)
    self.foreground_fraction = float(foreground_fraction)
    self.foreground_label = int(foreground_label)
    self.ct_slices = ct.slice_table
    self.ct_foreground = ct.foreground_table(foreground_label)
    self.mri_slices = mri.slice_table
    if not 0.0 <= self.foreground_fraction <= 1.0:
      raise ValueError(f"foreground_fraction must lie in [0, 1], got {foreground_fraction}")
    if self.foreground_fraction > 0 and len(self.ct_foreground) == 0:
      log.warning("no CT slice contains label %d: foreground oversampling is disabled", foreground_label)

  def __call__(self, global_index):
    rng = np.random.default_rng([self.seed, int(global_index)])
    use_foreground = len(self.ct_foreground) > 0 and rng.random() < self.foreground_fraction
    table = self.ct_foreground if use_foreground else self.ct_slices
    ct_case, ct_z = table[rng.integers(len(table))]
    ct_image = self.ct.images[ct_case][ct_z]
    ct_label = self.ct.labels[ct_case][ct_z]
    center = None
    if use_foreground:
      fg_pixels = np.argwhere(ct_label >= self.foreground_label)
      center = fg_pixels[rng.integers(len(fg_pixels))]
    origin = preprocess.random_crop_origin(rng, ct_image.shape, self.crop_size, center)
    mri_case, mri_z = self.mri_slices[rng.integers(len(self.mri_slices))]
    mri_image = self.mri.images[mri_case][mri_z]
    mri_origin = preprocess.random_crop_origin(rng, mri_image.shape, self.crop_size)
    return {
        "ct": preprocess.crop_2d(ct_image, origin, self.crop_size, -1.0)[..., None],
        "ct_label": preprocess.crop_2d(ct_label, origin, self.crop_size, 0).astype(np.int32),
        "mri": preprocess.crop_2d(mri_image, mri_origin, self.crop_size, -1.0)[..., None],
        "ct_case": np.int32(ct_case),
        "ct_slice": np.int32(ct_z),
        "mri_case": np.int32(mri_case),
        "mri_slice": np.int32(mri_z),
    }


class _LocalToGlobalIndex:
  """Local example index of process p -> global example index (contiguous rows of each global batch)."""

  def __init__(self, local_batch_size, process_index, process_count):
    self.local_batch_size = int(local_batch_size)
    self.process_index, self.process_count = int(process_index), int(process_count)

  def __call__(self, local_index):
    batch, row = divmod(int(local_index), self.local_batch_size)
    return (batch * self.process_count + self.process_index) * self.local_batch_size + row


def make_train_dataset(ct: SliceStore, mri: SliceStore, *, global_batch_size, crop_size, seed=0,
                       foreground_fraction=0.33, process_index=None, process_count=None,
                       num_batches=None) -> grain.MapDataset:
  """The per-process batched MapDataset of unpaired training examples.

  Args:
    ct, mri: stores from :func:`load_store` (the CT one labelled).
    global_batch_size: examples per step over all processes; must divide by ``process_count``.
    crop_size: side of the square crops in pixels (the paper uses 256).
    seed: the data seed; the stream is a function of it alone.
    foreground_fraction: probability of a tumor-centred CT crop.
    process_index, process_count: this process's shard; default ``jax.process_index()/process_count()``.
    num_batches: length in batches; default endless.

  Returns:
    A MapDataset whose element ``i`` is this process's part of global batch ``i`` (local batch size
    ``global_batch_size / process_count``).
  """
  if process_index is None or process_count is None:
    import jax  # the pipeline itself needs no JAX; only the default shard does
    process_index, process_count = jax.process_index(), jax.process_count()
  if global_batch_size % process_count:
    raise ValueError(f"global batch size {global_batch_size} does not divide over {process_count} processes")
  local_batch_size = global_batch_size // process_count
  maker = UnpairedExampleMaker(ct, mri, seed=seed, crop_size=crop_size, foreground_fraction=foreground_fraction)
  length = ENDLESS if num_batches is None else int(num_batches) * local_batch_size
  return (grain.MapDataset.range(length)
          .map(_LocalToGlobalIndex(local_batch_size, process_index, process_count))
          .map(maker)
          .batch(local_batch_size, drop_remainder=True))


def exit_with_parent(worker_index=0, worker_count=1):
  """grain ``worker_init_fn``: the worker process exits once the process that started it is gone.

  A training process killed with SIGKILL (the OOM killer, a scheduler's hard stop) cannot stop its grain workers,
  which would otherwise live on as orphans holding their memory; a daemon thread checks the parent every second.
  """
  del worker_index, worker_count
  parent = os.getppid()

  def watch():
    while os.getppid() == parent:
      time.sleep(1.0)
    os._exit(0)

  threading.Thread(target=watch, name="cmedl-exit-with-parent", daemon=True).start()


def make_train_iterator(dataset: grain.MapDataset, *, num_workers=0, prefetch_buffer_size=2):
  """A checkpointable iterator over ``dataset``; worker processes (``num_workers > 0``) change no value.

  Worker processes re-import the main module: scripts using them need an ``if __name__ == "__main__":`` guard.
  They exit when this process dies (:func:`exit_with_parent`).
  """
  iter_ds = dataset.to_iter_dataset(grain.ReadOptions(num_threads=0 if num_workers else 2,
                                                      prefetch_buffer_size=prefetch_buffer_size))
  if num_workers:
    # grain's worker processes read absl flags; programs that never parse absl flags (pytest, notebooks, our own
    # argparse CLIs) would fail with UnparsedFlagAccessError, and the defaults are what we want.
    from absl import flags
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers),
                                  worker_init_fn=exit_with_parent)
  return iter(iter_ds)
