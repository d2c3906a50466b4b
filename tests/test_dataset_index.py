"""Dataset folders: nnU-Net v2, MSD and plain layouts, and the errors for broken ones."""

import json

import numpy as np
import pytest

from cmedl_jax.data import cli, dataset_index, nifti_io
from cmedl_jax.errors import DataError


def _make_dataset(root, case_ids, *, labels=True, write_json=True, modality="CT"):
  for case_id in case_ids:
    nifti_io.save_nifti(dataset_index.image_path(root, case_id), np.zeros((4, 4, 3), np.float32), np.eye(4))
    if labels:
      nifti_io.save_nifti(dataset_index.label_path(root, case_id), np.zeros((4, 4, 3), np.uint8), np.eye(4))
  if write_json:
    dataset_index.write_dataset_json(root, case_ids, modality=modality, has_labels=labels)
  return root


def test_written_layout_reads_back(tmp_path):
  root = _make_dataset(tmp_path / "ct", ["b", "a", "c"])
  index = dataset_index.load_dataset(root, require_labels=True)
  assert [c.case_id for c in index.cases] == ["a", "b", "c"]
  assert index.modality == "CT" and index.labels == {"background": 0, "tumor": 1} and index.labelled
  assert index.cases[0].image.endswith("imagesTr/a_0000.nii.gz")
  assert index.cases[0].label.endswith("labelsTr/a.nii.gz")
  meta = json.loads((tmp_path / "ct" / "dataset.json").read_text())
  assert meta["numTraining"] == 3 and meta["file_ending"] == ".nii.gz" and meta["channel_names"] == {"0": "CT"}


def test_nnunet_v2_without_training_list(tmp_path):
  root = _make_dataset(tmp_path / "ct", ["x1", "x2"], write_json=False)
  (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0,
                                                 "tumor": 1}, "numTraining": 2, "file_ending": ".nii.gz"}))
  index = dataset_index.load_dataset(root, require_labels=True)
  assert [c.case_id for c in index.cases] == ["x1", "x2"] and index.labelled


def test_msd_labels_and_names(tmp_path):
  root = tmp_path / "Task06_Lung"
  for case in ["lung_001", "lung_003"]:
    nifti_io.save_nifti(root / "imagesTr" / f"{case}.nii.gz", np.zeros((3, 3, 3), np.float32), np.eye(4))
    nifti_io.save_nifti(root / "labelsTr" / f"{case}.nii.gz", np.zeros((3, 3, 3), np.uint8), np.eye(4))
  (root / "dataset.json").write_text(json.dumps({
      "modality": {"0": "CT"}, "labels": {"0": "background", "1": "cancer"},
      "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"}
                   for c in ["lung_001", "lung_003"]]}))
  index = dataset_index.load_dataset(root, require_labels=True)
  assert index.labels == {"background": 0, "cancer": 1}
  assert [c.case_id for c in index.cases] == ["lung_001", "lung_003"]


def test_plain_folder_of_mri(tmp_path):
  for name in ["p1.nii.gz", "p2.nii", "notes.txt"]:
    if name.endswith("txt"):
      (tmp_path / name).write_text("x")
    else:
      nifti_io.save_nifti(tmp_path / name, np.zeros((3, 3, 3), np.float32), np.eye(4))
  index = dataset_index.load_dataset(tmp_path)
  assert [c.case_id for c in index.cases] == ["p1", "p2"] and not index.labelled


def test_empty_folder(tmp_path):
  with pytest.raises(DataError, match="contains no NIfTI images") as info:
    dataset_index.load_dataset(tmp_path)
  assert str(tmp_path) in str(info.value)


def test_empty_images_folder(tmp_path):
  (tmp_path / "imagesTr").mkdir()
  with pytest.raises(DataError, match="imagesTr: contains no NIfTI images"):
    dataset_index.load_dataset(tmp_path)


def test_missing_folder(tmp_path):
  with pytest.raises(DataError, match="dataset folder does not exist"):
    dataset_index.load_dataset(tmp_path / "nowhere")


def test_malformed_dataset_json(tmp_path):
  _make_dataset(tmp_path, ["a"])
  (tmp_path / "dataset.json").write_text('{"labels": {"background": 0,,}}')
  with pytest.raises(DataError, match=r"dataset.json: is not valid JSON \(line 1"):
    dataset_index.load_dataset(tmp_path)


def test_listed_file_missing(tmp_path):
  _make_dataset(tmp_path, ["a", "b"])
  (tmp_path / "imagesTr" / "b_0000.nii.gz").unlink()
  with pytest.raises(DataError, match="b_0000.nii.gz: is listed in the dataset but does not exist"):
    dataset_index.load_dataset(tmp_path)


def test_missing_labels_when_required(tmp_path):
  _make_dataset(tmp_path, ["a", "b"], write_json=False)
  (tmp_path / "labelsTr" / "b.nii.gz").unlink()
  assert dataset_index.load_dataset(tmp_path).cases[1].label is None
  with pytest.raises(DataError, match=r"1 of 2 case\(s\) have no label file in labelsTr/ \(b\)"):
    dataset_index.load_dataset(tmp_path, require_labels=True)


def test_non_string_labels_in_json(tmp_path):
  _make_dataset(tmp_path, ["a"], write_json=False)
  (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": "zero"}}))
  with pytest.raises(DataError, match="'labels' has a non-integer value"):
    dataset_index.load_dataset(tmp_path)


def test_check_reports_every_bad_case_and_keeps_going(tmp_path, capsys):
  root = _make_dataset(tmp_path, ["a", "b", "c"])
  bad = np.zeros((4, 4, 3), np.uint8)
  bad[0, 0, 0] = 3
  nifti_io.save_nifti(dataset_index.label_path(root, "a"), bad, np.eye(4))
  (root / "imagesTr" / "c_0000.nii.gz").write_bytes(b"garbage")
  problems = cli.check(root, require_labels=True)
  assert len(problems) == 2
  assert "labelsTr/a.nii.gz" in problems[0] and "unexpected value(s) [3]" in problems[0]
  assert "imagesTr/c_0000.nii.gz" in problems[1] and "cannot read as NIfTI" in problems[1]
  assert cli.main(["check", str(root), "--require-labels"]) == 1
  assert "2 problem(s) found" in capsys.readouterr().err
