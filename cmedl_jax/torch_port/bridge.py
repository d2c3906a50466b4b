"""A JAX CMEDL train state holding the weights of PyTorch networks (parity tests, the step benchmark, and runs
started from converted weights with ``config.init_from``).

No torch import: the state_dicts may hold tensors or numpy arrays (``reference_step.CMEDLStep.state_dicts()``).
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
from flax import traverse_util

from jax.sharding import NamedSharding, PartitionSpec

from cmedl_jax.errors import DataError
from cmedl_jax.models import build
from cmedl_jax.torch_port import convert
from cmedl_jax.train import state as state_lib
from cmedl_jax.train.networks import Networks


def _target_variables(nets: Networks, name: str, image_shape):
  """Abstract flax variables of network ``name`` for (1, H, W, its input channels) inputs."""
  h, w, _ = image_shape
  segmenter = name in ("teacher", "student")
  channels = nets.student_in_channels if name == "student" else 1
  return build.abstract_variables(getattr(nets, name), (1, h, w, channels),
                                  **({"train": False} if segmenter else {}))


def check_converted_folder(field: str, folder: str) -> None:
  """Raises DataError unless ``folder`` holds a ``cmedl-convert-torch`` output (``field``: the config field)."""
  missing = [f for f in (convert.ARCH_FILE, convert.VARIABLES_FILE) if not os.path.isfile(os.path.join(folder, f))]
  if missing:
    raise DataError(folder, f"{field}: not a cmedl-convert-torch output folder (missing {', '.join(missing)}); "
                            f"convert a PyTorch checkpoint first: cmedl-convert-torch --arch ARCH --in FILE.pth "
                            f"--out {folder}")


def load_converted_weights(init_from: Mapping[str, str], nets: Networks, image_shape):
  """Reads the ``cmedl-convert-torch`` folders named by ``config.init_from`` for the run's networks.

  Args:
    init_from: {network name: folder}; empty folders are skipped.
    nets: the run's flax networks.
    image_shape: (H, W, 1) training crop.

  Returns:
    {network name: (params, batch_stats or None)} as numpy trees.

  Raises:
    cmedl_jax.errors.DataError: naming the folder and the config field: the run has no such network, the folder
      holds no converted weights, or the converted architecture does not fit the run's network (differing
      variables listed).
  """
  in_use = state_lib.network_names(nets)
  loaded = {}
  for name, folder in init_from.items():
    if not folder:
      continue
    field = f"init_from.{name}"
    if name not in in_use:
      raise DataError(folder, f"{field}: this run has no network {name!r} (its networks: {', '.join(in_use)})")
    check_converted_folder(field, folder)
    try:
      _, variables, meta = convert.load(folder)
    except (ValueError, KeyError, TypeError, OSError) as e:  # damaged arch.json / variables.msgpack
      raise DataError(folder, f"{field}: cannot read the converted weights ({type(e).__name__}: {e}); convert the "
                              "PyTorch checkpoint again with cmedl-convert-torch") from e
    got = {"/".join(k): v.shape for k, v in traverse_util.flatten_dict(dict(variables)).items()}
    want = {"/".join(k): v.shape for k, v in
            traverse_util.flatten_dict(dict(_target_variables(nets, name, image_shape))).items()}
    if got != want:
      problems = ([f"missing {k} {want[k]}" for k in sorted(set(want) - set(got))]
                  + [f"unexpected {k} {got[k]}" for k in sorted(set(got) - set(want))]
                  + [f"{k}: converted {got[k]}, run {want[k]}" for k in sorted(set(got) & set(want))
                     if got[k] != want[k]])
      shown = "; ".join(problems[:6]) + (f"; ... ({len(problems) - 6} more)" if len(problems) > 6 else "")
      described = convert.describe(meta["arch"], meta["options"])
      raise DataError(folder, f"{field}: the converted {described} does not fit this run's {name}: {shown}")
    loaded[name] = (variables["params"], variables.get("batch_stats"))
  return loaded


def with_converted_weights(state: state_lib.TrainState, init_from: Mapping[str, str], nets: Networks, cfg,
                           optimizers, image_shape) -> state_lib.TrainState:
  """A step-0 ``state`` whose networks named in ``init_from`` hold their converted weights (others unchanged).

  Optimizer states are initialised again for the new weights; BN statistics come with the converted segmenters.
  """
  loaded = load_converted_weights(init_from, nets, image_shape)
  if not loaded:
    return state
  params, batch_stats = dict(state.params), dict(state.batch_stats)
  for name, (p, stats) in loaded.items():
    params[name] = jax.tree.map(jnp.asarray, p)
    if stats is not None:
      batch_stats[name] = jax.tree.map(jnp.asarray, stats)
  return state_lib.state_from_variables(nets, cfg, optimizers, params, batch_stats, state.rng, image_shape)


def variables_from_torch(state_dicts: Mapping[str, Mapping[str, Any]], nets: Networks, image_shape):
  """Converts one PyTorch state_dict per network of ``nets``.

  Args:
    state_dicts: {network name ("gen_ct2mr", ..., "student"): state_dict}; must cover every network in use.
    nets: the run's flax networks (``train.networks.build_networks``).
    image_shape: (H, W, 1) training crop.

  Returns:
    ``(params, batch_stats)`` as ``train.networks.init_variables`` returns them.

  Raises:
    convert.WeightImportError: a state_dict does not fit its network.
    ValueError: a network has no state_dict (CUT's PatchNCE head is not supported).
  """
  params, batch_stats = {}, {}
  for name in state_lib.network_names(nets):
    if name not in state_dicts:
      raise ValueError(f"no PyTorch state_dict for {name!r} (got {sorted(state_dicts)})")
    variables, _ = convert.convert_state_dict(state_dicts[name], _target_variables(nets, name, image_shape),
                                              what=name)
    params[name] = variables["params"]
    if name in ("teacher", "student"):
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
