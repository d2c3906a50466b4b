"""The CMEDL trainer: data, state, the jitted step, logging, previews, checkpoints.

Resume order (any interruption, including SIGTERM on preemption or SIGKILL, restarts here with the same workdir):
  1. the config is taken from the command line (the checkpoint's resolved config is only written, never read,
     so a run can be resumed with, e.g., more steps);
  2. the latest complete checkpoint of WORKDIR/checkpoints is restored into the abstract state (params, BN
     statistics, optimizer states, image pools, rng, step) and the grain iterator is set to the position after the
     last batch that step consumed (a save interrupted by the kill is not complete and is ignored);
  3. rows of metrics.csv and validation.csv past that step (logged by the interrupted process) are dropped: they
     are logged again, with the same values (a fresh start moves existing files aside instead); the case split is
     read back from WORKDIR/splits.json and the best checkpoint's value from WORKDIR/best, so validation goes on
     picking the same best (only a strictly better value replaces it);
  4. training continues from state.step; the step's randomness is fold_in(rng, step), and every kernel sums in a
     fixed order, so the continuation is bitwise the same as an uninterrupted run.

The loop syncs with the host only at log, checkpoint, preview and validation steps (and the last): between them
steps are dispatched asynchronously, at most two in flight, with batches prefetched to the devices
(``train.prefetch_to_device``). A step whose losses or gradients are not finite leaves the state unchanged on the
device (:func:`cmedl_jax.train.step.make_per_device_step`); its flag is read at the next sync, and before every
save, and the run stops naming it, with nothing non-finite saved.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import shutil
import signal
import tempfile
import time

import jax
import numpy as np

from cmedl_jax import config_validation, distributed, ops
from cmedl_jax.data import augment, pipeline, store
from cmedl_jax.train import checkpointing, device_feed, init_from as init_from_lib, methods
from cmedl_jax.train import state as state_lib, step as step_lib, validation
from cmedl_jax.utils import files, png

log = logging.getLogger(__name__)


PREPROCESS_TIMEOUT_S = 24 * 3600


class NonFiniteLossError(RuntimeError):
  """Raised when a loss becomes NaN/Inf; the last good checkpoint is left untouched."""


@dataclasses.dataclass
class TrainResult:
  final_step: int
  last_metrics: dict
  history: list
  stopped_by_signal: bool = False


class _SigtermFlag:
  """Turns SIGTERM into a flag the loop checks (save, then exit cleanly)."""

  def __init__(self):
    self.raised = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: no signal handling
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    log.warning("SIGTERM received: saving a checkpoint and stopping")
    self.raised = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class MetricWriter:
  """Scalars to a CSV file of WORKDIR (metrics.csv) and (when tensorboardX is installed) TensorBoard event files,
  tagged ``<tag>/<name>`` (train/...; validation/... in WORKDIR/tensorboard/validation).

  WORKDIR may be a URL (:mod:`cmedl_jax.utils.files`): the CSV is then rewritten whole at each write, and the
  event files are written to a local folder and uploaded after each flush.
  """

  def __init__(self, workdir, enabled=True, filename="metrics.csv", tag="train"):
    self.enabled = enabled
    self.path = files.join(workdir, filename)
    self.tag = tag
    self._fields = None
    self._tb = None
    self._tb_dir = files.join(workdir, "tensorboard", *([] if tag == "train" else [tag]))
    self._tb_local = None
    if enabled:
      try:
        from tensorboardX import SummaryWriter
        if files.is_url(workdir):
          self._tb_local = tempfile.mkdtemp(prefix="cmedl_tensorboard_")
        self._tb = SummaryWriter(self._tb_local or self._tb_dir)
      except ImportError:
        log.info("tensorboardX not installed: metrics go to %s only", self.path)

  def start_at(self, step):
    """Prepares metrics.csv for a run continuing after ``step`` (0: a fresh run).

    A fresh run moves an existing metrics.csv aside (``metrics.csv.<time>.old``: never appended to or deleted); a
    resumed run drops the rows past ``step`` (logged by the interrupted process; logged again now), atomically.
    """
    if not self.enabled or not files.exists(self.path):
      return
    if step == 0:
      files.move_aside(self.path)
      return
    rows = list(csv.reader(io.StringIO(files.read_text(self.path), newline="")))
    if len(rows) < 2:
      return
    header = rows[0]
    step_column = header.index("step") if "step" in header else 0
    # (A row cut short by a kill is dropped too.)
    kept = [header] + [row for row in rows[1:] if len(row) == len(header) and int(float(row[step_column])) <= step]
    if len(kept) == len(rows):
      return
    files.write_text(self.path, _csv_text(kept))

  def write(self, step, metrics):
    if not self.enabled:
      return
    row = {"step": int(step), **{k: float(v) for k, v in sorted(metrics.items())}}
    if self._fields is None:
      exists = files.exists(self.path)
      if exists:
        self._fields = next(csv.reader(io.StringIO(files.read_text(self.path), newline="")), None)
      if not self._fields or set(self._fields) != set(row):
        self._fields = list(row)
        if exists:  # a resumed run with other metrics: start a new file rather than mixing columns
          files.move_aside(self.path)
        files.write_text(self.path, _csv_text([self._fields]))
    files.append_text(self.path, _csv_text([[row[k] for k in self._fields]]))
    if self._tb is not None:
      for k, v in row.items():
        if k != "step":
          self._tb.add_scalar(f"{self.tag}/{k}", v, row["step"])
      self._tb.flush()
      if self._tb_local:
        files.copy_tree(self._tb_local, self._tb_dir)

  def close(self):
    if self._tb is not None:
      self._tb.close()
      if self._tb_local:
        files.copy_tree(self._tb_local, self._tb_dir)
        shutil.rmtree(self._tb_local, ignore_errors=True)


def _csv_text(rows):
  """CSV lines of ``rows`` as the csv module writes them."""
  out = io.StringIO(newline="")
  csv.writer(out).writerows(rows)
  return out.getvalue()


def write_preview(path, batch, images, max_rows=4):
  """PNG grid, one row per example: CT, pMRI, reconstructed CT, MRI, label, teacher mask, student mask."""
  n = min(max_rows, batch["ct"].shape[0])
  gray = lambda x: np.repeat(png.to_uint8(x)[..., None], 3, -1)  # noqa: E731
  tiles = []
  for i in range(n):
    ct = png.to_uint8(batch["ct"][i, ..., 0])
    row = [gray(batch["ct"][i, ..., 0])]
    for key in ("pmri", "rec_ct"):
      if key in images:
        row.append(gray(images[key][i, ..., 0]))
    row.append(gray(batch["mri"][i, ..., 0]))
    row.append(png.overlay_mask(ct, batch["ct_label"][i] > 0, color=(64, 255, 64)))
    for key in ("teacher_logits", "student_logits"):
      if key in images:
        row.append(png.overlay_mask(ct, np.argmax(images[key][i], -1) > 0, color=(255, 64, 64)))
    tiles.extend(row)
  return png.write_png(path, png.tile(tiles, columns=len(tiles) // n))


def _to_host(tree, backend):
  tree = jax.device_get(tree)
  return step_lib.unreplicate(tree) if backend == "pmap" else tree


def _check_finite(pending, ckpt, backend):
  """Raises NonFiniteLossError for the first step in ``pending`` [(step, finite flag, metrics)] that was not finite."""
  flags = jax.device_get([finite for _, finite, _ in pending])
  for (step_number, _, metrics), finite in zip(pending, flags):
    if not np.all(finite):
      bad = {k: float(v) for k, v in _to_host(metrics, backend).items()
             if k != "finite" and not math.isfinite(float(v))}
      raise NonFiniteLossError(
          f"non-finite loss or gradient at step {step_number}: {bad}; the step was skipped and nothing after it "
          f"saved. The last good checkpoint (step {ckpt.latest_step()}) in {ckpt.directory} is kept; lower the "
          "learning rates or check the data (cmedl-data check) before resuming.")


def train(cfg, workdir, *, progress=True, max_steps=None) -> TrainResult:
  """Trains (or resumes) the run of ``cfg`` in ``workdir``.

  Args:
    cfg: a config from ``configs/*.py`` (see :mod:`cmedl_jax.config_base`) whose ``data.ct_dir`` and
      ``data.mri_dir`` exist (:func:`cmedl_jax.train.job.train_and_evaluate` generates phantoms first).
    workdir: checkpoints, metrics.csv, TensorBoard logs, previews and config.json go here: a local folder or a
      URL such as ``gs://bucket/runs/NAME`` (:mod:`cmedl_jax.utils.files`).
    progress: show a progress bar.
    max_steps: stop after this many steps in this call (for tests of interruption); default run to
      ``cfg.train.total_steps``.

  Raises:
    cmedl_jax.errors.ConfigError: a config field has an unusable value (before anything is read or written).
    cmedl_jax.errors.DataError: an unusable dataset file or folder, or an ``init_from`` folder that is not a
      converted network of this run (the message names the folder).
    NonFiniteLossError: a loss or gradient became NaN/Inf (nothing is saved from that step on).
    cmedl_jax.ops.onednn.OnednnUnavailable: ``conv_backend="onednn"`` where the library cannot be built.
  """
  config_validation.validate(cfg, num_devices=jax.device_count())
  d = cfg.data
  files.makedirs(workdir)
  kernels = ops.from_config(cfg)
  cpu_form = ops.cpu_form(kernels)  # a missing library fails now, before the data is read
  is_main = jax.process_index() == 0
  backend = cfg.train.backend
  nets = methods.build_networks(cfg)
  init_from = {name: folder for name, folder in cfg.init_from.items() if folder}
  init_from_lib.check_folders(init_from, nets)  # a wrong weights folder fails now, before the data is read
  multi_process = jax.process_count() > 1
  # ======================================================================== data
  # [multi-process] Process 0 preprocesses first; the others then find the cache fresh (a shared filesystem) or
  # write their own copy (a filesystem per host).
  # Preprocessing a large dataset takes long: these barriers wait up to a day (cmedl-data preprocess does it ahead).
  if not is_main:
    distributed.barrier("cmedl_preprocessed", timeout_seconds=PREPROCESS_TIMEOUT_S)
  ct, mri = pipeline.training_stores(d, progress=progress and is_main)
  val_store = None
  if cfg.eval.val_dir:
    val_store = store.prepare(cfg.eval.val_dir, store.settings_from_config(d, "CT"), cache_dir=d.cache_dir or None,
                              labels="required", progress=progress and is_main)
  if is_main:
    distributed.barrier("cmedl_preprocessed", timeout_seconds=PREPROCESS_TIMEOUT_S)
  distributed.barrier("cmedl_preprocessed_everywhere", timeout_seconds=PREPROCESS_TIMEOUT_S)
  # The split is read back on resume (validation.load_or_write_splits); only the training cases feed the stream.
  ckpt = checkpointing.RunCheckpointer(workdir, max_to_keep=cfg.train.keep_checkpoints,
                                       async_save=cfg.train.async_checkpoint)
  latest = ckpt.latest_step()
  splits = validation.load_or_write_splits(workdir, ct.case_ids, d, cfg.eval.val_dir, write=is_main,
                                           resuming=latest is not None)
  if splits["val"]:
    val_store = ct.subset(splits["val"])
  ct = ct.subset(splits["train"])
  validator = None
  if val_store is not None and cfg.train.val_every:
    validator = validation.Validator(cfg, nets, kernels, val_store)
    log.info("validation: %d case(s) every %d steps (%s)", len(val_store), cfg.train.val_every,
             "eval.val_dir" if cfg.eval.val_dir else "split off the CT set, WORKDIR/splits.json")
  dataset = pipeline.make_train_dataset(ct, mri, global_batch_size=d.global_batch_size, crop_size=d.crop_size,
                                        seed=d.seed, foreground_fraction=d.foreground_fraction,
                                        augment=augment.Augment.from_config(d.augment))
  data_iter = pipeline.make_train_iterator(dataset, num_workers=d.num_workers)
  log.info("kernels on %s: %s (CPU programs: %s)", jax.default_backend(), kernels, cpu_form)
  log.info("data: %d CT volumes (%d slices), %d MRI volumes (%d slices), preprocessed in %s and %s", len(ct),
           ct.num_slices, len(mri), mri.num_slices, ct.folder, mri.folder)

  # ======================================================================== model and state
  mesh = step_lib.make_mesh()
  optimizers = state_lib.make_optimizers(cfg, nets)
  image_shape = (d.crop_size, d.crop_size, 1)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  init_fn = jax.jit(ops.using(kernels, lambda key: state_lib.create_train_state(nets, cfg, optimizers, key,
                                                                                image_shape)),
                    out_shardings=replicated)
  abstract_state = jax.eval_shape(init_fn, jax.random.key(cfg.seed))
  abstract_state = checkpointing.abstract_like(abstract_state, replicated)
  writer = MetricWriter(workdir, enabled=is_main)
  val_writer = best = None
  if latest is None and is_main:  # a fresh start: another attempt's best checkpoint is not this run's
    files.move_aside(files.join(workdir, checkpointing.BEST))
  distributed.barrier("cmedl_best_aside")
  if validator is not None:
    val_writer = MetricWriter(workdir, enabled=is_main, filename="validation.csv", tag="validation")
    best = checkpointing.BestCheckpoint(workdir, validation.best_metric_name(cfg))
  if latest is not None:
    # Resume: state and data position come from the checkpoint (see the module docstring for the order).
    # Also resumes a checkpoint written with another number of processes (see RunCheckpointer.restore).
    state = ckpt.restore(latest, abstract_state, data_iter)
    log.info("resumed from %s at step %d", ckpt.directory, int(state.step))
    if init_from:
      log.info("init_from is ignored when resuming: the weights come from the checkpoint")
  else:
    t0 = time.time()
    state = state_lib.run_once(init_fn, jax.random.key(cfg.seed))
    if init_from:
      with ops.use(kernels):  # the converted variables are checked against the networks' shapes (a trace)
        converted = init_from_lib.with_converted_weights(state, init_from, nets, cfg, optimizers, image_shape)
      state = jax.device_put(converted, replicated)
      log.info("started from converted weights: %s", ", ".join(f"{k} from {v}" for k, v in init_from.items()))
    log.info("initialised in %.1f s", time.time() - t0)
  n_params = {name: int(sum(np.prod(x.shape) for x in jax.tree.leaves(p))) for name, p in
              abstract_state.params.items()}
  log.info("parameters: %s", ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in n_params.items()))
  config_dict = cfg.to_dict()
  if is_main:
    files.write_text(files.join(workdir, "config.json"), json.dumps(config_dict, indent=2, default=str))

  train_step = step_lib.make_train_step(nets, cfg, optimizers, mesh=mesh, backend=backend)
  if backend == "pmap":
    # pmap takes process-local, uncommitted arrays (also in one process: the replicated global state is not).
    state = step_lib.replicate(distributed.process_local_copy(state))

  def device_batch(host_batch):
    arrays = {k: host_batch[k] for k in ("ct", "ct_label", "mri")}
    if backend == "pmap":
      return jax.tree.map(lambda x: x.reshape((jax.local_device_count(), -1) + x.shape[1:]), arrays)
    return step_lib.shard_batch(arrays, mesh)

  def as_global(tree):
    # [multi-process] orbax takes global arrays only: pmap's per-process copy (that of the first local device,
    # taken without a multi-device computation) is put back on `replicated`.
    if backend != "pmap":
      return tree
    return distributed.as_replicated(jax.tree.map(lambda x: x.addressable_data(0)[0], tree), replicated)

  def save(step_number, data_position, force=False):
    saved_state = as_global(state)
    model = methods.test_time_variables(cfg, saved_state.params, saved_state.batch_stats)
    ckpt.save(step_number, saved_state, model, data_position, config_dict, force=force)

  # ======================================================================== training loop
  def validate(step_number):
    model = as_global(methods.test_time_variables(cfg, state.params, state.batch_stats))
    values = validator(validation.local_variables(model), progress=bar is not None)
    values = distributed.values_of_process_0(values)
    val_writer.write(step_number, values)
    log.info("validation at step %d: %s", step_number, ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
    best.offer(step_number, values[best.metric], model, config_dict)

  start_step = int(_to_host(state.step, backend))
  writer.start_at(start_step)
  if val_writer is not None:
    val_writer.start_at(start_step)
  total_steps = int(cfg.train.total_steps)
  end_step = total_steps if max_steps is None else min(total_steps, start_step + int(max_steps))
  feed = device_feed.DeviceFeed(data_iter, device_batch, depth=int(cfg.train.prefetch_to_device))
  history, last_metrics, stopped = [], {}, False
  bar = None
  if progress and is_main:
    from tqdm import tqdm
    bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)
  step_number = start_step
  t_last, steps_since = time.time(), 0
  pending = []  # (step, finite flag, metrics) of the steps since the last sync, still on the devices
  try:
    with _SigtermFlag() as sigterm:
      while step_number < end_step:
        fed = next(feed)
        state, metrics, images = train_step(state, fed.device)
        step_number += 1
        steps_since += 1
        pending.append((step_number, metrics["finite"], metrics))
        if len(pending) > 2:
          pending[-3][1].block_until_ready()  # at most two steps in flight: waits for step n-2, the devices stay busy
        if bar is not None:
          bar.update(1)
        log_now = step_number % cfg.train.log_every == 0 or step_number == end_step
        save_now = step_number % cfg.train.checkpoint_every == 0 or step_number == end_step
        preview_now = bool(cfg.train.preview_every) and (step_number % cfg.train.preview_every == 0
                                                         or step_number == end_step)
        val_now = validator is not None and (step_number % cfg.train.val_every == 0 or step_number == total_steps)
        sync = log_now or save_now or preview_now or val_now
        # [multi-process] SIGTERM reaches the processes at different steps; they agree (a collective) at the sync
        # steps, which are the same on every process. A single process acts on it at once.
        stop = (distributed.any_process(sigterm.raised) if sync else False) if multi_process else sigterm.raised
        if not (sync or stop):
          continue
        # ---------------------------------------------------------------------- sync with the host
        _check_finite(pending, ckpt, backend)
        pending = []
        if log_now:
          last_metrics = {k: float(v) for k, v in _to_host(metrics, backend).items() if k != "finite"}
          elapsed = time.time() - t_last
          last_metrics["steps_per_second"] = steps_since / max(elapsed, 1e-9)
          t_last, steps_since = time.time(), 0
          writer.write(step_number, last_metrics)
          history.append({"step": step_number, **last_metrics})
          if bar is not None:
            bar.set_postfix({k: f"{last_metrics[k]:.3f}" for k in ("total", "student_seg", "teacher_seg", "hint")
                             if k in last_metrics})
        if preview_now and is_main:
          if backend == "pmap":
            images_host = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), jax.device_get(images))
          else:  # [multi-process] the rows of host_batch: other processes' rows cannot be fetched here
            images_host = jax.tree.map(distributed.process_local_rows, images)
          write_preview(files.join(workdir, "previews", f"step_{step_number:07d}.png"), fed.host, images_host)
        if val_now:
          validate(step_number)
        if save_now or stop:
          save(step_number, fed.position, force=stop)
        if stop:
          stopped = True
          break
  finally:
    if bar is not None:
      bar.close()
    ckpt.close()
    writer.close()
    if validator is not None:
      best.close()
      val_writer.close()
  return TrainResult(final_step=step_number, last_metrics=last_metrics, history=history, stopped_by_signal=stopped)
