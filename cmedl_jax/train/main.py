"""``cmedl-train --config configs/FILE.py[:ARG] --workdir DIR [--config.x=y ...]``.

Trains (or resumes, from DIR/checkpoints) the run described by the config file; see configs/README.md.
Multi-process runs: ``--coordinator_address HOST:PORT --num_processes N --process_id I`` (or the CMEDL_* variables,
or a SLURM / Cloud TPU / Kubernetes environment); see docs/multihost.md and launch/.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from cmedl_jax.errors import DataError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Python config file with get_config(arg).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: checkpoints, metrics, previews.")
_NO_PROGRESS = flags.DEFINE_bool("no_progress", False, "Disable the progress bar.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-process runs: HOST:PORT of process 0's coordinator (else "
    "$CMEDL_COORDINATOR, else the detected cluster's; unset: single process).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process runs: number of processes "
                                      "(else $CMEDL_NUM_PROCESSES or the cluster's).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process runs: this process's index "
                                   "(else $CMEDL_PROCESS_ID or the cluster's).")


def run(argv):
  del argv
  # Our progress at INFO; the libraries' (orbax, absl) chatter only from WARNING up.
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", force=True)
  logging.getLogger("cmedl_jax").setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.WARNING)
  # Before anything touches a JAX device: a process can join a multi-process run only then.
  from cmedl_jax import distributed  # imports JAX: after flag parsing too
  distributed.initialize_from_environment(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  # A resume or a second run with the same shapes skips the step's compilation (tens of seconds on a CPU).
  from cmedl_jax.utils import compilation_cache
  compilation_cache.enable_persistent_cache()
  from cmedl_jax.ops.onednn import OnednnUnavailable
  from cmedl_jax.train import trainer  # after flag parsing: keeps --help fast
  try:
    result = trainer.train(_CONFIG.value, _WORKDIR.value, progress=not _NO_PROGRESS.value)
  except (DataError, trainer.NonFiniteLossError, OnednnUnavailable) as e:
    print(f"ERROR {e}", file=sys.stderr)
    return 1
  if result.eval_summary is not None:
    from cmedl_jax.evaluate import scoring
    print("evaluation: " + scoring.format_summary(result.eval_summary, _CONFIG.value.eval.tolerances_mm))
  how = "stopped by SIGTERM" if result.stopped_by_signal else "done"
  print(f"{how} at step {result.final_step}: " + ", ".join(f"{k} {v:.4f}" for k, v in
                                                         sorted(result.last_metrics.items())))
  return 0


def main():
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(lambda argv: sys.exit(run(argv)))


if __name__ == "__main__":
  main()
