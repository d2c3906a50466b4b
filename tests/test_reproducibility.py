"""The reproducibility contract, with real ``cmedl-train`` processes and real SIGKILLs.

The default configuration (configs/quickstart.py networks, the default CPU kernels, the preprocessed store and
augmentation) in mixed precision (bfloat16), with every step logged, two grain worker processes, batches
prefetched to the device and validation on a case split off the CT set: two runs give the same metrics.csv and
validation.csv, value by value, and keep the same best checkpoint; a run killed with SIGKILL between checkpoints,
or while an asynchronous checkpoint is being written, and restarted with the same command logs, after the
restart, exactly what the uninterrupted run logged.
"""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.processes import ROOT, user_environment

TOTAL_STEPS = 10
CHECKPOINT_EVERY = 4
VAL_EVERY = 3
# Logged values that measure the machine, not the run.
TIMING_COLUMNS = ("steps_per_second",)


def _command(phantom_dirs, workdir, program=("-m", "cmedl_jax.train.main")):
  ct_dir, mri_dir = phantom_dirs
  return [sys.executable, *program, "--config", os.path.join(ROOT, "configs", "quickstart.py"),
          "--workdir", str(workdir), "--no_progress",
          f"--config.data.ct_dir={ct_dir}", f"--config.data.mri_dir={mri_dir}", "--config.data.make_phantoms=False",
          "--config.eval.data_dir=", "--config.data.crop_size=32", "--config.data.num_workers=2",
          f"--config.train.total_steps={TOTAL_STEPS}", "--config.train.log_every=1",
          f"--config.train.checkpoint_every={CHECKPOINT_EVERY}", "--config.train.preview_every=0",
          "--config.train.prefetch_to_device=2", "--config.train.async_checkpoint=True",
          "--config.data.val_cases=1", f"--config.train.val_every={VAL_EVERY}", "--config.compute_dtype=bfloat16"]


