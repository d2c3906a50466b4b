"""The full CMEDL step (CycleGAN + teacher/student U-Nets) in JAX equals the PyTorch reference step from the same
weights and batches: every loss term, the per-group gradient norms, the parameters after SGD steps and the
BatchNorm statistics -- with the default CPU forms of the ops and with the plain forms GPU/TPU programs hold.

Both image pools are filling during these steps (pool_size >= images seen), so they return the new fakes in both
frameworks, and the generators have no dropout: those are the only random parts of the step. The CT images have no
flat (clipped) regions: equal neighbours give ties in the U-Nets' max pools, which PyTorch and XLA break differently
(both valid subgradients, but different gradients for the first encoder layers).
"""

import jax
import numpy as np
import pytest

from cmedl_jax.train import methods
from cmedl_jax.train import state as state_lib
from cmedl_jax.train import step as step_lib
from tests.tiny import random_batch, tiny_config

pytestmark = pytest.mark.torch

STEPS = 2
LOSS_VARIANTS = {
    "defaults": {},
    # other weights exercise the routing: lambda_seg scales only G's share of the teacher loss
    "reweighted": dict(lambda_seg=0.25, lambda_hint=2.0, lambda_identity=0.0, dice_weight=0.5),
}


def parity_config(**loss):
  cfg = tiny_config()  # 32 px, batch 8, U-Net (4, 8, 8), generators ngf 4 with 1 block, PatchGAN ndf 4
  cfg.pool_size = 8 * STEPS  # filling for every step: returns the new fakes
  for group in ("gen", "disc", "seg"):
    # SGD keeps updates proportional to gradients (Adam's first step turns float noise into lr-sized updates).
    cfg.optim[group].update(name="sgd", lr=0.001)
  cfg.loss.update(**loss)
  return cfg


def parity_batch(seed):
  """``tests.tiny.random_batch`` with CT = tanh(noise + lesion) instead of clipped noise (no max-pool ties)."""
  batch = random_batch(seed)
  noise = np.random.default_rng(100 + seed).normal(0, 0.3, batch["ct"].shape)
  batch["ct"] = np.tanh(noise + 0.5 * batch["ct_label"][..., None]).astype(np.float32)
  return batch


def run_both(cfg):
  """STEPS steps in both frameworks: (JAX metrics per step, torch metrics per step, JAX state, torch step)."""
  pytest.importorskip("torch")
  from cmedl_jax.torch_port import bridge, reference_step
  torch_step = reference_step.CMEDLStep.from_config(cfg, seed=0)
  nets = methods.build_networks(cfg)
  optimizers = state_lib.make_optimizers(cfg, nets)
  mesh = step_lib.make_mesh(jax.devices()[:1])
  state = bridge.train_state_from_torch(torch_step.state_dicts(), nets, cfg, optimizers, (32, 32, 1), mesh=mesh)
  initial = jax.device_get(state)
  train_step = step_lib.make_train_step(nets, cfg, optimizers, mesh=mesh)
  bn_counts = _record_batch_norm_counts(torch_step)
  jax_metrics, torch_metrics, jax_params, torch_params = [], [], [], []
  for i in range(STEPS):
    batch = parity_batch(i)
    state, metrics, _ = train_step(state, step_lib.shard_batch(batch, mesh))
    metrics = jax.device_get(metrics)
    assert metrics.pop("finite")  # the step's own flag (PyTorch's step has none): every term finite, update applied
    jax_metrics.append(metrics)
    torch_metrics.append(torch_step.step(batch))
    jax_params.append(jax.device_get(state.params))
    torch_params.append(bridge.variables_from_torch(torch_step.state_dicts(), nets, (32, 32, 1))[0])
  return dict(jax=jax_metrics, torch=torch_metrics, state=jax.device_get(state), initial=initial,
              torch_step=torch_step, nets=nets, bn_counts=bn_counts, jax_params=jax_params,
              torch_params=torch_params)


def _record_batch_norm_counts(torch_step):
  """{(network, BN module name): values per channel in the last training batch}, via forward hooks."""
  from torch import nn
  counts = {}
  for net_name in ("teacher", "student"):
    for name, module in torch_step.networks[net_name].named_modules():
      if isinstance(module, nn.BatchNorm2d):
        def hook(mod, inputs, output, key=(net_name, name)):
          counts[key] = inputs[0].numel() // inputs[0].shape[1]
        module.register_forward_hook(hook)
  return counts


# (loss variant, conv_backend): the default CPU forms with both variants, and the plain forms (what GPU/TPU run).
RUNS = [("defaults", "auto"), ("reweighted", "auto"), ("defaults", "plain")]


@pytest.fixture(scope="module", params=RUNS, ids=[f"{variant}-{backend}" for variant, backend in RUNS])
def runs(request):
  variant, backend = request.param
  cfg = parity_config(**LOSS_VARIANTS[variant])
  cfg.conv_backend = backend
  return variant, run_both(cfg)


