"""Multi-process runs on the CPU: start-up settings, the local launcher, and 2 processes x 4 devices (gloo) giving
the numbers of 1 process x 8 devices, with checkpoints moving between the two.

The end-to-end tests start real processes (tests/distributed_worker.py, through launch/local.py): JAX allows
one distributed set-up per process, and this pytest process already has its 8 devices.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from cmedl_jax import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(ROOT, "launch", "local.py")
WORKER = os.path.join(ROOT, "tests", "distributed_worker.py")
STEPS = 3


# ------------------------------------------------------------------------------------------- start-up settings


def _no_cluster():
  return None


def test_no_settings_means_a_single_process():
  plan = distributed.plan_startup(environ={}, detect_cluster=_no_cluster)
  assert plan.mode == "single"


def test_environment_settings_and_loopback_binding():
  env = {"CMEDL_COORDINATOR": "127.0.0.1:4321", "CMEDL_NUM_PROCESSES": "2", "CMEDL_PROCESS_ID": "1",
         "CMEDL_LOCAL_DEVICE_IDS": "2,3"}
  plan = distributed.plan_startup(environ=env, detect_cluster=_no_cluster)
  assert (plan.mode, plan.coordinator_address, plan.num_processes, plan.process_id, plan.local_device_ids) == (
      "explicit", "127.0.0.1:4321", 2, 1, (2, 3))
  assert plan.coordinator_bind_address == "127.0.0.1:4321"  # never all interfaces for a local run
  bound = distributed.plan_startup(environ={**env, "CMEDL_COORDINATOR_BIND": "[::]:4321"}, detect_cluster=_no_cluster)
  assert bound.coordinator_bind_address == "[::]:4321"


def test_flags_override_the_environment_and_the_cluster():
  env = {"CMEDL_COORDINATOR": "10.0.0.1:1", "CMEDL_NUM_PROCESSES": "4", "CMEDL_PROCESS_ID": "3"}
  plan = distributed.plan_startup("127.0.0.1:99", 2, 0, environ=env, detect_cluster=lambda: ("slurm", 8))
  assert (plan.mode, plan.coordinator_address, plan.num_processes, plan.process_id) == (
      "explicit", "127.0.0.1:99", 2, 0)


def test_detected_clusters():
  plan = distributed.plan_startup(environ={}, detect_cluster=lambda: ("slurm", 4))
  assert (plan.mode, plan.cluster) == ("cluster", "slurm")
  # One task (e.g. an interactive allocation): initialising would narrow the GPUs to one, so stay single.
  assert distributed.plan_startup(environ={}, detect_cluster=lambda: ("slurm", 1)).mode == "single"
  assert distributed.plan_startup(num_processes=1, environ={}, detect_cluster=lambda: ("slurm", 4)).mode == "single"


@pytest.mark.parametrize("env, message", [
    ({"CMEDL_NUM_PROCESSES": "2", "CMEDL_PROCESS_ID": "0"}, "no coordinator"),
    ({"CMEDL_COORDINATOR": "127.0.0.1", "CMEDL_NUM_PROCESSES": "2", "CMEDL_PROCESS_ID": "0"}, "HOST:PORT"),
    ({"CMEDL_COORDINATOR": "127.0.0.1:1", "CMEDL_NUM_PROCESSES": "2", "CMEDL_PROCESS_ID": "2"}, "must lie in"),
    ({"CMEDL_COORDINATOR": "127.0.0.1:1", "CMEDL_NUM_PROCESSES": "two"}, "not an integer"),
])
def test_inconsistent_settings_are_reported(env, message):
  with pytest.raises(ValueError, match=message):
    distributed.plan_startup(environ=env, detect_cluster=_no_cluster)


# ------------------------------------------------------------------------------------------- the local launcher


def _launch(num_processes, program, *extra, timeout=60, **popen):
  command = [sys.executable, LAUNCHER, "-n", str(num_processes), *extra, "--", sys.executable, "-c",
             textwrap.dedent(program)]
  return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def test_launcher_sets_the_coordinator_and_prefixes_output(tmp_path):
  proc = _launch(2, """
      import os
      print("|".join(os.environ[k] for k in ("CMEDL_COORDINATOR", "CMEDL_NUM_PROCESSES", "CMEDL_PROCESS_ID",
                                              "JAX_PLATFORMS", "XLA_FLAGS")))
      """, "--cpu_devices_per_process", "3", "--log_dir", str(tmp_path))
  out, _ = proc.communicate(timeout=60)
  assert proc.returncode == 0, out
  lines = sorted(line for line in out.splitlines() if line.startswith(("[0] ", "[1] ")))
  assert len(lines) == 2, out
  coordinators = set()
  for i, line in enumerate(lines):
    prefix, rest = line.split(" ", 1)
    coordinator, count, index, platforms, xla_flags = rest.split("|")
    assert (prefix, count, index, platforms) == (f"[{i}]", "2", str(i), "cpu")
    assert xla_flags.split().count("--xla_force_host_platform_device_count=3") == 1
    assert "device_count=8" not in xla_flags  # the session's own setting is replaced, not appended to
    coordinators.add(coordinator)
  assert len(coordinators) == 1 and coordinators.pop().startswith("127.0.0.1:")
  assert open(tmp_path / "process_1.log").read().split("|")[2] == "1"


def test_launcher_stops_everything_when_one_process_fails():
  t0 = time.monotonic()
  proc = _launch(2, """
      import os, sys, time
      if os.environ["CMEDL_PROCESS_ID"] == "1":
        sys.exit(3)
      time.sleep(120)  # a process that would wait forever in a collective
      """)
  out, _ = proc.communicate(timeout=60)
  assert proc.returncode == 3, out
  assert "process 1 exited with status 3" in out
  assert time.monotonic() - t0 < 30


def test_launcher_passes_sigterm_to_every_process(tmp_path):
  proc = _launch(2, f"""
      import os, signal, sys, time
      def stop(signum, frame):  # what the trainer does: save, then exit cleanly
        open(os.path.join({str(tmp_path)!r}, "saved_" + os.environ["CMEDL_PROCESS_ID"]), "w").close()
        sys.exit(0)
      signal.signal(signal.SIGTERM, stop)
      print("ready", flush=True)
      time.sleep(120)
      """)
  ready = 0
  while ready < 2:  # both children have installed their handler
    line = proc.stdout.readline()
    assert line, "the launcher stopped early"
    ready += "ready" in line
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=60)
  assert proc.returncode == 0, out
  assert sorted(os.listdir(tmp_path)) == ["saved_0", "saved_1"]


# ------------------------------------------------------------------------------------------- 2 processes vs 1


def _environment(cpu_devices):
  env = {k: v for k, v in os.environ.items() if not k.startswith("CMEDL_")}
  # conftest.py set JAX_COMPILATION_CACHE_DIR: the workers share this session's compilation cache.
  env["JAX_PLATFORMS"] = "cpu"
  # Compilation dominates and process 1 always compiles (the cache is written by process 0 and its CPU keys
  # differ per process); the lowest backend optimisation level cuts the cold run by a third. Both runs use it.
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={cpu_devices} --xla_backend_optimization_level=0"
  return env


def _run(command, env, timeout):
  try:
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout, cwd=ROOT)
  except subprocess.TimeoutExpired as e:
    pytest.fail(f"{command[:4]} timed out after {timeout} s:\n{(e.output or '')[-6000:]}")
  assert done.returncode == 0, f"{command[:4]} exited with {done.returncode}:\n{done.stdout[-6000:]}"
  return done.stdout


def _job(path, phantom_dirs, tasks):
  with open(path, "w") as f:
    json.dump({"ct_dir": phantom_dirs[0], "mri_dir": phantom_dirs[1], "tasks": tasks}, f)
  return str(path)


@pytest.fixture(scope="module")
def runs(phantom_dirs, tmp_path_factory):
  """Run A: 1 process x 8 devices. Run B: 2 processes x 4 devices from scratch. Run C: 2 processes resuming A's
  step-2 checkpoint. Both processes of the second job also restore A's final checkpoint."""
  tmp = tmp_path_factory.mktemp("distributed")
  a, b, c = (str(tmp / name) for name in "ABC")
  validated = {"val_cases": 1, "val_every": 2}  # validation on one split-off case at steps 2 and 3
  single = _job(tmp / "single.json", phantom_dirs, [
      {"train": a, "total_steps": STEPS, "out": str(tmp / "A.json"), **validated},
      {"restore": a, "step": STEPS, "out": str(tmp / "A_on_1.npz")}])
  t0 = time.time()
  _run([sys.executable, WORKER, single], _environment(8), timeout=420)
  t1 = time.time()
  os.makedirs(os.path.join(c, "checkpoints"))
  shutil.copytree(os.path.join(a, "checkpoints", "2"), os.path.join(c, "checkpoints", "2"))
  shutil.copy(os.path.join(a, "splits.json"), c)  # a run's split travels with its checkpoints
  multi = _job(tmp / "multi.json", phantom_dirs, [
      {"train": b, "total_steps": STEPS, "out": str(tmp / "B.json"), **validated},
      {"restore": a, "step": STEPS, "out": str(tmp / "A_on_2.npz")},
      {"train": c, "total_steps": STEPS, "out": str(tmp / "C.json"), **validated}])
  log = _run([sys.executable, LAUNCHER, "-n", "2", "--cpu_devices_per_process", "4", "--timeout", "600",
              "--grace_seconds", "10", "--", sys.executable, WORKER, multi], _environment(8), timeout=660)
  print(f"1 process: {t1 - t0:.0f} s, 2 processes: {time.time() - t1:.0f} s")
  losses = {name: {int(k): v for k, v in json.load(open(tmp / f"{name}.json")).items()} for name in "ABC"}
  return dict(dirs=dict(A=a, B=b, C=c), losses=losses, log=log,
              params={n: dict(np.load(tmp / f"A_on_{n}.npz")) for n in (1, 2)})


