"""A run folder in object storage: ``cmedl-train --workdir gs://BUCKET/run`` against a local GCS emulator.

The emulator (gcp-storage-emulator, from PyPI) serves Google Cloud Storage's JSON API on localhost; gcsfs (what
``etils.epath`` uses for ``gs://``) and tensorstore (orbax's arrays) are pointed at it by their documented
environment variables, so the trainer's writes take the code path a real bucket does. Checked: a gs:// run logs
and keeps the same values as the same run in a local folder (metrics, validation, best checkpoint, evaluation),
writes its config, previews and TensorBoard events there, and resumes from its gs:// checkpoint.
"""

import csv
import importlib.util
import io
import json
import os
import socket
import subprocess
import sys

import pytest

from tests.processes import ROOT, user_environment

BUCKET = "cmedl-test"
# The quickstart's networks narrowed to a few channels: what is tested is where the run's files go.
TINY = ["--config.model.segmenter_kwargs.features=(4,8,8)", "--config.model.generator.base_features=4",
        "--config.model.generator.num_blocks=1", "--config.model.discriminator.base_features=4"]


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def emulator_environment(url):
  """What points gcsfs, etils.epath and tensorstore at the emulator instead of storage.googleapis.com."""
  return {
      "STORAGE_EMULATOR_HOST": url,             # gcsfs and google-cloud-storage
      "TENSORSTORE_GCS_HTTP_URL": url,          # tensorstore's gcs driver (orbax's arrays)
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",  # tensorstore: no credential lookup
      "FSSPEC_GCS_TOKEN": "anon",               # gcsfs: anonymous access
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # gcsfs: no gRPC bucket-layout probe (the emulator is HTTP)
      "EPATH_USE_TF": "false",                  # etils: fsspec, also where TensorFlow is installed
  }


def _emulate_generations(server_module):
  """Makes the emulator handle object generations as GCS does, where tensorstore (orbax's arrays) relies on them:

  - uploads honour ``ifGenerationMatch`` (412 when the object's generation differs; 0: it must not exist);
  - downloads honour ``ifGenerationMatch`` / ``ifGenerationNotMatch`` (412 / 304) and send ``x-goog-generation``.

  The emulator ignores the conditions and sends no generation header; tensorstore's OCDBT commits its manifest
  with conditional writes and reads the generation of what it downloads, so checkpoints failed at random
  ("Malformed StorageGeneration") without this.
  """
  from http import HTTPStatus

  from gcp_storage_emulator.exceptions import NotFound
  from gcp_storage_emulator.handlers import objects
  if getattr(objects.insert, "emulates_generations", False):
    return
  insert, download = objects.insert, objects.download

  def generation(storage, bucket, name):
    try:
      return str(storage.get_file_obj(bucket, name)["generation"])
    except NotFound:
      return None

  def checked_insert(request, response, storage, *args, **kwargs):
    wanted = request.query.get("ifGenerationMatch")
    if wanted and request.query.get("name"):
      current = generation(storage, request.params["bucket_name"], request.query["name"][0]) or "0"
      if wanted[0] != current:
        response.status = HTTPStatus.PRECONDITION_FAILED
        return None
    return insert(request, response, storage, *args, **kwargs)

  def checked_download(request, response, storage, *args, **kwargs):
    current = generation(storage, request.params["bucket_name"], request.params["object_id"])
    if current is not None:
      if request.query.get("ifGenerationNotMatch", [None])[0] == current:
        response.status = HTTPStatus.NOT_MODIFIED
        return None
      if request.query.get("ifGenerationMatch", [current])[0] != current:
        response.status = HTTPStatus.PRECONDITION_FAILED
        return None
      response["x-goog-generation"] = current
    return download(request, response, storage, *args, **kwargs)

  checked_insert.emulates_generations = True
  replaced = {insert: checked_insert, download: checked_download}
  objects.insert, objects.download = checked_insert, checked_download  # also called directly inside the module
  server_module.HANDLERS = tuple(
      (pattern, {method: replaced.get(handler, handler) for method, handler in methods.items()})
      for pattern, methods in server_module.HANDLERS)


@pytest.fixture(scope="module")
def bucket_env():
  """A GCS emulator on a free local port with an empty bucket: the environment its clients need."""
  server_module = pytest.importorskip("gcp_storage_emulator.server")
  if importlib.util.find_spec("gcsfs") is None:
    pytest.skip("gcsfs is not installed")
  _emulate_generations(server_module)
  port = _free_port()
  server = server_module.create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
  server.start()
  env = emulator_environment(f"http://127.0.0.1:{port}")
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)  # this process reads the bucket back through epath; gcsfs reads them when imported
  import fsspec
  fsspec.config.conf.setdefault("gcs", {})["token"] = "anon"  # fsspec read FSSPEC_* when it was imported
  try:
    yield env
  finally:
    server.stop()
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


