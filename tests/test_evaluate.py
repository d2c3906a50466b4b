"""Evaluation: volume inference, prediction files, folder scoring, summaries and the paired test."""

import csv
import json
import os

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest
from scipy import stats

from cmedl_jax import ops
from cmedl_jax.data import dataset_index, nifti_io, preprocess
from cmedl_jax.errors import DataError
from cmedl_jax.evaluate import cli, inference, scoring
from cmedl_jax.evaluate import run as evaluate_run
from cmedl_jax.train import checkpointing

AFFINE = np.array([[-0.8, 0, 0, 40.0], [0, -0.8, 0, 30.0], [0, 0, 2.5, -60.0], [0, 0, 0, 1]])


# ---------------------------------------------------------------- inference


@pytest.fixture(scope="module")
def predictor(trained_run):
  workdir, _ = trained_run
  return inference.load_predictor(str(workdir))


def _state_variables(workdir, step):
  """The student's params and batch statistics at ``step``, read from the whole train state (orbax, untargeted)."""
  import orbax.checkpoint as ocp
  state = ocp.StandardCheckpointer().restore(os.path.join(str(workdir), "checkpoints", str(step), "state"))
  return {"params": {"student": state["params"]["student"]},
          "batch_stats": {"student": state["batch_stats"]["student"]}}


def _assert_trees_equal(a, b):
  assert jax.tree.structure(jax.tree.map(np.asarray, a)) == jax.tree.structure(jax.tree.map(np.asarray, b))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_predictor_restores_only_the_trained_student(predictor, trained_run):
  workdir, _ = trained_run
  assert predictor.step == 4 and predictor.cfg.method == "cmedl" and predictor.method.test_time_networks == ("student",)
  assert set(predictor.variables["params"]) == {"student"} and set(predictor.variables["batch_stats"]) == {"student"}
  _assert_trees_equal(predictor.variables, _state_variables(workdir, 4))


def test_runs_saved_without_the_model_item_still_evaluate(trained_run, tmp_path):
  import shutil
  workdir, _ = trained_run
  old = tmp_path / "old_run"
  shutil.copytree(workdir / "checkpoints", old / "checkpoints")
  for step in os.listdir(old / "checkpoints"):
    shutil.rmtree(old / "checkpoints" / step / "model")
  legacy = inference.load_predictor(str(old))
  _assert_trees_equal(legacy.variables, _state_variables(workdir, 4))


def test_a_run_of_an_unknown_method_fails_naming_the_run(trained_run, monkeypatch):
  workdir, _ = trained_run
  restore = checkpointing.RunCheckpointer.restore_config
  monkeypatch.setattr(checkpointing.RunCheckpointer, "restore_config",
                      lambda self, step: {**restore(self, step), "method": "ct_mri_blend"})
  with pytest.raises(DataError, match=r"the run was trained with a method this version does not have \(unknown "
                                      r"method 'ct_mri_blend'") as raised:
    inference.load_predictor(str(workdir))
  assert raised.value.path == str(workdir)


@pytest.mark.parametrize("run_backend, run_algorithm, expected", [
    ("xla", "direct", ops.Kernels("xla", "direct")), ("plain", "winograd", ops.Kernels("plain", "winograd")),
    ("onednn", "direct", ops.Kernels("auto", "direct")), ("auto", None, ops.Kernels("auto", "winograd")),
    (None, None, ops.Kernels("auto", "winograd"))])
def test_predictor_takes_the_runs_kernels(trained_run, monkeypatch, run_backend, run_algorithm, expected):
  # None: a run saved before the field existed. "onednn" becomes "auto": the machine evaluating may lack the library.
  workdir, _ = trained_run
  restore = checkpointing.RunCheckpointer.restore_config

  def config_of_the_run(self, step):
    cfg = restore(self, step)
    for field, value in (("conv_backend", run_backend), ("conv_algorithm", run_algorithm)):
      cfg.pop(field, None)
      if value is not None:
        cfg[field] = value
    return cfg

  monkeypatch.setattr(checkpointing.RunCheckpointer, "restore_config", config_of_the_run)
  assert inference.load_predictor(str(workdir)).kernels == expected
  chosen = ops.Kernels("plain")
  assert inference.load_predictor(str(workdir), kernels=chosen).kernels == chosen


