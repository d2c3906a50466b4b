"""Writing files without losing or half-writing any: atomic replacement, and moving earlier results aside."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid

log = logging.getLogger(__name__)


def temporary_name(path, ending=""):
  """A name beside ``path`` that no other process uses, also on another host sharing the folder: write there,
  then ``os.replace`` it onto ``path`` (atomic), so no reader or kill ever sees half a file. It ends in
  ``.tmp`` + ``ending`` (e.g. ".nii.gz", for writers that pick the format by the name)."""
  directory, name = os.path.split(os.fspath(path))
  unique = f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
  return os.path.join(directory, f".{name}.{unique}.tmp{ending}")


def write_json(path, document):
  """Writes ``document`` as JSON to ``path`` atomically (:func:`temporary_name`)."""
  tmp = temporary_name(path)
  with open(tmp, "w") as f:
    json.dump(document, f, indent=1)
  os.replace(tmp, path)


def move_aside(path):
  """Renames ``path`` (a file or folder) to ``path.<time>.old`` when it exists: kept, never replaced."""
  if os.path.exists(path):
    aside = f"{path}.{int(time.time())}.old"
    os.replace(path, aside)
    log.info("%s moved aside to %s (kept)", path, aside)
