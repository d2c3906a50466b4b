"""Runs started from converted PyTorch weights (``config.init_from.NAME = FOLDER``).

A folder is a ``cmedl-convert-torch`` output (:mod:`cmedl_jax.torch_port.convert`: the architecture and its flax
variables); nothing here imports torch. Only a fresh run reads it: a resumed run takes its weights from its
checkpoint.
"""

from __future__ import annotations

import os
from typing import Mapping

import jax
import jax.numpy as jnp
from flax import traverse_util

from cmedl_jax.errors import DataError
from cmedl_jax.torch_port import convert
from cmedl_jax.train import networks as networks_lib
from cmedl_jax.train import state as state_lib


def check_converted_folder(field: str, folder: str) -> None:
  """Raises DataError unless ``folder`` holds a ``cmedl-convert-torch`` output (``field``: the config field)."""
  missing = [f for f in (convert.ARCH_FILE, convert.VARIABLES_FILE) if not os.path.isfile(os.path.join(folder, f))]
  if missing:
    raise DataError(folder, f"{field}: not a cmedl-convert-torch output folder (missing {', '.join(missing)}); "
                            f"convert a PyTorch checkpoint first: cmedl-convert-torch --arch ARCH --in FILE.pth "
                            f"--out {folder}")


def check_folders(init_from: Mapping[str, str], nets: networks_lib.Networks) -> None:
  """Raises DataError for a folder naming a network the run does not have, or holding no converted weights."""
  for name, folder in init_from.items():
    if not folder:
      continue
    if name not in nets:
      raise DataError(folder, f"init_from.{name}: this run has no network {name!r} (its networks: "
                              f"{', '.join(nets.names)})")
    check_converted_folder(f"init_from.{name}", folder)


def load_converted_weights(init_from: Mapping[str, str], nets: networks_lib.Networks, image_shape):
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
  check_folders(init_from, nets)
  loaded = {}
  for name, folder in init_from.items():
    if not folder:
      continue
    field = f"init_from.{name}"
    try:
      _, variables, meta = convert.load(folder)
    except (ValueError, KeyError, TypeError, OSError) as e:  # damaged arch.json / variables.msgpack
      raise DataError(folder, f"{field}: cannot read the converted weights ({type(e).__name__}: {e}); convert the "
                              "PyTorch checkpoint again with cmedl-convert-torch") from e
    got = {"/".join(k): v.shape for k, v in traverse_util.flatten_dict(dict(variables)).items()}
    want = {"/".join(k): v.shape for k, v in
            traverse_util.flatten_dict(dict(networks_lib.abstract_variables(nets, name, image_shape))).items()}
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


def with_converted_weights(state: state_lib.TrainState, init_from: Mapping[str, str], nets: networks_lib.Networks,
                           cfg, optimizers, image_shape) -> state_lib.TrainState:
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
