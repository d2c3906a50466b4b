"""Mixed precision (``config.compute_dtype="bfloat16"``): bfloat16 activations and convolutions, float32
parameters, optimizer states, BatchNorm statistics and loss reductions (docs/design.md, "Mixed precision").

The bfloat16 run's checkpoint/SIGKILL/resume contract is tests/test_reproducibility.py (which runs in bfloat16).
"""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmedl_jax import config_base
from cmedl_jax.train import methods
from cmedl_jax.train import state as state_lib
from cmedl_jax.train import step as step_lib
from tests.tiny import random_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CROP = 32  # the quickstart networks at half their crop: the dtypes, not the size, are under test


def _quickstart(compute_dtype, conv_backend="auto"):
  """configs/quickstart.py in ``compute_dtype``."""
  cfg = config_base.load_config_file(os.path.join(ROOT, "configs", "quickstart.py"))
  cfg.compute_dtype, cfg.conv_backend = compute_dtype, conv_backend
  return cfg


def _setup(cfg):
  nets = methods.build_networks(cfg)
  optimizers = state_lib.make_optimizers(cfg, nets)
  init = jax.jit(lambda k: state_lib.create_train_state(nets, cfg, optimizers, k, (CROP, CROP, 1)))
  mesh = step_lib.make_mesh(jax.devices()[:1])
  return nets, optimizers, state_lib.run_once(init, jax.random.key(0)), mesh


@pytest.fixture(scope="module")
def steps():
  """The quickstart networks' first step in float32 and 20 steps in bfloat16 from the same initial state."""
  out = {}
  for dtype in ("float32", "bfloat16"):
    cfg = _quickstart(dtype)
    nets, optimizers, state, mesh = _setup(cfg)
    fn = step_lib.make_train_step(nets, cfg, optimizers, mesh=mesh)
    metrics = []
    for i in range(20 if dtype == "bfloat16" else 1):
      state, m, _ = fn(state, step_lib.shard_batch(random_batch(i, crop=CROP), mesh))
      metrics.append(jax.device_get(m))
    out[dtype] = {"metrics": metrics, "state": jax.device_get(state), "nets": nets}
  return out


def test_bfloat16_first_step_losses_match_float32(steps):
  """Same weights and batch: every loss term within 2e-2 relative (or 1e-3 absolute) of float32."""
  f32, bf16 = steps["float32"]["metrics"][0], steps["bfloat16"]["metrics"][0]
  assert set(f32) == set(bf16)
  terms = [k for k in f32 if k != "finite" and not k.startswith("grad_norm")]
  assert {"g_adv_ct2mr", "cycle", "d_mr", "teacher_seg", "student_seg", "hint", "total"} <= set(terms)
  for k in terms:
    a, b = float(f32[k]), float(bf16[k])
    assert abs(b - a) <= max(2e-2 * abs(a), 1e-3), (k, a, b)
  # bfloat16 does change the arithmetic: the values are not float32's bit for bit
  assert any(float(f32[k]) != float(bf16[k]) for k in terms)


def test_twenty_bfloat16_steps_are_finite_and_the_state_stays_float32(steps):
  run = steps["bfloat16"]
  assert all(bool(m["finite"]) for m in run["metrics"])
  assert all(np.isfinite(float(v)) for m in run["metrics"] for v in m.values())
  state = run["state"]
  assert int(state.step) == 20
  for part in (state.params, state.opt_state, state.batch_stats):
    floats = [leaf for leaf in jax.tree.leaves(part) if jnp.issubdtype(leaf.dtype, jnp.floating)]
    assert floats and all(leaf.dtype == jnp.float32 for leaf in floats)
  # the updates reached every network
  f32_state = steps["float32"]["state"]
  for name in state.params:
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.params[name]),
                                                        jax.tree.leaves(f32_state.params[name]))), name


_CONVOLUTION = re.compile(r"stablehlo\.convolution.*:\s*\((tensor<[^>]*>),\s*(tensor<[^>]*>)\)\s*->\s*(tensor<[^>]*>)")


def _convolution_types(lowered_text):
  return [m.groups() for m in _CONVOLUTION.finditer(lowered_text)]


@pytest.mark.parametrize("compute_dtype,element", [("bfloat16", "bf16"), ("float32", "f32")])
def test_the_lowered_step_convolves_in_the_compute_dtype_with_float32_state(compute_dtype, element):
  """The program GPUs and TPUs get (the plain form): every convolution, forward and backward, in the compute
  dtype; the state's parameters and optimizer moments enter and leave it as float32."""
  cfg = _quickstart(compute_dtype, conv_backend="plain")
  nets, optimizers, state, mesh = _setup(cfg)
  fn = step_lib.make_train_step(nets, cfg, optimizers, mesh=mesh)
  batch = step_lib.shard_batch(random_batch(0, crop=CROP), mesh)
  lowered = fn.lower(state, batch)
  convolutions = _convolution_types(lowered.as_text())
  assert len(convolutions) > 50  # forward and backward of the generators, discriminators and segmenters
  for types in convolutions:
    assert all(t.endswith(f"x{element}>") for t in types), types
  out_state = jax.eval_shape(fn, state, batch)[0]
  for part in (out_state.params, out_state.opt_state, out_state.batch_stats):
    floats = [leaf for leaf in jax.tree.leaves(part) if jnp.issubdtype(leaf.dtype, jnp.floating)]
    assert floats and all(leaf.dtype == jnp.float32 for leaf in floats)


def test_bfloat16_inference_follows_float32_on_the_same_weights(steps):
  """The test-time forward of the student in bfloat16 against float32, same (trained) weights."""
  f32_nets, bf16_nets = steps["float32"]["nets"], steps["bfloat16"]["nets"]
  state = steps["bfloat16"]["state"]
  ct = random_batch(7, crop=CROP)["ct"]
  logits = {}
  for name, nets in (("f32", f32_nets), ("bf16", bf16_nets)):
    logits[name], _, _ = jax.jit(lambda p, s, x, n=nets: n.segment("student", p, s, x, train=False))(
        state.params["student"], state.batch_stats["student"], ct)
  assert logits["bf16"].dtype == jnp.float32
  scale = float(np.abs(logits["f32"]).max())
  np.testing.assert_allclose(logits["bf16"], logits["f32"], atol=3e-2 * scale)
  agree = np.mean(np.argmax(logits["bf16"], -1) == np.argmax(logits["f32"], -1))
  assert agree > 0.99
