"""Orbax checkpoints of a run: train state, test-time networks, grain iterator state(s) and the resolved config.

Layout: ``WORKDIR/checkpoints/<step>/{state,model,data,config}``. ``state`` is everything training resumes from;
``model`` holds only the params and batch statistics of the method's test-time networks, so evaluation reads
those alone (runs saved before ``model`` existed have ``state`` only). Restoring needs an abstract target
(``jax.eval_shape`` of the init): without it optax states come back as plain dicts.

The best checkpoint by validation (:class:`BestCheckpoint`) lives apart, in ``WORKDIR/best/<step>/{model,config,
best}``, outside ``train.keep_checkpoints``; ``best`` records the metric and its value.
"""

from __future__ import annotations

import json
import logging

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from cmedl_jax.utils import files

log = logging.getLogger(__name__)


CHECKPOINTS = "checkpoints"
BEST = "best"


class RunCheckpointer:
  """Saves and restores {state, model, data iterator, config} under ``WORKDIR/checkpoints`` (or ``subdir``)."""

  def __init__(self, workdir, *, max_to_keep=3, async_save=True, subdir=CHECKPOINTS):
    self.directory = files.absolute(files.join(workdir, subdir))  # a local folder or a URL (orbax's epath)
    self.manager = ocp.CheckpointManager(
        epath.Path(self.directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=async_save),
        item_names=("state", "model", "data", "config", "best"),
        item_handlers={"state": ocp.StandardCheckpointHandler(), "model": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler(), "config": ocp.JsonCheckpointHandler(),
                       "best": ocp.JsonCheckpointHandler()})

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step, state, model, data_position, config_dict, *, force=False):
    """Starts an (async) save of ``state`` at ``step``; the arrays are written in the background.

    Args:
      step: the step number (the checkpoint's name).
      state: the train state after that step.
      model: {"params": ..., "batch_stats": ...} of the test-time networks (part of ``state``).
      data_position: the grain iterator's state (``get_state()``) right after the last batch the step consumed;
        restoring it makes the iterator yield the batch of the next step (the trainer's prefetch may be ahead).
      config_dict: the resolved config, saved as JSON beside them.
      force: save even when ``step`` is not a multiple of the manager's interval.
    """
    saved = self.manager.save(
        int(step),
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), model=ocp.args.StandardSave(model),
                                data=grain.checkpoint.CheckpointSave(_Position(data_position)),
                                config=ocp.args.JsonSave(json.loads(json.dumps(config_dict, default=str)))),
        force=force)
    if saved:
      log.info("checkpoint %d -> %s", step, self.directory)
    return saved

  def restore(self, step, abstract_state, data_iterator):
    """Restores the state at ``step`` into the structure of ``abstract_state`` and rewinds ``data_iterator``.

    Also resumes a checkpoint written with another number of processes. grain saves one iterator state per
    process, ``data/process_<i>-of-<n>.json``, and reads only the file of the current (i, n). Our pipeline's
    iterator state is the number of local batches consumed, and local batch ``b`` of every process is its part of
    global batch ``b`` (see :mod:`cmedl_jax.data.pipeline`), so the state of any process of the old run is the
    state of every process of the new one. The train state is stored as global arrays and restores onto any
    device count.
    """
    data_dir = epath.Path(files.join(self.directory, str(int(step)), "data"))
    names = sorted(p.name for p in data_dir.glob("process_*-of-*.json")) if data_dir.exists() else []
    own = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if names and own not in names:
      source = next((n for n in names if n.startswith("process_0-")), names[0])
      log.info("checkpoint %d was written by another number of processes: data position from %s", step, source)
      state = self.restore_state_only(step, abstract_state)
      data_iterator.set_state(json.loads((data_dir / source).read_text()))
      return state
    restored = self.manager.restore(
        int(step),
        args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                data=grain.checkpoint.CheckpointRestore(data_iterator)))
    return restored["state"]

  def _restore_item(self, step, item, abstract):
    restored = self.manager.restore(int(step), args=ocp.args.Composite(**{item: ocp.args.StandardRestore(abstract)}))
    return restored[item]

  def restore_state_only(self, step, abstract_state):
    """The state at ``step`` without touching any data iterator."""
    return self._restore_item(step, "state", abstract_state)

  def has_model(self, step):
    """Whether the checkpoint at ``step`` holds the ``model`` item (runs saved before it existed do not)."""
    return epath.Path(files.join(self.directory, str(int(step)), "model")).exists()

  def restore_model(self, step, abstract_model):
    """The test-time networks' variables at ``step``, into the structure of ``abstract_model``."""
    return self._restore_item(step, "model", abstract_model)

  def restore_config(self, step=None):
    step = self.latest_step() if step is None else step
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


class BestCheckpoint:
  """The test-time networks at the best validation value so far, in ``WORKDIR/best`` (one checkpoint, kept apart
  from the periodic ones). Survives resume: the value to beat is read back from the checkpoint itself. A fresh
  start (no periodic checkpoint) moves an earlier ``best`` aside first (``cmedl_jax.utils.files.move_aside``): it
  belongs to another attempt."""

  def __init__(self, workdir, metric):
    self.metric = metric
    self._checkpointer = RunCheckpointer(workdir, max_to_keep=1, async_save=False, subdir=BEST)
    self.directory = self._checkpointer.directory
    self.step, self.value = None, -float("inf")
    latest = self._checkpointer.latest_step()
    if latest is not None:
      manager = self._checkpointer.manager
      record = manager.restore(latest, args=ocp.args.Composite(best=ocp.args.JsonRestore()))["best"]
      if record.get("metric") == metric:
        self.step, self.value = int(record["step"]), float(record["value"])
      else:
        log.warning("%s holds the best checkpoint by %s; this run picks by %s: the next validation replaces it",
                    self.directory, record.get("metric"), metric)

  def offer(self, step, value, model, config_dict):
    """Saves ``model`` as the best when ``value`` beats the best so far (strictly); returns whether it did.

    [multi-process] Every process calls it with the same value (orbax's save is collective).
    """
    if not value > self.value:
      return False
    record = {"step": int(step), "metric": self.metric, "value": float(value)}
    if int(step) in self._checkpointer.manager.all_steps():  # this run's own, saved by another metric: replaced
      self._checkpointer.manager.delete(int(step))
    self._checkpointer.manager.save(
        int(step), args=ocp.args.Composite(model=ocp.args.StandardSave(model),
                                           config=ocp.args.JsonSave(json.loads(json.dumps(config_dict, default=str))),
                                           best=ocp.args.JsonSave(record)), force=True)
    self._checkpointer.manager.wait_until_finished()
    self.step, self.value = int(step), float(value)
    log.info("best %s %.4f at step %d -> %s", self.metric, value, step, self.directory)
    return True

  def close(self):
    self._checkpointer.close()


class _Position:
  """A recorded iterator state in the form grain's checkpoint handler saves (``get_state()`` -> JSON bytes)."""

  def __init__(self, state):
    self._state = json.dumps(state, indent=4).encode()

  def get_state(self):
    return self._state


def abstract_like(tree, sharding=None):
  """ShapeDtypeStructs of ``tree`` (optionally all with one sharding), a restore target."""
  def leaf(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding if sharding is not None else
                                getattr(x, "sharding", None))
  return jax.tree.map(leaf, tree)
