"""End-to-end training on tiny phantoms: outputs, kill-and-resume, SIGTERM, non-finite stop."""

import csv
import hashlib
import json
import os
import signal

import jax
import numpy as np
import pytest

from cmedl_jax.errors import ConfigError
from cmedl_jax.evaluate import run as evaluate_run
from cmedl_jax.train import methods
from cmedl_jax.train import step as step_lib
from cmedl_jax.train import trainer
from tests.tiny import phantom_config, tiny_config


def _config(phantom_dirs, total_steps=4, **train):
  return phantom_config(phantom_dirs, total_steps, **train)


def _losses(history):
  return {h["step"]: h["total"] for h in history}


@pytest.fixture(scope="module")
def uninterrupted(trained_run):
  workdir, job_result = trained_run
  return workdir, job_result.train


def test_run_writes_metrics_checkpoints_previews_and_config(uninterrupted):
  workdir, result = uninterrupted
  assert result.final_step == 4 and len(result.history) == 4
  rows = list(csv.DictReader(open(workdir / "metrics.csv")))
  assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
  np.testing.assert_allclose([float(r["total"]) for r in rows], [h["total"] for h in result.history], rtol=1e-6)
  for key in ("student_seg", "teacher_seg", "hint", "cycle", "d_mr"):
    assert key in rows[0]
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
  assert sorted(os.listdir(workdir / "previews")) == ["step_0000002.png", "step_0000004.png"]
  assert open(workdir / "previews" / "step_0000004.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  saved = json.load(open(workdir / "config.json"))
  assert saved["method"] == "cmedl" and saved["train"]["total_steps"] == 4
  assert any(name.startswith("events") for name in os.listdir(workdir / "tensorboard"))
  assert os.path.exists(os.path.join(evaluate_run.default_output_dir(workdir, result_config_data_dir(workdir), 4),
                                    "summary.json"))


def test_the_finished_job_is_evaluated_on_eval_data_dir(trained_run):
  workdir, job_result = trained_run
  assert job_result.eval_summary["num_cases"] == 3
  data_dir = result_config_data_dir(workdir)
  assert job_result.eval_dir == os.path.join(str(workdir), "eval", os.path.basename(data_dir) + "-" +
                                             hashlib.sha256(os.path.realpath(data_dir).encode()).hexdigest()[:8],
                                             "step_4")
  # The checkpoint holds the test-time networks as their own item (test_evaluate reads it).
  assert {"config", "data", "model", "state"} <= set(os.listdir(workdir / "checkpoints" / "4"))


def result_config_data_dir(workdir):
  return json.load(open(workdir / "config.json"))["eval"]["data_dir"]


def test_kill_and_resume_gives_the_same_losses(phantom_dirs, uninterrupted, tmp_path):
  _, full = uninterrupted
  cfg = _config(phantom_dirs, preview_every=0, async_checkpoint=True)
  first = trainer.train(cfg, str(tmp_path), progress=False, max_steps=2)  # "killed" after step 2's checkpoint
  assert first.final_step == 2
  second = trainer.train(cfg, str(tmp_path), progress=False)  # a fresh call restores step 2 and the data position
  assert [h["step"] for h in second.history] == [3, 4]
  resumed = {**_losses(first.history), **_losses(second.history)}
  expected = _losses(full.history)
  for step in (1, 2, 3, 4):
    np.testing.assert_allclose(resumed[step], expected[step], rtol=1e-5, err_msg=f"step {step}")


def test_the_loop_copies_to_the_host_only_at_log_checkpoint_and_preview_steps(phantom_dirs, tmp_path, monkeypatch):
  real_make, real_device_get = step_lib.make_train_step, jax.device_get
  dispatched, copies = [0], []

  def make_counting(*args, **kwargs):
    inner = real_make(*args, **kwargs)

    def step(state, batch):
      dispatched[0] += 1
      return inner(state, batch)
    return step

  def device_get(tree):
    copies.append(dispatched[0])
    return real_device_get(tree)

  monkeypatch.setattr(step_lib, "make_train_step", make_counting)
  monkeypatch.setattr(jax, "device_get", device_get)
  cfg = _config(phantom_dirs, total_steps=9, log_every=4, checkpoint_every=6, preview_every=0)
  result = trainer.train(cfg, str(tmp_path), progress=False)
  assert [h["step"] for h in result.history] == [4, 8, 9]
  # The first copy reads the step of the fresh state (before any step); then only the sync steps 4, 6, 8, 9.
  assert set(copies) == {0, 4, 6, 8, 9}, copies


def test_sigterm_saves_and_stops(phantom_dirs, tmp_path, monkeypatch):
  real_make = step_lib.make_train_step

  def make_with_sigterm(*args, **kwargs):
    inner = real_make(*args, **kwargs)
    calls = {"n": 0}

    def step(state, batch):
      calls["n"] += 1
      if calls["n"] == 3:
        os.kill(os.getpid(), signal.SIGTERM)  # a preemption notice arriving during step 3
      return inner(state, batch)
    return step

  monkeypatch.setattr(step_lib, "make_train_step", make_with_sigterm)
  handler_before = signal.getsignal(signal.SIGTERM)
  cfg = _config(phantom_dirs, total_steps=10, checkpoint_every=100)
  result = trainer.train(cfg, str(tmp_path), progress=False)
  assert result.stopped_by_signal and result.final_step == 3
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3"]
  assert signal.getsignal(signal.SIGTERM) is handler_before  # the trainer's handler is removed again


class _NanBatchAt:
  """A data iterator whose ``index``-th batch (1-based) has a NaN CT image; state calls go to the real one."""

  def __init__(self, iterator, index):
    self._iterator, self._index, self._served = iterator, index, 0

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self._iterator)
    self._served += 1
    if self._served == self._index:
      batch = dict(batch, ct=np.full_like(batch["ct"], np.nan))
    return batch

  def get_state(self):
    return self._iterator.get_state()

  def set_state(self, state):
    self._iterator.set_state(state)


