"""``python -m cmedl_jax.bench SUBCOMMAND [options]``: benchmarks that print ratios measured in one run.

Subcommands:
  accelerator  the GPU check: device vs CPU, shard_map vs pmap, the step in JAX fp32/bf16 vs PyTorch, the input
            pipeline vs the step, train + evaluate, deterministic repeat (--dry-run: on the CPU, tiny)
  convs     where the JAX step's time goes on CPU: the oneDNN convolutions per geometry (ms, GFLOP/s, share)
  data      the memory-mapped training data at real size vs an in-RAM store: starts, examples/s, memory
  metrics   jitted surface metrics vs the DeepMind surface-distance library on a 512x512x100 volume
  step      the full CMEDL train step, JAX (jit) vs PyTorch eager (and torch.compile with --compile)
"""

import sys


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  commands = {"accelerator": "cmedl_jax.bench.accelerator", "convs": "cmedl_jax.bench.conv_profile",
              "data": "cmedl_jax.bench.data_bench", "metrics": "cmedl_jax.bench.metrics_bench",
              "step": "cmedl_jax.bench.step_bench"}
  if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
    print(__doc__)
    return 0 if argv and argv[0] in ("-h", "--help") else 2
  import importlib
  return importlib.import_module(commands[argv[0]]).main(argv[1:]) or 0


if __name__ == "__main__":
  sys.exit(main())
