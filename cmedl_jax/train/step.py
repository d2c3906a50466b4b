"""The single CMEDL train step: one per-device function, run data-parallel by ``shard_map`` (default) or ``pmap``.

Everything trains concurrently from one scalar loss whose gradient routing is set by where gradients are stopped
(docs/design.md, "Gradient routing"):

- the generators get adversarial + cycle + identity (CycleGAN) or adversarial + PatchNCE (CUT) terms, and
  ``lambda_seg`` times the teacher's segmentation loss on pMRI = G_ct2mr(CT) (``scale_gradient``);
- the teacher gets its segmentation loss on pMRI (full weight);
- the student gets its segmentation loss on CT plus ``lambda_hint`` times the hint loss against
  stop_gradient(teacher features): the hint changes neither teacher nor generator;
- the discriminators get the LSGAN loss on real images vs pooled stop-gradient fakes; in the generators'
  adversarial terms the discriminator parameters are stop-gradient, so those terms train only the generators.

Per-group optax optimizers (gen, disc, seg) then apply the one gradient pytree. Gradients, losses and BatchNorm
statistics are averaged over the ``"data"`` axis. The image pools are queried on the all-gathered global batch
with a key shared by all devices, so the numbers do not depend on the device count.

Methods (``config.method``): ``cmedl`` (translator + teacher + student), ``ct_only`` (student only),
``pmri_only`` (translator + teacher; at test time teacher(G(CT))), ``ct_pmri_concat`` (translator + a student on
the two-channel [CT, G(CT)] input).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cmedl_jax import ops
from cmedl_jax.train import image_pool, losses
from cmedl_jax.train.networks import Networks
from cmedl_jax.train.state import AXIS, TrainState, split_groups


def _global_mean(x):
  return jax.lax.pmean(x, AXIS)


def _local_slice(global_array, local_batch):
  """This device's rows of an all-gathered (global) batch."""
  start = jax.lax.axis_index(AXIS) * local_batch
  return jax.lax.dynamic_slice_in_dim(global_array, start, local_batch, axis=0)


