"""A JAX CMEDL train state holding the weights of PyTorch networks (the parity tests and the step benchmark).

Runs started from converted weights (``config.init_from``) are :mod:`cmedl_jax.train.init_from`.

No torch import: the state_dicts may hold tensors or numpy arrays (``reference_step.CMEDLStep.state_dicts()``).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from cmedl_jax.torch_port import convert
from cmedl_jax.train import networks as networks_lib
from cmedl_jax.train import state as state_lib
from cmedl_jax.train.networks import Networks


def variables_from_torch(state_dicts: Mapping[str, Mapping[str, Any]], nets: Networks, image_shape):
  """Converts one PyTorch state_dict per network of ``nets``.

  Args:
    state_dicts: {network name ("gen_ct2mr", ..., "student"): state_dict}; must cover every network in use.
    nets: the run's flax networks (``train.methods.build_networks``).
    image_shape: (H, W, 1) training crop.

  Returns:
    ``(params, batch_stats)`` as ``train.networks.init_variables`` returns them.

  Raises:
    convert.WeightImportError: a state_dict does not fit its network.
    ValueError: a network has no state_dict (CUT's PatchNCE head is not supported).
  """
  params, batch_stats = {}, {}
  for name in nets.names:
    if name not in state_dicts:
      raise ValueError(f"no PyTorch state_dict for {name!r} (got {sorted(state_dicts)})")
    variables, _ = convert.convert_state_dict(state_dicts[name],
                                              networks_lib.abstract_variables(nets, name, image_shape), what=name)
    params[name] = variables["params"]
    if networks_lib.ROLES[name].kind == "segmenter":
      batch_stats[name] = variables.get("batch_stats", {})
  return params, batch_stats


def train_state_from_torch(state_dicts: Mapping[str, Mapping[str, Any]], nets: Networks, cfg, optimizers,
                           image_shape, rng: Optional[jax.Array] = None, mesh=None) -> state_lib.TrainState:
  """The state ``create_train_state`` would build, with the PyTorch weights instead of a fresh init.

  Optimizer states are initialised for those weights, pools are empty, the step is 0; ``rng`` defaults to
  ``jax.random.key(0)``. With ``mesh``, the state is placed replicated on it, as the jitted step returns it (a
  state placed otherwise makes the step compile a second time on its second call).
  """
  params, batch_stats = variables_from_torch(state_dicts, nets, image_shape)
  params = jax.tree.map(jnp.asarray, params)
  batch_stats = jax.tree.map(jnp.asarray, batch_stats)
  state = state_lib.state_from_variables(nets, cfg, optimizers, params, batch_stats,
                                         jax.random.key(0) if rng is None else rng, image_shape)
  return state if mesh is None else jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