def _start(command, env=None):
  """A run in a session of its own, so that its grain workers can be found (and cleaned up) as its process group."""
  return subprocess.Popen(command, cwd=ROOT, env=env or user_environment(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, start_new_session=True)


def _assert_workers_exit(process, seconds=30):
  """After the run's main process died: its grain worker processes end too (they do not linger as orphans)."""
  deadline = time.time() + seconds
  while time.time() < deadline:
    try:
      os.killpg(process.pid, 0)
    except ProcessLookupError:
      return
    time.sleep(0.2)
  os.killpg(process.pid, signal.SIGKILL)
  pytest.fail(f"processes of the killed run {process.pid} were still alive {seconds} s after it died")


def _run(command, env=None, expect=0):
  result = subprocess.run(command, cwd=ROOT, env=env or user_environment(), capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == expect, f"exit {result.returncode}:\n{result.stderr[-4000:]}"
  return result


def _csv_rows(path):
  """{step: {column: text}} of a CSV log, the timing columns left out; every step logged once."""
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  steps = [int(r["step"]) for r in rows]
  assert steps == sorted(set(steps)), f"steps logged out of order or twice in {path}: {steps}"
  return {int(r["step"]): {k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in rows}


def _rows(workdir):
  """What a run logged and kept: metrics.csv, validation.csv and the best checkpoint's step."""
  return {"metrics": _csv_rows(os.path.join(workdir, "metrics.csv")),
          "validation": _csv_rows(os.path.join(workdir, "validation.csv")),
          "best": sorted(os.listdir(os.path.join(workdir, "best")))}


def _assert_same(got, expected):
  assert sorted(got["metrics"]) == sorted(expected["metrics"]) == list(range(1, TOTAL_STEPS + 1))
  for step in expected["metrics"]:
    assert got["metrics"][step] == expected["metrics"][step], f"step {step} differs"
  val_steps = [s for s in range(1, TOTAL_STEPS + 1) if s % VAL_EVERY == 0 or s == TOTAL_STEPS]
  assert sorted(got["validation"]) == sorted(expected["validation"]) == val_steps
  assert got["validation"] == expected["validation"]
  assert got["best"] == expected["best"] and len(got["best"]) == 1


@pytest.fixture(scope="module")
def uninterrupted(phantom_dirs, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  _run(_command(phantom_dirs, workdir))
  return _rows(workdir)


def test_two_runs_with_the_same_seed_log_the_same_values(phantom_dirs, uninterrupted, tmp_path):
  _run(_command(phantom_dirs, tmp_path))
  with open(os.path.join(tmp_path, "config.json")) as f:
    assert json.load(f)["compute_dtype"] == "bfloat16"
  rows = _rows(tmp_path)
  metrics = rows["metrics"]
  assert float(metrics[1]["total"]) > 0 and metrics[1]["g_adv_ct2mr"] != metrics[TOTAL_STEPS]["g_adv_ct2mr"]
  _assert_same(rows, uninterrupted)


def _killed_run(phantom_dirs, workdir, point):
  """Runs tests/kill_run.py (cmedl-train SIGKILLing itself at ``point``) to its death; its workers must follow."""
  env = user_environment(CMEDL_TEST_KILL=point)
  process = _start(_command(phantom_dirs, workdir, program=(os.path.join(ROOT, "tests", "kill_run.py"),)), env)
  try:
    process.wait(timeout=600)
  finally:
    if process.poll() is None:
      os.killpg(process.pid, signal.SIGKILL)
  assert process.returncode == -signal.SIGKILL, process.stderr.read()[-4000:]
  _assert_workers_exit(process)
  return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


def test_sigkill_between_checkpoints_then_restart_continues_bitwise(phantom_dirs, uninterrupted, tmp_path):
  assert _killed_run(phantom_dirs, tmp_path, f"step:{CHECKPOINT_EVERY + 2}") == [str(CHECKPOINT_EVERY)]
  restarted = _run(_command(phantom_dirs, tmp_path))
  assert f"resumed from {tmp_path}" in restarted.stderr and f"at step {CHECKPOINT_EVERY}" in restarted.stderr
  _assert_same(_rows(tmp_path), uninterrupted)


def test_sigkill_during_an_async_checkpoint_save_then_restart_continues_bitwise(phantom_dirs, uninterrupted,
                                                                                tmp_path):
  saved = _killed_run(phantom_dirs, tmp_path, f"save:{2 * CHECKPOINT_EVERY}")
  # Checkpoint 8 was being written when the process died: only checkpoint 4 is complete.
  assert str(CHECKPOINT_EVERY) in saved and str(2 * CHECKPOINT_EVERY) not in saved, saved
  restarted = _run(_command(phantom_dirs, tmp_path))
  assert f"at step {CHECKPOINT_EVERY}" in restarted.stderr, restarted.stderr[-4000:]
  _assert_same(_rows(tmp_path), uninterrupted)


def test_sigkill_from_outside_at_any_moment_then_restart_continues_bitwise(phantom_dirs, uninterrupted, tmp_path):
  process = _start(_command(phantom_dirs, tmp_path))
  metrics = os.path.join(tmp_path, "metrics.csv")
  deadline = time.time() + 600
  try:
    # Whatever the run is doing once step 5 is logged: a step, a save, both.
    while time.time() < deadline and process.poll() is None:
      if os.path.exists(metrics) and len(open(metrics).read().splitlines()) > CHECKPOINT_EVERY + 1:
        break
      time.sleep(0.01)
    assert process.poll() is None, f"the run ended before it could be killed:\n{process.stderr.read()[-4000:]}"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
  finally:
    if process.poll() is None:
      os.killpg(process.pid, signal.SIGKILL)
  assert process.returncode == -signal.SIGKILL
  _assert_workers_exit(process)
  _run(_command(phantom_dirs, tmp_path))
  _assert_same(_rows(tmp_path), uninterrupted)
