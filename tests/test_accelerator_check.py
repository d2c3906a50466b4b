"""``python -m cmedl_jax.bench accelerator --dry-run``: every stage of the GPU check, on the CPU at tiny sizes.

The same code the GPU machine runs (launch/gpu_check.sh), so that it cannot rot between the machine's visits: a
real subprocess, then the report's keys and numbers, checked against each other.
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNERS = ("jax_fp32", "jax_bf16", "torch_eager_fp32", "torch_eager_amp_bf16", "torch_compile_amp_bf16")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  pytest.importorskip("torch")
  out = tmp_path_factory.mktemp("accelerator")
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  result = subprocess.run([sys.executable, "-m", "cmedl_jax.bench", "accelerator", "--out", str(out), "--dry-run"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  with open(out / "accelerator.json") as f:
    data = json.load(f)
  with open(out / "accelerator.log") as f:
    log = f.read()
  return data, log, out


def _finite(x):
  return isinstance(x, (int, float)) and math.isfinite(x)


def test_every_stage_ran_without_error_and_the_log_holds_the_output(report):
  data, log, _ = report
  assert data["dry_run"] is True and data["errors"] == {}
  assert list(data["stages"]) == ["tests", "step", "pipeline", "train"]
  assert all(_finite(data["stage_seconds"][s]) for s in data["stages"])
  assert "== step" in log and "ratio jax_bf16 / torch_eager_amp_bf16" in log
  assert data["environment"]["jax"] and data["environment"]["torch"]


def test_the_device_checks_agree(report):
  tests = report[0]["stages"]["tests"]
  assert tests["ok"] is True
  # dry run: "the device" is the CPU itself, so the same program on the same device gives the same numbers
  assert tests["device_vs_cpu"]["max_loss_relative_difference"] == 0.0
  assert tests["shard_map_vs_pmap"]["devices"] == 2  # a dry run takes two of the session's 8 virtual CPU devices
  assert tests["shard_map_vs_pmap"]["max_loss_relative_difference"] < 1e-4
  assert tests["checkpoint_round_trip"]["ok"] is True


def test_step_timings_and_ratios_are_consistent(report):
  step = report[0]["stages"]["step"]
  assert set(step) == {"paper", "quickstart"}
  for scale in step.values():
    rows = scale["runners"]
    assert set(rows) == set(RUNNERS)
    for row in rows.values():
      assert len(row["times"]) == 2 and all(_finite(t) and t > 0 for t in row["times"])
      assert row["median_step_s"] == pytest.approx(np.median(row["times"]))
      assert row["images_per_s"] == pytest.approx(scale["batch"] / row["median_step_s"])
      assert _finite(row["first_losses"]["total"]) and row["first_losses"]["total"] > 0
    # the same weights and batch: float32 JAX and PyTorch start from the same losses
    assert rows["jax_fp32"]["first_losses"]["total"] == pytest.approx(rows["torch_eager_fp32"]["first_losses"]["total"],
                                                                     rel=1e-4)
    assert rows["jax_bf16"]["first_losses"]["total"] == pytest.approx(rows["jax_fp32"]["first_losses"]["total"],
                                                                     rel=2e-2)
    assert set(scale["ratios"]) == {"jax_fp32_over_torch_eager_fp32", "jax_bf16_over_torch_eager_amp_bf16",
                                    "jax_bf16_over_torch_compile_amp_bf16"}
    for name, ratio in scale["ratios"].items():
      jax_name, torch_name = name.split("_over_")
      assert ratio["images_per_s"] == pytest.approx(rows[jax_name]["images_per_s"] / rows[torch_name]["images_per_s"])
      per_round = sorted(t / j for j, t in zip(rows[jax_name]["times"], rows[torch_name]["times"]))
      assert ratio["per_round_min"] == pytest.approx(per_round[0])
      assert ratio["per_round_max"] == pytest.approx(per_round[-1])


def test_the_pipeline_is_measured_against_the_step(report):
  data = report[0]
  pipeline = data["stages"]["pipeline"]
  consumed = data["stages"]["step"]["paper"]["runners"]["jax_bf16"]["images_per_s"]
  assert pipeline["step_consumes_examples_per_s"] == pytest.approx(consumed)
  assert set(pipeline["workers"]) == {"0", "2"}
  for row in pipeline["workers"].values():
    assert row["examples"] == 3 * 4 and row["examples_per_s"] > 0
    assert row["over_step_consumption"] == pytest.approx(row["examples_per_s"] / consumed)


def test_training_evaluation_and_the_deterministic_repeat(report):
  data, _, out = report
  train = data["stages"]["train"]
  assert 0.0 <= train["dice_mean"] <= 1.0
  assert train["repeat_bitwise_equal"] is True
  assert train["repeat_flags"] == "deterministic_ops"  # the CPU ignores the GPU flag; it must not fail
  # the evaluation of the best checkpoint wrote what it reports
  with open(out / "train" / "eval_best" / "summary.json") as f:
    assert json.load(f)["foreground_mean"]["dice"] == pytest.approx(train["dice_mean"])