def test_non_finite_step_is_skipped_reported_at_the_next_sync_and_never_saved(phantom_dirs, tmp_path, monkeypatch):
  from cmedl_jax.data import pipeline
  real_iterator = pipeline.make_train_iterator
  monkeypatch.setattr(pipeline, "make_train_iterator", lambda *a, **k: _NanBatchAt(real_iterator(*a, **k), 3))
  # Logged every 5 steps, saved every 2: the NaN of step 3 is found at step 4's sync, before its save.
  cfg = _config(phantom_dirs, total_steps=6, checkpoint_every=2, log_every=5)
  with pytest.raises(trainer.NonFiniteLossError, match=r"non-finite loss or gradient at step 3: \{.*'total': nan"
                                                       r".*last good checkpoint \(step 2\)"):
    trainer.train(cfg, str(tmp_path), progress=False)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]


def test_missing_data_folders_are_reported(tmp_path):
  cfg = tiny_config()
  with pytest.raises(ConfigError, match=r"data.ct_dir: set the dataset folder \(or data.make_phantoms=True\)"):
    trainer.train(cfg, str(tmp_path / "run"), progress=False)
  assert not (tmp_path / "run").exists()  # validated before anything is written


def _converted_folder(tmp_path, name, cfg, seed):
  """A cmedl-convert-torch folder holding network ``name`` of ``cfg`` with fresh weights of ``seed``."""
  import jax

  from cmedl_jax.torch_port import convert
  module = methods.build_networks(cfg)[name]
  shape = (1, cfg.data.crop_size, cfg.data.crop_size, 1)
  variables = jax.device_get(module.init(jax.random.key(seed), np.zeros(shape, np.float32),
                                         **({"train": False} if name in ("teacher", "student") else {})))
  arch = "unet" if name in ("teacher", "student") else "generator"
  folder = tmp_path / name
  convert.save(convert.convert_arch(arch, convert.variables_to_state_dict(variables)), str(folder))
  return str(folder), variables


