"""The accelerator check: one command for a machine with one GPU, most valuable stage first.

    python -m cmedl_jax.bench accelerator --out DIR [--dry-run] [--stages tests,step,pipeline,train]
        [--overwrite] [--compile-fp32] [--no-torch]

(``launch/gpu_check.sh WHEELS OUT`` installs the missing wheels, then runs this; see launch/README.md.) Writes
DIR/accelerator.json after every stage (a stage that fails records its error and the next one runs) and
DIR/accelerator.log (everything printed). Stages:

1. ``tests``: on the first device, the train step (configs/quickstart.py networks, one seeded state and one
   synthetic batch) against the same step on the CPU (float32, ``jax_default_matmul_precision="highest"``):
   the largest relative difference of the losses and gradient norms, and of the parameters after the step; the
   step under ``shard_map`` against ``pmap`` on the local devices (two steps); an orbax round trip of the state
   (saved and restored bit for bit).
2. ``step``: the full CMEDL train step (CycleGAN + U-Nets, same weights, same batch) at the paper's scale
   (configs/cmedl.py networks, 256 px, batch 8) and at the quickstart scale (64 px, batch 8): JAX float32 (matmul
   precision "highest"), JAX bfloat16 (``compute_dtype``), PyTorch eager float32 (TF32 off), PyTorch eager AMP
   bfloat16, torch.compile AMP bfloat16 (and float32 with ``--compile-fp32``), one process each (built at once),
   warm-up steps, then interleaved rounds (:func:`cmedl_jax.bench.step_bench.run_interleaved`): median step
   time, images/s, peak device memory, first-step losses, and the ratios JAX / PyTorch (float32 with float32,
   bfloat16 with AMP) with the median and range of the per-round ratios.
3. ``pipeline``: the training input pipeline (preprocessed store of generated phantoms, augmentation, 256 px
   crops, batch 8) with 8 and 16 grain workers: examples/s, against the examples/s the JAX bfloat16 paper-scale
   step of stage 2 consumes.
4. ``train``: ``cmedl-train`` with configs/quickstart.py for ``--train-steps`` steps (its phantoms generated into
   DIR), then ``cmedl-evaluate`` of its best checkpoint on the held-out phantoms; then two runs of a few steps with
   the same seed, XLA's deterministic GPU ops on (``--xla_gpu_deterministic_ops``), compared value by value (if
   they fail to run with the flag, the error is recorded and they run again without it).

``--dry-run`` runs every stage on the CPU at tiny sizes (the quickstart networks narrowed to a few channels at
32 px for both step scales, torch.compile with its ``aot_eager`` backend instead of inductor's generated C++, 0
and 2 workers, a few training steps) and writes the same keys; tests/test_accelerator_check.py runs it. Every
number is measured in this run; nothing is compared against stored values.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback

from cmedl_jax import bench

STAGES = ("tests", "step", "pipeline", "train")

# Sizes of a real run and of --dry-run. "scales": {name: (config, crop px, batch)} of stage 2.
SIZES = {
    "full": dict(check=("quickstart", 64, 8), scales={"paper": ("paper", 256, 8), "quickstart": ("quickstart", 64, 8)},
                 warmup=3, rounds=10, workers=(8, 16), crop=256, batch=8, batches=100,
                 phantoms=dict(num_ct=6, num_mri=6, size=320, slices=24), train_steps=300, repeat_steps=20),
    # The quickstart networks narrowed to a few channels (compiling is most of a dry run's time), torch.compile
    # without inductor's C++ code generation (minutes on a CPU); batch 8: the step runners use every device, and
    # a test session has 8 virtual CPU devices.
    "dry": dict(check=("quickstart", 32, 2), scales={"paper": ("quickstart", 32, 8),
                                                     "quickstart": ("quickstart", 32, 8)},
                overrides={"model.segmenter_kwargs": {"features": (4, 8, 8)}, "model.generator.base_features": 4,
                           "model.generator.num_blocks": 1, "model.discriminator.base_features": 4},
                compile_backend="aot_eager",
                train_flags=["--config.model.segmenter_kwargs.features=(4,8,8)",
                             "--config.model.generator.base_features=4", "--config.model.generator.num_blocks=1",
                             "--config.model.discriminator.base_features=4"],
                warmup=1, rounds=2, workers=(0, 2), crop=32, batch=4, batches=3,
                phantoms=dict(num_ct=3, num_mri=3, size=48, slices=12), train_steps=4, repeat_steps=2),
}
# Stage 1 agreement bounds (float32, "highest" matmul precision; the convolutions sum in other orders).
LOSS_RTOL = 1e-3
PARAM_ATOL = 1e-4


class _Tee:
  """Writes to the terminal and to the log file."""

  def __init__(self, stream, log):
    self.stream, self.log = stream, log

  def write(self, text):
    self.stream.write(text)
    self.log.write(text)
    return len(text)

  def flush(self):
    self.stream.flush()
    self.log.flush()


def _write_json(path, results):
  from cmedl_jax.utils import files
  files.write_text(path, json.dumps(results, indent=1, default=str))


def environment():
  """Versions and devices of this machine."""
  import jax
  out = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
         "jax": jax.__version__, "backend": jax.default_backend(),
         "devices": [f"{d.platform}:{d.device_kind}" for d in jax.devices()]}
  for name in ("jaxlib", "flax", "optax", "orbax.checkpoint", "grain", "numpy", "torch"):
    try:
      module = __import__(name, fromlist=["__version__"])
      out[name] = getattr(module, "__version__", "?")
    except ImportError:
      out[name] = None
  try:
    import torch
    out["torch_cuda"] = torch.version.cuda
    out["torch_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
  except ImportError:
    pass
  return out


def _relative_difference(a, b):
  return abs(a - b) / max(abs(a), abs(b), 1e-12)


def _differences(metrics_a, metrics_b, params_a, params_b):
  """({metric: relative difference} of two steps' metrics, the largest absolute difference of their parameters)."""
  import jax
  import numpy as np
  losses = {k: _relative_difference(float(metrics_a[k]), float(metrics_b[k])) for k in metrics_a if k != "finite"}
  params = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)))
  return losses, params


