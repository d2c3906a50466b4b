"""The ops' entry points (cmedl_jax.ops): every CPU form against the plain form, and what each platform's program holds.

GPU and TPU programs are lowered here without an accelerator (``Traced.lower(lowering_platforms=...)``): they must
hold the plain form only -- no custom call, no optimization barrier, no matrix-product kernel gradients, i.e. the
same convolutions and products as ``lax.conv_general_dilated`` / ``reduce_window`` differentiated by ``jax.grad``.
"""

import collections
import os
import re
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmedl_jax import ops
from cmedl_jax.ops import backend as backend_lib
from cmedl_jax.ops import onednn
from tests.tiny import random_batch, tiny_config

PLAIN = ops.Kernels("plain")
CPU_FORMS = {"onednn": ops.Kernels("onednn"), "onednn-direct": ops.Kernels("onednn", "direct"),
             "xla": ops.Kernels("xla")}
ACCELERATORS = ("cuda", "tpu")
# Ops whose kind and count the plain program fixes; the CPU forms add barriers, products and custom calls.
COMPUTE_OPS = ("convolution", "dot_general", "reduce_window", "select_and_scatter", "custom_call",
               "optimization_barrier")


def _random(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _network_like(kernels):
  """A loss over every op and form the networks use: 7x7 reflect-padded, 3x3 stride 2, 4x4 stride 2, a one-channel
  output layer, 2x2 max pooling and a CycleGAN up layer; returns loss(x, k7, k3, k4, kt, k1)."""
  from cmedl_jax.models import layers

  def loss(x, k7, k3, k4, kt, k1):
    y = jnp.tanh(layers.conv2d(x, k7, padding=3, padding_mode="reflect"))
    y = jnp.tanh(layers.conv2d(y, k3, stride=2, padding=1))
    y = ops.max_pool_2x2(jnp.tanh(layers.conv2d(y, k4, stride=2, padding=1)))
    y = jnp.tanh(ops.conv_transpose2d(y, kt, stride=2, padding=1, output_padding=1))
    return jnp.sum(jnp.sin(layers.conv2d(y, k1, padding=1)))

  return ops.using(kernels, loss)


def _network_arguments():
  shapes = [(2, 34, 30, 1), (7, 7, 1, 8), (3, 3, 8, 16), (4, 4, 16, 16), (3, 3, 16, 8), (3, 3, 8, 1)]
  return [_random(shape, seed) for seed, shape in enumerate(shapes)]


@pytest.mark.parametrize("form", sorted(CPU_FORMS))
def test_every_cpu_form_gives_the_values_and_gradients_of_the_plain_form(form, request):
  if form.startswith("onednn"):
    request.getfixturevalue("onednn_library")
  args = _network_arguments()
  value_and_grads = lambda kernels: jax.jit(jax.value_and_grad(_network_like(kernels), argnums=range(6)))  # noqa
  (value, grads), (ref_value, ref_grads) = value_and_grads(CPU_FORMS[form])(*args), value_and_grads(PLAIN)(*args)
  np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-5)
  for got, want in zip(grads, ref_grads):
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-4 * scale)


@pytest.mark.parametrize("form", sorted(CPU_FORMS))
def test_gradients_under_shard_map_with_checked_types_are_those_of_the_plain_form(form, request):
  # shard_map's check_vma (its default) types values as varying across devices or not: a kernel replicated over
  # the mesh gets the sum of the devices' gradients, and platform_dependent's branches must have equal types.
  if form.startswith("onednn"):
    request.getfixturevalue("onednn_library")
  from jax.sharding import PartitionSpec as P
  from cmedl_jax.train import step as step_lib
  mesh = step_lib.make_mesh(jax.devices()[:2])
  x, k7, k3, k4, kt, k1 = _network_arguments()

  def grads(kernels):
    loss = _network_like(kernels)
    per_device = lambda x, *ks: jax.grad(lambda ks: loss(x, *ks))(ks)  # noqa: E731
    return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P("data"),) + (P(),) * 5, out_specs=P()))

  got, want = grads(CPU_FORMS[form])(x, k7, k3, k4, kt, k1), grads(PLAIN)(x, k7, k3, k4, kt, k1)
  whole_batch = jax.grad(lambda ks: _network_like(PLAIN)(x, *ks))((k7, k3, k4, kt, k1))
  for a, b, c in zip(got, want, whole_batch):
    scale = float(jnp.max(jnp.abs(c)))
    np.testing.assert_allclose(np.asarray(b), np.asarray(c), rtol=0, atol=1e-4 * scale)
    np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=0, atol=1e-4 * scale)


