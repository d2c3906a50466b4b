"""Profile: where the JAX train step's time goes on CPU, convolution by convolution (oneDNN backend).

    python -m cmedl_jax.bench convs [--config quickstart|paper|FILE.py[:ARG]] [--size 128] [--batch 4]
        [--conv-algorithm winograd|direct] [--steps 3] [--top 25] [--json OUT.json]

Builds and compiles the same jitted step as ``python -m cmedl_jax.bench step`` (same networks, weights and
batch), runs one untimed step, then ``--steps`` timed steps with the oneDNN calls timed in the last one
(:func:`cmedl_jax.ops.onednn.profile_start`). Prints the step times, the share of the last step spent in
convolutions (wall time with a call running, and per kind: forward, input gradient ``dx``, kernel gradient
``dw``), and the ``--top`` geometries by time with their calls per step, ms per call and GFLOP/s (multiply-adds x
2). The rest of the step is XLA's own work (normalisation, activations, padding, losses, Adam, image pools) and
what runs next to the convolutions. Results and run times: docs/performance.md. x86-64 Linux only (oneDNN).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time

_KEY = re.compile(r"(fwd|dx|dw)\s+n(\d+) (\d+)x(\d+)x(\d+) -> (\d+)x(\d+)x(\d+) k(\d+)x(\d+) s(\d+)"
                  r"(?: winograd| thin)?")


def gflop(key: str) -> float:
  """Multiply-adds x 2 / 1e9 of one call of a profile key (``onednn.profile_stop()["calls"]``).

  Winograd calls (keys ending in " winograd") count the direct convolution's work too, so their GFLOP/s compare
  with the direct kernels' (an "effective" rate, above the CPU's peak when the transforms save enough).
  """
  match = _KEY.fullmatch(key.strip())
  if match is None:
    raise ValueError(f"not a oneDNN profile key: {key!r}")
  n, _, _, cin, out_h, out_w, cout, kh, kw, _ = map(int, match.groups()[1:])
  return 2.0 * n * out_h * out_w * cout * cin * kh * kw / 1e9


def summarize(profile: dict, step_s: float) -> dict:
  """Per kind seconds, total GFLOP, conv share of the step, rows sorted by time (dicts)."""
  rows, kinds = [], {"fwd": 0.0, "dx": 0.0, "dw": 0.0}
  for key, (calls, seconds) in profile["calls"].items():
    kind = key.split()[0]
    kinds[kind] += seconds
    work = gflop(key) * calls
    rows.append(dict(key=key, calls=calls, seconds=seconds, ms_per_call=1e3 * seconds / calls, gflop=work,
                     gflop_per_s=work / seconds if seconds > 0 else float("nan")))
  rows.sort(key=lambda r: -r["seconds"])
  return dict(step_s=step_s, conv_busy_s=profile["busy_s"], conv_share=profile["busy_s"] / step_s,
              seconds_per_kind=kinds, gflop=sum(r["gflop"] for r in rows), executor_threads=profile["threads"],
              rows=rows)


def main(argv=None):
  from cmedl_jax.bench import step_bench

  parser = argparse.ArgumentParser(prog="python -m cmedl_jax.bench convs", description=__doc__.split("\n\n")[0])
  step_bench.add_problem_arguments(parser)
  parser.add_argument("--steps", type=int, default=3, help="timed steps (the last one profiled)")
  parser.add_argument("--top", type=int, default=25, help="geometries to list")
  parser.add_argument("--json", help="write the summary to this file")
  args = parser.parse_args(argv)
  if args.steps < 1:
    parser.error("--steps must be at least 1")

  from cmedl_jax.ops import onednn
  try:
    onednn.load()
  except onednn.OnednnUnavailable as e:
    print(f"ERROR the oneDNN convolutions are unavailable here: {e}", file=sys.stderr)
    return 1
  print(f"machine: {step_bench._machine()}; {step_bench._load_average()}", flush=True)
  spec = dict(kind="jax", config=args.config, size=args.size, batch=args.batch, conv_backend="onednn",
              conv_algorithm=args.conv_algorithm)
  runner = step_bench._build_runner(spec)
  print(f"compiled the step in {runner.compile_s:.1f} s (convolutions: onednn, "
        f"{step_bench.jax_config(spec).conv_algorithm} 3x3); "
        f"{args.batch} x {args.size}x{args.size} px", flush=True)
  runner.step()
  times = []
  for i in range(args.steps):
    if i == args.steps - 1:
      onednn.profile_start()
    t0 = time.perf_counter()
    runner.step()
    times.append(time.perf_counter() - t0)
    print(f"step {i + 1}/{args.steps}: {times[-1]:.3f} s", flush=True)
  summary = summarize(onednn.profile_stop(), times[-1])
  summary.update(config=args.config, size=args.size, batch=args.batch, step_times_s=times)
  kinds = summary["seconds_per_kind"]
  print(f"profiled step {times[-1]:.3f} s (median of {len(times)}: {statistics.median(times):.3f} s); "
        f"convolutions running {summary['conv_busy_s']:.3f} s = {100 * summary['conv_share']:.0f}% of it "
        f"(fwd {kinds['fwd']:.3f} s, dx {kinds['dx']:.3f} s, dw {kinds['dw']:.3f} s; {summary['gflop']:.0f} GFLOP, "
        f"{summary['gflop'] / max(summary['conv_busy_s'], 1e-9):.0f} GFLOP/s)")
  print(f"{'seconds':>9s} {'calls':>6s} {'ms/call':>9s} {'GFLOP/s':>8s}  kind geometry (input -> output, kernel, "
        "stride)")
  for row in summary["rows"][:args.top]:
    print(f"{row['seconds']:9.3f} {row['calls']:6d} {row['ms_per_call']:9.2f} {row['gflop_per_s']:8.1f}  "
          f"{row['key']}")
  print(f"at the end: {step_bench._load_average()}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(summary, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
