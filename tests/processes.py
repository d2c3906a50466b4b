"""The environment of the real ``cmedl-*`` processes some tests start."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def user_environment(**extra):
  """This process's environment as a user's machine has it: one CPU device (the test session's 8 virtual devices
  are a test-suite setting) and the repository importable; ``extra`` variables added."""
  env = dict(os.environ, **extra)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
  env["XLA_FLAGS"] = " ".join(flags)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return env
