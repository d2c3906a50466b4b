"""Every shipped config resolves, builds its networks and traces its train state."""

import importlib.util
import os

import jax
import numpy as np
import pytest

from cmedl_jax.train import networks
from cmedl_jax.train import state as state_lib

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "configs")


def load_config(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIG_DIR, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert module.__doc__ and "Launch" in module.__doc__ and "Runtime" in module.__doc__, name
  return module.get_config(arg) if arg is not None else module.get_config()


CASES = ([("cmedl", f"{t},{s}") for t in ("cyclegan", "cut") for s in ("unet", "densefcn", "pspnet")]
         + [("baselines", m) for m in ("ct_only,unet", "pmri_only,unet", "ct_pmri_concat,unet")]
         + [("ablations", a) for a in ("no_hint", "no_seg_into_g")]
         + [("quickstart", "cyclegan"), ("quickstart", "cut")])

NETWORKS_OF = {
    "cmedl": {"cyclegan": {"gen_ct2mr", "gen_mr2ct", "disc_mr", "disc_ct", "teacher", "student"},
              "cut": {"gen_ct2mr", "disc_mr", "nce_head", "teacher", "student"}},
}


def _param_counts(cfg):
  nets = networks.build_networks(cfg)
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


def test_ablations_set_their_weight():
  assert load_config("ablations", "no_hint").loss.lambda_hint == 0.0
  assert load_config("ablations", "no_seg_into_g").loss.lambda_seg == 0.0
  assert load_config("cmedl", "cyclegan,unet").loss.lambda_hint == 1.0


def test_bad_config_args_are_explained():
  with pytest.raises(ValueError, match="TRANSLATOR,SEGMENTER"):
    load_config("cmedl", "cyclegan,resnet")
  with pytest.raises(ValueError, match="method must be one of"):
    load_config("baselines", "mri_only")