# ------------------------------------------------------------------------------------------------------ stage 1


def stage_tests(ctx):
  """The step on the device against the CPU, shard_map against pmap, an orbax round trip."""
  import jax
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P

  from cmedl_jax.bench import step_bench
  from cmedl_jax.train import checkpointing, methods
  from cmedl_jax.train import state as state_lib
  from cmedl_jax.train import step as step_lib

  config, size, batch_size = ctx.sizes["check"]
  cfg = step_bench.jax_config({"config": config, "size": size, "batch": batch_size,
                               "overrides": ctx.sizes.get("overrides", {})})
  batch = step_bench.synthetic_batch(batch_size, size, seed=1)
  nets = methods.build_networks(cfg)
  optimizers = state_lib.make_optimizers(cfg, nets)
  cpu = jax.devices("cpu")[0]
  out = {"config": config, "size": size, "batch": batch_size, "device": str(jax.devices()[0])}
  with jax.default_matmul_precision("highest"):
    with jax.default_device(cpu):
      state0 = jax.jit(lambda k: state_lib.create_train_state(nets, cfg, optimizers, k, (size, size, 1)))(
          jax.random.key(0))
    runs = {}
    for where, devices in (("device", jax.devices()[:1]), ("cpu", [cpu])):
      mesh = step_lib.make_mesh(devices)
      state = jax.device_put(state0, NamedSharding(mesh, P()), may_alias=False)  # the step donates it
      step = step_lib.make_train_step(nets, cfg, optimizers, mesh=mesh)
      state, metrics, _ = step(state, step_lib.shard_batch(batch, mesh))
      runs[where] = ({k: float(v) for k, v in jax.device_get(metrics).items()}, jax.device_get(state.params))
    (m_dev, p_dev), (m_cpu, p_cpu) = runs["device"], runs["cpu"]
    loss_diff, param_diff = _differences(m_cpu, m_dev, p_cpu, p_dev)
    out["device_vs_cpu"] = dict(max_loss_relative_difference=max(loss_diff.values()),
                                loss_relative_difference=loss_diff, max_param_abs_difference=param_diff,
                                losses_device=m_dev, losses_cpu=m_cpu,
                                ok=max(loss_diff.values()) <= LOSS_RTOL and param_diff <= PARAM_ATOL)
    print(f"  step on {out['device']} vs CPU: losses within {max(loss_diff.values()):.2e} relative, parameters "
          f"after the step within {param_diff:.2e}", flush=True)

    # shard_map vs pmap on the local devices (a dry run: two of them), two steps from the same state
    devices = jax.local_devices()[:2] if ctx.dry else jax.local_devices()
    n = len(devices)
    global_batch = step_bench.synthetic_batch(batch_size * n, size, seed=2)
    mesh = step_lib.make_mesh(devices)
    sm_step = step_lib.make_train_step(nets, cfg, optimizers, mesh=mesh)
    state = jax.device_put(state0, NamedSharding(mesh, P()), may_alias=False)
    pm_step = step_lib.make_train_step(nets, cfg, optimizers, backend="pmap")
    pm_state = step_lib.replicate(state0, n)
    for _ in range(2):
      state, sm_metrics, _ = sm_step(state, step_lib.shard_batch(global_batch, mesh))
      pm_state, pm_metrics, _ = pm_step(pm_state, jax.tree.map(
          lambda x: x.reshape((n, -1) + x.shape[1:]), global_batch))
    losses, pdiff = _differences(jax.device_get(sm_metrics), jax.device_get(step_lib.unreplicate(pm_metrics)),
                                 jax.device_get(state.params), jax.device_get(step_lib.unreplicate(pm_state).params))
    diff = max(losses.values())
    out["shard_map_vs_pmap"] = dict(devices=n, max_loss_relative_difference=diff, max_param_abs_difference=pdiff,
                                    ok=diff <= LOSS_RTOL and pdiff <= PARAM_ATOL)
    print(f"  shard_map vs pmap on {n} device(s), 2 steps: losses within {diff:.2e}, parameters within "
          f"{pdiff:.2e}", flush=True)

  # orbax round trip of the (device) state
  folder = os.path.join(ctx.out, "checkpoint_round_trip")
  shutil.rmtree(folder, ignore_errors=True)
  checkpointer = checkpointing.RunCheckpointer(folder, async_save=False)
  model = {"params": {"student": state.params["student"]}, "batch_stats": {"student": state.batch_stats["student"]}}
  t0 = time.perf_counter()
  checkpointer.save(2, state, model, {"batches": 2}, {"check": True}, force=True)
  checkpointer.manager.wait_until_finished()
  restored = checkpointer.restore_state_only(2, checkpointing.abstract_like(state))
  seconds = time.perf_counter() - t0
  checkpointer.close()
  same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
             zip(jax.tree.leaves(jax.device_get(_keys_as_data(state))),
                 jax.tree.leaves(jax.device_get(_keys_as_data(restored)))))
  out["checkpoint_round_trip"] = dict(ok=bool(same), seconds=seconds)
  shutil.rmtree(folder, ignore_errors=True)
  print(f"  orbax save + restore of the state: {'bitwise equal' if same else 'DIFFERENT'} ({seconds:.1f} s)",
        flush=True)
  out["ok"] = all(out[k]["ok"] for k in ("device_vs_cpu", "shard_map_vs_pmap", "checkpoint_round_trip"))
  return out


