"""Validation during training (cmedl_jax.train.validation): the split, the metrics, the best checkpoint."""

import csv
import json
import os

import jax
import numpy as np
import pytest

from cmedl_jax.data import pipeline, store
from cmedl_jax.errors import ConfigError
from cmedl_jax.evaluate import inference
from cmedl_jax.metrics import surface
from cmedl_jax.train import checkpointing, methods, trainer, validation
from tests.tiny import phantom_config

VAL_EVERY = 2


def test_split_is_seeded_disjoint_and_complete():
  ids = [f"case{i:02d}" for i in range(20)]
  train, val = validation.split_cases(ids[::-1], 5, seed=3)
  assert len(val) == 5 and sorted(train + val) == ids and not set(train) & set(val)
  assert train == sorted(train) and val == sorted(val)
  assert validation.split_cases(ids, 5, seed=3) == (train, val)  # order of the input does not matter
  assert validation.split_cases(ids, 5, seed=4)[1] != val
  with pytest.raises(ConfigError, match="data.val_cases.*at least one must stay"):
    validation.split_cases(ids, 20, seed=0)


def test_the_recorded_split_is_kept_and_guards_the_training_set(tmp_path):
  cfg = phantom_config(("/data/CT", "/data/MRI"))
  cfg.data.val_cases = 2
  ids = [f"c{i}" for i in range(6)]
  first = validation.load_or_write_splits(tmp_path, ids, cfg.data, "")
  assert json.load(open(tmp_path / validation.SPLITS_FILE))["val"] == first["val"]
  # Resumed: the same split, also when cases were added to the folder since, or the folder moved.
  cfg.data.ct_dir = "/scratch/CT"
  resumed = validation.load_or_write_splits(tmp_path, ids + ["c9"], cfg.data, "", resuming=True)
  assert (resumed["train"], resumed["val"]) == (first["train"], first["val"])
  cfg.data.val_cases = 3
  with pytest.raises(ConfigError, match="splits.json records the split.*val_cases: 2 -> 3"):
    validation.load_or_write_splits(tmp_path, ids, cfg.data, "", resuming=True)
  cfg.data.val_cases = 2
  for gone in (first["train"][0], first["val"][0]):
    with pytest.raises(ConfigError, match="no longer in"):
      validation.load_or_write_splits(tmp_path, [c for c in ids if c != gone], cfg.data, "", resuming=True)
  # A start without checkpoints makes its split anew.
  cfg.data.val_cases = 3
  assert len(validation.load_or_write_splits(tmp_path, ids, cfg.data, "")["val"]) == 3
  # A run started before splits existed trained on every case: none can be split off now.
  with pytest.raises(ConfigError, match="started without a split"):
    validation.load_or_write_splits(tmp_path / "old", ids, cfg.data, "", write=False, resuming=True)


def _val_config(phantom_dirs, total_steps=4, val_every=VAL_EVERY):
  cfg = phantom_config(phantom_dirs, total_steps)
  cfg.data.val_cases = 1
  cfg.train.val_every = val_every
  return cfg


