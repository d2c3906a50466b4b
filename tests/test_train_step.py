"""The single CMEDL step: gradient routing, backends and device counts, loss terms, all methods."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from cmedl_jax.train import image_pool, losses, methods
from cmedl_jax.train import state as state_lib
from cmedl_jax.train import step as step_lib
from tests.tiny import random_batch, tiny_config


def _setup(cfg):
  nets = methods.build_networks(cfg)
  optimizers = state_lib.make_optimizers(cfg, nets)
  init = jax.jit(lambda k: state_lib.create_train_state(nets, cfg, optimizers, k, (32, 32, 1)))
  state = state_lib.run_once(init, jax.random.key(0))
  return nets, optimizers, state


@pytest.fixture(scope="module")
def cmedl_setup():
  cfg = tiny_config()
  return (cfg,) + _setup(cfg)


# ---------------------------------------------------------------- loss terms against numpy


def test_cross_entropy_and_soft_dice_match_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5, 4, 2)).astype(np.float32)
  labels = rng.integers(0, 2, size=(3, 5, 4))
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  ce = -np.mean(np.log(np.take_along_axis(p, labels[..., None], -1)))
  np.testing.assert_allclose(losses.softmax_cross_entropy(logits, labels), ce, rtol=1e-5)
  inter = (p[..., 1] * labels).sum((1, 2))
  dice = (2 * inter + 1.0) / (p[..., 1].sum((1, 2)) + labels.sum((1, 2)) + 1.0)
  np.testing.assert_allclose(losses.soft_dice_loss(logits, labels), 1 - dice.mean(), rtol=1e-5)
  np.testing.assert_allclose(losses.segmentation_loss(logits, labels), ce + 1 - dice.mean(), rtol=1e-5)


def test_lsgan_and_hint_match_numpy():
  rng = np.random.default_rng(1)
  real, fake = rng.normal(size=(2, 6, 6, 1)), rng.normal(size=(2, 6, 6, 1))
  np.testing.assert_allclose(losses.lsgan_discriminator_loss(real, fake),
                             0.5 * (np.mean((real - 1) ** 2) + np.mean(fake ** 2)), rtol=1e-6)
  np.testing.assert_allclose(losses.lsgan_generator_loss(fake), np.mean((fake - 1) ** 2), rtol=1e-6)
  s = [rng.normal(size=(2, 4, 4, 3)), rng.normal(size=(2, 8, 8, 2))]
  t = [rng.normal(size=(2, 4, 4, 3)), rng.normal(size=(2, 8, 8, 2))]
  np.testing.assert_allclose(losses.hint_loss(s, t), sum(np.mean((a - b) ** 2) for a, b in zip(s, t)), rtol=1e-6)
  with pytest.raises(ValueError, match="differ in shape"):
    losses.hint_loss(s, t[::-1])


def test_scale_gradient():
  f = lambda x: jnp.sum(losses.scale_gradient(x, 0.25) ** 2)  # noqa: E731
  x = jnp.array([1.0, -2.0])
  np.testing.assert_allclose(f(x), 5.0)
  np.testing.assert_allclose(jax.grad(f)(x), 0.25 * 2 * x)


def test_image_pool_follows_cyclegan_semantics():
  query = jax.jit(image_pool.query_pool)
  pool = image_pool.init_pool(3, (1, 1, 1))
  images = jnp.arange(1.0, 3.0).reshape(2, 1, 1, 1)
  out, pool = query(pool, images, jax.random.key(0))
  np.testing.assert_array_equal(out, images)  # filling: returns the new images
  assert int(pool["count"]) == 2
  out, pool = query(pool, jnp.arange(3.0, 5.0).reshape(2, 1, 1, 1), jax.random.key(1))
  assert float(out[0, 0, 0, 0]) == 3.0 and int(pool["count"]) == 3  # third slot filled, returned as is
  # Full pool: each returned image is either the new one or a previously stored one, and about half are old.
  seen_old = 0
  for k in range(200):
    new = jnp.full((1, 1, 1, 1), 100.0 + k)
    before = set(np.asarray(pool["images"]).ravel().tolist())
    out, pool = query(pool, new, jax.random.key(10 + k))
    value = float(out[0, 0, 0, 0])
    assert value == 100.0 + k or value in before
    if value != 100.0 + k:
      seen_old += 1
      assert 100.0 + k in set(np.asarray(pool["images"]).ravel().tolist())  # the new one took its place
  assert 70 < seen_old < 130


# ---------------------------------------------------------------- gradient routing


PIECES = {
    "disc": [("d_mr", 1.0), ("d_ct", 1.0)],
    "gen": [("gen_total", 1.0)],
    "teacher": [("teacher_seg", 1.0)],
    "student": [("student_seg", 1.0)],
    "hint": [("hint", 1.0)],
}


def _grad_pieces(cfg, nets, st, batch, pieces=tuple(PIECES)):
  """Gradients of the total loss and of each named term, all under a 1-device "data" axis."""
  mesh = step_lib.make_mesh(jax.devices()[:1])
  key = jax.random.key(3)

  def per_device(params, batch):
    def term(name_weights, p):
      _, (metrics, *_rest) = methods.compute_losses(p, st.batch_stats, st.pools, batch, key, nets=nets, cfg=cfg)
      return sum(w * metrics[n] for n, w in name_weights)
    total = jax.grad(lambda p: methods.compute_losses(p, st.batch_stats, st.pools, batch, key, nets=nets,
                                                       cfg=cfg)[0])(params)
    out = {name: jax.grad(functools.partial(term, PIECES[name]))(params) for name in pieces}
    out["total"] = total
    return out

  fn = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("data")), out_specs=P(), check_vma=False))
  return jax.device_get(fn(st.params, batch))


def _norm(tree):
  return float(np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(tree))))


def _assert_tree_close(a, b):
  """Equal up to float rounding, judged against the tree's gradient scale (some entries, e.g. conv biases before
  an instance norm, have a true gradient of zero and only rounding noise)."""
  scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(b))
  assert scale > 0
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, atol=1e-5 * scale, rtol=1e-4)


def test_gradient_routing(cmedl_setup):
  cfg, nets, _, st = cmedl_setup
  g = _grad_pieces(cfg, nets, st, random_batch())
  lam_seg, lam_hint = cfg.loss.lambda_seg, cfg.loss.lambda_hint
  # The hint changes no teacher, generator or discriminator parameter; it reaches the student.
  for name in ("teacher", "gen_ct2mr", "gen_mr2ct", "disc_mr", "disc_ct"):
    assert _norm(g["hint"][name]) == 0.0, name
  assert _norm(g["hint"]["student"]) > 0
  # The teacher's segmentation loss reaches G_ct2mr (through pMRI), not F, D or the student.
  assert _norm(g["teacher"]["gen_ct2mr"]) > 0
  for name in ("gen_mr2ct", "disc_mr", "disc_ct", "student"):
    assert _norm(g["teacher"][name]) == 0.0, name
  # Generator adversarial terms do not train the discriminators.
  for name in ("disc_mr", "disc_ct", "teacher", "student"):
    assert _norm(g["gen"][name]) == 0.0, name
  # The discriminator losses reach only the discriminators (fakes are stop-gradient).
  for name in ("gen_ct2mr", "gen_mr2ct", "teacher", "student"):
    assert _norm(g["disc"][name]) == 0.0, name
  # Each group's total gradient is exactly its own terms.
  t = g["total"]
  _assert_tree_close(t["disc_mr"], g["disc"]["disc_mr"])
  _assert_tree_close(t["teacher"], g["teacher"]["teacher"])
  _assert_tree_close(t["student"], jax.tree.map(lambda a, b: a + lam_hint * b, g["student"]["student"],
                                                g["hint"]["student"]))
  _assert_tree_close(t["gen_ct2mr"], jax.tree.map(lambda a, b: a + lam_seg * b, g["gen"]["gen_ct2mr"],
                                                  g["teacher"]["gen_ct2mr"]))


def test_lambda_seg_scales_only_the_generator_share():
  cfg = tiny_config()
  cfg.loss.lambda_seg = 0.25
  nets, _, st = _setup(cfg)
  g = _grad_pieces(cfg, nets, st, random_batch(1), pieces=("teacher",))
  full = _grad_pieces(tiny_config(), nets, st, random_batch(1), pieces=("teacher",))
  # teacher_seg's gradient to G is scaled by lambda_seg through scale_gradient; to the teacher it is not.
  _assert_tree_close(g["teacher"]["gen_ct2mr"], jax.tree.map(lambda x: 0.25 * x, full["teacher"]["gen_ct2mr"]))
  _assert_tree_close(g["teacher"]["teacher"], full["teacher"]["teacher"])


# ---------------------------------------------------------------- backends and device counts


def _run(cfg, nets, optimizers, st, batches, backend, n_devices):
  if backend == "pmap":
    fn = step_lib.make_train_step(nets, cfg, optimizers, backend="pmap")
    s = step_lib.replicate(st, n_devices)
    for b in batches:
      s, m, _ = fn(s, jax.tree.map(lambda x: x.reshape((n_devices, -1) + x.shape[1:]), b))
    return jax.device_get(step_lib.unreplicate(m)), jax.device_get(step_lib.unreplicate(s).params)
  mesh = step_lib.make_mesh(jax.devices()[:n_devices])
  fn = step_lib.make_train_step(nets, cfg, optimizers, mesh=mesh)
  s = jax.tree.map(jnp.copy, st)
  for b in batches:
    s, m, _ = fn(s, step_lib.shard_batch(b, mesh))
  return jax.device_get(m), jax.device_get(s.params)


def test_shard_map_pmap_and_single_device_agree():
  """Same losses and params after two steps of the same global batches, whatever the backend and device count.

  SGD keeps updates proportional to gradients (Adam's first steps are sign-like and turn float noise in
  near-zero gradients into lr-sized differences), and a small lr keeps the GAN in its linear regime.
  """
  assert jax.device_count() == 8, "tests/conftest.py sets 8 virtual CPU devices"
  cfg = tiny_config()
  for group in ("gen", "disc", "seg"):
    cfg.optim[group].update(name="sgd", lr=1e-4)
  nets, optimizers, st = _setup(cfg)
  batches = [random_batch(0), random_batch(1)]
  results = {
      "shard_map x8": _run(cfg, nets, optimizers, st, batches, "shard_map", 8),
      "shard_map x1": _run(cfg, nets, optimizers, st, batches, "shard_map", 1),
      "pmap x8": _run(cfg, nets, optimizers, st, batches, "pmap", 8),
  }
  ref_metrics, ref_params = results["shard_map x1"]
  for name, (metrics, params) in results.items():
    for k in ref_metrics:
      # Gradient norms are summed in another order over 8 devices; the generators' L1 terms turn a residual at
      # rounding distance from zero into either sign (see test_torch_step_parity), so they get 1e-4 (seen: 2.2e-5).
      rtol = 1e-4 if k.startswith("grad_norm") else 2e-5
      np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=rtol, atol=1e-6, err_msg=f"{name} {k}")
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
      np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5, err_msg=name)
  assert set(ref_metrics) >= {"g_adv_ct2mr", "g_adv_mr2ct", "cycle", "identity", "d_mr", "d_ct", "teacher_seg",
                              "student_seg", "hint", "total"}


def test_run_once_keeps_values_and_shardings(cmedl_setup):
  """run_once (the state's init, compiled without LLVM optimisation on CPU) = the plain jitted call up to 1 ulp."""
  _, nets, _, _ = cmedl_setup
  mesh = step_lib.make_mesh(jax.devices()[:2])
  replicated = jax.sharding.NamedSharding(mesh, P())
  init = jax.jit(lambda k: nets["disc_mr"].init(k, jnp.zeros((1, 32, 32, 1)))["params"], out_shardings=replicated)
  key = jax.random.key(3)
  fast, plain = state_lib.run_once(init, key), init(key)
  assert jax.tree.structure(fast) == jax.tree.structure(plain)
  for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(plain)):
    assert a.sharding == replicated and a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=4e-7, atol=1e-9)
  assert any(float(jnp.std(leaf)) > 0 for leaf in jax.tree.leaves(fast))  # real random kernels, not zeros