def _keys_as_data(state):
  import jax
  return jax.tree.map(lambda x: jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
                      else x, state)


# ------------------------------------------------------------------------------------------------------ stage 2


def runner_specs(config, size, batch, device, compile_fp32=False, torch_rows=True, overrides=None,
                 compile_backend=None):
  """{name: step_bench spec} of the stage's runners (``torch_rows=False``: the JAX ones only)."""
  base = dict(config=config, size=size, batch=batch, overrides=dict(overrides or {}), compile_backend=compile_backend)
  specs = {
      "jax_fp32": dict(base, kind="jax", compute_dtype="float32", matmul_precision="highest"),
      "jax_bf16": dict(base, kind="jax", compute_dtype="bfloat16"),
  }
  if torch_rows:
    specs.update({
        "torch_eager_fp32": dict(base, kind="torch_eager", device=device),
        "torch_eager_amp_bf16": dict(base, kind="torch_eager", device=device, amp_dtype="bfloat16"),
        "torch_compile_amp_bf16": dict(base, kind="torch_compile", device=device, amp_dtype="bfloat16"),
    })
    if compile_fp32:
      specs["torch_compile_fp32"] = dict(base, kind="torch_compile", device=device)
  return specs


# (JAX runner, PyTorch runner) pairs whose ratio is printed: float32 with float32, bfloat16 with AMP.
COMPARISONS = (("jax_fp32", "torch_eager_fp32"), ("jax_fp32", "torch_compile_fp32"),
               ("jax_bf16", "torch_eager_amp_bf16"), ("jax_bf16", "torch_compile_amp_bf16"))