def compute_losses(params, batch_stats, pools, batch, key, *, nets: Networks, cfg):
  """The CMEDL objective on one device's batch.

  Returns:
    (total loss, (metrics dict, new batch_stats, new pools, images for previews)).
  """
  lc = cfg.loss
  method = cfg.method
  ct, label, mri = batch["ct"], batch["ct_label"], batch["mri"]
  local_batch = ct.shape[0]
  metrics, new_stats, new_pools, images = {}, dict(batch_stats), dict(pools), {}
  k_pool_mr, k_pool_ct, k_nce, k_nce_idt, k_drop = jax.random.split(key, 5)
  total = 0.0
  uses_translator = method != "ct_only"

  if uses_translator:
    g_params = params["gen_ct2mr"]
    pmri = nets.generate(nets.gen_ct2mr, g_params, ct, k_drop)
    images["pmri"] = pmri
    d_mr_frozen = jax.lax.stop_gradient(params["disc_mr"])
    adv = losses.lsgan_generator_loss(nets.discriminate(nets.disc_mr, d_mr_frozen, pmri))
    metrics["g_adv_ct2mr"] = adv
    gen_loss = adv
    if cfg.translator == "cyclegan":
      f_params = params["gen_mr2ct"]
      pct = nets.generate(nets.gen_mr2ct, f_params, mri, jax.random.fold_in(k_drop, 1))
      rec_ct = nets.generate(nets.gen_mr2ct, f_params, pmri, jax.random.fold_in(k_drop, 2))
      rec_mr = nets.generate(nets.gen_ct2mr, g_params, pct, jax.random.fold_in(k_drop, 3))
      images.update(pct=pct, rec_ct=rec_ct)
      d_ct_frozen = jax.lax.stop_gradient(params["disc_ct"])
      adv_f = losses.lsgan_generator_loss(nets.discriminate(nets.disc_ct, d_ct_frozen, pct))
      cycle = losses.l1(rec_ct, ct) + losses.l1(rec_mr, mri)
      gen_loss = gen_loss + adv_f + lc.lambda_cycle * cycle
      metrics.update(g_adv_mr2ct=adv_f, cycle=cycle)
      if lc.lambda_identity > 0:
        idt = (losses.l1(nets.generate(nets.gen_ct2mr, g_params, mri, jax.random.fold_in(k_drop, 4)), mri)
               + losses.l1(nets.generate(nets.gen_mr2ct, f_params, ct, jax.random.fold_in(k_drop, 5)), ct))
        gen_loss = gen_loss + lc.lambda_cycle * lc.lambda_identity * idt
        metrics["identity"] = idt
    else:  # CUT: PatchNCE between the CT and its translation, plus the identity NCE on MRI.
      nce = nets.patch_nce(g_params, params["nce_head"], ct, pmri, k_nce)
      metrics["nce"] = nce
      if lc.nce_identity:
        idt_mr = nets.generate(nets.gen_ct2mr, g_params, mri, jax.random.fold_in(k_drop, 4))
        nce_idt = nets.patch_nce(g_params, params["nce_head"], mri, idt_mr, k_nce_idt)
        metrics["nce_identity"] = nce_idt
        nce = 0.5 * (nce + nce_idt)
      gen_loss = gen_loss + lc.lambda_nce * nce
    total = total + gen_loss
    metrics["gen_total"] = gen_loss

    # Discriminators on real vs pooled fakes. The pool is global: gather, query with the shared key, slice.
    pooled_mr, new_pools["mr"] = image_pool.query_pool(
        pools["mr"], jax.lax.all_gather(jax.lax.stop_gradient(pmri), AXIS, tiled=True), k_pool_mr)
    d_mr = losses.lsgan_discriminator_loss(nets.discriminate(nets.disc_mr, params["disc_mr"], mri),
                                           nets.discriminate(nets.disc_mr, params["disc_mr"],
                                                             _local_slice(pooled_mr, local_batch)))
    metrics["d_mr"] = d_mr
    total = total + d_mr
    if cfg.translator == "cyclegan":
      pooled_ct, new_pools["ct"] = image_pool.query_pool(
          pools["ct"], jax.lax.all_gather(jax.lax.stop_gradient(images["pct"]), AXIS, tiled=True), k_pool_ct)
      d_ct = losses.lsgan_discriminator_loss(nets.discriminate(nets.disc_ct, params["disc_ct"], ct),
                                             nets.discriminate(nets.disc_ct, params["disc_ct"],
                                                               _local_slice(pooled_ct, local_batch)))
      metrics["d_ct"] = d_ct
      total = total + d_ct

  seg_kwargs = dict(dice_weight=lc.dice_weight, dice_smooth=lc.dice_smooth)
  teacher_features = None
  if method in ("cmedl", "pmri_only"):
    # Full gradient to the teacher, lambda_seg of it to the generator.
    teacher_in = losses.scale_gradient(images["pmri"], lc.lambda_seg)
    t_logits, teacher_features, new_stats["teacher"] = nets.segment(
        nets.teacher, params["teacher"], batch_stats["teacher"], teacher_in)
    teacher_loss = losses.segmentation_loss(t_logits, label, **seg_kwargs)
    metrics["teacher_seg"] = teacher_loss
    total = total + teacher_loss
    images["teacher_logits"] = t_logits

  if method in ("cmedl", "ct_only", "ct_pmri_concat"):
    student_in = ct
    if method == "ct_pmri_concat":
      # The concat student's pMRI channel is an input, not a path into the generator.
      student_in = jnp.concatenate([ct, jax.lax.stop_gradient(images["pmri"])], axis=-1)
    s_logits, student_features, new_stats["student"] = nets.segment(
        nets.student, params["student"], batch_stats["student"], student_in)
    student_loss = losses.segmentation_loss(s_logits, label, **seg_kwargs)
    metrics["student_seg"] = student_loss
    total = total + student_loss
    images["student_logits"] = s_logits
    if method == "cmedl" and lc.lambda_hint > 0:
      names = nets.hint_names(cfg.model.hint_features)
      hint = losses.hint_loss([student_features[n] for n in names], [teacher_features[n] for n in names])
      metrics["hint"] = hint
      total = total + lc.lambda_hint * hint

  metrics["total"] = total
  return total, (metrics, new_stats, new_pools, images)


