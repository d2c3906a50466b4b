"""Test-wide settings: 8 virtual CPU devices, a persistent compilation cache, a preprocessing cache per session.

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
# Preprocessed datasets of the tests (and their subprocesses) go to a folder of this session, not ~/.cache.
if "CMEDL_CACHE_DIR" not in os.environ:
  import atexit
  import shutil
  import tempfile
  os.environ["CMEDL_CACHE_DIR"] = tempfile.mkdtemp(prefix="cmedl_test_preprocessed_")
  atexit.register(shutil.rmtree, os.environ["CMEDL_CACHE_DIR"], ignore_errors=True)  # the session's, gone with it


import pytest  # noqa: E402  (after the environment set-up above)


@pytest.fixture(scope="session")
def phantom_dirs(tmp_path_factory):
  """3 CT + 3 MRI phantoms of 48x48x12 voxels: (CT folder, MRI folder)."""
  from cmedl_jax.data import phantoms
  out = tmp_path_factory.mktemp("phantoms")
  phantoms.write_phantom_dataset(out, num_ct=3, num_mri=3, seed=0, shape=(48, 48, 12))
  return str(out / "CT"), str(out / "MRI")


@pytest.fixture(scope="session")
def trained_run(phantom_dirs, tmp_path_factory):
  """A 4-step tiny CMEDL job on the phantoms, evaluated at the end: (workdir, job.JobResult)."""
  from cmedl_jax.train import job
  from tests.tiny import phantom_config
  workdir = tmp_path_factory.mktemp("run")
  cfg = phantom_config(phantom_dirs, 4, preview_every=2, async_checkpoint=True)
  cfg.eval.data_dir = phantom_dirs[0]  # exercise the evaluation at the end of training
  return workdir, job.train_and_evaluate(cfg, str(workdir), progress=False)


@pytest.fixture(scope="session")
def onednn_library():
  """The library's kernels (cmedl_jax.ops.onednn), built on first use; the test is skipped where they cannot be.

  A fixture, not a collection-time check: collecting the tests builds nothing.
  """
  from cmedl_jax.ops import onednn
  if not onednn.available():
    pytest.skip(f"the library's kernels are unavailable: {onednn.unavailable_reason()}")
  return onednn
