"""Benchmark: the full CMEDL train step, JAX (jitted) vs the PyTorch reference step, same machine and weights.

    python -m cmedl_jax.bench step [--config quickstart|paper|FILE.py[:ARG]] [--size 128] [--batch 4]
        [--steps 5] [--warmup 2] [--compile] [--backends default,onednn,xla,plain] [--skip-torch]
        [--json OUT.json] [--conv-algorithm winograd|direct]

Both frameworks run CMEDL with the CycleGAN translator (two generators, two PatchGANs, image pools of
``pool_size``, teacher and student segmenters, CE + soft Dice, hint, LSGAN, cycle, identity; Adam per group) on
the same random batch of ``--batch`` images of ``--size`` px, starting from the same weights (PyTorch's init
converted to flax by :mod:`cmedl_jax.torch_port.bridge`). ``--config``: ``quickstart`` = configs/quickstart.py
networks (generators ngf 8 with 3 blocks, PatchGAN ndf 8, U-Nets (8, 16, 32, 32)); ``paper`` = the design defaults
of configs/cmedl.py (ngf 64 with 9 blocks, ndf 64, the 13.4M U-Net).

Timed:

* JAX: ``train.step.make_train_step`` (jit + shard_map over this machine's devices, state donated), compiled with
  ``lower().compile()`` (the printed compile time), each step waited for with ``block_until_ready``; once per
  ``--backends`` entry: ``default`` (the config's ``conv_backend``, "auto" unless changed, and what it resolves to
  here) and each CPU form named (``onednn``, ``xla``, ``plain``: :mod:`cmedl_jax.ops`); a form that is what the
  default resolves to is not run twice;
* PyTorch eager: ``torch_port.reference_step.CMEDLStep.step`` (forward, one backward, three optimizers);
* with ``--compile``: the same with the loss computation under ``torch.compile`` (the image pools run eagerly);
  its first step includes the compilation.

Each runner lives in a process of its own (spawned; in one process, the threads one framework leaves behind
slowed the other's steps: PyTorch eager 0.47 -> 0.72 s per quickstart step next to XLA, -> 1.1 s next to oneDNN's
OpenMP threads, measured). Each runs ``--warmup`` steps, then ``--steps`` rounds of one step of each runner in
turn (interleaved, so a shared machine's background load hits all alike; the idle ones wait on a pipe). Step times
are measured inside the worker process. Prints the median step time and images/s of each, every JAX runner's ratio
to each PyTorch runner of images/s (> 1: JAX is faster) with the median and range of the per-round ratios
(:func:`paired_ratios`), the machine's load average, and the step-1 losses of the default JAX runner and PyTorch
eager (equal up to float rounding while the pools are filling, i.e. batch <= pool_size). ``--conv-algorithm``
sets the library's 3x3 stride-1 algorithm (``config.conv_algorithm``: winograd, the default, | direct).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
import traceback

import numpy as np

from cmedl_jax import config_base

_CONFIGS = {"quickstart": ("configs/quickstart.py", "translator=cyclegan"),
            "paper": ("configs/cmedl.py", "translator=cyclegan,segmenter=unet")}


def load_config(spec: str):
  """``quickstart`` | ``paper`` | ``FILE.py[:ARG]`` -> ml_collections config (``get_config(ARG)`` of the file)."""
  path, arg = _CONFIGS.get(spec, (spec.split(":", 1) + [None])[:2])
  candidates = [path, os.path.join(os.path.dirname(__file__), "..", "..", path)]
  found = next((p for p in candidates if os.path.exists(p)), None)
  if found is None:
    raise SystemExit(f"config file {path!r} not found (run from the repository root or pass FILE.py)")
  return config_base.load_config_file(found, arg)


def synthetic_batch(batch, size, seed=0):
  """{"ct", "ct_label", "mri"}: NHWC float32 images in [-1, 1] and a square lesion per CT image."""
  rng = np.random.default_rng(seed)
  label = np.zeros((batch, size, size), np.int32)
  side = max(2, size // 8)
  for i in range(batch):
    r, c = rng.integers(0, size - side, size=2)
    label[i, r:r + side, c:c + side] = 1
  ct = np.tanh(rng.normal(0, 0.4, (batch, size, size, 1)) + 0.6 * label[..., None]).astype(np.float32)
  mri = np.tanh(rng.normal(0, 0.5, (batch, size, size, 1))).astype(np.float32)
  return {"ct": ct, "ct_label": label, "mri": mri}


def _machine():
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
  except OSError:
    pass
  return f"{cpu}, {os.cpu_count()} CPU cores visible, {platform.system()} {platform.release()}"


def _load_average():
  # Timings on a shared machine are only meaningful when nothing else runs: print the load next to them.
  try:
    return "load average %.2f %.2f %.2f" % os.getloadavg()
  except OSError:
    return "load average unknown"


class JaxRunner:
  """The jitted JAX step on this machine's devices with the config's kernels (``kernels``); compiled on construction
  (``compile_s``)."""

  def __init__(self, cfg, state_dicts, batch, image_shape):
    import jax

    from cmedl_jax import ops
    from cmedl_jax.torch_port import bridge
    from cmedl_jax.train import methods
    from cmedl_jax.train import state as state_lib
    from cmedl_jax.train import step as step_lib

    self._jax = jax
    nets = methods.build_networks(cfg)
    optimizers = state_lib.make_optimizers(cfg, nets)
    mesh = step_lib.make_mesh()
    self.kernels = ops.from_config(cfg)
    with ops.use(self.kernels):  # the conversion traces the networks (their variables' shapes)
      self.state = bridge.train_state_from_torch(state_dicts, nets, cfg, optimizers, image_shape, mesh=mesh)
    self.batch = step_lib.shard_batch(batch, mesh)
    train_step = step_lib.make_train_step(nets, cfg, optimizers, mesh=mesh)
    t0 = time.perf_counter()
    self.compiled = train_step.lower(self.state, self.batch).compile()
    self.compile_s = time.perf_counter() - t0
    self.devices = f"{jax.device_count()} x {jax.devices()[0].platform}"

  def step(self):
    self.state, metrics, _ = self.compiled(self.state, self.batch)
    self._jax.block_until_ready((self.state, metrics))
    return metrics

  def metrics(self, metrics):
    return {k: float(v) for k, v in self._jax.device_get(metrics).items()}

  def peak_memory_bytes(self):
    """Peak bytes allocated on the (first) device, where the platform reports it (GPUs; not the CPU)."""
    stats = self._jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


class TorchRunner:
  """The PyTorch reference step, eager or with the loss computation under ``torch.compile``."""

  def __init__(self, cfg, batch, compile_mode=False, seed=0, device="cpu", amp_dtype=None, compile_backend=None):
    import torch

    from cmedl_jax.torch_port import reference_step

    self._torch = torch
    self.device = torch.device(device)
    self.torch_step = reference_step.CMEDLStep.from_config(cfg, seed=seed).to(
        self.device, getattr(torch, amp_dtype) if amp_dtype else None)
    if compile_mode:
      self.torch_step.compile(**({"backend": compile_backend} if compile_backend else {}))
    self.batch = batch

  def step(self):
    return self.torch_step.step(self.batch)  # its float() of the losses waits for the device

  def metrics(self, metrics):
    return metrics

  def peak_memory_bytes(self):
    return self._torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None


def jax_config(spec):
  """The config of a JAX runner: ``spec``'s problem, with its ``conv_backend`` unless it is "default" and its
  ``compute_dtype`` (default float32)."""
  cfg = load_config(spec["config"])
  cfg.data.crop_size, cfg.data.global_batch_size = spec["size"], spec["batch"]
  cfg.compute_dtype = spec.get("compute_dtype", "float32")
  for path, value in spec.get("overrides", {}).items():  # {"model.generator.num_blocks": 1, ...}
    *parents, leaf = path.split(".")
    section = cfg
    for name in parents:
      section = section[name]
    section[leaf] = value
  if spec.get("conv_backend", "default") != "default":
    cfg.conv_backend = spec["conv_backend"]
  if spec.get("conv_algorithm"):
    cfg.conv_algorithm = spec["conv_algorithm"]
  return cfg


def _build_runner(spec):
  """The runner of ``spec["kind"]`` (jax | torch_eager | torch_compile), built in the calling process.

  Optional spec keys: ``compute_dtype`` (JAX), ``matmul_precision`` (JAX's ``jax_default_matmul_precision``, e.g.
  "highest" for float32 comparisons), ``device`` and ``amp_dtype`` (PyTorch: "cuda", "bfloat16" for AMP) and
  ``tf32`` (PyTorch's TF32 matmuls and cuDNN convolutions; off unless set), ``compile_backend`` (torch.compile's
  backend; default inductor) and ``overrides`` ({dotted config field: value}, both frameworks).
  """
  from cmedl_jax.torch_port import reference_step

  cfg = jax_config(spec)
  size, batch_size = spec["size"], spec["batch"]
  batch = synthetic_batch(batch_size, size)
  if spec["kind"] != "jax":
    import torch
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(spec.get("tf32", False))
    return TorchRunner(cfg, batch, compile_mode=spec["kind"] == "torch_compile", device=spec.get("device", "cpu"),
                       amp_dtype=spec.get("amp_dtype"), compile_backend=spec.get("compile_backend"))
  if spec.get("matmul_precision"):
    import jax
    jax.config.update("jax_default_matmul_precision", spec["matmul_precision"])
  # One seeded PyTorch init gives both frameworks the same starting weights.
  state_dicts = reference_step.CMEDLStep.from_config(cfg, seed=0).state_dicts()
  return JaxRunner(cfg, state_dicts, batch, (size, size, 1))


def _serve(conn, spec):
  """Worker process: builds the runner, then answers "step" with (seconds, step-1 metrics or None) until "stop"."""
  try:
    runner = _build_runner(spec)
    info = {}
    if spec["kind"] == "jax":
      from cmedl_jax import ops
      kernels = runner.kernels
      info = dict(compile_s=runner.compile_s, devices=runner.devices, conv=ops.cpu_form(kernels),
                  backend=kernels.backend, algorithm=kernels.algorithm)
    conn.send(("ready", info))
    first = True
    while True:
      command = conn.recv()
      if command == "peak_memory":
        conn.send(runner.peak_memory_bytes())
        continue
      if command != "step":
        break
      t0 = time.perf_counter()
      metrics = runner.step()
      elapsed = time.perf_counter() - t0
      conn.send((elapsed, runner.metrics(metrics) if first else None))
      first = False
  except Exception:  # pylint: disable=broad-except
    try:
      conn.send(("error", traceback.format_exc()))
    except OSError:  # the parent is gone
      pass
  finally:
    conn.close()


class ProcessRunner:
  """A runner living in its own spawned process (see the module docstring for why)."""

  def __init__(self, spec, wait=True):
    ctx = multiprocessing.get_context("spawn")
    self._conn, child = ctx.Pipe()
    self._process = ctx.Process(target=_serve, args=(child, spec), daemon=True)
    self._process.start()
    child.close()
    self._kind = spec["kind"]
    self.info = None
    self.last_elapsed = None
    if wait:
      self.wait_ready()

  def wait_ready(self):
    """Waits until the runner is built (JAX: compiled); several runners started with ``wait=False`` build at
    once."""
    if self.info is None:
      self.info = self._receive(self._kind)
    return self.info

  def peak_memory_bytes(self):
    self._conn.send("peak_memory")
    return self._conn.recv()

  def _receive(self, what):
    try:
      message = self._conn.recv()
    except EOFError:
      raise SystemExit(f"the {what} benchmark process died (exit code {self._process.exitcode})") from None
    if isinstance(message, tuple) and message[0] == "error":
      raise SystemExit(f"the benchmark process failed:\n{message[1]}")
    return message[1] if message[0] == "ready" else message

  def step(self):
    self._conn.send("step")
    self.last_elapsed, metrics = self._receive("step")
    return metrics

  def metrics(self, metrics):
    return metrics

  def close(self):
    try:
      self._conn.send("stop")
    except OSError:
      pass
    self._process.join(timeout=30)
    if self._process.is_alive():
      self._process.terminate()
      self._process.join(timeout=10)


def run_interleaved(runners, warmup, steps):
  """Warm-up steps per runner (the first one timed alone), then ``steps`` rounds of one step of each runner in turn.

  Interleaving exposes every framework to the same background load, so their ratio stays meaningful on a shared
  machine. A runner with ``last_elapsed`` (a :class:`ProcessRunner`) reports its own step time. Returns
  {name: {"first_step_s", "times", "first_metrics"}}.
  """

  def timed_step(runner):
    t0 = time.perf_counter()
    metrics = runner.step()
    elapsed = time.perf_counter() - t0
    return getattr(runner, "last_elapsed", None) or elapsed, metrics

  out = {}
  for name, runner in runners.items():
    first_step_s, metrics = timed_step(runner)
    out[name] = dict(first_step_s=first_step_s, times=[], first_metrics=runner.metrics(metrics))
    for _ in range(max(warmup - 1, 0)):
      runner.step()
  for _ in range(steps):
    for name, runner in runners.items():
      out[name]["times"].append(timed_step(runner)[0])
  return out


def paired_ratios(jax_times, other_times):
  """Per-round speed ratios other / JAX step time (> 1: JAX faster), for steps taken in the same rounds.

  Each round runs one step of each framework back to back, so a round's ratio sees one background load; their
  median is steadier than the ratio of medians on a shared machine. Returns (median, min, max).
  """
  ratios = sorted(o / j for j, o in zip(jax_times, other_times))
  if not ratios:
    raise ValueError("no rounds to compare")
  return statistics.median(ratios), ratios[0], ratios[-1]


def add_problem_arguments(parser):
  """--config, --size, --batch: the networks and batch of the benchmarked step (shared with ``bench convs``)."""
  parser.add_argument("--config", default="quickstart", help="quickstart | paper | FILE.py[:ARG]")
  parser.add_argument("--size", type=int, default=128, help="square crop in pixels")
  parser.add_argument("--batch", type=int, default=4, help="images per step (the global batch)")
  parser.add_argument("--conv-algorithm", choices=("winograd", "direct"),
                      help="JAX's oneDNN 3x3 stride-1 convolutions (default: the config's conv_algorithm)")


JAX_BACKENDS = ("default", "onednn", "xla", "plain")
_LABELS = {"torch_eager": "PyTorch eager", "torch_compile": "PyTorch torch.compile"}


def jax_runner_specs(spec, backends):
  """{runner name: spec} of the JAX runners of ``backends`` (see the module docstring), the default first.

  A named form equal to what the default resolves to on this machine is dropped (the default runs it).
  """
  from cmedl_jax import ops
  default_form = ops.cpu_form(ops.from_config(jax_config(spec)))
  runners = {}
  for backend in backends:
    if backend not in JAX_BACKENDS:
      raise SystemExit(f"--backends: unknown {backend!r}; expected some of {', '.join(JAX_BACKENDS)}")
    if backend != "default" and backend == default_form and "default" in backends:
      continue
    name = "jax" if backend == "default" else f"jax_{backend}"
    runners[name] = {**spec, "kind": "jax", "conv_backend": backend}
  return runners


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m cmedl_jax.bench step", description=__doc__.split("\n\n")[0])
  add_problem_arguments(parser)
  parser.add_argument("--steps", type=int, default=5, help="timed steps")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (JAX: after compiling)")
  parser.add_argument("--compile", action="store_true", help="also time PyTorch with torch.compile")
  parser.add_argument("--backends", default="default,onednn,xla,plain",
                      help="JAX runners, comma-separated: default (the config's conv_backend) and CPU forms "
                           "onednn, xla, plain; '' for none")
  parser.add_argument("--skip-torch", action="store_true", help="eager PyTorch (its weights are still built)")
  parser.add_argument("--json", help="write the results to this file")
  args = parser.parse_args(argv)

  import torch

  cfg = load_config(args.config)
  cfg.data.crop_size, cfg.data.global_batch_size = args.size, args.batch
  m = cfg.model
  print(f"machine: {_machine()}; torch {torch.__version__} with {torch.get_num_threads()} threads; "
        f"{_load_average()}")
  print(f"config {args.config}: generators {dict(m.generator)}, discriminators {dict(m.discriminator)}, "
        f"{m.segmenter} {dict(m.segmenter_kwargs) or '(defaults)'}; {args.batch} x {args.size}x{args.size} px, "
        f"pool {cfg.pool_size}; {args.warmup} warm-up + {args.steps} timed steps")
  results = dict(config=args.config, size=args.size, batch=args.batch, steps=args.steps, warmup=args.warmup,
                 machine=_machine(), torch_threads=torch.get_num_threads(), load_average_start=_load_average())
  spec = dict(config=args.config, size=args.size, batch=args.batch, conv_algorithm=args.conv_algorithm)
  specs = jax_runner_specs(spec, [b for b in args.backends.split(",") if b])
  if not args.skip_torch:
    specs["torch_eager"] = {**spec, "kind": "torch_eager"}
  if args.compile:
    specs["torch_compile"] = {**spec, "kind": "torch_compile"}
  labels = dict(_LABELS)
  runners = {}
  try:
    for name, runner_spec in specs.items():
      runners[name] = ProcessRunner(runner_spec)
      if runner_spec["kind"] == "jax":
        info = runners[name].info
        labels[name] = f"JAX {info['backend']}" + (f" ({info['conv']})" if info["backend"] == "auto" else "")
        results[name + "_info"] = info
        print(f"{labels[name]}: compiled the step in {info['compile_s']:.1f} s on {info['devices']}; CPU form "
              f"{info['conv']} ({info['algorithm']} 3x3)", flush=True)
    timings = run_interleaved(runners, args.warmup, args.steps)
  finally:
    for runner in runners.values():
      runner.close()
  for name, timing in timings.items():
    median = statistics.median(timing["times"])
    timing.update(median_step_s=median, min_step_s=min(timing["times"]), images_per_s=args.batch / median)
    results[name] = timing
    note = f"   (first step {timing['first_step_s']:.1f} s)" if name == "torch_compile" else ""
    print(f"{labels[name]:24s} {median:9.3f} s/step (median; min {min(timing['times']):.3f}) "
          f"{args.batch / median:8.2f} images/s{note}", flush=True)
  for jax_name in [n for n in timings if n.startswith("jax")]:
    for name in ("torch_eager", "torch_compile"):
      if name in timings:
        ratio = timings[jax_name]["images_per_s"] / timings[name]["images_per_s"]
        results[f"ratio_{jax_name}_over_{name}"] = ratio
        median, low, high = paired_ratios(timings[jax_name]["times"], timings[name]["times"])
        results[f"paired_ratio_{jax_name}_over_{name}"] = dict(median=median, min=low, max=high)
        print(f"ratio {labels[jax_name]} / {labels[name]} (images/s): {ratio:.2f}x; per round: median "
              f"{median:.2f}x (range {low:.2f}-{high:.2f}x)")
  first_jax = next((n for n in timings if n.startswith("jax")), None)
  if first_jax and "torch_eager" in timings:
    a, b = timings[first_jax]["first_metrics"], timings["torch_eager"]["first_metrics"]
    keys = [k for k in ("total", "gen_total", "d_mr", "teacher_seg", "student_seg", "hint") if k in a and k in b]
    print(f"step-1 losses, same weights and batch ({labels[first_jax]} / PyTorch): "
          + ", ".join(f"{k} {a[k]:.5f} / {b[k]:.5f}" for k in keys))
  results["load_average_end"] = _load_average()
  print(f"at the end: {results['load_average_end']}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
