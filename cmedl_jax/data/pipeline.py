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

Cases are read from the preprocessed, memory-mapped stores of :mod:`cmedl_jax.data.store` (a pickled example
maker is only their metadata, so worker processes share the page cache). Foreground oversampling (nnU-Net style):
with probability ``foreground_fraction`` the CT crop contains (at a random position) a stored location of a
foreground class; otherwise the slice and crop are uniform. Augmentation (:mod:`cmedl_jax.data.augment`) follows,
from generators ``[seed, g, 1]`` (CT) and ``[seed, g, 2]`` (MRI).

Batches are dicts of numpy arrays::

    ct        (B, S, S, 1) float32 in [-1, 1]
    ct_label  (B, S, S)    int32
    mri       (B, S, S, 1) float32 in [-1, 1]
    ct_case, ct_slice, mri_case, mri_slice  (B,) int32   provenance (indices into the stores)
"""

from __future__ import annotations

import logging
import os
import threading
import time
import grain
import numpy as np

from cmedl_jax.data import augment as augment_lib, preprocess, store

log = logging.getLogger(__name__)

# A MapDataset needs a length; this is "forever" for any training run (2**40 examples).
ENDLESS = 2 ** 40
NO_AUGMENT = augment_lib.Augment(enabled=False)


def training_stores(data_cfg, *, progress=True):
  """The preprocessed CT (labelled) and MRI (images only) stores of a config's ``data`` section.

  Preprocesses on first use (:func:`cmedl_jax.data.store.prepare`, with a progress bar); later starts read the
  manifests and stat the source files only.
  """
  cache_dir = data_cfg.cache_dir or None
  ct = store.prepare(data_cfg.ct_dir, store.settings_from_config(data_cfg, "CT"), cache_dir=cache_dir,
                     labels="required", progress=progress)
  mri = store.prepare(data_cfg.mri_dir, store.settings_from_config(data_cfg, "MRI"), cache_dir=cache_dir,
                      labels="ignore", progress=progress)
  return ct, mri


class UnpairedExampleMaker:
  """Maps a global example index to one unpaired {ct, ct_label, mri} example (picklable for grain workers).

  Foreground oversampling over K classes (nnU-Net's): a foreground class is drawn uniformly among those present
  in the store, then a case containing it, then one of its stored voxel locations (the store's class
  locations); the crop contains that voxel at a random position. Otherwise the slice is uniform over all slices.
  """

  def __init__(self, ct: store.PreprocessedStore, mri: store.PreprocessedStore, *, seed, crop_size,
               foreground_fraction=0.33, augment: augment_lib.Augment = NO_AUGMENT):
    if not ct.labelled:
      raise ValueError(f"the CT set ({ct.folder}) has no labels; CMEDL trains on labelled CT")
    self.ct, self.mri = ct, mri
    self.seed, self.crop_size = int(seed), int(crop_size)
    self.foreground_fraction = float(foreground_fraction)
    self.augment = augment
    self.foreground_classes = ct.foreground_classes
    if not 0.0 <= self.foreground_fraction <= 1.0:
      raise ValueError(f"foreground_fraction must lie in [0, 1], got {foreground_fraction}")
    if self.foreground_fraction > 0 and not self.foreground_classes:
      log.warning("no CT case contains a foreground label: foreground oversampling is disabled")

  def __call__(self, global_index):
    rng = np.random.default_rng([self.seed, int(global_index)])
    use_foreground = bool(self.foreground_classes) and rng.random() < self.foreground_fraction
    center = None
    if use_foreground:
      value = self.foreground_classes[rng.integers(len(self.foreground_classes))]
      cases = self.ct.cases_with_class(value)
      ct_case = int(cases[rng.integers(len(cases))])
      locations = self.ct.locations(ct_case, value)
      ct_z, *center = (int(v) for v in locations[rng.integers(len(locations))])
    else:
      ct_case, ct_z = self.ct.slice_at(rng.integers(self.ct.num_slices))
    ct_image = self.ct.image(ct_case)[ct_z]
    ct_label = self.ct.label(ct_case)[ct_z]
    origin = preprocess.random_crop_origin(rng, ct_image.shape, self.crop_size, center)
    mri_case, mri_z = self.mri.slice_at(rng.integers(self.mri.num_slices))
    mri_image = self.mri.image(mri_case)[mri_z]
    mri_origin = preprocess.random_crop_origin(rng, mri_image.shape, self.crop_size)
    # Augmentation draws from generators of its own: switching it on or off leaves the slices and crops drawn.
    ct_rng, mri_rng = (np.random.default_rng([self.seed, int(global_index), k]) for k in (1, 2))
    aug = self.augment
    ct_crop, ct_label_crop = augment_lib.sample_crop(ct_rng, aug, ct_image, ct_label, origin, self.crop_size, -1.0)
    mri_crop, _ = augment_lib.sample_crop(mri_rng, aug, mri_image, None, mri_origin, self.crop_size, -1.0)
    return {
        "ct": augment_lib.intensity(ct_rng, aug.ct, ct_crop, aug.enabled)[..., None],
        "ct_label": ct_label_crop.astype(np.int32),
        "mri": augment_lib.intensity(mri_rng, aug.mri, mri_crop, aug.enabled)[..., None],
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


def make_train_dataset(ct: store.PreprocessedStore, mri: store.PreprocessedStore, *, global_batch_size, crop_size,
                       seed=0, foreground_fraction=0.33, augment: augment_lib.Augment = NO_AUGMENT,
                       process_index=None, process_count=None, num_batches=None) -> grain.MapDataset:
  """The per-process batched MapDataset of unpaired training examples.

  Args:
    ct, mri: preprocessed stores (:func:`training_stores`; the CT one labelled).
    global_batch_size: examples per step over all processes; must divide by ``process_count``.
    crop_size: side of the square crops in pixels (the paper uses 256).
    seed: the data seed; the stream is a function of it alone.
    foreground_fraction: probability of a foreground-centred CT crop.
    augment: the augmentation (:mod:`cmedl_jax.data.augment`); default none.
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
  maker = UnpairedExampleMaker(ct, mri, seed=seed, crop_size=crop_size, foreground_fraction=foreground_fraction,
                               augment=augment)
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