def stage_step(ctx):
  from cmedl_jax.bench import step_bench
  device = None
  if not ctx.args.no_torch:
    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
  out = {}
  for scale, (config, size, batch) in ctx.sizes["scales"].items():
    print(f"  {scale} scale: {config} networks, {batch} x {size} px, torch on {device}", flush=True)
    specs = runner_specs(config, size, batch, device, ctx.args.compile_fp32, torch_rows=not ctx.args.no_torch,
                         overrides=ctx.sizes.get("overrides"), compile_backend=ctx.sizes.get("compile_backend"))
    runners = {}
    try:
      for name, spec in specs.items():  # started together: they build (compile) at once
        runners[name] = step_bench.ProcessRunner(spec, wait=False)
      t0 = time.perf_counter()
      info = {name: runner.wait_ready() for name, runner in runners.items()}
      build_s = time.perf_counter() - t0
      timings = step_bench.run_interleaved(runners, ctx.sizes["warmup"], ctx.sizes["rounds"])
      peaks = {name: runner.peak_memory_bytes() for name, runner in runners.items()}
    finally:
      for runner in runners.values():
        runner.close()
    rows = {}
    for name, timing in timings.items():
      median = statistics.median(timing["times"])
      rows[name] = dict(median_step_s=median, min_step_s=min(timing["times"]), images_per_s=batch / median,
                        first_step_s=timing["first_step_s"], times=timing["times"],
                        peak_memory_gib=None if peaks[name] is None else peaks[name] / 2 ** 30,
                        first_losses={k: timing["first_metrics"][k] for k in
                                      ("total", "teacher_seg", "student_seg", "hint", "d_mr")
                                      if k in timing["first_metrics"]},
                        compile_s=(info[name] or {}).get("compile_s"))
      memory = "" if peaks[name] is None else f", peak memory {peaks[name] / 2 ** 30:.2f} GiB"
      print(f"    {name:24s} {median * 1e3:9.1f} ms/step {batch / median:9.1f} images/s{memory}", flush=True)
    ratios = {}
    for jax_name, torch_name in COMPARISONS:
      if jax_name in timings and torch_name in timings:
        median, low, high = step_bench.paired_ratios(timings[jax_name]["times"], timings[torch_name]["times"])
        ratio = rows[jax_name]["images_per_s"] / rows[torch_name]["images_per_s"]
        ratios[f"{jax_name}_over_{torch_name}"] = dict(images_per_s=ratio, per_round_median=median,
                                                       per_round_min=low, per_round_max=high)
        print(f"    ratio {jax_name} / {torch_name} (images/s): {ratio:.2f}x (per round {median:.2f}x, "
              f"{low:.2f}-{high:.2f})", flush=True)
    out[scale] = dict(config=config, size=size, batch=batch, torch_device=device, build_s=build_s, runners=rows,
                      ratios=ratios)
  return out


# ------------------------------------------------------------------------------------------------------ stage 3


def stage_pipeline(ctx):
  from cmedl_jax import config_base
  from cmedl_jax.data import augment as augment_lib, phantoms, pipeline
  from cmedl_jax.bench import data_bench

  s = ctx.sizes
  folder = os.path.join(ctx.out, "pipeline_phantoms")
  p = s["phantoms"]
  t0 = time.perf_counter()
  phantoms.write_phantom_dataset(folder, num_ct=p["num_ct"], num_mri=p["num_mri"], seed=0,
                                 shape=(p["size"], p["size"], p["slices"]))
  cfg = config_base.base_config()
  cfg.data.ct_dir, cfg.data.mri_dir = os.path.join(folder, "CT"), os.path.join(folder, "MRI")
  cfg.data.cache_dir = os.path.join(ctx.out, "pipeline_cache")
  ct, mri = pipeline.training_stores(cfg.data, progress=False)
  prepare_s = time.perf_counter() - t0
  augment = augment_lib.Augment.from_config(cfg.data.augment)
  out = {"phantoms": p, "prepare_s": prepare_s, "crop": s["crop"], "batch": s["batch"], "workers": {}}
  consumed = None
  step = ctx.results["stages"].get("step", {})
  if isinstance(step, dict) and "paper" in step:
    consumed = step["paper"]["runners"]["jax_bf16"]["images_per_s"]
  out["step_consumes_examples_per_s"] = consumed
  for workers in s["workers"]:
    row, _ = data_bench.measure_stream(ct, mri, workers=workers, batch=s["batch"], batches=s["batches"],
                                       crop=s["crop"], seed=0, foreground_fraction=cfg.data.foreground_fraction,
                                       augment=augment, baseline=data_bench.machine_used())
    row["over_step_consumption"] = None if not consumed else row["examples_per_s"] / consumed
    out["workers"][str(workers)] = row
    versus = "" if not consumed else f" = {row['over_step_consumption']:.2f}x what the bf16 step consumes"
    print(f"  {workers:2d} workers: {row['examples_per_s']:.1f} examples/s{versus} (first batch "
          f"{row['first_batch_s']:.1f} s)", flush=True)
  shutil.rmtree(folder, ignore_errors=True)
  shutil.rmtree(cfg.data.cache_dir, ignore_errors=True)
  return out


