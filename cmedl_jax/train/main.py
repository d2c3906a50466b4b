"""``cmedl-train --config configs/FILE.py[:key=value,...] --workdir DIR [--config.x=y ...]``.

Trains (or resumes, from DIR/checkpoints) the run described by the config file, then evaluates it on
``config.eval.data_dir`` (:mod:`cmedl_jax.train.job`). The configs and their arguments: README.md, "Configs".
Multi-process runs: ``--coordinator_address HOST:PORT --num_processes N --process_id I`` (or the CMEDL_* variables,
or a SLURM / Cloud TPU / Kubernetes environment); see docs/multihost.md and launch/.
"""

from __future__ import annotations

import logging
import re
import sys

from absl import app, flags
from ml_collections import config_flags

from cmedl_jax.errors import ConfigError, DataError

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


def _unwrap(error):
  """The ConfigError behind a flag-parsing error (absl wraps what the config file's get_config raised)."""
  while error is not None and not isinstance(error, ConfigError):
    error = error.__cause__ or error.__context__
  return error


def parse_flags(argv):
  """absl's flag parsing with one-line errors for a bad config argument or an unknown ``--config.`` field."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    config_error = _unwrap(e)
    print(f"ERROR {config_error or e}", file=sys.stderr)
    if config_error is None:
      print(f"Pass --helpfull to see the flags of {argv[0]}.", file=sys.stderr)
    sys.exit(2)
  except (ConfigError, AttributeError, KeyError) as e:
    # AttributeError / KeyError: ml_collections' answer to an override of a field the config does not have.
    print(f"ERROR {_describe_override_error(e, argv)}", file=sys.stderr)
    sys.exit(2)


def _describe_override_error(error, argv):
  """One line for a failed ``--config.`` override: the flag, and the field ml_collections suggests instead."""
  if isinstance(error, ConfigError):
    return str(error)
  text = str(error.args[0] if error.args else error).replace("\\n", " ").replace("\n", " ").replace("\\'", "'")
  match = re.search(r"'(\w+)'\W+Did you mean \"(\w+)\"", text)
  name = match.group(1) if match else text.strip("'\" ")
  flag = next((a.split("=", 1)[0] for a in argv if a.startswith("--config.") and
               a.split("=", 1)[0].split(".")[-1] == name), f"--config...{name}")
  return f"{flag}: no such config field" + (f"; did you mean {match.group(2)}?" if match else "")


def run(argv):
  del argv
  # Our progress at INFO; the libraries' (orbax, absl) chatter only from WARNING up.
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", force=True)
  logging.getLogger("cmedl_jax").setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.WARNING)
  # Before anything touches a JAX device: a process can join a multi-process run only then.
  from cmedl_jax import distributed  # imports JAX: after flag parsing too
  distributed.initialize_from_environment(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  # A resume or a second run with the same shapes skips the step's compilation.
  from cmedl_jax.utils import compilation_cache
  compilation_cache.enable_persistent_cache()
  from cmedl_jax.ops.onednn import OnednnUnavailable
  from cmedl_jax.train import job, trainer  # after flag parsing: keeps --help fast
  cfg = _CONFIG.value
  try:
    result = job.train_and_evaluate(cfg, _WORKDIR.value, progress=not _NO_PROGRESS.value)
  except (ConfigError, DataError, trainer.NonFiniteLossError, OnednnUnavailable) as e:
    print(f"ERROR {e}", file=sys.stderr)
    return 1
  if result.eval_summary is not None:
    from cmedl_jax.evaluate import scoring
    print("evaluation: " + scoring.format_summary(result.eval_summary, cfg.eval.tolerances_mm))
  how = "stopped by SIGTERM" if result.train.stopped_by_signal else "done"
  print(f"{how} at step {result.train.final_step}: " + ", ".join(f"{k} {v:.4f}" for k, v in
                                                               sorted(result.train.last_metrics.items())))
  return 0


def main():
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(lambda argv: sys.exit(run(argv)), flags_parser=parse_flags)


if __name__ == "__main__":
  main()