def test_predictions_of_the_default_and_the_plain_kernels_agree(trained_run):
  workdir, _ = trained_run
  hu = np.random.default_rng(3).uniform(-1000, 400, size=(48, 48, 5)).astype(np.float32)
  logits_of = {}
  for name, kernels in (("default", None), ("plain", ops.Kernels("plain"))):
    predictor = inference.load_predictor(str(workdir), kernels=kernels)
    logits = jax.jit(ops.using(predictor.kernels, lambda v, x: predictor.nets.segment(
        "student", v["params"]["student"], v["batch_stats"]["student"], x, train=False)[0]))
    x = preprocess.axial_slices(preprocess.normalize_ct(hu, tuple(predictor.cfg.data.ct_window)))[..., None]
    logits_of[name] = np.asarray(logits(predictor.variables, x))
  np.testing.assert_allclose(logits_of["default"], logits_of["plain"], rtol=1e-4, atol=1e-4)


def test_volume_inference_equals_slice_by_slice_application(predictor):
  """Batching with a padded last batch and a mask must not change any slice's prediction."""
  rng = np.random.default_rng(0)
  hu = rng.uniform(-1000, 400, size=(64, 64, 13)).astype(np.float32)  # 13 slices: 2 batches of 8, 3 padded
  segmenter = inference.VolumeSegmenter(predictor, batch_size=8)
  out = segmenter(hu)
  assert out.shape == hu.shape and out.dtype == np.uint8
  slices = preprocess.axial_slices(preprocess.normalize_ct(hu))
  nets, v = predictor.nets, predictor.variables
  for k in (0, 7, 12):
    logits, _, _ = nets.segment("student", v["params"]["student"], v["batch_stats"]["student"],
                                jnp.asarray(slices[k][None, ..., None]), train=False)
    np.testing.assert_array_equal(out[:, :, k], np.argmax(np.asarray(logits[0]), -1))


def test_volume_inference_handles_sizes_not_divisible_by_the_stride(predictor):
  out = inference.VolumeSegmenter(predictor, batch_size=4)(np.zeros((50, 37, 3), np.float32))
  assert out.shape == (50, 37, 3)


def test_evaluate_run_writes_predictions_on_the_input_grid(trained_run, phantom_dirs, tmp_path):
  workdir, _ = trained_run
  out_dir, summary = evaluate_run.evaluate_run(str(workdir), phantom_dirs[0], str(tmp_path / "eval"), progress=None,
                                      tolerances_mm=(2.0, 4.0))
  index = dataset_index.load_dataset(phantom_dirs[0])
  for case in index.cases:
    written = nib.load(os.path.join(out_dir, "predictions", f"{case.case_id}.nii.gz"))
    source = nib.load(case.image)
    assert written.shape == source.shape
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-5)
  document = json.load(open(os.path.join(out_dir, "summary.json")))
  assert len(document["metric_per_case"]) == len(index.cases)
  assert set(document["mean"]["1"]) >= {"dice", "surface_dice_2mm", "surface_dice_4mm", "hd95_mm"}
  assert document["settings"]["test_time_networks"] == ["student"] and document["settings"]["checkpoint_step"] == 4
  rows = list(csv.DictReader(open(os.path.join(out_dir, "cases.csv"))))
  assert [r["case"] for r in rows] == [c.case_id for c in index.cases]
  assert summary["num_cases"] == len(index.cases)


def test_inplane_resampling_segments_at_the_target_pixel_size_and_returns_the_input_grid():
  seen = []
  window = (-1000.0, 500.0)
  threshold = preprocess.normalize_ct(np.float32(0.0), window)

  def threshold_probabilities(slices):  # stands in for the network: tumor = voxels above 0 HU
    seen.append(slices.shape)
    tumor = (slices > threshold).astype(np.float32)
    return np.stack([1 - tumor, tumor], axis=-1)

  def labels(ct, spacing, target):
    probs = inference.probabilities_on_scan_grid(threshold_probabilities, ct, spacing, target, window)
    return np.argmax(probs, axis=-1)

  # A 40 x 40 mm square of 100 HU in a 200 x 100 mm field sampled at 0.5 x 1.0 mm, segmented at 2 mm pixels.
  x = np.arange(400)[:, None, None] * 0.5 + 0.25
  y = np.arange(100)[None, :, None] * 1.0 + 0.5
  inside = (np.abs(x - 100) < 20) & (np.abs(y - 50) < 20) & np.ones((1, 1, 3), bool)
  ct = np.where(inside, 100.0, -1000.0).astype(np.float32)
  out = labels(ct, (0.5, 1.0, 5.0), (2.0, 2.0))
  assert seen == [(3, 100, 50)]  # 200 mm / 2 mm, 100 mm / 2 mm; slices untouched
  assert out.shape == ct.shape
  # Back on the input grid the square is exact up to the 2 mm pixels at its edges.
  assert np.mean(out[inside]) > 0.97
  assert abs(out.sum() - inside.sum()) <= 2 * (80 + 40) * 3  # at most a 2 mm rim, all slices
  # The scan's own pixel size (or none given): the network sees the scan itself.
  np.testing.assert_array_equal(labels(ct[:, :50], (1.0, 1.0, 5.0), (1.0, 1.0)), ct[:, :50] > 0)
  assert seen[-1] == (3, 400, 50)
  np.testing.assert_array_equal(labels(ct, None, None), ct > 0)