@pytest.mark.slow
def test_two_processes_join_with_the_coordinator_on_loopback(runs):
  for i in (0, 1):
    assert f"[{i}] worker: process {i} of 2, 4 local of 8 devices" in runs["log"]
  assert "coordinator service bound to 127.0.0.1:" in runs["log"]


@pytest.mark.slow
def test_two_processes_give_the_losses_of_one(runs):
  single, multi = runs["losses"]["A"], runs["losses"]["B"]
  assert sorted(single) == sorted(multi) == list(range(1, STEPS + 1))
  for step in single:
    np.testing.assert_allclose(multi[step], single[step], rtol=1e-5, err_msg=f"step {step}")


@pytest.mark.slow
def test_only_process_zero_writes_the_run_outputs_and_every_process_its_data_state(runs):
  b = runs["dirs"]["B"]
  with open(os.path.join(b, "metrics.csv")) as f:
    assert [line.split(",")[0] for line in f.read().splitlines()[1:]] == ["1", "2", "3"]  # one writer
  assert sorted(os.listdir(os.path.join(b, "previews"))) == ["step_0000002.png", "step_0000003.png"]
  assert sorted(os.listdir(os.path.join(b, "checkpoints"))) == ["2", "3"]
  data_states = [name for name in os.listdir(os.path.join(b, "checkpoints", "3", "data"))
                 if name.startswith("process_")]
  assert sorted(data_states) == ["process_0-of-2.json", "process_1-of-2.json"]


