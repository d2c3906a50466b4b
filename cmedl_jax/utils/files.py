"""Writing results without losing or half-writing any, on a local disk or in object storage.

A run's folder (``--workdir``) may be a local path or a URL such as ``gs://bucket/runs/cmedl``: URLs go through
``etils.epath`` (gcsfs for ``gs://``), the path layer orbax uses for the checkpoints, so one code path serves both
and a local folder never needs a cloud package. Local files are written to a temporary name and renamed
(atomic); an object in a bucket is replaced whole by one upload, which readers never see half-done either.
Object storage has no append and no atomic folder rename: :func:`append_text` rewrites the object, and
:func:`move_aside` copies then deletes.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid

log = logging.getLogger(__name__)


def is_url(path) -> bool:
  """Whether ``path`` names object storage (``scheme://...``) rather than a local file."""
  return "://" in os.fspath(path)


def _epath(path):
  from etils import epath
  return epath.Path(os.fspath(path))


def join(base, *parts) -> str:
  """``os.path.join`` for local paths; "/"-joined for URLs."""
  base = os.fspath(base)
  if not is_url(base):
    return os.path.join(base, *parts)
  return "/".join([base.rstrip("/")] + [str(p).strip("/") for p in parts])


def absolute(path) -> str:
  """An absolute local path, or the URL unchanged."""
  return os.fspath(path) if is_url(path) else os.path.abspath(os.fspath(path))


def exists(path) -> bool:
  return _epath(path).exists() if is_url(path) else os.path.exists(path)


def makedirs(path):
  """Creates a local folder and its parents (object storage has no folders: nothing to do)."""
  if not is_url(path):
    os.makedirs(path, exist_ok=True)


def read_text(path) -> str:
  if is_url(path):
    return _epath(path).read_text()
  with open(path) as f:
    return f.read()


def temporary_name(path, ending=""):
  """A name beside ``path`` that no other process uses, also on another host sharing the folder: write there,
  then ``os.replace`` it onto ``path`` (atomic), so no reader or kill ever sees half a file. It ends in
  ``.tmp`` + ``ending`` (e.g. ".nii.gz", for writers that pick the format by the name)."""
  directory, name = os.path.split(os.fspath(path))
  unique = f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
  return os.path.join(directory, f".{name}.{unique}.tmp{ending}")


def write_bytes(path, data: bytes):
  """Replaces ``path`` with ``data`` atomically (local: :func:`temporary_name` + rename; a URL: one upload)."""
  if is_url(path):
    _epath(path).write_bytes(data)
    return
  makedirs(os.path.dirname(os.fspath(path)) or ".")
  tmp = temporary_name(path)
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def write_text(path, text: str):
  """Replaces ``path`` with ``text`` atomically (:func:`write_bytes`)."""
  write_bytes(path, text.encode())


def append_text(path, text: str):
  """Appends ``text`` to ``path`` (created if missing). Object storage has no append: the object is read and
  written again whole, which suits small logs such as metrics.csv."""
  if is_url(path):
    old = read_text(path) if exists(path) else ""
    write_text(path, old + text)
    return
  with open(path, "a") as f:
    f.write(text)


def write_json(path, document):
  """Writes ``document`` as JSON to ``path`` atomically (:func:`write_text`)."""
  write_text(path, json.dumps(document, indent=1))


def copy_tree(source, destination):
  """Copies the local folder ``source`` into ``destination`` (a local folder or a URL), file by file."""
  for root, _, names in os.walk(source):
    relative = os.path.relpath(root, source)
    for name in names:
      parts = [] if relative == "." else relative.split(os.sep)
      with open(os.path.join(root, name), "rb") as f:
        write_bytes(join(destination, *parts, name), f.read())


def move_aside(path):
  """Renames ``path`` (a file or folder) to ``path.<time>.old`` when it exists: kept, never replaced (on object
  storage a copy, then the original deleted)."""
  if not exists(path):
    return
  aside = f"{os.fspath(path).rstrip('/')}.{int(time.time())}.old"
  if is_url(path):
    _epath(path).rename(aside)
  else:
    os.replace(path, aside)
  log.info("%s moved aside to %s (kept)", path, aside)
