"""Multi-process (multi-host) start-up: one call, before anything touches a JAX device.

:func:`initialize_from_environment` decides how this process joins a run, in this order:

1. explicit settings win: the arguments (``cmedl-train --coordinator_address --num_processes --process_id``),
   else the environment variables ``CMEDL_COORDINATOR`` (``host:port`` of process 0), ``CMEDL_NUM_PROCESSES``,
   ``CMEDL_PROCESS_ID`` and optionally ``CMEDL_LOCAL_DEVICE_IDS`` (``0,1``). ``num_processes=1`` means a
   single process. The coordinator service of process 0 listens on the coordinator address itself
   (``127.0.0.1:PORT`` stays on the loopback interface), or on ``CMEDL_COORDINATOR_BIND`` when that is set
   (e.g. ``[::]:PORT`` where the coordinator's name is not an address of its own host);
2. else JAX's own cluster detection (SLURM ``srun`` steps, Cloud TPU VMs, Open MPI, Kubernetes Jobs with the
   ``kubernetes`` package): when a detected cluster has more than one process,
   ``jax.distributed.initialize()`` is called without arguments and JAX reads everything from the cluster;
3. else a single process: nothing is initialised.

With more than one process: the CPU backend uses gloo for cross-process collectives (unless
``JAX_CPU_COLLECTIVES_IMPLEMENTATION`` chooses otherwise; accelerators ignore the setting) and opens its
communicators at once (see :func:`_open_cpu_collectives`); an uncaught exception ends the process at once
instead of leaving it in JAX's shutdown barrier. The result is logged and returned: process index and count,
local and global devices.

The rest of the module serves the trainer in multi-process runs: resuming a checkpoint written with another
process count, a barrier, agreeing on a stop flag, and moving data between per-process and global arrays.
See docs/multihost.md.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import os
import sys
from typing import Optional, Sequence

import jax
import numpy as np

log = logging.getLogger(__name__)

ENV_COORDINATOR = "CMEDL_COORDINATOR"
ENV_COORDINATOR_BIND = "CMEDL_COORDINATOR_BIND"
ENV_NUM_PROCESSES = "CMEDL_NUM_PROCESSES"
ENV_PROCESS_ID = "CMEDL_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "CMEDL_LOCAL_DEVICE_IDS"


@dataclasses.dataclass(frozen=True)
class StartupPlan:
  """What :func:`initialize_from_environment` will do; computed without touching JAX devices.

  Attributes:
    mode: "explicit" (flags/CMEDL_* variables), "cluster" (JAX's auto-detection) or "single".
    coordinator_address: ``host:port`` of process 0 (explicit mode; None lets JAX detect it).
    coordinator_bind_address: where process 0's coordinator service listens (explicit mode).
    num_processes, process_id: explicit values, or None where JAX detects them.
    local_device_ids: devices this process uses (None: all local devices, or JAX's cluster default).
    cluster: name of the detected cluster environment (cluster mode; for the log).
    reason: one line for the log.
  """

  mode: str
  coordinator_address: Optional[str] = None
  coordinator_bind_address: Optional[str] = None
  num_processes: Optional[int] = None
  process_id: Optional[int] = None
  local_device_ids: Optional[tuple] = None
  cluster: Optional[str] = None
  reason: str = ""


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
  """This process's place in the run, as JAX sees it after start-up."""

  mode: str
  process_index: int
  process_count: int
  local_device_count: int
  device_count: int
  platform: str


def _int_or_none(value, name):
  if value is None or value == "":
    return None
  try:
    return int(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name}={value!r} is not an integer") from None


def _device_ids(value):
  if value is None or value == "":
    return None
  if isinstance(value, int):
    return (value,)
  if isinstance(value, str):
    return tuple(int(v) for v in value.split(",") if v.strip())
  return tuple(int(v) for v in value)


def _detect_cluster():
  """(name, process count or None) of the cluster JAX would auto-detect, or None outside any cluster.

  Uses JAX's own detectors (the ones ``jax.distributed.initialize()`` runs), so the answer is exactly what JAX
  will find; they live in a private module, hence the guards.
  """
  try:
    from jax._src import clusters  # pylint: disable=g-import-not-at-top
    cluster_types = list(clusters.ClusterEnv._cluster_types)  # pylint: disable=protected-access
  except (ImportError, AttributeError):
    log.warning("JAX's cluster detectors are not available in jax %s; only CMEDL_* settings and SLURM are "
                "recognised", jax.__version__)
    if "SLURM_STEP_NODELIST" in os.environ and "SLURM_PROCID" in os.environ:
      return "slurm", _int_or_none(os.environ.get("SLURM_NTASKS"), "SLURM_NTASKS")
    return None
  for env in cluster_types:
    if getattr(env, "opt_in_only_method", False):
      continue  # e.g. mpi4py: JAX only uses it when asked to by name
    try:
      if not env.is_env_present():
        continue
      count = env.get_process_count()
    except Exception as e:  # pylint: disable=broad-except
      # A half-configured environment (e.g. Kubernetes without pod-reading rights): say so, let JAX decide.
      log.warning("cluster environment %s detected but not readable (%s)", env.__name__, e)
      return env.__name__, None
    return (getattr(env, "name", "") or env.__name__), (None if count is None else int(count))
  return None


def plan_startup(coordinator_address=None, num_processes=None, process_id=None, local_device_ids=None, *,
                 environ=None, detect_cluster=_detect_cluster) -> StartupPlan:
  """Resolves flags, CMEDL_* variables and the cluster environment into a :class:`StartupPlan`.

  Args:
    coordinator_address, num_processes, process_id, local_device_ids: explicit values (command-line flags);
      each one overrides its CMEDL_* environment variable.
    environ: the environment to read (default ``os.environ``).
    detect_cluster: returns (cluster name, process count) or None; replaceable in tests.

  Raises:
    ValueError: inconsistent explicit settings (e.g. a process count without a coordinator).
  """
  env = os.environ if environ is None else environ
  coordinator = coordinator_address or env.get(ENV_COORDINATOR) or None
  count = num_processes if num_processes is not None else _int_or_none(env.get(ENV_NUM_PROCESSES),
                                                                       ENV_NUM_PROCESSES)
  index = process_id if process_id is not None else _int_or_none(env.get(ENV_PROCESS_ID), ENV_PROCESS_ID)
  devices = _device_ids(local_device_ids if local_device_ids is not None else env.get(ENV_LOCAL_DEVICE_IDS))

  if count == 1:
    return StartupPlan("single", local_device_ids=devices, reason="num_processes=1")
  if coordinator is not None or count is not None or index is not None:
    if coordinator is None:
      raise ValueError(f"num_processes/process_id given ({count}, {index}) but no coordinator: set "
                       f"--coordinator_address or {ENV_COORDINATOR}=HOST:PORT (process 0's address)")
    if ":" not in coordinator:
      raise ValueError(f"coordinator address {coordinator!r} must be HOST:PORT")
    if count is not None and index is not None and not 0 <= index < count:
      raise ValueError(f"process_id={index} must lie in [0, num_processes={count})")
    bind = env.get(ENV_COORDINATOR_BIND) or coordinator
    return StartupPlan("explicit", coordinator_address=coordinator, coordinator_bind_address=bind,
                       num_processes=count, process_id=index, local_device_ids=devices,
                       reason="coordinator, process count and id from flags/" + ENV_COORDINATOR + "...")
  detected = detect_cluster()
  if detected is None:
    return StartupPlan("single", local_device_ids=devices, reason="no coordinator set and no cluster detected")
  name, cluster_count = detected
  if cluster_count == 1:
    # Initialising would still narrow the visible devices to one per process (JAX's SLURM default), which a
    # single process does not want.
    return StartupPlan("single", local_device_ids=devices, cluster=name,
                       reason=f"{name} cluster with a single process")
  return StartupPlan("cluster", local_device_ids=devices, cluster=name,
                     reason=f"{name} cluster detected ({cluster_count or '?'} processes)")


def _use_gloo_on_cpu():
  if os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
    return  # the user's explicit choice (e.g. mpi)
  # Without a cross-process implementation the CPU client cannot run a collective that spans processes.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")


def _exit_at_once_on_uncaught_errors():
  """Makes an uncaught exception end this process at once, with status 1, after printing it.

  Otherwise the interpreter's exit runs JAX's shutdown, which waits up to 5 minutes for processes that are
  blocked in a collective with this one and will never get there; exiting lets the launcher (launch/local.py,
  ``srun --kill-on-bad-exit``, a JobSet failure policy) stop the run straight away.
  """
  previous = sys.excepthook

  def hook(kind, value, traceback):
    previous(kind, value, traceback)
    if not issubclass(kind, KeyboardInterrupt):
      sys.stdout.flush()
      sys.stderr.flush()
      logging.shutdown()
      os._exit(1)  # pylint: disable=protected-access

  sys.excepthook = hook


@functools.cache
def _global_sum_fn():
  """A jitted sum over every device of every process, on the mesh of the train step (``jax.devices()``)."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  mesh = Mesh(np.asarray(jax.devices()), ("all",))
  total = jax.jit(jax.shard_map(lambda x: jax.lax.psum(x, "all"), mesh=mesh, in_specs=P("all"), out_specs=P(),
                                check_vma=False))

  def global_sum(value):
    per_device = np.zeros((jax.local_device_count(),), np.int32)
    per_device[0] = value
    local = jax.make_array_from_process_local_data(NamedSharding(mesh, P("all")), per_device)
    return int(np.asarray(total(local).addressable_data(0))[0])

  return global_sum


def _open_cpu_collectives():
  """Runs the collectives that later code depends on once now, while the processes are in step.

  XLA:CPU creates the gloo communicator of a group of devices at the group's first collective and gives up
  when the other processes do not arrive within 30 s (a fixed limit; later collectives of an existing group
  wait far longer). The first train step comes right after compiling it, and compile times differ between
  processes: the persistent compilation cache is written by process 0 only and its CPU keys differ between
  processes, so process 0 may start stepping while another still compiles. Opened here: the group of all
  devices in ``jax.devices()`` order (the train step's mesh, :func:`cmedl_jax.train.step.make_mesh`) and the
  one-device-per-process groups of ``multihost_utils.sync_global_devices``, which orbax uses as its barrier.
  """
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  processes = _global_sum_fn()(1)
  if processes != jax.process_count():
    raise RuntimeError(f"a cross-process sum over {jax.device_count()} devices counted {processes} processes")
  multihost_utils.sync_global_devices("cmedl_open_cpu_collectives")


def initialize_from_environment(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
                                process_id: Optional[int] = None,
                                local_device_ids: Optional[Sequence[int]] = None,
                                *, initialization_timeout: int = 300) -> ProcessInfo:
  """Joins this process to its multi-process run (or does nothing for a single process); see the module doc.

  Call once at start-up, before any JAX computation or device query (``jax.devices()`` included): JAX can
  only join a distributed run before its backends exist.

  Args:
    coordinator_address: ``host:port`` of process 0's coordinator (else ``CMEDL_COORDINATOR``).
    num_processes: number of processes (else ``CMEDL_NUM_PROCESSES``); 1 means a single process.
    process_id: this process's index in ``[0, num_processes)`` (else ``CMEDL_PROCESS_ID``).
    local_device_ids: the local devices this process uses (else ``CMEDL_LOCAL_DEVICE_IDS``; default all).
    initialization_timeout: seconds to wait for all processes to connect.

  Returns:
    A :class:`ProcessInfo` (also logged).

  Raises:
    ValueError: inconsistent explicit settings.
    RuntimeError: from JAX, e.g. when a backend was already initialised.
  """
  plan = plan_startup(coordinator_address, num_processes, process_id, local_device_ids)
  if jax.distributed.is_initialized():
    log.info("jax.distributed already initialised; keeping it")
  elif plan.mode == "explicit":
    _use_gloo_on_cpu()
    log.info("starting process %s of %s, coordinator %s (coordinator service bound to %s)",
             plan.process_id, plan.num_processes, plan.coordinator_address, plan.coordinator_bind_address)
    jax.distributed.initialize(coordinator_address=plan.coordinator_address, num_processes=plan.num_processes,
                               process_id=plan.process_id,
                               local_device_ids=list(plan.local_device_ids) if plan.local_device_ids else None,
                               coordinator_bind_address=plan.coordinator_bind_address,
                               initialization_timeout=initialization_timeout)
  elif plan.mode == "cluster":
    _use_gloo_on_cpu()
    log.info("%s: letting JAX read the coordinator, process count and id from it", plan.reason)
    jax.distributed.initialize(local_device_ids=list(plan.local_device_ids) if plan.local_device_ids else None,
                               initialization_timeout=initialization_timeout)
  elif plan.local_device_ids:
    # Single process restricted to some accelerators: the same knob JAX uses for multi-process runs.
    jax.config.update("jax_cuda_visible_devices", ",".join(map(str, plan.local_device_ids)))
  if jax.process_count() > 1:
    _exit_at_once_on_uncaught_errors()
    if jax.default_backend() == "cpu":
      _open_cpu_collectives()
  info = ProcessInfo(mode=plan.mode, process_index=jax.process_index(), process_count=jax.process_count(),
                     local_device_count=jax.local_device_count(), device_count=jax.device_count(),
                     platform=jax.default_backend())
  log.info("process %d of %d (%s: %s): %d local of %d global %s devices", info.process_index,
           info.process_count, plan.mode, plan.reason, info.local_device_count, info.device_count, info.platform)
  return info


# ---------------------------------------------------------------------------------------------------- helpers
# The helpers below are collectives where noted: every process must call them at the same point.


_barrier_counts = collections.Counter()


def barrier(name, timeout_seconds=3600):
  """Waits until every process reaches ``barrier(name)`` (a no-op for a single process).

  A barrier of the coordination service rather than a device collective: it may wait for long work (e.g.
  writing phantoms) without gloo's 30 s limit on opening a communicator.
  """
  if jax.process_count() == 1:
    return
  _barrier_counts[name] += 1  # the service wants unique names; every process passes here in the same order
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  client = jax_distributed.global_state.client  # the coordination service's client (no public handle)
  client.wait_at_barrier(f"{name}:{_barrier_counts[name]}", timeout_in_ms=int(timeout_seconds * 1000))


def any_process(flag) -> bool:
  """True on every process when ``flag`` is true on any of them (a collective for more than one process)."""
  if jax.process_count() == 1:
    return bool(flag)
  return _global_sum_fn()(int(bool(flag))) > 0


def values_of_process_0(values: dict) -> dict:
  """Process 0's ``{name: float}`` on every process (a collective for more than one process), so that decisions
  taken from host-computed numbers (e.g. which checkpoint is the best) agree even where hosts round differently."""
  if jax.process_count() == 1:
    return dict(values)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  names = sorted(values)
  agreed = multihost_utils.broadcast_one_to_all(np.array([values[k] for k in names], np.float64))
  return {k: float(v) for k, v in zip(names, np.asarray(agreed))}


def process_local_copy(tree):
  """This process's copy of a replicated pytree as uncommitted local values (numpy arrays; PRNG keys rebuilt
  from their data), which ``pmap`` accepts in single- and multi-process runs alike."""

  def leaf(x):
    if not isinstance(x, jax.Array):
      return np.asarray(x)
    local = x.addressable_data(0)
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(np.asarray(jax.random.key_data(local)), impl=jax.random.key_impl(x))
    return np.asarray(local)

  return jax.tree.map(leaf, tree)


def as_replicated(tree, sharding):
  """Global arrays with the replicated ``sharding`` from a pytree that holds the same values on every process.

  For state kept per process (the pmap backend), which orbax cannot save in a multi-process run.
  """
  devices = sorted(sharding.addressable_devices, key=lambda d: d.id)

  def leaf(x):
    return jax.make_array_from_single_device_arrays(x.shape, sharding, [jax.device_put(x, d) for d in devices])

  return jax.tree.map(leaf, tree)


def process_local_rows(array) -> np.ndarray:
  """This process's rows of an array sharded on its leading axis, in order; the whole array when addressable.

  Rows held by other processes cannot be fetched without a collective; for a batch placed with
  ``jax.make_array_from_process_local_data`` these are the rows of this process's host batch.
  """
  if not isinstance(array, jax.Array) or array.is_fully_addressable:
    return np.asarray(jax.device_get(array))
  pieces = {}
  for shard in array.addressable_shards:
    start = (shard.index[0].start or 0) if shard.index else 0
    pieces.setdefault(start, shard)  # replicas of a row block on several local devices: keep one
  return np.concatenate([np.asarray(pieces[k].data) for k in sorted(pieces)], axis=0)