def _train(phantom_dirs, workdir, steps, env=None):
  ct_dir, mri_dir = phantom_dirs
  command = [sys.executable, "-m", "cmedl_jax.train.main", "--config", os.path.join(ROOT, "configs", "quickstart.py"),
             "--workdir", workdir, "--no_progress", f"--config.data.ct_dir={ct_dir}",
             f"--config.data.mri_dir={mri_dir}", "--config.data.make_phantoms=False", "--config.data.crop_size=32",
             f"--config.eval.data_dir={ct_dir}", f"--config.train.total_steps={steps}", "--config.train.log_every=1",
             "--config.train.checkpoint_every=2", "--config.train.preview_every=2", "--config.data.val_cases=1",
             "--config.train.val_every=2", *TINY]
  result = subprocess.run(command, cwd=ROOT, env=user_environment(**(env or {})), capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]


def _read(path):
  from etils import epath
  return epath.Path(path).read_text()


def _csv(text):
  rows = list(csv.DictReader(io.StringIO(text)))
  return [{k: v for k, v in r.items() if k != "steps_per_second"} for r in rows]


def _summary_dir(workdir):
  from etils import epath
  (data_folder,) = list(epath.Path(workdir, "eval").iterdir())
  return data_folder


@pytest.fixture(scope="module")
def runs(bucket_env, phantom_dirs, tmp_path_factory):
  """The same 4-step run in a local folder and in the bucket, then both resumed to 6 steps."""
  local = str(tmp_path_factory.mktemp("local_run"))
  remote = f"gs://{BUCKET}/runs/tiny"
  out = {}
  for steps in (4, 6):
    _train(phantom_dirs, local, steps)
    _train(phantom_dirs, remote, steps, bucket_env)
    out[steps] = {name: {"metrics": _csv(_read(f"{w}/metrics.csv")), "validation": _csv(_read(f"{w}/validation.csv"))}
                  for name, w in (("local", local), ("remote", remote))}
  return local, remote, out


def test_a_gs_run_logs_what_the_same_local_run_logs(runs):
  _, _, out = runs
  for steps in (4, 6):
    local, remote = out[steps]["local"], out[steps]["remote"]
    assert [int(r["step"]) for r in remote["metrics"]] == list(range(1, steps + 1))
    assert remote == local, f"after {steps} steps"
  # the resumed run kept its first four rows as they were
  assert out[6]["remote"]["metrics"][:4] == out[4]["remote"]["metrics"]


def test_a_gs_run_keeps_its_files_in_the_bucket(runs):
  from etils import epath
  local, remote, _ = runs
  root = epath.Path(remote)
  assert json.loads((root / "config.json").read_text())["train"]["total_steps"] == 6
  assert sorted(p.name for p in (root / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4", "6"]
  assert [p.name for p in (root / "best").iterdir() if p.name.isdigit()] == \
      [p.name for p in epath.Path(local, "best").iterdir() if p.name.isdigit()]
  assert json.loads((root / "splits.json").read_text())["val"] == json.loads(_read(f"{local}/splits.json"))["val"]
  previews = sorted(p.name for p in (root / "previews").iterdir())
  assert previews == sorted(os.listdir(os.path.join(local, "previews"))) and len(previews) == 3
  assert (root / "previews" / previews[0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  events = [p for p in (root / "tensorboard").iterdir() if p.name.startswith("events.out.tfevents")]
  assert events and all(len(p.read_bytes()) > 0 for p in events)


def test_the_end_of_training_evaluation_is_uploaded_beside_the_local_one(runs):
  local, remote, _ = runs
  remote_eval, local_eval = _summary_dir(remote), _summary_dir(local)
  assert remote_eval.name == local_eval.name  # one folder per data folder, named from its path
  for step in (4, 6):
    remote_summary = json.loads((remote_eval / f"step_{step}" / "summary.json").read_text())
    local_summary = json.loads((local_eval / f"step_{step}" / "summary.json").read_text())
    assert remote_summary["foreground_mean"] == local_summary["foreground_mean"]
    assert remote_summary["settings"]["workdir"] == remote
    predictions = sorted(p.name for p in (remote_eval / f"step_{step}" / "predictions").iterdir())
    assert predictions == sorted(os.listdir(local_eval / f"step_{step}" / "predictions")) and predictions
    assert "cases.csv" in [p.name for p in (remote_eval / f"step_{step}").iterdir()]


def test_cmedl_evaluate_reads_the_best_checkpoint_from_the_bucket(runs, bucket_env, phantom_dirs, tmp_path):
  local, remote, _ = runs
  summaries = {}
  for name, workdir, out in (("local", local, str(tmp_path / "best_eval")),
                             ("remote", remote, f"gs://{BUCKET}/evaluations/best")):
    command = [sys.executable, "-c", "import sys; from cmedl_jax.evaluate.cli import main_evaluate; "
               "sys.exit(main_evaluate())", "--workdir", workdir, "--data", phantom_dirs[0], "--step", "best",
               "--out", out]
    environment = user_environment(**(bucket_env if name == "remote" else {}))
    result = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    summaries[name] = json.loads(_read(f"{out}/summary.json"))
  assert summaries["remote"]["foreground_mean"] == summaries["local"]["foreground_mean"]
  assert summaries["remote"]["settings"]["checkpoint_step"] == summaries["local"]["settings"]["checkpoint_step"]