def make_per_device_step(nets: Networks, cfg, optimizers):
  """The step run on every device (``axis_name="data"``): (state, local batch) -> (state, metrics, images).

  The ops inside it use the config's kernels (``conv_backend``, ``conv_algorithm``; :mod:`cmedl_jax.ops`), set
  while the step is traced. ``metrics["finite"]`` says whether every loss and gradient norm of the step was finite;
  where one is not, the step applies no update: the returned state is the input state, unchanged in every leaf
  (params, optimizer states, batch statistics, image pools, step), as ``optax.apply_if_finite`` skips updates.
  """
  kernels = ops.from_config(cfg)

  def step_fn(state: TrainState, batch):
    with ops.use(kernels):
      key = jax.random.fold_in(state.rng, state.step)
      grad_fn = jax.grad(functools.partial(compute_losses, nets=nets, cfg=cfg), has_aux=True)
      grads, (metrics, batch_stats, pools, images) = grad_fn(state.params, state.batch_stats, state.pools, batch,
                                                             key)
    grads = _global_mean(grads)
    metrics = _global_mean(metrics)
    # BN statistics are already computed over the global batch (BatchNorm axis_name); the mean only removes
    # float noise between devices.
    batch_stats = _global_mean(batch_stats)
    new_params, new_opt_state = {}, {}
    grouped_grads, grouped_params = split_groups(grads), split_groups(state.params)
    for group, opt in optimizers.items():
      updates, new_opt_state[group] = opt.update(grouped_grads[group], state.opt_state[group],
                                                 grouped_params[group])
      new_params.update(optax.apply_updates(grouped_params[group], updates))
      metrics[f"grad_norm_{group}"] = optax.tree.norm(grouped_grads[group])
    # The metrics are global means, so every device takes the same decision.
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in jax.tree.leaves(metrics)]))

    def if_finite(new, old):
      return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)

    new_state = state.replace(step=if_finite(state.step + 1, state.step), params=if_finite(new_params, state.params),
                              batch_stats=if_finite(batch_stats, state.batch_stats),
                              opt_state=if_finite(new_opt_state, state.opt_state), pools=if_finite(pools, state.pools))
    metrics["finite"] = finite
    return new_state, metrics, images

  return step_fn


def make_mesh(devices=None):
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices, (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def make_train_step(nets: Networks, cfg, optimizers, *, mesh=None, backend="shard_map"):
  """Returns ``train_step(state, batch) -> (state, metrics, images)``.

  shard_map backend: ``state`` replicated, ``batch`` sharded on its leading axis over ``mesh``; jitted with the
  state donated. pmap backend: ``state`` and ``batch`` carry a leading device axis (see :func:`replicate`).
  Both run the same per-device function.
  """
  step_fn = make_per_device_step(nets, cfg, optimizers)
  if backend == "pmap":
    return jax.pmap(step_fn, axis_name=AXIS, donate_argnums=(0,))
  if backend != "shard_map":
    raise ValueError(f"unknown backend {backend!r}; expected 'shard_map' or 'pmap'")
  mesh = mesh or make_mesh()
  sharded = jax.shard_map(step_fn, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=(P(), P(), P(AXIS)),
                          check_vma=False)
  return jax.jit(sharded, donate_argnums=(0,))


def replicate(tree, num_devices=None):
  """pmap layout: a leading axis holding one copy per local device (pmap spreads it over the devices)."""
  n = jax.local_device_count() if num_devices is None else int(num_devices)
  return jax.tree.map(lambda x: jnp.stack([x] * n), tree)


def unreplicate(tree):
  return jax.tree.map(lambda x: x[0], tree)


def shard_batch(batch, mesh):
  """Places a host batch (global, or this process's part) on ``mesh`` split along the leading axis."""
  sharding = NamedSharding(mesh, P(AXIS))
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)