# ------------------------------------------------------------------------------------------------------ stage 4


def _metrics_rows(path):
  with open(path, newline="") as f:
    return [{k: v for k, v in row.items() if k != "steps_per_second"} for row in csv.DictReader(f)]


def _run(command, log_path, env=None):
  t0 = time.perf_counter()
  with open(log_path, "w") as log:
    result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env)
  if result.returncode:
    with open(log_path) as f:
      tail = f.read()[-3000:]
    raise RuntimeError(f"{' '.join(command[:4])} ... exited with {result.returncode}; log {log_path}:\n{tail}")
  return time.perf_counter() - t0


def stage_train(ctx):
  s = ctx.sizes
  root = os.path.join(ctx.out, "train")
  shutil.rmtree(root, ignore_errors=True)
  os.makedirs(root)
  config = bench.repository_file("configs", "quickstart.py")
  phantoms = os.path.join(root, "phantoms")
  common = ["--config", config, f"--config.data.phantoms.out={phantoms}",
            f"--config.data.ct_dir={phantoms}/CT", f"--config.data.mri_dir={phantoms}/MRI",
            f"--config.eval.data_dir={phantoms}/test/CT", f"--config.data.cache_dir={root}/cache", "--no_progress"]
  if ctx.dry:
    common += s["train_flags"] + [
        "--config.data.phantoms.size=48", "--config.data.phantoms.slices=12", "--config.data.crop_size=32",
        "--config.data.phantoms.num_ct=3", "--config.data.phantoms.num_mri=3", "--config.data.phantoms.num_test=2"]
  train = [sys.executable, "-m", "cmedl_jax.train.main"]
  steps = s["train_steps"]
  run_dir = os.path.join(root, "run")
  seconds = _run(train + common + ["--workdir", run_dir, f"--config.train.total_steps={steps}",
                                   f"--config.train.checkpoint_every={max(steps // 2, 1)}",
                                   f"--config.train.log_every={max(steps // 10, 1)}", "--config.data.val_cases=1",
                                   f"--config.train.val_every={max(steps // 3, 1)}"],
                 os.path.join(root, "train.log"))
  eval_dir = os.path.join(root, "eval_best")
  evaluate = [sys.executable, "-c", "import sys; from cmedl_jax.evaluate.cli import main_evaluate; "
              "sys.exit(main_evaluate())"]
  eval_s = _run(evaluate + ["--workdir", run_dir, "--data",
                 f"{phantoms}/test/CT", "--step", "best", "--out", eval_dir], os.path.join(root, "evaluate.log"))
  with open(os.path.join(eval_dir, "summary.json")) as f:
    summary = json.load(f)
  out = {"train_steps": steps, "train_s": seconds, "evaluate_s": eval_s,
         "dice_mean": _summary_value(summary, "dice"), "hd95_mm_mean": _summary_value(summary, "hd95_mm")}
  print(f"  cmedl-train {steps} steps + evaluation in {seconds:.0f} s; cmedl-evaluate --step best in "
        f"{eval_s:.0f} s: DSC {out['dice_mean']:.3f}", flush=True)
  deterministic = dict(os.environ)
  deterministic["XLA_FLAGS"] = (deterministic.get("XLA_FLAGS", "") + " --xla_gpu_deterministic_ops=true").strip()
  out["repeat_steps"] = s["repeat_steps"]
  # XLA documents that the flag makes compiling select-and-scatter (the gradient of reduce_window max pooling,
  # the plain form GPUs get) fail; if the repeat fails with it, the failure is kept and the runs repeat without it.
  for flag, env in (("deterministic_ops", deterministic), ("default_flags", None)):
    try:
      repeat = []
      for k in range(2):
        workdir = os.path.join(root, f"repeat_{flag}_{k}")
        _run(train + common + ["--workdir", workdir, f"--config.train.total_steps={s['repeat_steps']}",
                               "--config.train.log_every=1", "--config.eval.data_dir=",
                               f"--config.train.checkpoint_every={s['repeat_steps']}"],
             os.path.join(root, f"repeat_{flag}_{k}.log"), env=env)
        repeat.append(_metrics_rows(os.path.join(workdir, "metrics.csv")))
    except RuntimeError as e:
      out[f"repeat_{flag}_error"] = str(e)[-2000:]
      print(f"  same-seed runs with {flag} failed: {str(e)[-400:]}", flush=True)
      continue
    out["repeat_flags"] = flag
    out["repeat_bitwise_equal"] = repeat[0] == repeat[1] and len(repeat[0]) == s["repeat_steps"]
    print(f"  two {s['repeat_steps']}-step runs, same seed, {flag}: "
          f"{'bitwise equal' if out['repeat_bitwise_equal'] else 'DIFFERENT'}", flush=True)
    break
  return out


