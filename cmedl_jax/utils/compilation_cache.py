"""The persistent XLA compilation cache for the command-line tools.

Compiling the CMEDL step takes tens of seconds on a CPU; with the cache a second run (a resume, an evaluation)
reuses the executables (docs/performance.md).
"""

from __future__ import annotations

import os

import jax

DEFAULT_DIR = os.path.join(os.path.expanduser("~"), ".cache", "cmedl_jax", "xla")


def enable_persistent_cache(path=None, min_compile_seconds=1.0):
  """Turns the cache on at ``path`` (default: $CMEDL_COMPILATION_CACHE, else ~/.cache/cmedl_jax/xla).

  Respects a cache directory already chosen through JAX_COMPILATION_CACHE_DIR; "off" disables it. Returns the
  directory in use, or None.
  """
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
  path = path or os.environ.get("CMEDL_COMPILATION_CACHE", DEFAULT_DIR)
  if path == "off":
    return None
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
  return path