def _lowered(fn, args, platform):
  return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def _compute_ops(program):
  """{op: count} of COMPUTE_OPS, and the convolutions' and products' operand types and attributes, SSA names removed."""
  counts = collections.Counter(op for op in COMPUTE_OPS for _ in re.finditer(rf"stablehlo\.{op}\b", program))
  signatures = sorted(re.sub(r"%[\w#.]+", "%", line.strip()) for line in program.splitlines()
                      if re.search(r"stablehlo\.(convolution|dot_general)\b", line))
  return counts, signatures


def test_cpu_programs_hold_the_chosen_form(onednn_library):
  args = _network_arguments()
  grads = lambda kernels: jax.value_and_grad(_network_like(kernels), argnums=range(6))  # noqa: E731
  program = _lowered(grads(CPU_FORMS["onednn"]), args, "cpu")
  for target in ("CmedlOnednnConvForward", "CmedlOnednnConvBackwardData", "CmedlOnednnConvBackwardWeights"):
    assert target in program
  xla, plain = (_compute_ops(_lowered(grads(CPU_FORMS[name] if name == "xla" else PLAIN), args, "cpu"))
                for name in ("xla", "plain"))
  assert xla[0]["custom_call"] == 0 and xla != plain  # e.g. the unpadded 7x7 run as a padded one, then cropped
  with jax.enable_x64():  # the library is float32 only: other dtypes take the XLA forms
    args64 = [jnp.asarray(a, jnp.float64) for a in args]
    assert "CmedlOnednnConv" not in _lowered(grads(CPU_FORMS["onednn"]), args64, "cpu")


@pytest.mark.parametrize("platform", ACCELERATORS)
@pytest.mark.parametrize("form", sorted(CPU_FORMS))
def test_accelerator_programs_hold_the_plain_form_whatever_the_cpu_form(form, platform, request):
  if form.startswith("onednn"):
    request.getfixturevalue("onednn_library")
  args = _network_arguments()
  grads = lambda kernels: jax.value_and_grad(_network_like(kernels), argnums=range(6))  # noqa: E731
  program = _lowered(grads(CPU_FORMS[form]), args, platform)
  counts, signatures = _compute_ops(program)
  assert counts["custom_call"] == 0 and counts["optimization_barrier"] == 0, counts
  assert (counts, signatures) == _compute_ops(_lowered(grads(PLAIN), args, platform))
  assert counts["convolution"] == 15 and counts["dot_general"] == 0  # 5 layers x (forward, dx, dw)


@pytest.mark.parametrize("platform", ACCELERATORS)
def test_train_step_for_gpu_and_tpu_is_plain_lax_and_jax_grad(platform):
  # The whole CMEDL step of the default configuration (CPU form "auto"), lowered for an accelerator, against the
  # same step built with the plain form everywhere.
  from cmedl_jax.train import methods, state as state_lib, step as step_lib
  programs = {}
  for name in ("auto", "plain"):
    cfg = tiny_config()
    cfg.conv_backend = name
    nets = methods.build_networks(cfg)
    optimizers = state_lib.make_optimizers(cfg, nets)
    mesh = step_lib.make_mesh(jax.devices()[:1])
    state = jax.eval_shape(lambda k: state_lib.create_train_state(nets, cfg, optimizers, k, (32, 32, 1)),
                           jax.random.key(0))
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in random_batch().items()}
    train_step = step_lib.make_train_step(nets, cfg, optimizers, mesh=mesh)
    programs[name] = train_step.trace(state, batch).lower(lowering_platforms=(platform,)).as_text()
  counts, signatures = _compute_ops(programs["auto"])
  assert counts["custom_call"] == 0 and counts["optimization_barrier"] == 0, counts
  assert counts["convolution"] > 100
  assert (counts, signatures) == _compute_ops(programs["plain"])


