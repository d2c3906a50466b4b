"""Orbax checkpoints of the whole run: train state, grain iterator state(s) and the resolved config.

Layout: ``WORKDIR/checkpoints/<step>/{state,data,config}``. Restoring needs an abstract target of the state
(``jax.eval_shape`` of the init): without it optax states come back as plain dicts.
"""

from __future__ import annotations

import json
import logging
import os

import grain
import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class RunCheckpointer:
  """Saves and restores {state, data iterator, config} under ``WORKDIR/checkpoints``."""

  def __init__(self, workdir, *, max_to_keep=3, async_save=True):
    self.directory = os.path.abspath(os.path.join(os.fspath(workdir), "checkpoints"))
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=async_save),
        item_names=("state", "data", "config"),
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler()})

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step, state, data_iterator, config_dict, *, force=False):
    """Starts an (async) save; the iterator state is captured now, the arrays are written in the background."""
    saved = self.manager.save(
        int(step),
        args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                data=grain.checkpoint.CheckpointSave(data_iterator),
                                config=ocp.args.JsonSave(json.loads(json.dumps(config_dict, default=str)))),
        force=force)
    if saved:
      log.info("checkpoint %d -> %s", step, self.directory)
    return saved

  def restore(self, step, abstract_state, data_iterator):
    """Restores the state at ``step`` into the structure of ``abstract_state`` and rewinds ``data_iterator``."""
    restored = self.manager.restore(
        int(step),
        args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                data=grain.checkpoint.CheckpointRestore(data_iterator)))
    return restored["state"]

  def restore_state_only(self, step, abstract_state):
    """The state at ``step`` without touching any data iterator (evaluation)."""
    restored = self.manager.restore(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
    return restored["state"]

  def restore_config(self, step=None):
    step = self.latest_step() if step is None else step
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree, sharding=None):
  """ShapeDtypeStructs of ``tree`` (optionally all with one sharding), a restore target."""
  def leaf(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding if sharding is not None else
                                getattr(x, "sharding", None))
  return jax.tree.map(leaf, tree)