def test_evaluate_run_with_inplane_spacing_keeps_the_input_grid(trained_run, phantom_dirs, tmp_path):
  workdir, _ = trained_run
  out_dir, _ = evaluate_run.evaluate_run(str(workdir), phantom_dirs[0], str(tmp_path / "eval"), progress=None,
                                inplane_spacing_mm=3.0, tolerances_mm=(2.0,))
  for case in dataset_index.load_dataset(phantom_dirs[0]).cases:
    written = nib.load(os.path.join(out_dir, "predictions", f"{case.case_id}.nii.gz"))
    assert written.shape == nib.load(case.image).shape
  assert json.load(open(os.path.join(out_dir, "summary.json")))["settings"]["inplane_spacing_mm"] == [3.0, 3.0]


# ---------------------------------------------------------------- scoring folders of predictions


def _write_pair(root, case, pred, ref, affine=AFFINE):
  nifti_io.save_nifti(root / "pred" / f"{case}.nii.gz", pred.astype(np.uint8), affine)
  nifti_io.save_nifti(root / "ref" / f"{case}.nii.gz", ref.astype(np.uint8), AFFINE)


def test_score_folder_matches_analytic_values(tmp_path):
  ref = np.zeros((30, 30, 10), bool)
  ref[5:15, 5:15, 2:6] = True      # lesion 1: 400 voxels
  ref[20:24, 20:24, 5:7] = True    # lesion 2: 32 voxels, missed
  pred = np.zeros_like(ref)
  pred[5:15, 5:15, 2:5] = True     # 300 voxels inside lesion 1
  pred[25:28, 2:4, 1:2] = True     # 6-voxel false positive
  _write_pair(tmp_path, "case_a", pred, ref)
  _write_pair(tmp_path, "case_b", ref, ref)  # perfect
  summary = scoring.score_folder(tmp_path / "pred", tmp_path / "ref", tmp_path / "out", progress=None)
  rows = {r["case"]: r for r in csv.DictReader(open(tmp_path / "out" / "cases.csv"))}
  np.testing.assert_allclose(float(rows["case_a"]["dice"]), 2 * 300 / (306 + 432), rtol=1e-9)
  assert float(rows["case_b"]["dice"]) == 1.0 and float(rows["case_b"]["hd95_mm"]) == 0.0
  assert rows["case_a"]["lesions"] == "2" and rows["case_a"]["lesions_detected"] == "1"
  assert rows["case_a"]["false_positive_components"] == "1"
  lesions = list(csv.DictReader(open(tmp_path / "out" / "lesions.csv")))
  lesion1 = [r for r in lesions if r["case"] == "case_a" and r["voxels"] == "400"][0]
  np.testing.assert_allclose(float(lesion1["dice"]), 2 * 300 / 700, rtol=1e-9)
  np.testing.assert_allclose(float(lesion1["volume_ml"]), 400 * 0.8 * 0.8 * 2.5 / 1000, rtol=1e-6)
  missed = [r for r in lesions if r["case"] == "case_a" and r["voxels"] == "32"][0]
  assert missed["detected"] == "False" and float(missed["hd95_mm"]) == np.inf
  fps = list(csv.DictReader(open(tmp_path / "out" / "false_positives.csv")))
  assert len(fps) == 1 and fps[0]["voxels"] == "6"
  np.testing.assert_allclose(summary["mean"]["dice"]["mean"], (2 * 300 / 738 + 1.0) / 2, rtol=1e-9)
  document = json.load(open(tmp_path / "out" / "summary.json"))
  assert document["metric_per_case"][0]["prediction_file"].endswith("case_a.nii.gz")
  assert document["empty_policy"]["one_empty"]["hd95_mm"] == "inf"