@pytest.mark.slow
def test_two_processes_validate_like_one_and_agree_on_the_best_checkpoint(runs):
  def validation_rows(run):
    with open(os.path.join(runs["dirs"][run], "validation.csv")) as f:
      return [[float(v) for v in line.split(",")] for line in f.read().splitlines()[1:]]

  single, multi = validation_rows("A"), validation_rows("B")
  assert [row[0] for row in single] == [row[0] for row in multi] == [2, 3]
  np.testing.assert_allclose(multi, single, rtol=1e-5, atol=1e-6)
  assert os.listdir(os.path.join(runs["dirs"]["B"], "best")) == os.listdir(os.path.join(runs["dirs"]["A"], "best"))
  assert len(os.listdir(os.path.join(runs["dirs"]["B"], "best"))) == 1


@pytest.mark.slow
def test_a_one_process_checkpoint_restores_on_one_and_on_two_processes(runs):
  on_1, on_2 = runs["params"][1], runs["params"][2]
  assert sorted(on_1) == sorted(on_2) and len(on_1) > 20
  for name in on_1:
    np.testing.assert_array_equal(on_2[name], on_1[name], err_msg=name)


@pytest.mark.slow
def test_two_processes_resume_a_one_process_checkpoint(runs):
  # Same state and same data position: step 3 after resuming step 2 equals step 3 of the uninterrupted run.
  assert sorted(runs["losses"]["C"]) == [3]
  np.testing.assert_allclose(runs["losses"]["C"][3], runs["losses"]["A"][3], rtol=1e-5)
  assert "written by another number of processes" in runs["log"]
