"""Every shipped config resolves, builds its networks and traces its train state; arguments and validation."""

import importlib.util
import os

import jax
import numpy as np
import pytest

from cmedl_jax.train import methods
from cmedl_jax.train import state as state_lib

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "configs")


def load_config(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIG_DIR, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert module.__doc__ and "Launch" in module.__doc__ and "Runtime" in module.__doc__, name
  return module.get_config(arg) if arg is not None else module.get_config()


CASES = ([("cmedl", f"translator={t},segmenter={s}") for t in ("cyclegan", "cut")
          for s in ("unet", "densefcn", "pspnet")]
         + [("baselines", f"method={m}") for m in ("ct_only", "pmri_only", "ct_pmri_concat")]
         + [("baselines", "method=pmri_only,translator=cut,segmenter=densefcn")]
         + [("ablations", f"ablation={a}") for a in ("no_hint", "no_seg_into_g")]
         + [("quickstart", "translator=cyclegan"), ("quickstart", "translator=cut"), ("quickstart", None)])

NETWORKS_OF = {
    "cmedl": {"cyclegan": {"gen_ct2mr", "gen_mr2ct", "disc_mr", "disc_ct", "teacher", "student"},
              "cut": {"gen_ct2mr", "disc_mr", "nce_head", "teacher", "student"}},
}


def _param_counts(cfg):
  nets = methods.build_networks(cfg)
  optimizers = state_lib.make_optimizers(cfg, nets)
  size = cfg.data.crop_size
  abstract = jax.eval_shape(lambda k: state_lib.create_train_state(nets, cfg, optimizers, k, (size, size, 1)),
                            jax.random.key(0))
  return {name: int(sum(np.prod(x.shape) for x in jax.tree.leaves(p))) for name, p in abstract.params.items()}


@pytest.mark.parametrize("name,arg", CASES)
def test_config_traces(name, arg):
  cfg = load_config(name, arg)
  counts = _param_counts(cfg)
  if cfg.method == "cmedl":
    assert set(counts) == NETWORKS_OF["cmedl"][cfg.translator]
    assert counts["teacher"] == counts["student"]
  if cfg.method == "ct_only":
    assert set(counts) == {"student"}
  if name != "quickstart" and cfg.translator == "cyclegan" and cfg.method != "ct_only":
    # docs/design.md defaults: ResNet generator ~11.4M, 70x70 PatchGAN ~2.8M (1-channel images)
    assert abs(counts["gen_ct2mr"] - 11.378e6) / 11.378e6 < 0.01
    assert abs(counts["disc_mr"] - 2.763e6) / 2.763e6 < 0.01
  if name == "cmedl" and cfg.model.segmenter == "unet":
    assert abs(counts["student"] - 13.4e6) / 13.4e6 < 0.01


def test_config_args_set_their_fields():
  assert load_config("ablations", "ablation=no_hint").loss.lambda_hint == 0.0
  assert load_config("ablations", "ablation=no_seg_into_g,translator=cut").loss.lambda_seg == 0.0
  assert load_config("cmedl", "translator=cut,segmenter=pspnet").loss.lambda_hint == 1.0
  cfg = load_config("baselines", " segmenter=densefcn , method=ct_pmri_concat ")  # any order, spaces
  assert (cfg.method, cfg.translator, cfg.model.segmenter) == ("ct_pmri_concat", "cyclegan", "densefcn")
  cfg = load_config("cmedl")
  assert (cfg.method, cfg.translator, cfg.model.segmenter) == ("cmedl", "cyclegan", "unet")
  assert load_config("quickstart", "translator=cut").translator == "cut"


@pytest.mark.parametrize("name,arg,message", [
    ("cmedl", "cut", r"configs/cmedl.py: 'cut': the argument is key=value pairs, e.g. "
                     r"configs/cmedl.py:translator=cut \(keys: translator, segmenter\)"),
    ("cmedl", "cyclegan,unet", r"e.g. configs/cmedl.py:translator=cyclegan"),
    ("baselines", "ct_only,unet", r"e.g. configs/baselines.py:method=ct_only"),
    ("ablations", "no_hint", r"e.g. configs/ablations.py:ablation=no_hint"),
    ("quickstart", "cut", r"e.g. configs/quickstart.py:translator=cut"),
    ("cmedl", "segmenter=resnet", r"segmenter='resnet': allowed values are unet, densefcn, pspnet"),
    ("baselines", "method=cmedl", r"method='cmedl': allowed values are ct_only, pmri_only, ct_pmri_concat"),
    ("cmedl", "translater=cut", r"unknown key 'translater' \(did you mean translator\?\); keys: translator, "),
])
def test_bad_config_args_fail_in_one_line_naming_the_allowed_values(name, arg, message):
  from cmedl_jax.errors import ConfigError
  with pytest.raises(ConfigError, match=message) as raised:
    load_config(name, arg)
  assert "\n" not in str(raised.value)


# ---------------------------------------------------------------- validation: one rule per case


def _tiny():
  from tests.tiny import tiny_config
  cfg = tiny_config()
  cfg.data.ct_dir, cfg.data.mri_dir = "ct", "mri"
  return cfg


def _set(cfg, field, value):
  *path, last = field.split(".")
  node = cfg
  for part in path:
    node = node[part]
  with cfg.unlocked():
    node[last] = value


@pytest.mark.parametrize("field,value,message", [
    ("method", "mri_only", r"method: 'mri_only' is not one of cmedl, ct_only, pmri_only, ct_pmri_concat"),
    ("translator", "unit", r"translator: 'unit' is not one of cyclegan, cut"),
    ("conv_backend", "mkl", r"conv_backend: 'mkl' is not one of auto, onednn, xla, plain"),
    ("data.ct_dir", "", r"data.ct_dir: set the dataset folder \(or data.make_phantoms=True\)"),
    ("data.crop_size", 50, r"data.crop_size: 50: the generator maps 50x50 crops to 52x52; use a multiple of 4, "
                           r"e.g. 48"),
    ("data.crop_size", 8, r"data.crop_size: 8: must be an integer >= 16"),
    ("data.global_batch_size", 0, r"data.global_batch_size: 0: must be an integer >= 1"),
    ("data.global_batch_size", 12, r"data.global_batch_size: 12 is not divisible by the 8 devices of this job"),
    ("data.foreground_fraction", 1.5, r"data.foreground_fraction: 1.5: must be a number >= 0 and <= 1"),
    ("data.ct_window", (500.0, -1000.0), r"data.ct_window: \(500.0, -1000.0\): must be \(low, high\) with low < high"),
    ("data.mri_percentiles", (0.5, 120.0), r"data.mri_percentiles: 120.0: must be a number >= 0 and <= 100"),
    ("data.num_workers", -1, r"data.num_workers: -1: must be an integer >= 0"),
    ("model.segmenter", "segformer", r"model.segmenter: 'segformer' is not one of unet, densefcn, pspnet"),
    ("model.num_classes", 1, r"model.num_classes: 1: must be an integer >= 2"),
    ("model.hint_features", ("up9",), r"model.hint_features: \['up9'\]: unet has the decoder features up1, up2"),
    ("model.nce.temperature", 0.0, r"model.nce.temperature: 0.0: must be a number > 0"),
    ("loss.lambda_hint", -1.0, r"loss.lambda_hint: -1.0: must be a number >= 0"),
    ("loss.lambda_cycle", float("nan"), r"loss.lambda_cycle: nan: must be a number >= 0"),
    ("loss.dice_smooth", 0.0, r"loss.dice_smooth: 0.0: must be a number > 0"),
    ("pool_size", -2, r"pool_size: -2: must be an integer >= 0"),
    ("optim.seg.lr", -1e-4, r"optim.seg.lr: -0.0001: must be a number >= 0"),
    ("optim.gen.b1", 1.0, r"optim.gen.b1: 1.0: must be a number >= 0 and < 1"),
    ("optim.disc.name", "lamb", r"optim.disc.name: 'lamb' is not one of adam, sgd"),
    ("train.total_steps", 0, r"train.total_steps: 0: must be an integer >= 1"),
    ("train.backend", "pjit", r"train.backend: 'pjit' is not one of shard_map, pmap"),
    ("train.log_every", 0, r"train.log_every: 0: must be an integer >= 1"),
    ("eval.tolerances_mm", (2.0, 0.0), r"eval.tolerances_mm: 0.0: must be a number > 0"),
    ("eval.tolerances_mm", (), r"eval.tolerances_mm: give at least one surface Dice tolerance"),
    ("eval.hd95_convention", "itk", r"eval.hd95_convention: 'itk' is not one of deepmind, monai, medpy"),
])
def test_validation_names_the_field_and_the_rule(field, value, message):
  from cmedl_jax import config_validation
  from cmedl_jax.errors import ConfigError
  config_validation.validate(_tiny(), num_devices=8)  # the unchanged config passes
  cfg = _tiny()
  _set(cfg, field, value)
  with pytest.raises(ConfigError, match=message) as raised:
    config_validation.validate(cfg, num_devices=8)
  assert "\n" not in str(raised.value)


def test_validation_rejects_fields_the_base_config_does_not_have():
  from cmedl_jax import config_validation
  from cmedl_jax.errors import ConfigError
  cfg = _tiny()
  _set(cfg, "data.crop_sise", 64)
  with pytest.raises(ConfigError, match=r"data.crop_sise: no such config field; did you mean data.crop_size\?"):
    config_validation.validate(cfg)
  cfg = _tiny()
  _set(cfg, "model.segmenter_kwargs.features", (4, 8))  # free-form: passed to the segmenter
  config_validation.validate(cfg)


def test_cmedl_train_reports_bad_configs_in_one_line_before_writing_anything(tmp_path):
  import subprocess
  import sys
  quickstart = os.path.join(CONFIG_DIR, "quickstart.py")
  cases = [([f"--config={quickstart}", "--config.data.crop_sise=64"],
            "ERROR --config.data.crop_sise: no such config field; did you mean crop_size?"),
           ([f"--config={os.path.join(CONFIG_DIR, 'cmedl.py')}:cut"],
            "ERROR configs/cmedl.py: 'cut': the argument is key=value pairs, e.g. configs/cmedl.py:translator=cut"),
           ([f"--config={quickstart}", "--config.data.crop_size=50"],
            "ERROR data.crop_size: 50: the generator maps 50x50 crops to 52x52; use a multiple of 4")]
  for args, expected in cases:
    workdir = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "cmedl_jax.train.main", f"--workdir={workdir}", *args],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode != 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1 and errors[0].startswith(expected), done.stderr
    assert not workdir.exists() and not (tmp_path / "runs").exists()


def test_paper_configs_resample_to_one_physical_scale_and_the_defaults_keep_each_scans_own():
  from cmedl_jax import config_base
  from cmedl_jax.data import resample
  for name in ("cmedl", "baselines", "ablations"):
    assert resample.target_inplane(load_config(name).data.target_spacing_mm) == (1.0, 1.0), name
  assert resample.target_inplane(config_base.base_config().data.target_spacing_mm) is None
  assert resample.target_inplane(load_config("quickstart").data.target_spacing_mm) is None  # phantoms' own scale
