"""The single CMEDL train step: one per-device function, run data-parallel by ``shard_map`` (default) or ``pmap``.

Everything trains concurrently from one scalar loss, the run's method's objective
(:func:`cmedl_jax.train.methods.compute_losses`; its gradient routing is set where that objective stops or scales
gradients). Per-group optax optimizers (gen, disc, seg) then apply the one gradient pytree. Gradients, losses and
BatchNorm statistics are averaged over the ``"data"`` axis.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cmedl_jax import ops
from cmedl_jax.train import methods
from cmedl_jax.train.networks import Networks
from cmedl_jax.train.state import AXIS, TrainState, split_groups


def _global_mean(x):
  return jax.lax.pmean(x, AXIS)


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
      grad_fn = jax.grad(functools.partial(methods.compute_losses, nets=nets, cfg=cfg), has_aux=True)
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