def test_score_folder_errors_name_the_file(tmp_path):
  ref = np.zeros((8, 8, 4), bool)
  ref[2:4, 2:4, 1] = True
  shifted = AFFINE.copy()
  shifted[0, 3] += 3
  _write_pair(tmp_path, "a", ref, ref, affine=shifted)
  with pytest.raises(DataError, match="affine differs"):
    scoring.score_folder(tmp_path / "pred", tmp_path / "ref", tmp_path / "out", progress=None)
  nifti_io.save_nifti(tmp_path / "pred" / "a.nii.gz", ref.astype(np.uint8), AFFINE)
  nifti_io.save_nifti(tmp_path / "pred" / "zzz.nii.gz", ref.astype(np.uint8), AFFINE)
  with pytest.raises(DataError, match=r"1 prediction\(s\) have no reference.*zzz"):
    scoring.score_folder(tmp_path / "pred", tmp_path / "ref", tmp_path / "out", progress=None)
  (tmp_path / "empty").mkdir()
  with pytest.raises(DataError, match="contains no NIfTI predictions"):
    scoring.score_folder(tmp_path / "empty", tmp_path / "ref", tmp_path / "out", progress=None)


def test_evaluate_folder_cli(tmp_path, capsys):
  ref = np.zeros((12, 12, 4), bool)
  ref[3:7, 3:7, 1:3] = True
  _write_pair(tmp_path, "c1", ref, ref)
  assert cli.main_evaluate_folder([str(tmp_path / "pred"), str(tmp_path / "ref"), "--out", str(tmp_path / "o"),
                                   "--tolerances", "1,3", "--convention", "medpy"]) == 0
  out = capsys.readouterr().out
  assert "DSC 1.000" in out and "sDSC@1mm" in out and "sDSC@3mm" in out
  assert json.load(open(tmp_path / "o" / "summary.json"))["settings"]["hd95_convention"] == "medpy"


# ---------------------------------------------------------------- paired comparison


def test_paired_wilcoxon_matches_scipy(tmp_path, capsys):
  rng = np.random.default_rng(0)
  a = rng.uniform(0.6, 0.9, size=15)
  b = a - rng.normal(0.03, 0.02, size=15)
  for name, values in (("A", a), ("B", b)):
    with open(tmp_path / f"{name}.csv", "w", newline="") as f:
      writer = csv.writer(f)
      writer.writerow(["case", "dice"])
      writer.writerows([(f"c{i}", v) for i, v in enumerate(values)])
  result = scoring.paired_wilcoxon(scoring.read_case_csv(tmp_path / "A.csv", "dice"),
                                   scoring.read_case_csv(tmp_path / "B.csv", "dice"))
  expected = stats.wilcoxon(a, b)
  assert result["n"] == 15
  np.testing.assert_allclose(result["p_value"], expected.pvalue, rtol=1e-12)
  np.testing.assert_allclose(result["median_difference"], np.median(a - b))
  assert cli.main_compare([str(tmp_path / "A.csv"), str(tmp_path / "B.csv")]) == 0
  assert "Wilcoxon signed-rank p=" in capsys.readouterr().out
  assert cli.main_compare([str(tmp_path / "A.csv"), str(tmp_path / "B.csv"), "--metric", "hd95"]) == 1


# ---------------------------------------------------------------- output folders, the run's target spacing, predict


def test_results_are_never_replaced_without_overwrite(trained_run, phantom_dirs, tmp_path):
  import shutil
  workdir, _ = trained_run
  # Another data folder of the same name gets its own default folder; evaluating it again needs overwrite.
  other = tmp_path / "elsewhere" / os.path.basename(phantom_dirs[0])
  shutil.copytree(phantom_dirs[0], other)
  out_a = evaluate_run.default_output_dir(workdir, phantom_dirs[0], 4)
  out_b = evaluate_run.default_output_dir(workdir, other, 4)
  assert out_a != out_b and os.path.basename(out_b) == "step_4"
  evaluate_run.evaluate_run(str(workdir), str(other), progress=None, tolerances_mm=(2.0,))
  first = open(os.path.join(out_b, "cases.csv")).read()
  with pytest.raises(DataError, match="--overwrite"):
    evaluate_run.evaluate_run(str(workdir), str(other), progress=None, tolerances_mm=(2.0,))
  evaluate_run.evaluate_run(str(workdir), str(other), progress=None, tolerances_mm=(2.0,), overwrite=True)
  assert open(os.path.join(out_b, "cases.csv")).read() == first


