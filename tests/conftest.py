"""Test-wide settings: 8 virtual CPU devices and a persistent compilation cache.

Both must be set before JAX is first imported, so they live here at module level.
"""

import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
_cache_dir = os.environ.get(
    "CMEDL_TEST_COMPILATION_CACHE", str(pathlib.Path.home() / ".cache" / "cmedl_jax_test_xla"))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _cache_dir)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