# ---------------------------------------------------------------------------------------------- the choice
def test_kernels_reject_unknown_names():
  with pytest.raises(ValueError, match="conv_backend must be one of"):
    ops.Kernels("mkl")
  with pytest.raises(ValueError, match="conv_algorithm must be one of"):
    ops.Kernels("onednn", "fft")


def test_use_and_using_set_the_kernels_of_what_they_trace():
  assert ops.current() == ops.Kernels()
  with ops.use(PLAIN):
    assert ops.current() == PLAIN
    with ops.use(CPU_FORMS["xla"]):
      assert ops.current() == CPU_FORMS["xla"]
    assert ops.current() == PLAIN
  assert ops.current() == ops.Kernels()
  seen = []
  traced = jax.jit(ops.using(PLAIN, lambda x: seen.append(ops.current()) or x + 1))
  traced(1.0)
  traced(jnp.ones(3))  # a second trace sees the same kernels
  assert seen == [PLAIN, PLAIN] and ops.current() == ops.Kernels()


def test_from_config_reads_the_run_fields_with_defaults_for_old_runs():
  cfg = tiny_config()
  assert ops.from_config(cfg) == ops.Kernels("auto", "winograd")
  cfg.conv_backend, cfg.conv_algorithm = "xla", "direct"
  assert ops.from_config(cfg) == ops.Kernels("xla", "direct")
  assert ops.from_config({}) == ops.Kernels()


def test_auto_falls_back_to_xla_with_one_warning(monkeypatch):
  monkeypatch.setattr(onednn, "available", lambda: False)
  monkeypatch.setattr(onednn, "unavailable_reason", lambda: "no C++ compiler found")
  monkeypatch.setattr(backend_lib, "_warned_fallback", [])
  with pytest.warns(UserWarning, match=r"no C\+\+ compiler found"):
    assert ops.cpu_form(ops.Kernels("auto")) == "xla"
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert ops.cpu_form(ops.Kernels("auto")) == "xla"
  assert ops.cpu_form(PLAIN) == "plain"


@pytest.mark.parametrize("backend", ["auto", "onednn"])
def test_nothing_is_built_in_a_gpu_or_tpu_process(monkeypatch, backend):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(onednn, "available", lambda: pytest.fail("the library was asked for"))
  monkeypatch.setattr(onednn, "load", lambda: pytest.fail("the library was asked for"))
  assert ops.cpu_form(ops.Kernels(backend)) == "xla"


def test_onednn_fails_where_the_library_is_missing(monkeypatch):
  def missing():
    raise onednn.OnednnUnavailable("no C++ compiler found")
  monkeypatch.setattr(onednn, "load", missing)
  with pytest.raises(onednn.OnednnUnavailable, match="no C"):
    ops.cpu_form(ops.Kernels("onednn"))


def test_importing_and_building_the_networks_builds_no_cpp(tmp_path):
  code = ("import jax, os\n"
          "from cmedl_jax import models\n"
          "from cmedl_jax.train import methods, trainer\n"
          "from tests.tiny import tiny_config\n"
          "nets = methods.build_networks(tiny_config())\n"
          "from cmedl_jax.ops import onednn\n"
          "print(sorted(onednn._state), os.listdir(os.environ['CMEDL_ONEDNN_CACHE']))\n")
  env = dict(os.environ, CMEDL_ONEDNN_CACHE=str(tmp_path))
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip() == "[] []"