def test_state_is_updated_and_step_counts(cmedl_setup):
  cfg, nets, optimizers, st = cmedl_setup
  mesh = step_lib.make_mesh()
  fn = step_lib.make_train_step(nets, cfg, optimizers, mesh=mesh)
  s, _, images = fn(jax.tree.map(jnp.copy, st), step_lib.shard_batch(random_batch(), mesh))
  assert int(s.step) == 1 and int(s.pools["mr"]["count"]) == 4  # pool of 4 filled by the 8 fakes
  for name in st.params:
    assert _norm(jax.tree.map(lambda a, b: a - b, s.params[name], st.params[name])) > 0, name
  assert images["pmri"].shape == (8, 32, 32, 1) and images["student_logits"].shape == (8, 32, 32, 2)
  stats_changed = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), s.batch_stats, st.batch_stats)
  assert max(jax.tree.leaves(stats_changed)) > 0


@pytest.mark.parametrize("poisoned", ["ct", "mri"])
def test_a_non_finite_step_leaves_the_whole_state_unchanged(cmedl_setup, poisoned):
  # A NaN CT reaches every loss; a NaN MRI the translators' and discriminators' losses only (the student's stay
  # finite): either way no update at all, as optax.apply_if_finite. The check is on device: the step's flag.
  cfg, nets, optimizers, st = cmedl_setup
  mesh = step_lib.make_mesh(jax.devices()[:2])
  fn = step_lib.make_train_step(nets, cfg, optimizers, mesh=mesh)
  batch = random_batch()
  batch[poisoned] = batch[poisoned].copy()
  batch[poisoned][3, 5, 7, 0] = np.nan
  before = jax.device_get(jax.tree.map(jnp.copy, st))
  after, metrics, _ = fn(jax.tree.map(jnp.copy, st), step_lib.shard_batch(batch, mesh))
  metrics = jax.device_get(metrics)
  assert not metrics["finite"] and not np.isfinite(metrics["total"])
  assert (poisoned == "mri") == bool(np.isfinite(metrics["student_seg"]))
  after = jax.device_get(after)
  assert jax.tree.structure(after) == jax.tree.structure(before)
  for a, b in zip(jax.tree.leaves(after.replace(rng=None)), jax.tree.leaves(before.replace(rng=None))):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(jax.random.key_data(after.rng), jax.random.key_data(before.rng))
  _, clean, _ = fn(jax.tree.map(jnp.copy, st), step_lib.shard_batch(random_batch(), mesh))
  assert bool(clean["finite"])


@pytest.mark.parametrize("method,translator,expected", [
    ("ct_only", "cyclegan", {"student_seg"}),
    ("pmri_only", "cyclegan", {"teacher_seg", "cycle", "d_mr"}),
    ("ct_pmri_concat", "cyclegan", {"student_seg", "cycle"}),
    ("cmedl", "cut", {"nce", "nce_identity", "hint", "teacher_seg", "d_mr"}),
])
def test_every_method_takes_a_finite_step(method, translator, expected):
  cfg = tiny_config(method, translator)
  nets, optimizers, st = _setup(cfg)
  metrics, params = _run(cfg, nets, optimizers, st, [random_batch()], "shard_map", 8)
  assert expected <= set(metrics)
  assert all(np.isfinite(v) for v in metrics.values())
  networks_used = set(params)
  if method == "ct_only":
    assert networks_used == {"student"}
  if translator == "cut":
    assert "gen_mr2ct" not in networks_used and "nce_head" in networks_used and "cycle" not in metrics
  if method == "ct_pmri_concat":  # the student's first conv reads [CT, pMRI]
    assert any(x.ndim == 4 and x.shape[2] == 2 for x in jax.tree.leaves(params["student"]))
