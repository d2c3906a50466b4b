"""The preprocessed, memory-mapped case store (nnU-Net's "preprocessed" folder).

A dataset folder is read, validated (:mod:`cmedl_jax.data.nifti_io`'s errors), resampled in-plane to the target
spacing (:mod:`cmedl_jax.data.resample`), normalised (:mod:`cmedl_jax.data.preprocess`) and written once to a
cache folder, one set of ``.npy`` files per case:

    CACHE_DIR/<dataset folder name>-<hash of its path>/<hash of the settings>-{labelled|images}/
        manifest.json                  settings, the dataset's labels, and per case: source files (path, size,
                                       mtime, sha256), preprocessed shape/spacing/affine, files, class locations
        cases/CASE.<digest>.image.npy  (Z, X, Y) float32 in [-1, 1]: axial slices, contiguous
        cases/CASE.<digest>.label.npy  (Z, X, Y) uint8 or int16 (labelled datasets)
        cases/CASE.<digest>.locations.npy  (L, 3) int32 (z, x, y) foreground voxels, grouped by class
        .lock                          held (flock) by the process that is preprocessing

Freshness: a case is redone when its source files' size or mtime differ from the manifest's (content hashes are
computed only while preprocessing, and recorded; a source that changes while it is read is an error), or when one
of its cache files is missing or has another size than recorded (e.g. a scratch purge); another label set in
dataset.json redoes every case, and the whole folder is another one when any setting differs, so nothing stale is
used. ``<digest>`` is taken from the sources' content hashes, so a redone case gets new file names and a process
still reading the old ones is not disturbed. Every file is written to a temporary name unique to the host and
process and renamed (atomic), the manifest last (and every few seconds while preprocessing): an interrupted
preprocessing resumes about where it stopped, and concurrent processes (the hosts of one job on a shared
filesystem) never see a partial file; the lock only saves them doing the same work twice.

Class locations (nnU-Net's): for each foreground class of each case up to ``max_locations`` voxel coordinates,
evenly strided over the class's voxels in (z, x, y) order, so foreground sampling never scans a label map.

Opening a store reads the manifest and stats the source and cache files: O(number of cases) of metadata. Volumes
are memory-mapped on first use in each process (at most ``MAX_OPEN_MAPS`` maps, hence file descriptors, open at
once), so grain worker processes share the OS page cache and a pickled store is only its metadata.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import time
from typing import Optional

import numpy as np

from cmedl_jax.data import dataset_index, nifti_io, preprocess, resample
from cmedl_jax.errors import DataError
from cmedl_jax.utils import files

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
# Memory maps a process keeps open (each holds a file descriptor; the least recently used is closed beyond this).
MAX_OPEN_MAPS = 256
# Seconds between manifest writes while preprocessing (and after the last case): an interruption loses at most that.
MANIFEST_WRITE_SECONDS = 10.0
CACHE_ENV = "CMEDL_CACHE_DIR"
MANIFEST = "manifest.json"


def default_cache_dir():
  """``$CMEDL_CACHE_DIR``, else ``$XDG_CACHE_HOME/cmedl_jax/preprocessed`` (``~/.cache/...``)."""
  if os.environ.get(CACHE_ENV):
    return os.environ[CACHE_ENV]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "cmedl_jax", "preprocessed")


@dataclasses.dataclass(frozen=True)
class PreprocessSettings:
  """Everything that changes a preprocessed array; part of the cache folder's name.

  Attributes:
    modality: "CT" (HU window) or an MRI name (per-scan percentiles).
    target_spacing_mm: in-plane (x, y) pixel size, or None to keep each scan's own.
    image_interpolation: "linear" | "cubic".
    label_interpolation: "linear_per_class" | "nearest".
    ct_window: HU window mapped to [-1, 1].
    mri_percentiles: per-scan clipping percentiles mapped to [-1, 1].
    max_locations: stored foreground voxel coordinates per class and case.
  """

  modality: str = "CT"
  target_spacing_mm: Optional[tuple] = None
  image_interpolation: str = "linear"
  label_interpolation: str = "linear_per_class"
  ct_window: tuple = preprocess.CT_WINDOW_HU
  mri_percentiles: tuple = preprocess.MRI_PERCENTILES
  max_locations: int = 10000

  @property
  def is_ct(self):
    return self.modality.upper() == "CT"

  def as_dict(self):
    d = {"format_version": FORMAT_VERSION, "modality": "CT" if self.is_ct else "MRI",
         "target_spacing_mm": None if self.target_spacing_mm is None else [float(v) for v in self.target_spacing_mm],
         "image_interpolation": self.image_interpolation, "label_interpolation": self.label_interpolation,
         "max_locations": int(self.max_locations)}
    if self.is_ct:
      d["ct_window"] = [float(v) for v in self.ct_window]
    else:
      d["mri_percentiles"] = [float(v) for v in self.mri_percentiles]
    return d

  def key(self):
    return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()[:16]


def settings_from_config(data_cfg, modality) -> PreprocessSettings:
  """The settings of one modality from a config's ``data`` section."""
  return PreprocessSettings(
      modality=modality, target_spacing_mm=resample.target_inplane(data_cfg.target_spacing_mm),
      image_interpolation=data_cfg.image_interpolation, label_interpolation=data_cfg.label_interpolation,
      ct_window=tuple(data_cfg.ct_window), mri_percentiles=tuple(data_cfg.mri_percentiles))