def _summary_value(summary, metric):
  """The mean over cases of ``metric`` in an evaluation's summary.json (its ``foreground_mean``)."""
  return float(summary["foreground_mean"][metric])


# ------------------------------------------------------------------------------------------------------ main


class _Context:

  def __init__(self, args, results):
    self.args, self.results = args, results
    self.out = os.path.abspath(args.out)
    self.dry = bool(args.dry_run)
    self.sizes = SIZES["dry" if self.dry else "full"]


STAGE_FUNCTIONS = {"tests": stage_tests, "step": stage_step, "pipeline": stage_pipeline, "train": stage_train}


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m cmedl_jax.bench accelerator", description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="output folder (accelerator.json, accelerator.log, runs)")
  parser.add_argument("--dry-run", action="store_true", help="every stage on the CPU at tiny sizes")
  parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {', '.join(STAGES)}")
  parser.add_argument("--overwrite", action="store_true", help="replace the results of an earlier check in --out")
  parser.add_argument("--compile-fp32", action="store_true", help="also time torch.compile in float32")
  parser.add_argument("--no-torch", action="store_true", help="no PyTorch rows in the step stage (e.g. on a TPU VM)")
  args = parser.parse_args(argv)
  stages = [s for s in args.stages.split(",") if s]
  unknown = sorted(set(stages) - set(STAGES))
  if unknown:
    parser.error(f"--stages: unknown {unknown}; expected some of {', '.join(STAGES)}")
  out = os.path.abspath(args.out)
  report = os.path.join(out, "accelerator.json")
  if os.path.exists(report) and not args.overwrite:
    parser.error(f"{report} exists (an earlier check); pass --overwrite to replace it or choose another --out")
  os.makedirs(out, exist_ok=True)
  # One GPU shared by this process and the step runners: none of them may take most of its memory up front.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  if args.dry_run:
    os.environ["JAX_PLATFORMS"] = "cpu"

  with open(os.path.join(out, "accelerator.log"), "w") as log, contextlib.redirect_stdout(_Tee(sys.stdout, log)):
    results = {"command": "python -m cmedl_jax.bench accelerator " + " ".join(argv if argv is not None else
                                                                             sys.argv[1:]),
               "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "dry_run": bool(args.dry_run),
               "environment": environment(), "stages": {}, "stage_seconds": {}, "errors": {}}
    ctx = _Context(args, results)
    print(f"accelerator check{' (dry run, CPU)' if args.dry_run else ''}: {results['environment']['devices']}; "
          f"jax {results['environment']['jax']}, torch {results['environment'].get('torch')}", flush=True)
    _write_json(report, results)
    for stage in stages:
      print(f"\n== {stage}", flush=True)
      t0 = time.perf_counter()
      try:
        results["stages"][stage] = STAGE_FUNCTIONS[stage](ctx)
      except Exception:  # pylint: disable=broad-except  (recorded; the next stage still runs)
        results["errors"][stage] = traceback.format_exc()
        print(f"  stage {stage} failed:\n{results['errors'][stage]}", flush=True)
      results["stage_seconds"][stage] = time.perf_counter() - t0
      print(f"  ({stage}: {results['stage_seconds'][stage]:.0f} s)", flush=True)
      _write_json(report, results)
    print(f"\nwrote {report}", flush=True)
  return 1 if results["errors"] else 0


if __name__ == "__main__":
  sys.exit(main())