def test_evaluation_segments_at_the_runs_target_spacing(trained_run, phantom_dirs, tmp_path):
  """A run trained at 1.6 mm pixels: evaluation resamples in and back by itself, like --inplane-spacing 1.6."""
  import shutil
  workdir, _ = trained_run
  run = tmp_path / "run_at_1.6mm"
  shutil.copytree(workdir / "checkpoints", run / "checkpoints")
  config_path = next(run.glob("checkpoints/4/config/*"))
  config = json.load(open(config_path))
  config["data"]["target_spacing_mm"] = [1.6, 1.6]
  json.dump(config, open(config_path, "w"))
  auto, _ = evaluate_run.evaluate_run(str(run), phantom_dirs[0], str(tmp_path / "auto"), progress=None,
                                      tolerances_mm=(2.0,))
  given, _ = evaluate_run.evaluate_run(str(workdir), phantom_dirs[0], str(tmp_path / "given"), progress=None,
                                       inplane_spacing_mm=1.6, tolerances_mm=(2.0,))
  assert json.load(open(os.path.join(auto, "summary.json")))["settings"]["inplane_spacing_mm"] == [1.6, 1.6]
  for case in dataset_index.load_dataset(phantom_dirs[0]).cases:
    a = nib.load(os.path.join(auto, "predictions", f"{case.case_id}.nii.gz"))
    b = nib.load(os.path.join(given, "predictions", f"{case.case_id}.nii.gz"))
    assert a.shape == nib.load(case.image).shape
    np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))


def test_predict_writes_labels_and_probabilities_on_each_input_grid(trained_run, phantom_dirs, tmp_path):
  from cmedl_jax.evaluate import predict
  workdir, _ = trained_run
  index = dataset_index.load_dataset(phantom_dirs[0])
  single = index.cases[0].image
  out = tmp_path / "pred"
  written = predict.predict(str(workdir), [phantom_dirs[0]], str(out), probabilities=True, progress=False)
  assert sorted(written) == [c.case_id for c in index.cases]
  evaluated, _ = evaluate_run.evaluate_run(str(workdir), phantom_dirs[0], str(tmp_path / "eval"), progress=None,
                                           tolerances_mm=(2.0,))
  for case in index.cases:
    labels = nib.load(written[case.case_id])
    source = nib.load(case.image)
    assert labels.shape == source.shape
    np.testing.assert_allclose(labels.affine, source.affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(labels.dataobj), np.asarray(
        nib.load(os.path.join(evaluated, "predictions", f"{case.case_id}.nii.gz")).dataobj))
    probs = np.asarray(nib.load(out / f"{case.case_id}_probabilities.nii.gz").dataobj)
    assert probs.shape == source.shape + (2,)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(np.argmax(probs, -1), np.asarray(labels.dataobj))
  with pytest.raises(DataError, match="--overwrite"):
    predict.predict(str(workdir), [single], str(out), progress=False)
  assert predict.main(["--workdir", str(workdir), "--input", single, "--out", str(out)]) == 1
  with pytest.raises(DataError, match="does not exist"):
    predict.predict(str(workdir), [str(tmp_path / "missing.nii.gz")], str(tmp_path / "x"), progress=False)
  for out_dir in (phantom_dirs[0], os.path.join(phantom_dirs[0], "imagesTr"), os.path.dirname(single)):
    with pytest.raises(DataError, match="lies in the input folder"):
      predict.predict(str(workdir), [phantom_dirs[0]], out_dir, overwrite=True, progress=False)


def test_mirror_tta_averages_the_four_mirrored_predictions(predictor):
  rng = np.random.default_rng(0)
  ct = rng.uniform(-1000, 400, (40, 36, 3)).astype(np.float32)
  plain = inference.VolumeSegmenter(predictor, batch_size=4)
  tta = inference.VolumeSegmenter(predictor, batch_size=4, mirror_tta=True)
  expected = np.mean([plain.probabilities(ct[::a, ::b])[::a, ::b] for a in (1, -1) for b in (1, -1)], axis=0)
  np.testing.assert_allclose(tta.probabilities(ct), expected, atol=1e-5)