def test_init_from_converted_weights_starts_those_networks(phantom_dirs, tmp_path):
  import orbax.checkpoint as ocp
  cfg = _config(phantom_dirs, total_steps=1, preview_every=0)
  cfg.eval.data_dir = ""
  cfg.optim.seg.lr = cfg.optim.gen.lr = 0.0  # the checkpoint after one step then holds the loaded weights
  cfg.init_from.student, student = _converted_folder(tmp_path, "student", cfg, seed=11)
  cfg.init_from.gen_ct2mr, generator = _converted_folder(tmp_path, "gen_ct2mr", cfg, seed=12)
  trainer.train(cfg, str(tmp_path / "run"), progress=False)
  restored = ocp.StandardCheckpointer().restore(str(tmp_path / "run" / "checkpoints" / "1" / "state"))["params"]
  for name, variables in (("student", student), ("gen_ct2mr", generator)):
    got = jax.tree.leaves(restored[name])
    want = jax.tree.leaves(variables["params"])
    assert len(got) == len(want)
    for a, b in zip(got, want):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_init_from_errors_name_the_field_and_the_problem(phantom_dirs, tmp_path):
  from cmedl_jax.train import init_from
  cfg = _config(phantom_dirs)
  nets = methods.build_networks(cfg)
  image_shape = (cfg.data.crop_size, cfg.data.crop_size, 1)
  with pytest.raises(ValueError, match=r"nothing: init_from.student: not a cmedl-convert-torch output folder"):
    init_from.load_converted_weights({"student": str(tmp_path / "nothing")}, nets, image_shape)
  folder, _ = _converted_folder(tmp_path, "student", cfg, seed=0)
  with pytest.raises(ValueError, match=r"student: init_from.gen_mr2ct: the converted unet\(.*does not fit this "
                                       r"run's gen_mr2ct: missing"):
    init_from.load_converted_weights({"gen_mr2ct": folder}, nets, image_shape)
  ct_only = methods.build_networks(_ct_only(cfg))
  with pytest.raises(ValueError, match=r"this run has no network 'gen_ct2mr' \(its networks: student\)"):
    init_from.load_converted_weights({"gen_ct2mr": folder}, ct_only, image_shape)
  (tmp_path / "damaged").mkdir()
  for name in ("arch.json", "variables.msgpack"):
    (tmp_path / "damaged" / name).write_text("{not json")
  with pytest.raises(ValueError, match=r"damaged: init_from.student: cannot read the converted weights"):
    init_from.load_converted_weights({"student": str(tmp_path / "damaged")}, nets, image_shape)
  assert init_from.load_converted_weights({"student": "", "teacher": ""}, nets, image_shape) == {}


def _ct_only(cfg):
  cfg = cfg.copy_and_resolve_references()
  cfg.method = "ct_only"
  return cfg


def test_with_converted_weights_replaces_params_and_batch_statistics_of_the_named_networks(phantom_dirs, tmp_path):
  from cmedl_jax.torch_port import convert
  from cmedl_jax.train import init_from
  from cmedl_jax.train import state as state_lib
  cfg = _config(phantom_dirs)
  nets = methods.build_networks(cfg)
  optimizers = state_lib.make_optimizers(cfg, nets)
  image_shape = (cfg.data.crop_size, cfg.data.crop_size, 1)
  fresh = state_lib.create_train_state(nets, cfg, optimizers, jax.random.key(0), image_shape)
  folder, variables = _converted_folder(tmp_path, "student", cfg, seed=5)
  # Running statistics unlike any fresh init (mean 0, var 1), so that a copy is visible.
  variables["batch_stats"] = jax.tree.map(lambda v: np.asarray(v) + 3.0, variables["batch_stats"])
  convert.save(convert.convert_arch("unet", convert.variables_to_state_dict(variables)), folder)
  state = init_from.with_converted_weights(fresh, {"student": folder}, nets, cfg, optimizers, image_shape)
  for got, want in ((state.params["student"], variables["params"]),
                    (state.batch_stats["student"], variables["batch_stats"]),
                    (state.params["teacher"], fresh.params["teacher"]),
                    (state.batch_stats["teacher"], fresh.batch_stats["teacher"])):
    assert jax.tree.structure(got) == jax.tree.structure(jax.tree.map(np.asarray, want))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(state.step) == 0


def test_a_fixed_eval_folder_with_another_steps_results_fails_before_training(phantom_dirs, tmp_path):
  from cmedl_jax.errors import DataError
  from cmedl_jax.train import job
  cfg = phantom_config(phantom_dirs, 4)
  cfg.eval.data_dir, cfg.eval.out_dir = phantom_dirs[0], "eval/fixed"
  os.makedirs(tmp_path / "eval" / "fixed")
  with open(tmp_path / "eval" / "fixed" / "summary.json", "w") as f:
    json.dump({"settings": {"checkpoint_step": 2}}, f)
  with pytest.raises(DataError, match="holds the evaluation of step 2; this run ends at step 4"):
    job.train_and_evaluate(cfg, str(tmp_path), progress=False)
  assert not os.path.exists(tmp_path / "checkpoints")  # nothing trained
