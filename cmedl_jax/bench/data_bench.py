"""Benchmark: the preprocessed, memory-mapped training data at real size, against an in-RAM store, in one run.

    python -m cmedl_jax.bench data [--cases 20,60] [--size 512] [--slices 120] [--mri-cases 4] [--crop 256]
        [--batch 8] [--batches 50] [--rounds 6] [--workers 0,2] [--train-start] [--work-dir /tmp/cmedl_data_bench]
        [--keep] [--json FILE]

1. Writes max(--cases) labelled CT volumes (int16 HU in [-1000, 1000], ``--size`` x ``--size`` x ``--slices``,
   0.8 x 0.8 x 2.5 mm, body, lungs, one ellipsoidal tumour labelled 1) and ``--mri-cases`` MRI volumes (a plain
   folder) into WORK/pool, one progress line per volume; the CT dataset folder of each N lists the first N of them
   (WORK/datasets/ct_N/dataset.json, paths into the pool), so the volumes are written once.
2. For each N, with a preprocessing cache of its own (WORK/cache/N): the first start (``training_stores``
   preprocesses CT and MRI) and a second start (the cache is fresh: manifests and file stats only), timed, with
   the peak memory of the machine during the first.
3. Throughput: examples/s of the training stream (``make_train_dataset`` with the base config's augmentation and
   foreground fraction, ``--crop``, ``--batch``), from the memory-mapped store and from an in-RAM store
   (:class:`InRamStore`: every volume read into RAM as float32 up front and pickled whole into each grain worker,
   as the removed store did), with the ratio memory-mapped / in-RAM on the same cases and whether the two streams'
   first batches are bitwise equal. The memory-mapped store first runs alone (``--batches`` batches after the
   first, whose time, worker start included, is printed apart; its memory is that run's). With workers the in-RAM
   store then runs the same way (starting workers costs seconds, and it pickles every volume into each). With 0
   workers the ratio comes from the two stores taking turns: ``--rounds`` rounds each (the order alternating), a
   round timing ``--batches`` batches after its first from an iterator started at the round's own batch offset;
   the in-RAM row's examples/s is the median of its rounds and the ratio the median of the per-round ratios (their
   range printed), so drifts of the machine's speed hit both stores alike. Where the in-RAM store with its worker copies
   would need more than ``--ram-fraction`` of the machine's memory, it runs on the first K cases that fit (and the
   memory-mapped store again on the same K cases, for the ratio); K is printed.
4. Memory, sampled every 0.2 s in a background thread: the machine's memory in use (MemTotal - MemAvailable of
   /proc/meminfo, less its value when the benchmark started; the page cache is not in use) and the anonymous
   resident memory (RssAnon: not file-backed, so memory-mapped pages do not count) of this process and, summed, of
   its child processes (the grain workers). Peaks per row: compare N to see whether anonymous memory grows with N.
5. ``--train-start``: ``cmedl-train`` (``python -m cmedl_jax.train.main``) with configs/quickstart.py's networks,
   ``data.num_workers=2``, ``--train-crop`` px, ``--train-steps`` steps, on the smallest N's dataset and cache
   (already fresh from 2.) with a new compilation cache (WORK/xla): a first start (compilation cold), a second
   (compilation warm, fresh workdir), then one warm start on each other N. Printed: seconds until the first step
   is done (the first row of WORKDIR/metrics.csv appears; log_every=1), the process's wall time, and the peaks
   of the machine's memory in use and of the trainer's plus its workers' RssAnon.

Everything written goes under ``--work-dir``; its subfolders (pool, datasets, cache, train, xla) are deleted at
the end unless ``--keep`` (a kept pool of the same size is reused by the next run). Other processes on the machine
count in "machine memory in use".
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
import weakref

import numpy as np

from cmedl_jax import bench
from cmedl_jax.data import store

SPACING_MM = (0.8, 0.8, 2.5)
POOL_VERSION = 1
GIB = float(2 ** 30)


def _ints(text):
  return tuple(int(v) for v in text.split(","))


# ---------------------------------------------------------------------------------------------------------- memory


def _meminfo():
  values = {}
  with open("/proc/meminfo") as f:
    for line in f:
      key, rest = line.split(":", 1)
      values[key] = int(rest.split()[0]) * 1024
  return values


def machine_used():
  """Bytes of memory in use on the machine: MemTotal - MemAvailable (reclaimable page cache excluded)."""
  m = _meminfo()
  return m["MemTotal"] - m["MemAvailable"]


def _children(pid):
  out = []
  try:
    tasks = os.listdir(f"/proc/{pid}/task")
  except OSError:
    return out
  for task in tasks:
    try:
      with open(f"/proc/{pid}/task/{task}/children") as f:
        out.extend(int(v) for v in f.read().split())
    except OSError:
      pass
  return out


def process_tree(pid):
  """``pid`` and its descendants (from /proc/PID/task/*/children)."""
  pids, stack = [], [int(pid)]
  while stack:
    p = stack.pop()
    pids.append(p)
    stack.extend(_children(p))
  return pids


def rss_anon(pid):
  """Anonymous resident bytes (RssAnon of /proc/PID/status) of one process; 0 once it is gone."""
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("RssAnon:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return 0


class MemoryPeak:
  """Samples, in a background thread every ``interval`` s, the machine's memory in use (less ``baseline``) and the
  RssAnon of process ``pid`` (default this one) and of its descendants; keeps the peaks."""

  def __init__(self, baseline, pid=None, interval=0.2):
    self.baseline, self.pid, self.interval = baseline, pid or os.getpid(), interval
    self.machine = self.anon_main = self.anon_children = self.anon_total = 0
    self.machine_abs = 0
    self.max_children = 0
    self.anon_main_start = None
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

  def sample(self):
    used_abs = machine_used()
    used = used_abs - self.baseline
    self.machine_abs = max(self.machine_abs, used_abs)
    pids = process_tree(self.pid)
    main = rss_anon(pids[0])
    if self.anon_main_start is None:
      self.anon_main_start = main
    children = sum(rss_anon(p) for p in pids[1:])
    self.machine = max(self.machine, used)
    self.anon_main = max(self.anon_main, main)
    self.anon_children = max(self.anon_children, children)
    self.anon_total = max(self.anon_total, main + children)
    self.max_children = max(self.max_children, len(pids) - 1)

  def _run(self):
    while not self._stop.wait(self.interval):
      self.sample()

  def __enter__(self):
    self.sample()
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.sample()

  def as_dict(self):
    return {"machine_in_use_gib": self.machine / GIB, "machine_in_use_absolute_gib": self.machine_abs / GIB,
            "anon_main_gib": self.anon_main / GIB,
            "anon_workers_gib": self.anon_children / GIB, "anon_total_gib": self.anon_total / GIB,
            "anon_main_at_start_gib": self.anon_main_start / GIB, "child_processes": self.max_children}


# ---------------------------------------------------------------------------------------------------------- data


def _ellipse(size, cx, cy, ax, ay):
  x = np.linspace(-1.0, 1.0, size, dtype=np.float32)
  return ((x[:, None] - cx) / ax) ** 2 + ((x[None, :] - cy) / ay) ** 2 <= 1.0


def synthetic_ct(rng, size, slices):
  """(size, size, slices) int16 HU volume (air, soft tissue, two lungs, noise) and its uint8 tumour label."""
  body, lungs = _ellipse(size, 0, 0, 0.85, 0.65), _ellipse(size, -0.4, 0, 0.28, 0.45) | _ellipse(size, 0.4, 0, 0.28,
                                                                                                 0.45)
  plane = np.full((size, size), -1000.0, np.float32)
  plane[body] = 40.0
  plane[body & lungs] = -850.0
  volume = rng.standard_normal((size, size, slices), dtype=np.float32)
  volume *= 25.0
  volume += plane[:, :, None]
  label = np.zeros((size, size, slices), np.uint8)
  # One ellipsoidal tumour inside a lung: radius 4-9% of the width in-plane, the same in mm across slices.
  r = rng.uniform(0.04, 0.09) * size / 2
  rz = max(1.0, r * SPACING_MM[0] / SPACING_MM[2])
  cx = (0.5 + rng.choice((-0.4, 0.4)) / 2 + rng.uniform(-0.05, 0.05)) * size
  cy = (0.5 + rng.uniform(-0.1, 0.1)) * size
  cz = rng.uniform(0.3, 0.7) * slices
  box = [slice(max(0, int(c - rr) - 1), min(n, int(c + rr) + 2)) for c, rr, n in
         ((cx, r, size), (cy, r, size), (cz, rz, slices))]
  gx, gy, gz = np.meshgrid(*[np.arange(b.start, b.stop, dtype=np.float32) for b in box], indexing="ij")
  inside = ((gx - cx) / r) ** 2 + ((gy - cy) / r) ** 2 + ((gz - cz) / rz) ** 2 <= 1.0
  label[tuple(box)] = inside
  sub = volume[tuple(box)]
  sub[inside] = 30.0 + 25.0 * rng.standard_normal(int(inside.sum()), dtype=np.float32)
  np.clip(volume, -1000, 1000, out=volume)
  return volume.astype(np.int16), label


def synthetic_mri(rng, size, slices):
  """(size, size, slices) int16 T2w-like volume (bright body, dark lungs, a bias field, noise)."""
  body, lungs = _ellipse(size, 0, 0, 0.85, 0.65), _ellipse(size, -0.4, 0, 0.28, 0.45) | _ellipse(size, 0.4, 0, 0.28,
                                                                                                 0.45)
  plane = np.zeros((size, size), np.float32)
  plane[body] = 400.0
  plane[body & lungs] = 60.0
  plane *= 1.0 + 0.3 * np.linspace(-1, 1, size, dtype=np.float32)[:, None]
  volume = rng.standard_normal((size, size, slices), dtype=np.float32)
  volume *= 20.0
  volume += plane[:, :, None]
  np.clip(volume, 0, 4000, out=volume)
  return volume.astype(np.int16)


def _affine():
  return np.diag([*SPACING_MM, 1.0])


def write_pool(pool, num_ct, num_mri, size, slices, seed=0):
  """Writes (or reuses, when written before with the same geometry) the synthetic volumes; returns seconds spent."""
  from cmedl_jax.data import nifti_io
  spec = {"version": POOL_VERSION, "size": size, "slices": slices, "seed": seed}
  spec_path = os.path.join(pool, "spec.json")
  if os.path.exists(spec_path):
    with open(spec_path) as f:
      if json.load(f) != spec:
        shutil.rmtree(pool)
  os.makedirs(pool, exist_ok=True)
  with open(spec_path, "w") as f:
    json.dump(spec, f)
  t0 = time.perf_counter()
  todo = [("CT", k) for k in range(num_ct)] + [("MRI", k) for k in range(num_mri)]
  for position, (modality, k) in enumerate(todo, 1):
    if modality == "CT":
      image_path, label_path = ct_paths(pool, k)
    else:
      image_path, label_path = os.path.join(pool, "mri", f"mr_{k:03d}.nii.gz"), None
    if os.path.exists(image_path) and (label_path is None or os.path.exists(label_path)):
      continue
    t = time.perf_counter()
    rng = np.random.default_rng([seed, 0 if modality == "CT" else 1, k])
    if modality == "CT":
      image, label = synthetic_ct(rng, size, slices)
      nifti_io.save_nifti(label_path, label, _affine(), dtype=np.uint8)
    else:
      image = synthetic_mri(rng, size, slices)
    nifti_io.save_nifti(image_path, image, _affine(), dtype=np.int16)
    print(f"  wrote {modality} {k + 1}/{num_ct if modality == 'CT' else num_mri} "
          f"({position}/{len(todo)}): {os.path.basename(image_path)} {size}x{size}x{slices} in "
          f"{time.perf_counter() - t:.1f} s", flush=True)
  return time.perf_counter() - t0


def ct_paths(pool, k):
  case = f"ct_{k:03d}"
  return (os.path.join(pool, "ct", "imagesTr", f"{case}_0000.nii.gz"), os.path.join(pool, "ct", "labelsTr",
                                                                                    f"{case}.nii.gz"))


def write_dataset_folder(root, pool, n):
  """ROOT/dataset.json listing the first ``n`` CT cases of the pool (relative paths into it)."""
  os.makedirs(root, exist_ok=True)
  training = []
  for k in range(n):
    image, label = ct_paths(pool, k)
    training.append({"image": os.path.relpath(image, root), "label": os.path.relpath(label, root)})
  meta = {"name": f"data bench CT ({n})", "channel_names": {"0": "CT"}, "labels": {"background": 0, "tumor": 1},
          "numTraining": n, "file_ending": ".nii.gz", "training": training}
  with open(os.path.join(root, "dataset.json"), "w") as f:
    json.dump(meta, f, indent=1)
  return root


# ---------------------------------------------------------------------------------------------------------- stores


class InRamStore(store.PreprocessedStore):
  """The removed in-RAM store's behaviour on a preprocessed store's files: every array read into RAM up front
  (``np.load`` without a memory map), and pickled whole into each worker process."""

  def __init__(self, base: store.PreprocessedStore):
    super().__init__(base.folder, base._manifest, base.case_ids)  # pylint: disable=protected-access
    for case, entry in enumerate(self._entries):
      for kind in ("image", "label", "locations"):
        if entry.get(kind):
          self._maps[(case, kind)] = np.load(os.path.join(self.folder, "cases", entry[kind]))

  def __getstate__(self):
    return dict(self.__dict__)

  @property
  def nbytes(self):
    return sum(a.nbytes for a in self._maps.values())


def store_bytes(s: store.PreprocessedStore, cases=None):
  """Bytes the store's arrays take in RAM (float32 images, integer labels), over the first ``cases`` cases."""
  total = 0
  for case in range(len(s) if cases is None else cases):
    n = int(np.prod(s.shapes[case]))
    total += n * 4
    if s.labelled:
      total += n * np.load(os.path.join(s.folder, "cases", s.entry(case)["label"]), mmap_mode="r").dtype.itemsize
  return total


def in_ram_need(per_ct_case, mri_bytes, cases, workers):
  """Estimated peak bytes of the in-RAM store with ``workers`` workers: the arrays in this process, and for each
  worker (spawned; grain cloudpickles the dataset for it) the pickled bytes in both processes and the copy there."""
  data = per_ct_case * cases + mri_bytes
  return data if workers == 0 else data * (2 + 2 * workers)


# ---------------------------------------------------------------------------------------------------------- runs


def _dataset(ct, mri, *, batch, crop, seed, foreground_fraction, augment, **_):
  from cmedl_jax.data import pipeline
  return pipeline.make_train_dataset(ct, mri, global_batch_size=batch, crop_size=crop, seed=seed,
                                     foreground_fraction=foreground_fraction, augment=augment, process_index=0,
                                     process_count=1)


def _peaks(memory_dicts):
  """The peaks over several :meth:`MemoryPeak.as_dict` (the RssAnon at start: the first one's)."""
  out = {key: max(d[key] for d in memory_dicts) for key in memory_dicts[0]}
  out["anon_main_at_start_gib"] = memory_dicts[0]["anon_main_at_start_gib"]
  return out


def _timed_batches(dataset, workers, batches, memory):
  """Seconds to the first batch of an iterator over ``dataset`` (workers started), seconds for ``batches`` more,
  examples in them, and the first batch."""
  from cmedl_jax.data import pipeline
  t0 = time.perf_counter()
  iterator = pipeline.make_train_iterator(dataset, num_workers=workers)
  first = next(iterator)
  t1 = time.perf_counter()
  examples = 0
  for _ in range(batches):
    examples += len(next(iterator)["ct"])
  t2 = time.perf_counter()
  close = getattr(iterator, "close", None)
  if close is not None:
    close()
  del iterator
  memory.sample()
  return t1 - t0, t2 - t1, examples, first


def measure_stream(ct, mri, *, workers, batches, baseline, **stream):
  """Iterates the training stream once: seconds to the first batch, then ``batches`` more batches timed, memory
  peaks."""
  dataset = _dataset(ct, mri, **stream)
  with MemoryPeak(baseline) as memory:
    first_s, seconds, examples, first = _timed_batches(dataset, workers, batches, memory)
  return {"workers": workers, "first_batch_s": first_s, "seconds": seconds, "examples": examples,
          "examples_per_s": examples / max(seconds, 1e-9), **memory.as_dict()}, first


def measure_interleaved(stores, *, rounds, batches, baseline, **stream):
  """The stores' streams (0 workers) in alternating rounds: round r times ``batches`` batches after the first of
  an iterator started at batch r * (batches + 1), the stores in turn (the order alternating with r).

  Args:
    stores: {name: (ct store, mri store)}, two entries.
    rounds, batches: rounds per store, timed batches per round.
    baseline, stream: as :func:`measure_stream`.

  Returns:
    {name: row} (examples/s the median over rounds, per-round examples/s, first-batch seconds of the first round,
    minor page faults of this process per example made in the store's rounds (memory-mapped pages are mapped
    into the process on first touch; the in-RAM store's were touched when it was read), memory peaks over all of
    a store's rounds), {name: first batch of round 0}, per-round speed ratios (first
    name's examples/s over the second's).
  """
  names = list(stores)
  datasets = {name: _dataset(*stores[name], **stream) for name in names}
  per_round = {name: [] for name in names}
  memories = {name: [] for name in names}
  total_s = {name: 0.0 for name in names}
  faults = {name: 0 for name in names}
  first_batch, first_s = {}, {}
  for r in range(rounds):
    start = r * (batches + 1)
    for name in (names if r % 2 == 0 else names[::-1]):
      with MemoryPeak(baseline) as memory:
        faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        seconds_to_first, seconds, examples, first = _timed_batches(
            datasets[name][start:start + batches + 1], 0, batches, memory)
        faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before
      memories[name].append(memory.as_dict())
      per_round[name].append(examples / max(seconds, 1e-9))
      total_s[name] += seconds
      first_batch.setdefault(name, first)
      first_s.setdefault(name, seconds_to_first)
  rows = {}
  for name in names:
    rates = per_round[name]
    rows[name] = {"workers": 0, "rounds": rounds, "first_batch_s": first_s[name],
                  "examples": rounds * batches * stream["batch"], "examples_per_s": float(np.median(rates)),
                  "examples_per_s_per_round": rates, "seconds": total_s[name],
                  "minor_faults_per_example": faults[name] / (rounds * (batches + 1) * stream["batch"]),
                  **_peaks(memories[name])}
  ratios = [a / max(b, 1e-9) for a, b in zip(per_round[names[0]], per_round[names[1]])]
  return rows, first_batch, ratios


def _wait_freed(refs, timeout=60.0):
  deadline = time.monotonic() + timeout
  while any(r() is not None for r in refs) and time.monotonic() < deadline:
    gc.collect()
    time.sleep(0.1)
  if any(r() is not None for r in refs):
    print("  warning: the in-RAM store is still referenced; later rows include its memory", flush=True)


def _same_batch(a, b):
  return set(a) == set(b) and all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def _train_args(config_file, workdir, ct_dir, mri_dir, cache_dir, crop, steps):
  return [sys.executable, "-m", "cmedl_jax.train.main", "--config", config_file, "--workdir", workdir,
          f"--config.data.ct_dir={ct_dir}", f"--config.data.mri_dir={mri_dir}", "--config.data.make_phantoms=False",
          f"--config.data.cache_dir={cache_dir}", "--config.data.num_workers=2", f"--config.data.crop_size={crop}",
          f"--config.train.total_steps={steps}", "--config.train.log_every=1",
          "--config.train.checkpoint_every=1000000", "--config.train.preview_every=0", "--config.eval.data_dir=",
          "--no_progress"]


def train_start(args, label, workdir, ct_dir, mri_dir, cache_dir, xla_dir, baseline):
  """One ``cmedl-train`` process: seconds until metrics.csv has its first row, wall time, memory peaks."""
  config_file = bench.repository_file("configs", "quickstart.py")
  env = dict(os.environ, CMEDL_COMPILATION_CACHE=xla_dir)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  shutil.rmtree(workdir, ignore_errors=True)
  os.makedirs(os.path.dirname(workdir), exist_ok=True)
  metrics = os.path.join(workdir, "metrics.csv")
  log_path = workdir + ".log"
  first_step = None
  with open(log_path, "w") as log:
    t0 = time.perf_counter()
    proc = subprocess.Popen(_train_args(config_file, workdir, ct_dir, mri_dir, cache_dir, args.train_crop,
                                        args.train_steps), stdout=log, stderr=subprocess.STDOUT, env=env)
    with MemoryPeak(baseline, pid=proc.pid) as memory:
      while proc.poll() is None:
        if first_step is None and os.path.exists(metrics):
          with open(metrics) as f:
            if len(f.read().splitlines()) >= 2:
              first_step = time.perf_counter() - t0
        time.sleep(0.1)
    wall = time.perf_counter() - t0
  if proc.returncode != 0:
    with open(log_path) as f:
      tail = f.read()[-3000:]
    raise RuntimeError(f"cmedl-train ({label}) exited with {proc.returncode}; log {log_path}:\n{tail}")
  if first_step is None and os.path.exists(metrics):
    first_step = wall
  return {"start": label, "first_step_s": first_step, "wall_s": wall, **memory.as_dict()}


# ---------------------------------------------------------------------------------------------------------- main


def _gib(v):
  return f"{v:.2f}"


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m cmedl_jax.bench data", description=__doc__.split("\n")[0])
  parser.add_argument("--cases", type=_ints, default=(20, 60), help="numbers N of CT volumes, e.g. 20,60")
  parser.add_argument("--size", type=int, default=512, help="in-plane voxels of every volume")
  parser.add_argument("--slices", type=int, default=120)
  parser.add_argument("--mri-cases", type=int, default=4)
  parser.add_argument("--crop", type=int, default=256, help="training crop (px) of the throughput runs")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--batches", type=int, default=50, help="timed batches (after the first) per run or round")
  parser.add_argument("--rounds", type=int, default=6,
                      help="rounds per store of the 0-worker comparison (the stores take turns)")
  parser.add_argument("--workers", type=_ints, default=(0, 2), help="grain worker counts, e.g. 0,2")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--ram-fraction", type=float, default=0.4,
                      help="the in-RAM store runs on at most the cases whose estimated need fits this fraction of "
                      "the machine's memory (and 70%% of what is available)")
  parser.add_argument("--train-start", action="store_true",
                      help="also time cmedl-train starts (quickstart networks, 2 workers) up to the first step")
  parser.add_argument("--train-crop", type=int, default=64)
  parser.add_argument("--train-steps", type=int, default=1)
  parser.add_argument("--work-dir", default="/tmp/cmedl_data_bench")
  parser.add_argument("--keep", action="store_true", help="keep the volumes, caches and runs in --work-dir")
  parser.add_argument("--no-progress", action="store_true", help="no preprocessing progress bars")
  parser.add_argument("--json", help="also write the numbers to this file")
  args = parser.parse_args(argv)
  cases = sorted(set(args.cases))
  if not cases or cases[0] < 1 or args.mri_cases < 1 or args.batches < 1 or args.rounds < 1 or args.crop > args.size:
    parser.error("need --cases >= 1, --mri-cases >= 1, --batches >= 1, --rounds >= 1 and --crop <= --size")

  from cmedl_jax import config_base
  from cmedl_jax.data import augment as augment_lib, pipeline

  work = os.path.abspath(args.work_dir)
  pool = os.path.join(work, "pool")
  made = [os.path.join(work, name) for name in ("pool", "datasets", "cache", "train", "xla")]
  for folder in made[1:]:  # a kept pool is reused; everything measured starts cold
    shutil.rmtree(folder, ignore_errors=True)
  os.makedirs(work, exist_ok=True)
  baseline = machine_used()
  mem_total = _meminfo()["MemTotal"]
  cfg = config_base.base_config()
  augment = augment_lib.Augment.from_config(cfg.data.augment)
  results = {"command": "python -m cmedl_jax.bench data " + " ".join(argv if argv is not None else sys.argv[1:]),
             "machine": {"cpus": os.cpu_count(), "mem_total_gib": mem_total / GIB,
                         "in_use_at_start_gib": baseline / GIB},
             "volume": [args.size, args.size, args.slices], "mri_cases": args.mri_cases, "crop": args.crop,
             "batch": args.batch, "batches": args.batches, "runs": {}}
  print(f"{args.size}x{args.size}x{args.slices} volumes, N = {', '.join(map(str, cases))} CT + {args.mri_cases} "
        f"MRI; crop {args.crop}, batch {args.batch}, {args.batches} timed batches; workers "
        f"{', '.join(map(str, args.workers))}; {os.cpu_count()} CPUs, {mem_total / GIB:.1f} GiB, "
        f"{baseline / GIB:.2f} GiB in use at start (subtracted below)", flush=True)

  try:
    # ------------------------------------------------------------------------------------------------ volumes
    print(f"writing {max(cases)} CT + {args.mri_cases} MRI volumes into {pool}", flush=True)
    with MemoryPeak(baseline) as memory:
      results["generation_s"] = write_pool(pool, max(cases), args.mri_cases, args.size, args.slices, args.seed)
    print(f"volumes ready in {results['generation_s']:.1f} s ({_dir_gib(pool):.2f} GiB of .nii.gz)", flush=True)

    for n in cases:
      run = results["runs"][str(n)] = {"cases": n}
      with cfg.unlocked():
        cfg.data.ct_dir = write_dataset_folder(os.path.join(work, "datasets", f"ct_{n}"), pool, n)
        cfg.data.mri_dir = os.path.join(pool, "mri")
        cfg.data.cache_dir = os.path.join(work, "cache", f"N{n}")
      # ---------------------------------------------------------------------------------------------- starts
      print(f"\nN = {n}: first start (preprocessing into {cfg.data.cache_dir})", flush=True)
      with MemoryPeak(baseline) as memory:
        t0 = time.perf_counter()
        ct, mri = pipeline.training_stores(cfg.data, progress=not args.no_progress)
        run["first_start_s"] = time.perf_counter() - t0
      run["first_start_memory"] = memory.as_dict()
      t0 = time.perf_counter()
      ct, mri = pipeline.training_stores(cfg.data, progress=False)
      run["second_start_s"] = time.perf_counter() - t0
      os.sync()  # the cache just written goes to disk now, not in the background of the throughput rows
      run["cache_gib"] = _dir_gib(cfg.data.cache_dir)
      print(f"N = {n}: first start {run['first_start_s']:.1f} s (peak machine memory in use "
            f"{_gib(memory.machine / GIB)} GiB, cache {run['cache_gib']:.2f} GiB), second start "
            f"{run['second_start_s']:.3f} s", flush=True)

      # ---------------------------------------------------------------------------------------------- streams
      stream = dict(batch=args.batch, batches=args.batches, crop=args.crop, seed=args.seed,
                    foreground_fraction=cfg.data.foreground_fraction, augment=augment, baseline=baseline)
      per_ct_case = store_bytes(ct, 1) if len(ct) else 0
      mri_bytes = store_bytes(mri)
      rows = run["throughput"] = []
      for w in args.workers:
        limit = min(args.ram_fraction * mem_total, 0.7 * _meminfo()["MemAvailable"])
        k = n
        while k > 0 and in_ram_need(per_ct_case, mri_bytes, k, w) > limit:
          k -= 1
        mmap_row, mmap_first = measure_stream(ct, mri, workers=w, **stream)
        rows.append({"store": "mmap", "cases": n, **mmap_row})
        _print_row(rows[-1])
        if k == 0:
          why = f"in-RAM store, {w} workers: skipped, even 1 case needs more than {limit / GIB:.1f} GiB"
          print("  " + why, flush=True)
          rows.append({"store": "in-RAM", "cases": 0, "workers": w, "skipped": why})
          continue
        ct_k = ct if k == n else ct.subset(ct.case_ids[:k])
        if k < n:
          print(f"  in-RAM store with {w} workers on {n} cases would need "
                f"~{in_ram_need(per_ct_case, mri_bytes, n, w) / GIB:.1f} GiB > {limit / GIB:.1f} GiB: both stores "
                f"on the first {k} cases", flush=True)
          mmap_row, mmap_first = measure_stream(ct_k, mri, workers=w, **stream)
          rows.append({"store": "mmap", "cases": k, **mmap_row})
          _print_row(rows[-1])
        t0 = time.perf_counter()
        ct_ram, mri_ram = InRamStore(ct_k), InRamStore(mri)
        load_s = time.perf_counter() - t0
        if w == 0:  # the ratio from rounds taken in turn; the memory-mapped row above gives its memory alone
          both, first, ratios = measure_interleaved({"mmap": (ct_k, mri), "in-RAM": (ct_ram, mri_ram)},
                                                    rounds=args.rounds, **stream)
          ram_row = dict(both["in-RAM"], mmap_interleaved_examples_per_s=both["mmap"]["examples_per_s"],
                         mmap_interleaved_examples_per_s_per_round=both["mmap"]["examples_per_s_per_round"],
                         mmap_minor_faults_per_example=both["mmap"]["minor_faults_per_example"])
          ratio = float(np.median(ratios))
        else:
          ram_row, ram_first = measure_stream(ct_ram, mri_ram, workers=w, **stream)
          first = {"mmap": mmap_first, "in-RAM": ram_first}
          ratios = None
          ratio = mmap_row["examples_per_s"] / max(ram_row["examples_per_s"], 1e-9)
        freed = [weakref.ref(ct_ram), weakref.ref(mri_ram)]
        del ct_ram, mri_ram
        _wait_freed(freed)  # before the next row: grain's prefetch threads finish their item after close()
        rows.append({"store": "in-RAM", "cases": k, "load_s": load_s, **ram_row,
                     "same_first_batch": _same_batch(first["in-RAM"], first["mmap"]),
                     "ratio_mmap_over_in_ram": ratio, "ratios_per_round": ratios})
        _print_row(rows[-1])
      del ct, mri

    # -------------------------------------------------------------------------------------------------- training
    if args.train_start:
      starts = results["train_starts"] = []
      xla = os.path.join(work, "xla")
      plan = [(cases[0], "first (compilation cold)"), (cases[0], "second (compilation warm)")]
      plan += [(n, "warm") for n in cases[1:]]
      print(f"\ncmedl-train starts: quickstart networks, 2 workers, crop {args.train_crop}, "
            f"{args.train_steps} step(s); compilation cache {xla}", flush=True)
      for i, (n, label) in enumerate(plan):
        result = train_start(args, label, os.path.join(work, "train", f"run{i}_N{n}"),
                             os.path.join(work, "datasets", f"ct_{n}"), os.path.join(pool, "mri"),
                             os.path.join(work, "cache", f"N{n}"), xla, baseline)
        result["cases"] = n
        starts.append(result)
        print(f"  N = {n:3d} {label:26s} first step after {_s(result['first_step_s'])} s (process "
              f"{result['wall_s']:.1f} s); peak machine memory in use {_gib(result['machine_in_use_gib'])} GiB "
              f"({_gib(result['machine_in_use_absolute_gib'])} GiB with the other processes), "
              f"RssAnon trainer {_gib(result['anon_main_gib'])} + workers {_gib(result['anon_workers_gib'])} = "
              f"{_gib(result['anon_total_gib'])} GiB", flush=True)
  finally:
    if not args.keep:
      for folder in made:
        shutil.rmtree(folder, ignore_errors=True)
      if os.path.isdir(work) and not os.listdir(work):
        os.rmdir(work)

  _print_summary(results)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)
  return 0


def _s(seconds):
  return "?" if seconds is None else f"{seconds:.1f}"


def _dir_gib(folder):
  total = 0
  for root, _, files in os.walk(folder):
    for name in files:
      try:
        total += os.path.getsize(os.path.join(root, name))
      except OSError:
        pass
  return total / GIB


def _print_row(r):
  extra = ""
  if r["store"] == "in-RAM":
    spread = ""
    if r.get("ratios_per_round"):
      spread = (f" (median of {len(r['ratios_per_round'])} rounds taken in turn with the memory-mapped store, "
                f"{min(r['ratios_per_round']):.2f}-{max(r['ratios_per_round']):.2f}; memory-mapped "
                f"{r['mmap_interleaved_examples_per_s']:.1f} examples/s in them; minor page faults per example "
                f"{r['mmap_minor_faults_per_example']:.1f} memory-mapped, {r['minor_faults_per_example']:.1f} in-RAM)")
    extra = (f"  loaded in {r['load_s']:.1f} s; ratio mmap/in-RAM {r['ratio_mmap_over_in_ram']:.2f}{spread}; same "
             f"first batch: {'yes' if r['same_first_batch'] else 'NO'}")
  timed = (f"median of {r['rounds']} rounds, {r['examples']} examples in all" if r.get("rounds") else
           f"{r['examples']} examples in {r['seconds']:.2f} s")
  print(f"  {r['store']:6s} {r['cases']:3d} cases, {r['workers']} workers: {r['examples_per_s']:8.1f} examples/s "
        f"({timed}; first batch {r['first_batch_s']:.2f} s); peak machine "
        f"memory in use {_gib(r['machine_in_use_gib'])} GiB, RssAnon main {_gib(r['anon_main_at_start_gib'])} at "
        f"start, peak {_gib(r['anon_main_gib'])} + workers {_gib(r['anon_workers_gib'])} = "
        f"{_gib(r['anon_total_gib'])} GiB{extra}", flush=True)


def _print_summary(results):
  print("\nsummary (GiB: peaks of machine memory in use / RssAnon of this process + its workers)")
  print(f"{'N':>4} {'store':>6} {'cases':>5} {'workers':>7} {'examples/s':>10} {'mmap/RAM':>8} {'1st batch s':>11} "
        f"{'machine GiB':>11} {'anon GiB':>8}")
  for n, run in results["runs"].items():
    for r in run["throughput"]:
      if r.get("skipped"):
        print(f"{n:>4} {r['store']:>6} {'-':>5} {r['workers']:>7}  skipped")
        continue
      ratio = f"{r['ratio_mmap_over_in_ram']:.2f}" if "ratio_mmap_over_in_ram" in r else ""
      print(f"{n:>4} {r['store']:>6} {r['cases']:>5} {r['workers']:>7} {r['examples_per_s']:>10.1f} {ratio:>8} "
            f"{r['first_batch_s']:>11.2f} {r['machine_in_use_gib']:>11.2f} {r['anon_total_gib']:>8.2f}")
  for n, run in results["runs"].items():
    print(f"N = {n}: first start {run['first_start_s']:.1f} s, second start {run['second_start_s']:.3f} s, "
          f"preprocessing peak machine memory in use {run['first_start_memory']['machine_in_use_gib']:.2f} GiB")
  for s in results.get("train_starts", []):
    print(f"train start N = {s['cases']} {s['start']}: first step {_s(s['first_step_s'])} s, machine "
          f"{s['machine_in_use_gib']:.2f} GiB ({s['machine_in_use_absolute_gib']:.2f} absolute), RssAnon trainer + "
          f"workers {s['anon_total_gib']:.2f} GiB")


if __name__ == "__main__":
  sys.exit(main())
