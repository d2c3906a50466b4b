"""The method table: a method registered from outside trains through the one step, and no code outside the table
branches on method or translator names."""

import ast
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmedl_jax.train import losses, methods
from cmedl_jax.train import state as state_lib
from cmedl_jax.train import step as step_lib
from tests.tiny import random_batch, tiny_config

PACKAGE = os.path.join(os.path.dirname(__file__), "..", "cmedl_jax")


def _flip_consistency_loss(inputs, objective):
  """Toy method: the student on CT and on the left-right mirrored CT (label mirrored too)."""
  methods.segmentation_term(inputs, objective, "student", inputs.batch["ct"], "student_seg")
  nets, lc = inputs.nets, inputs.cfg.loss
  logits, _, objective.batch_stats["student"] = nets.segment(
      "student", inputs.params["student"], objective.batch_stats["student"], inputs.batch["ct"][:, :, ::-1])
  objective.add("mirrored_seg", losses.segmentation_loss(logits, inputs.batch["ct_label"][:, :, ::-1],
                                                         dice_weight=lc.dice_weight, dice_smooth=lc.dice_smooth), 0.5)


@pytest.fixture
def toy_method():
  toy = methods.register(methods.Method(
      "flip_consistency", "Flip", {"student": 1}, False, _flip_consistency_loss, ("student",),
      lambda nets, variables, ct: nets.segment("student", variables["params"]["student"],
                                               variables["batch_stats"]["student"], ct, train=False)[0]))
  yield toy
  del methods.METHODS[toy.name]


def test_a_registered_method_trains_a_step(toy_method):
  cfg = tiny_config(method=toy_method.name)
  cfg.optim.seg.update(name="sgd", lr=0.1)
  nets = methods.build_networks(cfg)
  assert nets.names == ("student",)
  optimizers = state_lib.make_optimizers(cfg, nets)
  assert list(optimizers) == ["seg"]
  state = state_lib.run_once(jax.jit(lambda k: state_lib.create_train_state(nets, cfg, optimizers, k, (32, 32, 1))),
                             jax.random.key(0))
  params0 = jax.device_get(state.params["student"])
  stats0 = jax.device_get(state.batch_stats["student"])
  batch = random_batch()
  mesh = step_lib.make_mesh()
  train_step = step_lib.make_train_step(nets, cfg, optimizers, mesh=mesh)
  new_state, metrics, _ = train_step(state, step_lib.shard_batch(batch, mesh))

  # Independently: the same loss on the whole batch, BatchNorm over the whole batch (no data axis), its gradient.
  whole = methods.networks_lib.build_modules(cfg.model, {"student": 1}, bn_axis_name=None)

  def loss(p):
    def seg(x, y, stats):
      logits, _, stats = whole.segment("student", p, stats, x)
      return losses.segmentation_loss(logits, y), stats
    plain, stats = seg(batch["ct"], batch["ct_label"], stats0)
    mirrored, _ = seg(batch["ct"][:, :, ::-1], batch["ct_label"][:, :, ::-1], stats)
    return plain + 0.5 * mirrored, (plain, mirrored)

  (total, (plain, mirrored)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params0)
  np.testing.assert_allclose(float(metrics["student_seg"]), float(plain), rtol=2e-5)
  np.testing.assert_allclose(float(metrics["mirrored_seg"]), float(mirrored), rtol=2e-5)
  np.testing.assert_allclose(float(metrics["total"]), float(total), rtol=2e-5)
  expected = jax.tree.map(lambda p, g: p - 0.1 * g, params0, grads)
  for got, want in zip(jax.tree.leaves(jax.device_get(new_state.params["student"])), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  assert int(new_state.step) == 1 and set(new_state.params) == {"student"} and new_state.pools == {}


def _branches_on_names(path, names):
  """(line, text) of every comparison in ``path`` against a string in ``names`` (==, !=, in, not in)."""
  tree = ast.parse(open(path).read(), path)
  found = []
  for node in ast.walk(tree):
    if not isinstance(node, ast.Compare):
      continue
    operands = [node.left] + list(node.comparators)
    strings = []
    for operand in operands:
      if isinstance(operand, ast.Constant) and isinstance(operand.value, str):
        strings.append(operand.value)
      elif isinstance(operand, (ast.Tuple, ast.List, ast.Set)):
        strings += [e.value for e in operand.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
    if set(strings) & names:
      found.append((node.lineno, ast.get_source_segment(open(path).read(), node)))
  return found


def test_no_code_outside_the_method_table_branches_on_method_or_translator_names():
  names = set(methods.METHODS) | set(methods.TRANSLATORS)
  # The PyTorch reference implements one method (cmedl + cyclegan) by design and says so when asked for another.
  exempt = {os.path.join("train", "methods.py"), os.path.join("torch_port", "reference_step.py")}
  offenders = []
  for folder, _, files in os.walk(PACKAGE):
    for name in files:
      path = os.path.join(folder, name)
      relative = os.path.relpath(path, PACKAGE)
      if name.endswith(".py") and relative not in exempt:
        offenders += [f"{relative}:{line}: {text}" for line, text in _branches_on_names(path, names)]
  assert not offenders, "\n".join(offenders)


def test_the_branch_detector_finds_branches(tmp_path):
  path = tmp_path / "module.py"
  path.write_text("def f(cfg):\n  if cfg.method == 'ct_only':\n    return 1\n  return cfg.translator in ('cut',)\n")
  assert [line for line, _ in _branches_on_names(str(path), {"ct_only", "cut"})] == [2, 4]


def test_every_method_names_its_networks_and_test_time_forward():
  for method in methods.METHODS.values():
    cfg = tiny_config(method=method.name)
    nets = methods.build_networks(cfg)
    assert set(method.test_time_networks) <= set(nets.names), method.name
    params, stats = jax.eval_shape(lambda k: methods.networks_lib.init_variables(nets, k, (32, 32, 1)),
                                   jax.random.key(0))
    variables = methods.test_time_variables(cfg, params, stats)
    logits = jax.eval_shape(lambda v, x: method.predict(nets, v, x), variables,
                            jax.ShapeDtypeStruct((2, 32, 32, 1), jnp.float32))
    assert logits.shape == (2, 32, 32, cfg.model.num_classes), method.name
