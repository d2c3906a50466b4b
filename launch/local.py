#!/usr/bin/env python
"""Starts N processes of one program on this machine as one multi-process JAX run (coordinator on 127.0.0.1).

    python launch/local.py --num_processes 2 --cpu_devices_per_process 4 -- \\
        cmedl-train --config configs/quickstart.py --workdir runs/quickstart_2proc --no_progress

Every process gets ``CMEDL_COORDINATOR=127.0.0.1:PORT`` (a free port), ``CMEDL_NUM_PROCESSES=N`` and
``CMEDL_PROCESS_ID=i``, which :func:`cmedl_jax.distributed.initialize_from_environment` (called by
``cmedl-train``) reads; the coordinator service listens on 127.0.0.1 only. With ``--cpu_devices_per_process K``
each process runs on the CPU with K virtual devices (``XLA_FLAGS=--xla_force_host_platform_device_count=K``);
with ``--gpus_per_process K`` process i uses GPUs ``i*K ... i*K+K-1`` (``CMEDL_LOCAL_DEVICE_IDS``).

Output lines are prefixed with ``[i]`` (and copied to ``--log_dir/process_i.log`` when given). The launcher exits
with the first non-zero exit status of a process, after stopping the others (a process left alone would wait in
a collective); SIGTERM or Ctrl-C is passed to every process as SIGTERM (the trainer saves a checkpoint and
exits), and whatever still runs after ``--grace_seconds`` is killed. Needs only the standard library.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

TIMEOUT_EXIT_CODE = 124


def free_port(host="127.0.0.1"):
  """A TCP port that was free on ``host`` a moment ago (the coordinator binds it soon after)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind((host, 0))
    return s.getsockname()[1]


def with_cpu_device_count(xla_flags, count):
  """``xla_flags`` with ``--xla_force_host_platform_device_count=count`` (replacing any earlier value)."""
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", xla_flags or "").split()
  return " ".join(flags + [f"--xla_force_host_platform_device_count={int(count)}"])


def process_environment(base, *, process_id, num_processes, coordinator, cpu_devices=None, gpus=None):
  """The environment of process ``process_id``."""
  env = dict(base)
  env.update(CMEDL_COORDINATOR=coordinator, CMEDL_NUM_PROCESSES=str(num_processes),
             CMEDL_PROCESS_ID=str(process_id), PYTHONUNBUFFERED="1")
  if cpu_devices:
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = with_cpu_device_count(env.get("XLA_FLAGS"), cpu_devices)
  if gpus:
    env["CMEDL_LOCAL_DEVICE_IDS"] = ",".join(str(process_id * gpus + k) for k in range(gpus))
  return env


class _Prefixer(threading.Thread):
  """Copies a process's output to our stdout line by line, prefixed with its index (and to a log file)."""

  _lock = threading.Lock()

  def __init__(self, index, stream, log_path=None):
    super().__init__(daemon=True)
    self.prefix = f"[{index}] "
    self.stream = stream
    self.log_file = open(log_path, "w", encoding="utf-8") if log_path else None

  def run(self):
    # Lines, not bytes: tqdm's carriage returns stay inside one prefixed line.
    for raw in iter(self.stream.readline, b""):
      line = raw.decode("utf-8", "replace").rstrip("\n")
      with self._lock:
        sys.stdout.write(self.prefix + line + "\n")
        sys.stdout.flush()
      if self.log_file:
        self.log_file.write(line + "\n")
        self.log_file.flush()
    if self.log_file:
      self.log_file.close()


def _exit_status(returncode):
  return 128 - returncode if returncode < 0 else returncode  # killed by signal k -> 128 + k, as shells report


