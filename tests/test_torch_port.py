"""PyTorch weight import (cmedl_jax.torch_port): key mapping, checks and messages, checkpoint formats, the CLI, and
forward parity of the PyTorch reference networks with the flax ones from the same weights.

The first group needs no torch (state_dicts of numpy arrays); tests marked ``torch`` skip without it.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmedl_jax import ops
from cmedl_jax.models import build
from cmedl_jax.torch_port import convert

TINY = {  # name -> (arch, options): small networks for 32 px inputs
    "generator": ("generator", dict(base_features=4, num_blocks=2)),
    "generator_dropout": ("generator", dict(base_features=4, num_blocks=2, use_dropout=True)),
    "discriminator": ("discriminator", dict(base_features=4)),
    "discriminator_2_layers": ("discriminator", dict(base_features=4, num_layers=2, input_channels=2)),
    "unet": ("unet", dict(features=(4, 8, 16, 16), num_classes=3)),
    "unet_no_bias": ("unet", dict(features=(4, 8, 8), conv_bias=False)),
    "densefcn": ("densefcn", dict(down_blocks=(2, 3), up_blocks=(3, 2), bottleneck_layers=2, growth_rate=4,
                                  first_conv_features=8)),
}


def random_variables(arch, options, seed=0):
  """Flax variables of ``arch`` filled with random numbers (numpy), without running init."""
  module, shape, kwargs = convert.build_module(arch, options)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    if path[-1].key == "var":
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    return (0.2 * rng.normal(size=leaf.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, build.abstract_variables(module, shape, **kwargs))


def full_options(arch, options):
  return {**convert.DEFAULT_OPTIONS[arch], **options}


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ----------------------------------------------------------------------------------------- no torch needed
def test_importing_the_package_does_not_import_torch():
  code = ("import sys, cmedl_jax.torch_port, cmedl_jax.torch_port.cli, cmedl_jax.torch_port.bridge, "
          "cmedl_jax.bench.step_bench; assert 'torch' not in sys.modules, 'torch was imported'")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120)
  assert result.returncode == 0, result.stderr


def test_torch_key_is_the_inverse_of_the_naming_rule():
  cases = {
      ("params", "model_1", "kernel"): "model.1.weight",
      ("params", "model_10", "conv_block_5", "kernel"): "model.10.conv_block.5.weight",
      ("params", "model_19", "transposed_kernel"): "model.19.weight",
      ("params", "down1", "maxpool_conv_1", "double_conv_3", "bias"): "down1.maxpool_conv.1.double_conv.3.bias",
      ("batch_stats", "up2", "conv", "double_conv_4", "var"): "up2.conv.double_conv.4.running_var",
      ("params", "denseBlocksDown_0", "layers_1", "norm", "scale"): "denseBlocksDown.0.layers.1.norm.weight",
      ("batch_stats", "bottleneck", "bottleneck", "layers_0", "norm", "mean"):
          "bottleneck.bottleneck.layers.0.norm.running_mean",
      ("params", "ppm", "features_2_1", "kernel"): "ppm.features.2.1.weight",
  }
  for path, key in cases.items():
    assert convert.torch_key(path) == key
  assert convert.torch_shape("kernel", (3, 5, 2, 7)) == (7, 2, 3, 5)
  assert convert.torch_shape("transposed_kernel", (3, 3, 16, 8)) == (16, 8, 3, 3)
  assert convert.torch_shape("kernel", (4, 9)) == (9, 4)


@pytest.mark.parametrize("name", sorted(TINY))
def test_round_trip_through_pytorch_keys_and_option_inference(name):
  arch, options = TINY[name]
  variables = random_variables(arch, options)
  state_dict = convert.variables_to_state_dict(variables)
  conversion = convert.convert_arch(arch, state_dict)  # every option read off the checkpoint
  assert conversion.options == full_options(arch, options)
  assert set(conversion.inferred) == set(convert.DEFAULT_OPTIONS[arch])
  assert_trees_equal(conversion.variables, variables)
  assert conversion.num_tensors == len(state_dict) and conversion.ignored == []


@pytest.mark.parametrize("arch", convert.ARCHS)
def test_full_size_reference_networks_round_trip_with_default_options(arch):
  module, shape, kwargs = convert.build_module(arch, convert.DEFAULT_OPTIONS[arch])
  zeros = jax.tree.map(lambda leaf: np.zeros(leaf.shape, np.float32),
                       build.abstract_variables(module, shape, **kwargs))
  conversion = convert.convert_arch(arch, convert.variables_to_state_dict(zeros))
  assert conversion.options == dict(convert.DEFAULT_OPTIONS[arch])
  expected = {"generator": 11_365_633, "discriminator": 2_762_689, "unet": 13_394_242, "densefcn": 3_459_778}
  assert conversion.num_parameters() == expected[arch]


def test_dropout_shifts_the_second_conv_of_every_residual_block():
  plain = convert.variables_to_state_dict(random_variables(*TINY["generator"]))
  dropout = convert.variables_to_state_dict(random_variables(*TINY["generator_dropout"]))
  assert "model.10.conv_block.5.weight" in plain and "model.10.conv_block.6.weight" in dropout
  assert {k.replace("conv_block.6", "conv_block.5") for k in dropout} == set(plain)
  with pytest.raises(convert.WeightImportError) as info:
    convert.convert_arch("generator", dropout, {"use_dropout": False})
  message = str(info.value)
  assert "missing key model.10.conv_block.5.weight: expected shape (16, 16, 3, 3)" in message
  assert "unexpected key model.10.conv_block.6.weight: found shape (16, 16, 3, 3)" in message
  assert "use_dropout" in message and "--use-dropout" in message
  with pytest.raises(convert.WeightImportError, match="--no-dropout"):
    convert.convert_arch("generator", plain, {"use_dropout": True})


def test_errors_name_every_bad_key_with_expected_and_found_shapes():
  arch, options = TINY["unet"]
  state_dict = convert.variables_to_state_dict(random_variables(arch, options))
  with pytest.raises(convert.WeightImportError) as info:
    convert.convert_arch(arch, state_dict, {"num_classes": 2})
  assert sorted(info.value.mismatched) == [("outc.conv.bias", (2,), (3,)),
                                           ("outc.conv.weight", (2, 4, 1, 1), (3, 4, 1, 1))]
  assert "shape mismatch outc.conv.weight: expected (2, 4, 1, 1), found (3, 4, 1, 1)" in str(info.value)
  broken = dict(state_dict)
  del broken["inc.double_conv.1.running_var"]
  broken["extra.weight"] = np.zeros((5, 5), np.float32)
  with pytest.raises(convert.WeightImportError) as info:
    convert.convert_arch(arch, broken)
  assert info.value.missing == [("inc.double_conv.1.running_var", (4,))]
  assert info.value.unexpected == [("extra.weight", (5, 5))]
  # a multi-network checkpoint: the hint names the prefix that selects the right keys
  with pytest.raises(convert.WeightImportError, match="--prefix netS."):
    convert.convert_arch(arch, {f"netS.{k}": v for k, v in state_dict.items()}, options)
  with pytest.raises(ValueError, match="unknown options for unet"):
    convert.convert_arch(arch, state_dict, {"num_blocks": 3})


def test_buffers_without_a_flax_variable():
  # BatchNorm step counters are skipped; stale InstanceNorm statistics (PyTorch < 0.4 generators) too, as the
  # CycleGAN code does; anything else is an error.
  arch, options = TINY["unet"]
  state_dict = convert.variables_to_state_dict(random_variables(arch, options))
  state_dict["inc.double_conv.1.num_batches_tracked"] = np.array(7)
  assert convert.convert_arch(arch, state_dict).ignored == ["inc.double_conv.1.num_batches_tracked"]
  generator = convert.variables_to_state_dict(random_variables(*TINY["generator"]))
  generator["model.2.running_mean"] = np.zeros(4, np.float32)
  assert convert.convert_arch("generator", generator).ignored == ["model.2.running_mean"]
  state_dict["inc.double_conv.2.running_mean"] = np.zeros(4, np.float32)
  with pytest.raises(convert.WeightImportError, match="unexpected key inc.double_conv.2.running_mean"):
    convert.convert_arch(arch, state_dict)


def test_extract_state_dict_from_wrapped_checkpoints():
  tensors = {"a.weight": np.ones((2, 3)), "b.bias": np.zeros(2)}
  for checkpoint in (tensors,
                     {"state_dict": {f"module.{k}": v for k, v in tensors.items()}, "epoch": 3},
                     {"model_state_dict": {f"_orig_mod.module.{k}": v for k, v in tensors.items()}, "opt": {}},
                     {"model": {"state_dict": tensors}}):
    state_dict, ignored = convert.extract_state_dict(checkpoint)
    assert sorted(state_dict) == sorted(tensors) and ignored == []
  state_dict, ignored = convert.extract_state_dict({**tensors, "mask_values": [0, 1]})  # newer milesial files
  assert sorted(state_dict) == sorted(tensors) and ignored == ["mask_values"]
  both = {"netG_A": {"x.weight": np.ones(1)}, "netG_B": {"y.weight": np.ones(1)}}
  with pytest.raises(convert.WeightImportError, match="select one with --key"):
    convert.extract_state_dict(both)
  assert list(convert.extract_state_dict(both, key="netG_B")[0]) == ["y.weight"]
  with pytest.raises(convert.WeightImportError, match="no entry 'netD'"):
    convert.extract_state_dict(both, key="netD")
  flat = {"netG_A.x.weight": np.ones(1), "netD_A.x.weight": np.ones(2)}
  assert convert.extract_state_dict(flat, prefix="netD_A.")[0]["x.weight"].shape == (2,)
  with pytest.raises(convert.WeightImportError, match="selects nothing"):
    convert.extract_state_dict(flat, prefix="netF.")


def test_save_and_load(tmp_path):
  arch, options = TINY["densefcn"]
  variables = random_variables(arch, options)
  conversion = convert.convert_arch(arch, convert.variables_to_state_dict(variables), options)
  paths = convert.save(conversion, str(tmp_path / "out"), source="x.pth")
  assert sorted(os.listdir(tmp_path / "out")) == ["arch.json", "variables.msgpack"]
  module, loaded, meta = convert.load(str(tmp_path / "out"))
  assert meta["arch"] == "densefcn" and meta["source"] == "x.pth" and os.path.exists(paths["variables"])
  assert module == conversion.module()
  assert_trees_equal(loaded, variables)


# ------------------------------------------------------------------------------------------------ with torch
class TrainingOptions:
  """A custom object some training scripts pickle into their checkpoints (refused by weights_only loading)."""
def _reference(name, seed=0):
  torch = pytest.importorskip("torch")
  from cmedl_jax.torch_port import reference
  arch, options = TINY[name]
  torch.manual_seed(seed)
  module = reference.build(arch, **options)
  if arch in ("generator", "discriminator"):
    reference.init_gan_weights(module, gain=0.2)  # larger than CycleGAN's 0.02, so the outputs are not tiny
  return module


@pytest.mark.torch
@pytest.mark.parametrize("arch", convert.ARCHS)
def test_reference_modules_have_the_expected_keys_at_full_size(arch):
  pytest.importorskip("torch")
  from cmedl_jax.torch_port import reference
  variants = [{}] + ([{"use_dropout": True}] if arch == "generator" else [])
  for options in variants:
    module, shape, kwargs = convert.build_module(arch, options)
    expected = convert.expected_torch_keys(build.abstract_variables(module, shape, **kwargs))
    found = {k: tuple(v.shape) for k, v in reference.build(arch, **options).state_dict().items()
             if not k.endswith("num_batches_tracked")}
    assert found == {k: shape for k, (_, shape) in expected.items()}


@pytest.mark.torch
@pytest.mark.parametrize("kernels", [ops.Kernels(), ops.Kernels("plain")], ids=["default", "plain"])
@pytest.mark.parametrize("name", sorted(TINY))
def test_forward_outputs_match_pytorch(name, kernels):
  torch = pytest.importorskip("torch")
  from cmedl_jax.torch_port import reference
  arch, options = TINY[name]
  module_t = _reference(name)
  if arch in ("unet", "densefcn"):
    reference.randomize_batch_norm(module_t)
  module_t.eval()  # dropout off, BN running statistics
  conversion = convert.convert_arch(arch, module_t.state_dict())
  assert conversion.options == full_options(arch, options)
  channels = conversion.options["input_channels"]
  x = np.random.default_rng(1).uniform(-1, 1, size=(2, 32, 32, channels)).astype(np.float32)
  module = conversion.module()
  apply = jax.jit(ops.using(kernels, module.apply), static_argnames=("nce_layers",))
  with torch.no_grad():
    if arch == "generator":
      layers = (0, 4, 8, 10, 11)
      y_t, feats_t = module_t(reference.to_nchw(x), layers)
      y, feats = apply(conversion.variables, x, nce_layers=layers)
      pairs = [(y, y_t)] + list(zip(feats, feats_t))
    elif arch == "discriminator":
      pairs = [(apply(conversion.variables, x), module_t(reference.to_nchw(x)))]
    else:
      logits_t, feats_t = module_t(reference.to_nchw(x))
      logits, feats = apply(conversion.variables, x)
      assert set(feats) == set(feats_t) and tuple(feats_t) == module.decoder_feature_names()
      pairs = [(logits, logits_t)] + [(feats[k], feats_t[k]) for k in feats_t]
  for a, b in pairs:
    np.testing.assert_allclose(np.asarray(a), reference.to_nhwc(b), rtol=1e-4, atol=1e-4)


@pytest.mark.torch
def test_unet_training_mode_and_batch_statistics_match_pytorch():
  torch = pytest.importorskip("torch")
  from cmedl_jax.torch_port import reference
  module_t = _reference("unet")
  conversion = convert.convert_arch("unet", module_t.state_dict())
  x = np.random.default_rng(2).normal(size=(4, 32, 32, 1)).astype(np.float32)
  module_t.train()
  logits_t, _ = module_t(reference.to_nchw(x))
  (logits, _), updates = jax.jit(lambda v, a: conversion.module().apply(v, a, train=True, mutable=["batch_stats"]))(
      conversion.variables, x)
  np.testing.assert_allclose(np.asarray(logits), reference.to_nhwc(logits_t), rtol=1e-4, atol=1e-4)
  # running_mean follows the same update; running_var differs by design (PyTorch: unbiased batch variance)
  np.testing.assert_allclose(np.asarray(updates["batch_stats"]["inc"]["double_conv_1"]["mean"]),
                             module_t.inc.double_conv[1].running_mean.numpy(), rtol=1e-4, atol=1e-6)
  n = 4 * 32 * 32
  var_t = (module_t.inc.double_conv[1].running_var.numpy() - 0.9) / 0.1 * (n - 1) / n  # biased batch variance
  var = (np.asarray(updates["batch_stats"]["inc"]["double_conv_1"]["var"]) - 0.9) / 0.1
  np.testing.assert_allclose(var, var_t, rtol=1e-4, atol=1e-5)


@pytest.mark.torch
@pytest.mark.parametrize("name", ["generator_dropout", "densefcn"])
def test_flax_variables_load_into_pytorch(name):
  torch = pytest.importorskip("torch")
  from cmedl_jax.torch_port import reference
  arch, options = TINY[name]
  variables = random_variables(arch, options, seed=3)
  module_t = reference.load_variables(reference.build(arch, **options), variables).eval()
  module = convert.build_module(arch, options)[0]
  x = np.random.default_rng(4).uniform(-1, 1, size=(1, 32, 32, 1)).astype(np.float32)
  with torch.no_grad():
    out_t = module_t(reference.to_nchw(x))
  out = jax.jit(module.apply)(variables, x)
  out, out_t = (out[0], out_t[0]) if arch == "densefcn" else (out, out_t)
  np.testing.assert_allclose(np.asarray(out), reference.to_nhwc(out_t), rtol=1e-4, atol=1e-4)


@pytest.mark.torch
def test_cli_converts_wrapped_checkpoints(tmp_path, capsys):
  torch = pytest.importorskip("torch")
  from cmedl_jax.torch_port import cli, reference
  module_t = _reference("generator_dropout").eval()
  path = tmp_path / "latest_net_G.pth"
  # DataParallel prefixes inside a {"state_dict": ...} wrapper, as many training scripts save them
  torch.save({"epoch": 200, "state_dict": {f"module.{k}": v for k, v in module_t.state_dict().items()}}, path)
  assert cli.main(["--arch", "generator", "--in", str(path), "--out", str(tmp_path / "out")]) == 0
  printed = capsys.readouterr().out
  assert "use_dropout=True (read off the checkpoint)" in printed and "parameters: 12,593" in printed
  module, variables, meta = convert.load(str(tmp_path / "out"))
  assert meta["options"]["use_dropout"] is True and meta["num_parameters"] == 12_593
  x = np.random.default_rng(5).uniform(-1, 1, size=(1, 32, 32, 1)).astype(np.float32)
  with torch.no_grad():
    expected = reference.to_nhwc(module_t(reference.to_nchw(x)))
  np.testing.assert_allclose(np.asarray(jax.jit(module.apply)(variables, jnp.asarray(x))), expected, rtol=1e-4,
                             atol=1e-4)

  # explicit options are checked against the file, with the key and both shapes in the message
  assert cli.main(["--arch", "generator", "--in", str(path), "--out", str(tmp_path / "bad"), "--no-dropout"]) == 1
  error = capsys.readouterr().err
  assert "missing key model.10.conv_block.5.weight: expected shape (16, 16, 3, 3)" in error and "--use-dropout" in error
  assert cli.main(["--arch", "generator", "--in", str(path), "--out", str(tmp_path / "bad"), "--ngf", "8"]) == 1
  assert "shape mismatch model.1.weight: expected (8, 1, 7, 7), found (4, 1, 7, 7)" in capsys.readouterr().err
  assert cli.main(["--arch", "generator", "--in", str(path), "--out", str(tmp_path / "bad"), "--n-layers", "3"]) == 1
  assert "unknown options for generator: ['num_layers']" in capsys.readouterr().err


@pytest.mark.torch
def test_files_are_read_with_weights_only(tmp_path):
  torch = pytest.importorskip("torch")
  unet = _reference("unet")
  path = tmp_path / "milesial.pth"
  torch.save({**unet.state_dict(), "mask_values": [0, 1]}, path)
  conversion = convert.convert_file("unet", str(path))
  assert conversion.options["features"] == (4, 8, 16, 16) and "mask_values" in conversion.ignored
  unsafe = tmp_path / "pickled_object.pth"
  torch.save({"state_dict": unet.state_dict(), "config": TrainingOptions()}, unsafe)
  with pytest.raises(convert.WeightImportError, match="weights_only=True"):
    convert.convert_file("unet", str(unsafe))


def test_paired_ratios_compare_steps_of_the_same_round():
  from cmedl_jax.bench import step_bench

  # Round 2 ran under load for both frameworks: its ratio (2.0 / 1.0) is the same as the quiet rounds'.
  jax_times, torch_times = [0.5, 1.0, 0.4], [1.0, 2.0, 0.6]
  assert step_bench.paired_ratios(jax_times, torch_times) == pytest.approx((2.0, 1.5, 2.0))
  with pytest.raises(ValueError):
    step_bench.paired_ratios([], [])


def test_step_bench_runs_the_default_and_every_other_cpu_form_once(monkeypatch):
  from cmedl_jax.bench import step_bench
  spec = dict(config="quickstart", size=32, batch=2, conv_algorithm=None)
  for resolved in ("onednn", "xla"):  # what "auto" resolves to, with and without the library
    monkeypatch.setattr(ops, "cpu_form", lambda kernels, resolved=resolved: resolved)
    specs = step_bench.jax_runner_specs(spec, ["default", "onednn", "xla", "plain"])
    others = [f for f in ("onednn", "xla", "plain") if f != resolved]
    assert list(specs) == ["jax"] + [f"jax_{f}" for f in others]
    assert [s["conv_backend"] for s in specs.values()] == ["default"] + others
    assert all(s["kind"] == "jax" for s in specs.values())
  assert step_bench.jax_config({**spec, "conv_backend": "plain"}).conv_backend == "plain"
  assert step_bench.jax_config({**spec, "conv_backend": "default"}).conv_backend == "auto"
  with pytest.raises(SystemExit, match="unknown 'mkl'"):
    step_bench.jax_runner_specs(spec, ["mkl"])
