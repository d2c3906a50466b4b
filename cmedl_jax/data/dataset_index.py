"""Dataset folders: the nnU-Net v2 / Medical Segmentation Decathlon layout, and plain folders of NIfTI files.

Layout written by :func:`write_dataset_json` and by ``cmedl-make-phantoms``::

    ROOT/dataset.json         nnU-Net v2 keys (channel_names, labels, numTraining, file_ending)
                              plus the MSD "training" list, so both kinds of tools read it
    ROOT/imagesTr/CASE_0000.nii.gz
    ROOT/labelsTr/CASE.nii.gz (absent for unlabelled sets, e.g. the unpaired MRI)

Read by :func:`load_dataset`, in this order of preference:
1. ``dataset.json`` with a ``training`` list (MSD): the listed image/label paths, relative to ROOT.
2. ``imagesTr/`` (nnU-Net v2): ``CASE_0000<ending>`` images, ``labelsTr/CASE<ending>`` labels
   (MSD-style ``CASE<ending>`` image names without the channel suffix are accepted too).
3. a plain folder of ``.nii``/``.nii.gz`` files (e.g. an MRI folder): images only, case id = file name stem.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Optional

from cmedl_jax.errors import DataError

log = logging.getLogger(__name__)

NIFTI_ENDINGS = (".nii.gz", ".nii")
DEFAULT_LABELS = {"background": 0, "tumor": 1}


@dataclasses.dataclass(frozen=True)
class Case:
  case_id: str
  image: str
  label: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class DatasetIndex:
  """The cases of one dataset folder.

  Attributes:
    root: the folder.
    modality: channel 0 name from dataset.json ("CT", "MRI", "T2", ...), or "" when unknown.
    labels: label name -> integer value (nnU-Net v2 convention); the values allowed in label maps.
    cases: sorted by case id.
  """

  root: str
  modality: str
  labels: dict
  cases: tuple

  @property
  def labelled(self):
    return bool(self.cases) and all(c.label is not None for c in self.cases)

  def __len__(self):
    return len(self.cases)


def _strip_ending(name):
  for ending in NIFTI_ENDINGS:
    if name.endswith(ending):
      return name[:-len(ending)], ending
  return None, None


def case_id_of(image_path):
  """The case id of an image file name (``CASE_0000.nii.gz`` or ``CASE.nii``: ``CASE``), None if not NIfTI."""
  stem, _ = _strip_ending(os.path.basename(image_path))
  if stem is not None and stem.endswith("_0000"):
    stem = stem[:-5]
  return stem


def _read_dataset_json(path):
  try:
    with open(path) as f:
      meta = json.load(f)
  except json.JSONDecodeError as e:
    raise DataError(path, f"is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from e
  except OSError as e:
    raise DataError(path, f"cannot be read: {e}") from e
  if not isinstance(meta, dict):
    raise DataError(path, "must hold a JSON object")
  return meta


def _labels_from_meta(path, meta):
  labels = meta.get("labels")
  if labels is None:
    return dict(DEFAULT_LABELS)
  if not isinstance(labels, dict) or not labels:
    raise DataError(path, f"'labels' must be a non-empty object, got {labels!r}")
  try:
    if all(str(k).lstrip("-").isdigit() for k in labels):  # MSD: {"0": "background", "1": "tumour"}
      return {str(name): int(value) for value, name in labels.items()}
    # nnU-Net v2: {"background": 0, "tumor": 1}; region-based entries (lists) are flattened.
    out = {}
    for name, value in labels.items():
      values = value if isinstance(value, (list, tuple)) else [value]
      for v in values:
        out[f"{name}" if len(values) == 1 else f"{name}_{v}"] = int(v)
    return out
  except (TypeError, ValueError) as e:
    raise DataError(path, f"'labels' has a non-integer value: {labels!r}") from e


def _modality_from_meta(meta):
  channels = meta.get("channel_names") or meta.get("modality") or {}
  if isinstance(channels, dict) and channels:
    return str(channels.get("0", next(iter(channels.values()))))
  return ""


def _cases_from_training_list(root, json_path, entries):
  if not isinstance(entries, list):
    raise DataError(json_path, "'training' must be a list of {\"image\": ..., \"label\": ...} objects")
  cases = []
  for i, entry in enumerate(entries):
    if not isinstance(entry, dict) or "image" not in entry:
      raise DataError(json_path, f"'training'[{i}] must be an object with an 'image' key, got {entry!r}")
    image = os.path.normpath(os.path.join(root, entry["image"]))
    label = os.path.normpath(os.path.join(root, entry["label"])) if entry.get("label") else None
    case_id = case_id_of(image)
    if case_id is None:
      raise DataError(json_path, f"'training'[{i}] image {entry['image']!r} is not a .nii/.nii.gz file")
    cases.append(Case(case_id, image, label))
  return cases


def _cases_from_images_folder(root, images_dir, labels_dir, file_ending):
  cases = []
  for name in sorted(os.listdir(images_dir)):
    stem, ending = _strip_ending(name)
    if stem is None or (file_ending and ending != file_ending):
      continue
    if stem[-5:-4] == "_" and stem[-4:].isdigit():
      if stem[-4:] != "0000":
        raise DataError(os.path.join(images_dir, name), "has channel suffix other than _0000; only "
                        "single-channel inputs are supported")
      stem = stem[:-5]
    label = None
    if labels_dir is not None:
      candidate = os.path.join(labels_dir, stem + ending)
      label = candidate if os.path.exists(candidate) else None
    cases.append(Case(stem, os.path.join(images_dir, name), label))
  return cases


def load_dataset(root, *, require_labels=False) -> DatasetIndex:
  """Indexes a dataset folder (see the module docstring for the accepted layouts).

  Args:
    root: the dataset folder.
    require_labels: every case must have a label file (CT training sets).

  Raises:
    DataError: missing or empty folder, malformed dataset.json, listed files that do not exist, missing labels
      when required, duplicate case ids. Messages name the file or folder.
  """
  root = os.path.abspath(os.fspath(root))
  if not os.path.isdir(root):
    raise DataError(root, "dataset folder does not exist" if not os.path.exists(root) else "is not a folder")
  json_path = os.path.join(root, "dataset.json")
  meta = _read_dataset_json(json_path) if os.path.exists(json_path) else {}
  images_dir = os.path.join(root, "imagesTr")
  labels_dir = os.path.join(root, "labelsTr")
  if "training" in meta:
    cases = _cases_from_training_list(root, json_path, meta["training"])
  elif os.path.isdir(images_dir):
    cases = _cases_from_images_folder(root, images_dir, labels_dir if os.path.isdir(labels_dir) else None,
                                      meta.get("file_ending"))
  else:
    cases = _cases_from_images_folder(root, root, None, None)
  if not cases:
    where = images_dir if os.path.isdir(images_dir) else root
    raise DataError(where, "contains no NIfTI images (.nii or .nii.gz); expected imagesTr/CASE_0000.nii.gz "
                           "with dataset.json, or a folder of .nii.gz files")

  seen = {}
  for case in cases:
    if case.case_id in seen:
      raise DataError(case.image, f"case id {case.case_id!r} also used by {seen[case.case_id]}")
    seen[case.case_id] = case.image
    if not os.path.exists(case.image):
      raise DataError(case.image, "is listed in the dataset but does not exist")
    if case.label is not None and not os.path.exists(case.label):
      raise DataError(case.label, f"label of case {case.case_id!r} is listed but does not exist")
  missing = [c for c in cases if c.label is None]
  if require_labels and missing:
    shown = ", ".join(c.case_id for c in missing[:5]) + (" ..." if len(missing) > 5 else "")
    raise DataError(root, f"{len(missing)} of {len(cases)} case(s) have no label file in labelsTr/ "
                          f"({shown}); a labelled training set is required here")
  if os.path.isdir(labels_dir) and "training" not in meta:
    known = {c.case_id for c in cases}
    orphans = [n for n in sorted(os.listdir(labels_dir)) if _strip_ending(n)[0] not in known and
               _strip_ending(n)[0] is not None]
    if orphans:
      log.warning("%s: %d label file(s) without an image are ignored: %s", labels_dir, len(orphans),
                      ", ".join(orphans[:5]))
  n_declared = meta.get("numTraining")
  if isinstance(n_declared, int) and n_declared != len(cases):
    log.warning("%s: numTraining says %d but %d case(s) were found", json_path, n_declared, len(cases))
  return DatasetIndex(root=root, modality=_modality_from_meta(meta),
                      labels=_labels_from_meta(json_path, meta), cases=tuple(sorted(cases, key=lambda c: c.case_id)))


def image_path(root, case_id, file_ending=".nii.gz"):
  return os.path.join(root, "imagesTr", f"{case_id}_0000{file_ending}")


def label_path(root, case_id, file_ending=".nii.gz"):
  return os.path.join(root, "labelsTr", f"{case_id}{file_ending}")


def write_dataset_json(root, case_ids, *, modality, labels=None, has_labels=True, name="", description="",
                       file_ending=".nii.gz", extra=None):
  """Writes ROOT/dataset.json for cases stored at :func:`image_path` / :func:`label_path`."""
  labels = dict(DEFAULT_LABELS if labels is None else labels)
  training = []
  for case_id in sorted(case_ids):
    entry = {"image": "./" + os.path.relpath(image_path(root, case_id, file_ending), root)}
    if has_labels:
      entry["label"] = "./" + os.path.relpath(label_path(root, case_id, file_ending), root)
    training.append(entry)
  meta = {
      "name": name,
      "description": description,
      "tensorImageSize": "3D",
      "channel_names": {"0": modality},
      "modality": {"0": modality},
      "labels": labels,
      "numTraining": len(training),
      "file_ending": file_ending,
      "training": training,
  }
  meta.update(extra or {})
  os.makedirs(root, exist_ok=True)
  path = os.path.join(root, "dataset.json")
  with open(path, "w") as f:
    json.dump(meta, f, indent=2)
  return path