def launch(command, num_processes, *, cpu_devices=None, gpus=None, port=None, log_dir=None, timeout=None,
           grace_seconds=60.0, poll_seconds=0.2):
  """Runs ``command`` (a list) as ``num_processes`` processes; returns the launcher's exit status."""
  coordinator = f"127.0.0.1:{port or free_port()}"
  if log_dir:
    os.makedirs(log_dir, exist_ok=True)
  print(f"[launch] {num_processes} processes, coordinator {coordinator}: {shlex.join(command)}", flush=True)
  procs, readers = [], []
  for i in range(num_processes):
    env = process_environment(os.environ, process_id=i, num_processes=num_processes, coordinator=coordinator,
                              cpu_devices=cpu_devices, gpus=gpus)
    # Own session: a Ctrl-C in the terminal reaches the launcher only, which then stops every process the same
    # way; killpg at the end also takes the process's own children (e.g. grain workers).
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    procs.append(proc)
    reader = _Prefixer(i, proc.stdout, os.path.join(log_dir, f"process_{i}.log") if log_dir else None)
    reader.start()
    readers.append(reader)

  stop_reason = []

  def on_signal(signum, frame):
    del frame
    stop_reason.append(signal.Signals(signum).name)

  previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
  deadline = None if timeout is None else time.monotonic() + timeout
  status, grace = 0, grace_seconds
  try:
    while True:
      codes = [p.poll() for p in procs]
      failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
      if failed:
        i, code = failed[0]
        print(f"[launch] process {i} exited with status {_exit_status(code)}: stopping the others", flush=True)
        status = _exit_status(code)
        # The others are likely blocked in a collective, where no SIGTERM handler runs: do not wait long.
        grace = min(grace_seconds, 10.0)
        break
      if all(c == 0 for c in codes):
        break
      if stop_reason:
        print(f"[launch] {stop_reason[0]}: passing SIGTERM to every process", flush=True)
        status = 128 + signal.SIGTERM
        break
      if deadline is not None and time.monotonic() > deadline:
        print(f"[launch] timeout after {timeout:.0f} s: stopping every process", flush=True)
        status = TIMEOUT_EXIT_CODE
        break
      time.sleep(poll_seconds)
  finally:
    _stop(procs, grace)
    for s, handler in previous.items():
      signal.signal(s, handler)
    for reader in readers:
      reader.join(timeout=5)
  if status == 128 + signal.SIGTERM and all(p.returncode == 0 for p in procs):
    status = 0  # every process saved and stopped cleanly after the SIGTERM
  return status


def _stop(procs, grace_seconds):
  """SIGTERM to the processes still running, then SIGKILL to their process groups after the grace period."""
  running = [p for p in procs if p.poll() is None]
  for p in running:
    try:
      p.send_signal(signal.SIGTERM)
    except ProcessLookupError:
      pass
  deadline = time.monotonic() + grace_seconds
  for p in running:
    try:
      p.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      pass
  for p in procs:
    try:
      os.killpg(p.pid, signal.SIGKILL)  # the group of a process we started (its own session)
    except (ProcessLookupError, PermissionError):
      pass
    p.wait()


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("-n", "--num_processes", type=int, required=True)
  devices = parser.add_mutually_exclusive_group()
  devices.add_argument("--cpu_devices_per_process", type=int, default=None,
                       help="run on the CPU with this many virtual devices per process")
  devices.add_argument("--gpus_per_process", type=int, default=None,
                       help="process i uses GPUs i*K ... i*K+K-1 of this machine")
  parser.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
  parser.add_argument("--log_dir", default=None, help="also write each process's output to LOG_DIR/process_i.log")
  parser.add_argument("--timeout", type=float, default=None, help="stop everything after this many seconds")
  parser.add_argument("--grace_seconds", type=float, default=60.0,
                      help="after SIGTERM, wait this long for processes to save and exit before killing them")
  parser.add_argument("command", nargs=argparse.REMAINDER, help="-- PROGRAM [ARGS...]")
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  if not command:
    parser.error("give the program to run after --")
  if args.num_processes < 1:
    parser.error("--num_processes must be at least 1")
  return launch(command, args.num_processes, cpu_devices=args.cpu_devices_per_process, gpus=args.gpus_per_process,
                port=args.port, log_dir=args.log_dir, timeout=args.timeout, grace_seconds=args.grace_seconds)


if __name__ == "__main__":
  sys.exit(main())
