"""The train state pytree and its creation."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp

from cmedl_jax.train import image_pool, optim
from cmedl_jax.train.networks import GROUPS, ROLES, Networks, init_variables

AXIS = "data"


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training, as one pytree.

  Attributes:
    step: () int32.
    params: {network name: params} for the networks of the method.
    batch_stats: {segmenter name: BatchNorm statistics}.
    opt_state: {group: optax state} for the groups in use.
    pools: {"mr": pool, "ct": pool} of generated images (CycleGAN history).
    rng: PRNG key; the step's randomness is ``fold_in(rng, step)``.
  """

  step: Any
  params: Any
  batch_stats: Any
  opt_state: Any
  pools: Any
  rng: Any


def split_groups(tree):
  """{network name: x} -> {optimizer group: {network name: x}} for the groups that have networks."""
  out = {g: {} for g in GROUPS}
  for name, value in tree.items():
    out[ROLES[name].group][name] = value
  return {g: v for g, v in out.items() if v}


def make_optimizers(cfg, nets: Networks):
  """One optax optimizer per parameter group in use (gen, disc, seg), from ``cfg.optim[group]``."""
  groups = [g for g in GROUPS if any(ROLES[n].group == g for n in nets.names)]
  return {group: optim.make_optimizer(cfg.optim[group], cfg.train.total_steps) for group in groups}


def create_train_state(nets: Networks, cfg, optimizers, key, image_shape) -> TrainState:
  """Initial state: params, BN statistics, optimizer states, empty pools, rng, step 0. Jit it (fast init)."""
  init_key, train_key = jax.random.split(key)
  params, batch_stats = init_variables(nets, init_key, image_shape)
  return state_from_variables(nets, cfg, optimizers, params, batch_stats, train_key, image_shape)


# XLA:CPU spends most of the state's compile time optimising the unrolled random initialisers with LLVM, for a
# function that runs once: without that optimisation the tiny test networks' init compiles in 5 s instead of 27 s;
# the values are the same up to 1 ulp (fused multiply-adds) in ~4% of the kernel entries.
_RUN_ONCE_OPTIONS = {"cpu": {"xla_backend_optimization_level": 0}}


def run_once(jitted, *args):
  """``jitted(*args)`` for a jitted function that runs once (e.g. the state's init), compiled for compile speed on CPU.

  Args:
    jitted: a ``jax.jit`` function (its shardings are kept).
    *args: its arguments.
  """
  options = _RUN_ONCE_OPTIONS.get(jax.default_backend())
  return jitted.lower(*args).compile(options)(*args)


def state_from_variables(nets: Networks, cfg, optimizers, params, batch_stats, rng, image_shape) -> TrainState:
  """Step 0 from given network variables: fresh optimizer states for them, empty image pools."""
  grouped = split_groups(params)
  opt_state = {group: opt.init(grouped[group]) for group, opt in optimizers.items()}
  pools = {ROLES[name].pool: image_pool.init_pool(cfg.pool_size, image_shape) for name in nets.names
           if ROLES[name].pool}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats, opt_state=opt_state,
                    pools=pools, rng=rng)