def _csv(path):
  with open(path, newline="") as f:
    return [{k: v for k, v in row.items() if k != "steps_per_second"} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def validated_run(phantom_dirs, tmp_path_factory):
  """A 4-step tiny run validating on one split-off CT case every 2 steps, stopped after step 2 and resumed; the
  CT stores its training streams were built from are recorded."""
  seen = []
  real = pipeline.make_train_dataset

  def recording(ct, mri, **kwargs):
    seen.append(ct)
    return real(ct, mri, **kwargs)

  workdir = tmp_path_factory.mktemp("validated")
  cfg = _val_config(phantom_dirs)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(pipeline, "make_train_dataset", recording)
    trainer.train(cfg, str(workdir), progress=False, max_steps=2)
    trainer.train(cfg, str(workdir), progress=False)
  return workdir, seen


def test_no_validation_case_enters_the_training_stream(validated_run):
  workdir, seen = validated_run
  splits = json.load(open(workdir / validation.SPLITS_FILE))
  assert len(splits["val"]) == 1 and len(splits["train"]) == 2
  assert len(seen) == 2
  for ct in seen:  # both starts
    assert ct.case_ids == splits["train"]
    ds = pipeline.make_train_dataset(ct, ct, global_batch_size=8, crop_size=32, seed=0, foreground_fraction=0.5,
                                     process_index=0, process_count=1)
    cases = {ct.case_ids[int(c)] for b in range(30) for c in ds[b]["ct_case"]}
    assert cases == set(splits["train"])  # provenance: every example is from a training case, all of them used


def test_validation_is_logged_and_the_best_checkpoint_kept_across_resume(validated_run):
  workdir, _ = validated_run
  rows = _csv(workdir / "validation.csv")
  assert [int(r["step"]) for r in rows] == [2, 4]
  assert set(rows[0]) == {"step", "dice", "surface_dice_2mm", "surface_dice_4mm"}
  values = [float(r["dice"]) for r in rows]
  best_step = [2, 4][int(np.argmax(values))]  # the first of equal values: only a strictly better one replaces it
  assert os.listdir(workdir / checkpointing.BEST) == [str(best_step)]
  best = checkpointing.BestCheckpoint(str(workdir), "dice")
  assert (best.step, best.value) == (best_step, max(values))
  best.close()
  predictor = inference.load_predictor(str(workdir), "best")
  assert predictor.step == best_step
  saved = inference.load_predictor(str(workdir), best_step)  # the periodic checkpoint of that step
  jax.tree.map(np.testing.assert_array_equal, predictor.variables, saved.variables)
  assert any(name.startswith("events") for name in os.listdir(workdir / "tensorboard" / "validation"))


def test_losses_are_the_same_with_and_without_validation(phantom_dirs, validated_run, tmp_path):
  workdir, _ = validated_run
  trainer.train(_val_config(phantom_dirs, val_every=0), str(tmp_path), progress=False)
  assert _csv(tmp_path / "metrics.csv") == _csv(workdir / "metrics.csv")
  assert not os.path.exists(tmp_path / "validation.csv") and not os.path.exists(tmp_path / checkpointing.BEST)


def test_validation_metrics_equal_the_host_metrics_on_the_preprocessed_grid(phantom_dirs, validated_run):
  """The jitted metrics of the validator against cmedl_jax.metrics.surface, on non-trivial masks: the network's
  output is replaced by each case's reference mask shifted by two pixels, in (Z, X, Y) slice order with the
  (z, x, y) spacing."""
  workdir, _ = validated_run
  cfg = _val_config(phantom_dirs)
  ct = store.prepare(phantom_dirs[0], store.settings_from_config(cfg.data, "CT"), labels="required", progress=False)
  predictor = inference.load_predictor(str(workdir), 4)
  validator = validation.Validator(predictor.cfg, predictor.nets, predictor.kernels, ct)
  shifted = [np.roll(np.asarray(ct.label(c)) > 0, 2, axis=2) for c in range(len(ct))]
  outputs = iter(shifted * 2)

  def fake_network(slices):
    foreground = next(outputs).astype(np.float32)
    assert foreground.shape == slices.shape
    return np.stack([1 - foreground, foreground], axis=-1)

  validator.segmenter.slice_probabilities = fake_network
  rows = validator.per_case(predictor.variables)
  dice = []
  for c, row in enumerate(rows):
    reference = np.asarray(ct.label(c)) > 0
    sx, sy, sz = ct.spacings[c]
    expected = surface.segmentation_metrics(shifted[c], reference, (sz, sx, sy), tolerances_mm=(2.0, 4.0))
    assert row["dice"] == pytest.approx(expected.dice, rel=1e-5)
    assert row["surface_dice_2mm"] == pytest.approx(expected.surface_dice[2.0], rel=1e-5)
    assert row["surface_dice_4mm"] == pytest.approx(expected.surface_dice[4.0], rel=1e-5)
    dice.append(row["dice"])
  assert 0.05 < np.mean(dice) < 0.95  # non-trivial masks
  means = validator(predictor.variables)
  assert means["dice"] == pytest.approx(np.mean(dice))


def test_evaluate_step_best_needs_a_validated_run(trained_run):
  workdir, _ = trained_run
  with pytest.raises(FileNotFoundError, match="no best checkpoint"):
    inference.load_predictor(str(workdir), "best")
  assert not os.path.exists(os.path.join(workdir, checkpointing.BEST))  # reading created nothing


def test_validation_data_settings_are_checked(phantom_dirs):
  from cmedl_jax import config_validation
  cfg = _val_config(phantom_dirs)
  cfg.eval.val_dir = phantom_dirs[0]
  with pytest.raises(ConfigError, match="data.val_cases.*eval.val_dir"):
    config_validation.check_values(cfg)
  cfg = _val_config(phantom_dirs)
  cfg.eval.best_metric = "hd95"
  with pytest.raises(ConfigError, match="eval.best_metric"):
    config_validation.check_values(cfg)
  assert methods.get(cfg.method).test_time_networks  # the validated networks are the method's test-time ones


def test_a_fresh_start_moves_another_attempts_best_checkpoint_aside(phantom_dirs, validated_run, tmp_path):
  import shutil
  workdir, _ = validated_run
  shutil.copytree(workdir / checkpointing.BEST, tmp_path / checkpointing.BEST)  # left by an attempt, no checkpoint
  earlier = sorted(os.listdir(tmp_path / checkpointing.BEST))
  trainer.train(_val_config(phantom_dirs, total_steps=2), str(tmp_path), progress=False)
  aside = [n for n in os.listdir(tmp_path) if n.startswith(checkpointing.BEST + ".") and n.endswith(".old")]
  assert len(aside) == 1 and sorted(os.listdir(tmp_path / aside[0])) == earlier  # kept, not replaced
  assert os.listdir(tmp_path / checkpointing.BEST) == ["2"]


def test_the_pmap_backend_validates_and_keeps_the_best_like_shard_map(phantom_dirs, validated_run, tmp_path):
  workdir, _ = validated_run
  cfg = _val_config(phantom_dirs, total_steps=2)
  cfg.train.backend = "pmap"
  trainer.train(cfg, str(tmp_path), progress=False)
  pmap_rows, shard_map_rows = _csv(tmp_path / "validation.csv"), _csv(workdir / "validation.csv")[:1]
  assert [r["step"] for r in pmap_rows] == [r["step"] for r in shard_map_rows] == ["2"]
  for key in pmap_rows[0]:
    assert float(pmap_rows[0][key]) == pytest.approx(float(shard_map_rows[0][key]), rel=1e-5, abs=1e-6)
  assert os.listdir(tmp_path / checkpointing.BEST) == ["2"]
  best = inference.load_predictor(str(tmp_path), "best")
  periodic = inference.load_predictor(str(tmp_path), 2)
  jax.tree.map(np.testing.assert_array_equal, best.variables, periodic.variables)