def cache_folder(root, settings: PreprocessSettings, cache_dir=None, labelled=True):
  """Where the preprocessed form of dataset ``root`` with ``settings`` (with or without labels) lives.

  Raises:
    DataError: the cache folder would lie inside the dataset folder (the source data stay untouched).
  """
  root = os.path.realpath(os.fspath(root))
  cache_dir = os.path.realpath(os.fspath(cache_dir or default_cache_dir()))
  if os.path.commonpath([root, cache_dir]) == root:
    raise DataError(cache_dir, f"the preprocessing cache must not lie inside the dataset folder {root}; set "
                               "data.cache_dir (or --cache-dir / $CMEDL_CACHE_DIR) to a folder outside it")
  name = os.path.basename(root) + "-" + hashlib.sha256(root.encode()).hexdigest()[:8]
  return os.path.join(cache_dir, name, settings.key() + ("-labelled" if labelled else "-images"))


def _file_stat(path):
  st = os.stat(path)
  return {"path": os.path.realpath(path), "size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


def _sha256(path):
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      h.update(chunk)
  return h.hexdigest()


def _is_fresh(entry, case, use_label, folder):
  """Whether ``entry`` was made from the case's current source files and its cache files are all there, whole."""
  if entry is None:
    return False
  for key, path in (("image", case.image), ("label", case.label if use_label else None)):
    recorded = entry["source"].get(key)
    if (path is None) != (recorded is None):
      return False
    if path is not None:
      st = _file_stat(path)
      if any(recorded[k] != st[k] for k in ("path", "size", "mtime_ns")):
        return False
  for name, size in entry.get("bytes", {}).items():  # e.g. a scratch purge deleted or cut a file
    try:
      if os.stat(os.path.join(folder, "cases", name)).st_size != size:
        return False
    except FileNotFoundError:
      return False
  return True


def _save_npy(path, array):
  """Writes ``array`` to ``path`` atomically; returns the file's size in bytes."""
  tmp = files.temporary_name(path)
  with open(tmp, "wb") as f:
    np.save(f, np.ascontiguousarray(array))
  os.replace(tmp, path)
  return os.stat(path).st_size


def _class_locations(label_slices, values, max_locations):
  """(L, 3) int32 coordinates grouped by class and {value: [offset, stored, voxels]} for the classes present."""
  blocks, table, offset = [], {}, 0
  for value in values:
    coords = np.argwhere(label_slices == value)
    voxels = len(coords)
    if not voxels:
      continue
    if voxels > max_locations:
      coords = coords[np.linspace(0, voxels - 1, max_locations).round().astype(np.int64)]
    blocks.append(coords.astype(np.int32))
    table[str(int(value))] = [offset, int(len(coords)), int(voxels)]
    offset += len(coords)
  locations = np.concatenate(blocks) if blocks else np.zeros((0, 3), np.int32)
  return locations, table


def preprocess_case(case, settings: PreprocessSettings, label_values, use_label):
  """Reads, resamples and normalises one case.

  Returns:
    (image slices (Z, X, Y) float32, label slices (Z, X, Y) or None, spacing (3,), affine (4, 4), source volume).
  """
  image, label = nifti_io.load_case(case.image, case.label if use_label else None, allowed_labels=label_values)
  data, affine = image.data, image.affine
  labels = None if label is None else label.data
  if settings.target_spacing_mm is not None:
    new_shape = resample.resampled_inplane_shape(data.shape[:2], image.spacing[:2], settings.target_spacing_mm)
    data = resample.resample_image(data, new_shape, settings.image_interpolation)
    if labels is not None:
      labels = resample.resample_labels(labels, new_shape, settings.label_interpolation, classes=label_values)
    affine = resample.resampled_affine(affine, image.shape[:2], new_shape)
  normalised = preprocess.normalize(data, settings.modality, ct_window=settings.ct_window,
                                    mri_percentiles=settings.mri_percentiles)
  spacing = tuple(float(s) for s in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
  label_slices = None
  if labels is not None:
    dtype = np.uint8 if labels.min() >= 0 and labels.max() < 256 else np.int16
    label_slices = preprocess.axial_slices(labels).astype(dtype)
  return preprocess.axial_slices(normalised), label_slices, spacing, affine, image


@contextlib.contextmanager
def _locked(folder):
  """An exclusive flock on FOLDER/.lock (waits for another process that is preprocessing the same folder)."""
  import fcntl
  path = os.path.join(folder, ".lock")
  with open(path, "w") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      log.info("%s: another process is preprocessing this dataset; waiting for it", folder)
      fcntl.flock(f, fcntl.LOCK_EX)
    except OSError as e:  # e.g. a network filesystem mounted without lock support
      raise DataError(path, f"cannot be locked ({e}); put the preprocessing cache on a filesystem with file "
                            "locks (data.cache_dir, --cache-dir or $CMEDL_CACHE_DIR), e.g. a local disk") from e
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _read_manifest(folder):
  path = os.path.join(folder, MANIFEST)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise DataError(path, f"preprocessing manifest cannot be read ({e}); delete the folder {folder} to redo it")


LABEL_USES = ("required", "if_present", "ignore")


def prepare(root, settings: PreprocessSettings, *, cache_dir=None, labels="if_present", progress=True):
  """The preprocessed store of dataset ``root``: preprocesses the cases that are missing or stale, then opens it.

  Args:
    root: a dataset folder (:mod:`cmedl_jax.data.dataset_index`).
    settings: the preprocessing settings.
    cache_dir: the cache's root (default :func:`default_cache_dir`).
    labels: "required" (every case must be labelled: the CT training set), "if_present" (stored when every case
      has one) or "ignore" (images only: the unpaired MRI).
    progress: show a progress bar over the cases being preprocessed.

  Raises:
    DataError: from indexing or reading a case (nothing of that case is written), or a cache folder inside
      ``root``.
  """
  if labels not in LABEL_USES:
    raise ValueError(f"labels must be one of {LABEL_USES}, got {labels!r}")
  index = dataset_index.load_dataset(root, require_labels=labels == "required")
  use_label = labels == "required" or (labels == "if_present" and index.labelled)
  folder = cache_folder(index.root, settings, cache_dir, use_label)
  manifest = _read_manifest(folder)
  if manifest is not None and _all_fresh(manifest, index, use_label, folder):
    return PreprocessedStore(folder, manifest)
  os.makedirs(os.path.join(folder, "cases"), exist_ok=True)
  with _locked(folder):
    manifest = _read_manifest(folder)  # another process may have done it meanwhile
    manifest = _update(folder, index, settings, manifest, use_label, progress)
  return PreprocessedStore(folder, manifest)


def _all_fresh(manifest, index, use_label, folder):
  entries = manifest.get("cases", {})
  return (manifest.get("labels") == index.labels and set(entries) == {c.case_id for c in index.cases}
          and all(_is_fresh(entries[c.case_id], c, use_label, folder) for c in index.cases))


def _update(folder, index, settings, manifest, use_label, progress):
  label_values = sorted(set(index.labels.values()))
  # Another label set (dataset.json) changes label checks, per-class resampling and class locations: all redone.
  if (manifest is None or manifest.get("settings") != settings.as_dict() or manifest.get("labelled") != use_label
      or manifest.get("labels") != index.labels):
    manifest = {"settings": settings.as_dict(), "source": index.root, "labelled": use_label, "cases": {}}
  manifest["labels"] = index.labels
  entries = manifest["cases"]
  for stale in set(entries) - {c.case_id for c in index.cases}:
    del entries[stale]
  todo = [c for c in index.cases if not _is_fresh(entries.get(c.case_id), c, use_label, folder)]
  bar = None
  if progress and todo:
    from tqdm import tqdm
    bar = tqdm(total=len(todo), desc=f"preprocess {os.path.basename(index.root)}", dynamic_ncols=True)
  log.info("preprocessing %d of %d case(s) of %s into %s", len(todo), len(index.cases), index.root, folder)
  t0 = last_write = time.time()
  try:
    for case in todo:
      sources = {"image": case.image, "label": case.label if use_label else None}
      before = {k: _file_stat(p) for k, p in sources.items() if p}
      image_slices, label_slices, spacing, affine, source = preprocess_case(case, settings, label_values, use_label)
      hashes = {k: _sha256(p) if p else None for k, p in sources.items()}
      for key, stat in before.items():
        if _file_stat(sources[key]) != stat:
          raise DataError(sources[key], "changed while it was being preprocessed; run again once it is complete")
      digest = hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()[:12]
      stem = os.path.join(folder, "cases", f"{case.case_id}.{digest}")
      entry = {"source": {"image": {**before["image"], "sha256": hashes["image"]},
                          "label": {**before["label"], "sha256": hashes["label"]} if use_label else None},
               "source_shape": list(source.shape), "source_spacing_mm": list(source.spacing),
               "shape": list(image_slices.shape), "spacing_mm": list(spacing), "affine": np.asarray(affine).tolist(),
               "image": os.path.basename(stem) + ".image.npy"}
      arrays = {"image": image_slices}
      if label_slices is not None:
        locations, table = _class_locations(label_slices, [v for v in label_values if v != 0],
                                            settings.max_locations)
        arrays.update(label=label_slices, locations=locations)
        entry.update(label=os.path.basename(stem) + ".label.npy", locations=os.path.basename(stem) + ".locations.npy",
                     class_locations=table)
      entry["bytes"] = {entry[k]: _save_npy(os.path.join(folder, "cases", entry[k]), a) for k, a in arrays.items()}
      entries[case.case_id] = entry
      if time.time() - last_write > MANIFEST_WRITE_SECONDS:
        files.write_json(os.path.join(folder, MANIFEST), manifest)
        last_write = time.time()
      if bar is not None:
        bar.update(1)
  finally:  # the cases done so far are recorded, also when a later case fails
    files.write_json(os.path.join(folder, MANIFEST), manifest)
    if bar is not None:
      bar.close()
  _remove_unreferenced(folder, entries)
  if todo:
    log.info("preprocessed %d case(s) in %.1f s", len(todo), time.time() - t0)
  return manifest


def _remove_unreferenced(folder, entries):
  """Deletes case files of this cache folder that the manifest no longer names (superseded versions, and
  temporary files of an interrupted preprocessing; called under the folder's lock)."""
  referenced = {e[k] for e in entries.values() for k in ("image", "label", "locations") if e.get(k)}
  cases_dir = os.path.join(folder, "cases")
  for name in os.listdir(cases_dir):
    if name.endswith(".tmp") or (name.endswith(".npy") and name not in referenced):
      os.remove(os.path.join(cases_dir, name))


class PreprocessedStore:
  """The cases of one preprocessed dataset, opened lazily as memory maps.

  Attributes:
    folder: the cache folder.
    modality: "CT" or "MRI".
    case_ids: case ids in sorted order (case index ``c`` is ``case_ids[c]``).
    shapes: (N, 3) int64 (Z, X, Y) of each case's slices.
    spacings: (N, 3) float64 preprocessed voxel size (x, y, z) in mm.
    labelled: whether label maps are stored.
    labels: {name: value} of the dataset.
  """

  def __init__(self, folder, manifest, case_ids=None):
    self.folder = folder
    self._manifest = manifest
    self.modality = manifest["settings"]["modality"]
    self.labelled = bool(manifest["labelled"])
    self.labels = dict(manifest.get("labels", dataset_index.DEFAULT_LABELS))
    entries = manifest["cases"]
    self.case_ids = sorted(entries) if case_ids is None else list(case_ids)
    self._entries = [entries[c] for c in self.case_ids]
    self.shapes = np.array([e["shape"] for e in self._entries], np.int64).reshape(-1, 3)
    self.spacings = np.array([e["spacing_mm"] for e in self._entries], np.float64).reshape(-1, 3)
    self.slice_offsets = np.concatenate([[0], np.cumsum(self.shapes[:, 0])]).astype(np.int64)
    self._cases_with_class = {}
    for c, e in enumerate(self._entries):
      for value in e.get("class_locations", {}):
        self._cases_with_class.setdefault(int(value), []).append(c)
    self._cases_with_class = {k: np.array(v, np.int64) for k, v in sorted(self._cases_with_class.items())}
    self._maps = collections.OrderedDict()  # (case, kind) -> array, least recently used first

  def __len__(self):
    return len(self.case_ids)

  def __getstate__(self):  # pickled into worker processes: metadata only, the memory maps are reopened there
    state = dict(self.__dict__)
    state["_maps"] = collections.OrderedDict()
    return state

  def subset(self, case_ids):
    """The same store restricted to ``case_ids`` (e.g. the training cases once validation cases are split off)."""
    return PreprocessedStore(self.folder, self._manifest, case_ids)

  @property
  def num_slices(self):
    return int(self.slice_offsets[-1])

  @property
  def foreground_classes(self):
    """Label values > 0 with stored locations in at least one case, ascending."""
    return tuple(self._cases_with_class)

  def cases_with_class(self, value):
    return self._cases_with_class.get(int(value), np.zeros(0, np.int64))

  def slice_at(self, global_slice):
    """(case index, slice index) of the ``global_slice``-th axial slice of the store."""
    case = int(np.searchsorted(self.slice_offsets, global_slice, side="right") - 1)
    return case, int(global_slice - self.slice_offsets[case])

  def entry(self, case):
    return self._entries[case]

  def affine(self, case):
    return np.asarray(self._entries[case]["affine"], np.float64)

  def _open(self, case, kind):
    name = self._entries[case].get(kind)
    if name is None:
      raise ValueError(f"{self.folder}: case {self.case_ids[case]!r} has no {kind} (unlabelled dataset)")
    path = os.path.join(self.folder, "cases", name)
    try:
      # A plain ndarray view of the map: numpy's memmap subclass costs ~40% more per crop (its wrapping of every
      # slice and result), the view reads the same file-backed pages.
      return np.asarray(np.load(path, mmap_mode="r"))
    except OSError as e:
      if e.errno in (errno.EMFILE, errno.ENFILE):
        raise DataError(path, f"cannot be opened: too many open files ({e}); raise the limit (ulimit -n) or "
                              "lower cmedl_jax.data.store.MAX_OPEN_MAPS") from e
      raise DataError(path, f"preprocessed file is missing or unreadable ({e}): the cache was changed or deleted "
                            "while this run used it; start the run again to redo it") from e

  def _map(self, case, kind):
    """The case's array, from at most MAX_OPEN_MAPS open memory maps (least recently used closed first)."""
    key = (case, kind)
    if key in self._maps:
      self._maps.move_to_end(key)
    else:
      self._maps[key] = self._open(case, kind)
      while len(self._maps) > MAX_OPEN_MAPS:
        self._maps.popitem(last=False)
    return self._maps[key]

  def image(self, case):
    """(Z, X, Y) float32 normalised axial slices (a read-only view of the memory-mapped file)."""
    return self._map(case, "image")

  def label(self, case):
    """(Z, X, Y) integer label slices (a read-only view of the memory-mapped file)."""
    return self._map(case, "label")

  def locations(self, case, value):
    """(L, 3) int32 (z, x, y) stored voxel coordinates of class ``value`` in ``case`` (L may be 0)."""
    offset, stored, _ = self._entries[case].get("class_locations", {}).get(str(int(value)), (0, 0, 0))
    return self._map(case, "locations")[offset:offset + stored] if stored else np.zeros((0, 3), np.int32)