def test_every_loss_term_and_gradient_norm_matches(runs):
  variant, r = runs
  for step, (jax_metrics, torch_metrics) in enumerate(zip(r["jax"], r["torch"])):
    assert set(jax_metrics) == set(torch_metrics)
    expected = {"g_adv_ct2mr", "g_adv_mr2ct", "cycle", "gen_total", "d_mr", "d_ct", "teacher_seg", "student_seg",
                "hint", "total", "grad_norm_gen", "grad_norm_disc", "grad_norm_seg"}
    assert expected <= set(jax_metrics)
    assert ("identity" in jax_metrics) == (variant == "defaults")
    # Step 1 (same weights, same batch) is held to 1e-4. Later steps start from generators that already differ
    # (the L1 sign effect of test_parameters_after_sgd_steps_match), so they get 5e-4 for losses and 5e-3 for the
    # gradient norms (seen: 1.4e-3 for the generators' at step 2).
    for key in sorted(jax_metrics):
      rtol = 1e-4 if step == 0 else (5e-3 if key.startswith("grad_norm") else 5e-4)
      np.testing.assert_allclose(float(jax_metrics[key]), torch_metrics[key], rtol=rtol, atol=1e-5,
                                 err_msg=f"{variant} step {step + 1}: {key}")


def _flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def test_parameters_after_sgd_steps_match(runs):
  """The updates (not only the parameters, which barely move at lr 0.001) agree, step by step.

  Errors are judged against each network's largest update: conv biases in front of an instance norm have a true
  gradient of zero and get rounding noise. The generators' cycle and identity losses are L1: a residual within
  float rounding of zero takes the sign the rounding gives it, and one such pixel of the 8192 moves a generator's
  gradient by ~2/sqrt(8192) of its size (measured: the generators' worst element 1e-3 of the largest update after
  step 1, while every other network is within 1e-4; with lambda_cycle = lambda_identity = 0 the generators too
  are within 3e-6). So generators are held to 5e-3 after step 1, and after step 2, when the networks already
  differ by that much, every network's whole update must point the same way (cosine) with the same length.
  """
  variant, r = runs
  for name in r["initial"].params:
    before = r["initial"].params[name]
    moved = jax.tree.map(lambda new, old: new - old, r["jax_params"][0][name], before)
    moved_t = jax.tree.map(lambda new, old: new - old, r["torch_params"][0][name], before)
    scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(moved_t))
    assert scale > 0, name
    tolerance = 5e-3 if name.startswith("gen") else 1e-4
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(moved), jax.tree.leaves(moved_t)):
      np.testing.assert_allclose(a, b, rtol=0, atol=tolerance * scale, err_msg=f"{variant} step 1 {name} {path}")
    total = _flat(r["jax_params"][-1][name]) - _flat(before)
    total_t = _flat(r["torch_params"][-1][name]) - _flat(before)
    cosine = total @ total_t / (np.linalg.norm(total) * np.linalg.norm(total_t))
    assert cosine > 0.999, (variant, name, cosine)  # measured >= 0.9996 (gen_mr2ct), others >= 0.99998
    np.testing.assert_allclose(np.linalg.norm(total), np.linalg.norm(total_t), rtol=1e-2, err_msg=name)  # seen: 2e-3


def test_batch_norm_statistics_match(runs):
  variant, r = runs
  decay = 0.9 ** STEPS  # flax momentum 0.9 = PyTorch momentum 0.1
  assert len(r["bn_counts"]) == 2 * 10  # U-Net (4, 8, 8): 5 DoubleConvs of 2 BNs, teacher and student
  for (net, module), n in r["bn_counts"].items():
    stats, before = _nested(r["state"].batch_stats[net], module), _nested(r["initial"].batch_stats[net], module)
    torch_bn = r["torch_step"].networks[net].get_submodule(module)
    np.testing.assert_allclose(stats["mean"], torch_bn.running_mean.numpy(), rtol=1e-4, atol=1e-6,
                               err_msg=f"{variant} {net} {module}")
    # PyTorch averages in the unbiased batch variance (x n / (n - 1)), flax the biased one; every step here has
    # the same n, so the accumulated batch parts differ by exactly that factor.
    accumulated = stats["var"] - decay * before["var"]
    accumulated_t = (torch_bn.running_var.numpy() - decay * before["var"]) * (n - 1) / n
    np.testing.assert_allclose(accumulated, accumulated_t, rtol=1e-4, atol=1e-6, err_msg=f"{variant} {net} {module}")


def _nested(tree, module_name):
  """The flax batch_stats entry of a PyTorch BN module name (``a.0.b.1`` -> tree["a_0"]["b_1"])."""
  from cmedl_jax.models import torch_names
  for part in torch_names.module_path(module_name + ".x"):
    tree = tree[part]
  return tree
