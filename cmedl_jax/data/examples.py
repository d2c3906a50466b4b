"""Real chest CTs with lung-tumor masks: the test cases shipped in the pyradiomics 3.0.1 source distribution.

The pyradiomics sdist on PyPI (``pyradiomics-3.0.1.tar.gz``, BSD-3-Clause) carries two thorax CTs with one
segmented lung lesion each, as gzip-encoded NRRD files::

    pyradiomics-3.0.1/data/lung1_image.nrrd   512x512x48, 0.5703x0.5703x5 mm, int16 HU
    pyradiomics-3.0.1/data/lung1_label.nrrd   same grid, values {0, 1}
    pyradiomics-3.0.1/data/lung2_image.nrrd   512x512x61, 0.6270x0.6270x5 mm, int16 HU
    pyradiomics-3.0.1/data/lung2_label.nrrd   same grid, values {0, 1}

:func:`prepare_examples` finds the sdist through the PyPI JSON API, downloads and caches it (sha256 checked), or
takes a local file; reads the lung cases with pynrrd; builds the RAS affine from the NRRD ``space``,
``space directions`` and ``space origin``; checks that image and label share one grid; binarises the label as
pyradiomics does (value 1 is the region of interest); and writes a labelled CT dataset (``dataset.json``,
``imagesTr/``, ``labelsTr/``, see :mod:`cmedl_jax.data.dataset_index`) that ``cmedl-data check`` and
``cmedl-evaluate`` read.

Every problem raises :class:`cmedl_jax.errors.DataError` naming the file (for a tarball member:
``TARBALL::MEMBER``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request

import nrrd
import numpy as np

from cmedl_jax.data import dataset_index, nifti_io
from cmedl_jax.errors import DataError

PACKAGE = "pyradiomics"
VERSION = "3.0.1"
SDIST_NAME = f"{PACKAGE}-{VERSION}.tar.gz"
# The digest PyPI lists for pyradiomics-3.0.1.tar.gz (files on PyPI are immutable): lets a local --sdist be
# verified offline, and the JSON API's digest be cross-checked.
SDIST_SHA256 = "47c57f441d6cb7973fa3b2ea48d3948df78e3348e1c69e1e2ff19001601fc2f5"
# The per-release endpoint is the documented one; some mirrors and proxies only serve the per-project document,
# whose "releases" map holds the same file entries.
PYPI_JSON_URLS = (f"https://pypi.org/pypi/{PACKAGE}/{VERSION}/json", f"https://pypi.org/pypi/{PACKAGE}/json")
DEFAULT_OUT = os.path.join("runs", "examples")
TUMOR_LABEL = 1  # pyradiomics' default ``label`` setting: the mask value of the region of interest
HTTP_TIMEOUT_S = 60

# NRRD anatomical spaces -> sign of each world axis relative to RAS. Axis order is always (x, y, z) =
# (left-right, posterior-anterior, inferior-superior); only the direction of x and y differs.
_SPACE_SIGNS = {
    "right-anterior-superior": (1.0, 1.0, 1.0), "ras": (1.0, 1.0, 1.0),
    "left-anterior-superior": (-1.0, 1.0, 1.0), "las": (-1.0, 1.0, 1.0),
    "left-posterior-superior": (-1.0, -1.0, 1.0), "lps": (-1.0, -1.0, 1.0),
}
_CASE_RE = re.compile(r"(?:^|/)data/(lung\d+)_image\.nrrd$")


@dataclasses.dataclass
class ExampleCase:
  """One converted case.

  Attributes:
    case_id: e.g. "lung1".
    image_path, label_path: the NIfTI files written.
    shape: (3,) voxels in the NRRD's (= the NIfTI file's) voxel order.
    spacing: (3,) mm along those axes.
    tumor_voxels: voxels with the tumor label.
    tumor_ml: their volume in ml.
    hu_range: (min, max) of the image.
    other_label_values: {value: voxel count} of label values other than 0 and the tumor label (set to 0).
  """

  case_id: str
  image_path: str
  label_path: str
  shape: tuple
  spacing: tuple
  tumor_voxels: int
  tumor_ml: float
  hu_range: tuple
  other_label_values: dict


# ---------------------------------------------------------------------------------------------------------------
# NRRD -> NIfTI geometry


def nrrd_affine(header, path="<nrrd>"):
  """The (4, 4) voxel -> RAS world (mm) matrix of a 3D NRRD header, as a NIfTI affine.

  NRRD gives the world position of voxel index ``i`` as ``space origin + sum_a i[a] * space directions[a]`` in
  the coordinate system named by ``space``; NIfTI/nibabel affines are in RAS, so LPS (DICOM's system, what
  Slicer and ITK write) flips the sign of x and y. Anisotropic, flipped and oblique directions are kept as
  they are: the spacing is the norm of each direction vector.

  Args:
    header: a header as returned by ``nrrd.read`` / ``nrrd.read_header`` (pynrrd).
    path: named in errors.

  Raises:
    DataError: not 3D, no or an unsupported ``space``, missing/non-finite/singular directions or origin.
  """
  if int(header.get("dimension", 0)) != 3:
    raise DataError(path, f"is a {header.get('dimension')}D NRRD; expected a 3D volume")
  space = header.get("space")
  if space is None:
    raise DataError(path, "has no 'space' field: the anatomical orientation is unknown (only "
                          "'space directions' with a 'space' such as left-posterior-superior can be converted)")
  signs = _SPACE_SIGNS.get(str(space).strip().lower())
  if signs is None:
    raise DataError(path, f"has space {space!r}; supported: right-anterior-superior, left-anterior-superior, "
                          "left-posterior-superior")
  directions = header.get("space directions")
  if directions is None:
    raise DataError(path, "has no 'space directions': voxel spacing and orientation are unknown")
  directions = np.asarray(directions, dtype=np.float64)
  if directions.shape != (3, 3) or not np.all(np.isfinite(directions)):
    raise DataError(path, f"has 'space directions' {directions.tolist()}; expected three finite 3-vectors "
                          "(one per axis; 'none' axes are not supported)")
  origin = np.asarray(header.get("space origin", np.zeros(3)), dtype=np.float64)
  if origin.shape != (3,) or not np.all(np.isfinite(origin)):
    raise DataError(path, f"has 'space origin' {origin.tolist()}; expected a finite 3-vector")
  if abs(np.linalg.det(directions)) < 1e-12:
    raise DataError(path, f"has singular 'space directions' {directions.tolist()} (zero spacing along an axis or "
                          "parallel axes)")
  affine = np.eye(4)
  # Row a of 'space directions' is the world step of index axis a: it becomes column a of the affine.
  affine[:3, :3] = np.asarray(signs)[:, None] * directions.T
  affine[:3, 3] = np.asarray(signs) * origin
  return affine


def read_nrrd(path, *, name=None):
  """Reads a 3D NRRD file with pynrrd.

  Args:
    path: the file.
    name: how to name the file in errors (defaults to ``path``).

  Returns:
    (data in the file's index order, RAS affine, header).

  Raises:
    DataError: unreadable file, not 3D, bad geometry, NaN/Inf voxels.
  """
  name = name or os.fspath(path)
  try:
    data, header = nrrd.read(os.fspath(path))
  except (OSError, EOFError, ValueError, nrrd.NRRDError) as e:
    raise DataError(name, f"cannot read as NRRD (corrupt, truncated or not a NRRD file): {e}") from e
  affine = nrrd_affine(header, name)
  if data.ndim != 3:
    raise DataError(name, f"has data of shape {data.shape}; expected a 3D volume")
  if np.issubdtype(data.dtype, np.floating) and not np.all(np.isfinite(data)):
    raise DataError(name, f"contains {int((~np.isfinite(data)).sum())} NaN/Inf voxel(s)")
  return data, affine, header


def binarize_label(data, tumor_label=TUMOR_LABEL):
  """The tumor mask as pyradiomics defines it (voxels equal to ``tumor_label``).

  Returns:
    (uint8 mask with 1 = tumor, {other non-zero value: voxel count}); the other values are set to 0.
  """
  data = np.asarray(data)
  if np.issubdtype(data.dtype, np.floating) and np.any(data != np.round(data)):
    raise ValueError("label map has non-integer values")
  values, counts = np.unique(data, return_counts=True)
  others = {int(v): int(n) for v, n in zip(values, counts) if v != 0 and v != tumor_label}
  return (data == tumor_label).astype(np.uint8), others


def check_hu(data, name):
  """Refuses images that do not look like CT in Hounsfield units (air near -1000).

  Some exports store CT as unsigned values (HU + 1024) or rescaled; the CT window [-1000, 500] HU would then
  make the whole image look like soft tissue or bone.
  """
  lo = float(np.percentile(data, 1))
  if lo > -500.0:
    raise DataError(name, f"does not look like CT in Hounsfield units: 1st percentile {lo:.0f}, expected air "
                          "near -1000 HU (stored with an offset such as +1024, or not a CT?)")


# ---------------------------------------------------------------------------------------------------------------
# Finding, downloading and verifying the sdist


def _default_cache():
  return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                      "cmedl_jax", "downloads")


def sha256_of(path, chunk=1 << 20):
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(chunk), b""):
      digest.update(block)
  return digest.hexdigest()


def verify_sha256(path, expected):
  """Raises DataError naming ``path`` when its sha256 is not ``expected`` (``None`` skips the check)."""
  if expected is None:
    return
  actual = sha256_of(path)
  if actual != expected.lower():
    raise DataError(path, f"sha256 mismatch: expected {expected.lower()}, got {actual} (truncated or altered "
                          "download? delete the file and run again)")


def find_sdist(json_urls=PYPI_JSON_URLS, version=VERSION, filename=SDIST_NAME):
  """Looks the sdist up in the PyPI JSON API.

  Returns:
    (download URL, sha256 hex digest, size in bytes).

  Raises:
    DataError: no JSON document could be fetched, or it lists no such file.
  """
  errors = []
  for url in json_urls:
    try:
      with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
        meta = json.load(response)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
      errors.append(f"{url}: {e}")
      continue
    # The per-release document lists its files under "urls"; the per-project one under "releases"[version]
    # ("urls" there belongs to the latest release).
    files = list((meta.get("releases") or {}).get(version) or ())
    if (meta.get("info") or {}).get("version") == version:
      files += list(meta.get("urls") or ())
    for entry in files:
      if entry.get("filename") == filename and entry.get("packagetype", "sdist") == "sdist":
        return entry["url"], entry["digests"]["sha256"], entry.get("size")
    errors.append(f"{url}: lists no {filename}")
  raise DataError(json_urls[0], "cannot find the pyradiomics sdist through the PyPI JSON API ("
                  + "; ".join(errors) + "); download " + filename + " elsewhere and pass it with --sdist PATH")


def _progress_printer(name, total, out):
  state = {"shown": -1, "text": ""}
  interactive = hasattr(out, "isatty") and out.isatty()

  def show(done, final=False):
    mb = done / 2 ** 20
    if total:
      percent = int(100 * done / total)
      # Every 10 % on a log, every percent on a terminal (rewritten in place).
      step = 1 if interactive else 10
      if percent // step == state["shown"] and not final:
        return
      state["shown"] = percent // step
      text = f"downloading {name}: {mb:.1f}/{total / 2 ** 20:.1f} MB ({percent}%)"
    else:
      if int(mb) == state["shown"] and not final:
        return
      state["shown"] = int(mb)
      text = f"downloading {name}: {mb:.1f} MB"
    if final and text == state["text"] and not interactive:
      return  # the last block already printed this line
    state["text"] = text
    print(("\r" + text) if interactive else text, end="\n" if (final or not interactive) else "", file=out,
          flush=True)

  return show


def download(url, dest, *, sha256=None, progress_out=None):
  """Downloads ``url`` to ``dest`` with progress output; ``dest`` appears only once complete and verified.

  Raises:
    DataError: network/HTTP error (naming the URL) or checksum mismatch (naming the downloaded file, which is
      kept as ``dest + '.bad'`` for inspection).
  """
  progress_out = progress_out or sys.stdout  # looked up at call time (tests capture stdout)
  os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
  part = dest + ".part"
  try:
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response, open(part, "wb") as f:
      total = int(response.headers.get("Content-Length") or 0) if hasattr(response, "headers") else 0
      show = _progress_printer(os.path.basename(dest), total, progress_out)
      done = 0
      for block in iter(lambda: response.read(1 << 20), b""):
        f.write(block)
        done += len(block)
        show(done)
      show(done, final=True)
  except (urllib.error.URLError, http.client.HTTPException, OSError) as e:  # incl. timeouts, cut connections
    if os.path.exists(part):
      os.remove(part)
    raise DataError(url, f"cannot download: {e}; without network, pass a local copy with --sdist PATH") from e
  try:
    verify_sha256(part, sha256)
  except DataError as e:
    # The message names the file the user can inspect, not the temporary name.
    shutil.move(part, dest + ".bad")
    raise DataError(dest + ".bad", f"downloaded from {url}: {e.problem}") from None
  os.replace(part, dest)
  return dest


def fetch_sdist(sdist=None, *, cache=None, sha256=None, json_urls=PYPI_JSON_URLS, progress_out=None):
  """Returns the path of a verified pyradiomics sdist.

  Args:
    sdist: ``None`` (look it up on PyPI), a local file, or a URL (``http(s)://``, ``file://``).
    cache: folder for downloads (default ``$XDG_CACHE_HOME/cmedl_jax/downloads``, ``~/.cache/...`` without it).
    sha256: expected digest; default: PyPI's digest for a lookup, the known digest of pyradiomics-3.0.1.tar.gz
      for a local file or URL. ``"any"`` skips the check (e.g. another release).
    json_urls: PyPI JSON documents tried in turn.
    progress_out: where download progress goes.

  Raises:
    DataError: missing local file, download failure, checksum mismatch (naming the file).
  """
  progress_out = progress_out or sys.stdout  # looked up at call time (tests capture stdout)
  cache = cache or _default_cache()
  skip = isinstance(sha256, str) and sha256.lower() in ("any", "none", "skip")
  expected = None if skip else sha256
  if sdist is not None and not re.match(r"^[a-z][a-z0-9+.-]*://", str(sdist)):
    path = os.fspath(sdist)
    if not os.path.isfile(path):
      raise DataError(path, "file does not exist" if not os.path.exists(path) else "is not a file")
    verify_sha256(path, None if skip else (expected or SDIST_SHA256))
    return path
  if sdist is None:
    url, listed, _ = find_sdist(json_urls)
    if expected is None and not skip:
      expected = listed
      if listed.lower() != SDIST_SHA256:
        print(f"warning: PyPI lists sha256 {listed} for {SDIST_NAME}, not the known {SDIST_SHA256}",
              file=progress_out)
  else:
    url = str(sdist)
    if expected is None and not skip:
      expected = SDIST_SHA256
  name = os.path.basename(urllib.parse.urlparse(url).path) or SDIST_NAME
  dest = os.path.join(cache, name)
  if os.path.exists(dest):
    verify_sha256(dest, expected)
    print(f"using cached {dest}", file=progress_out)
    return dest
  return download(url, dest, sha256=expected, progress_out=progress_out)


# ---------------------------------------------------------------------------------------------------------------
# Extracting and converting the cases


def list_lung_cases(tar_path):
  """{case id: (image member, label member)} of the ``data/lungN_image.nrrd`` cases in the sdist.

  Raises:
    DataError: unreadable tarball, no lung case, or an image without its label (naming the tarball).
  """
  try:
    with tarfile.open(tar_path, "r:*") as tar:
      names = [m.name for m in tar.getmembers() if m.isfile()]
  except (tarfile.TarError, OSError, EOFError) as e:
    raise DataError(tar_path, f"cannot read as a tar archive: {e}") from e
  cases = {}
  for name in names:
    match = _CASE_RE.search(name)
    if match:
      label = name[:-len("_image.nrrd")] + "_label.nrrd"
      if label not in names:
        raise DataError(tar_path, f"has {name} but not its label {label}")
      cases[match.group(1)] = (name, label)
  if not cases:
    raise DataError(tar_path, "contains no lung case (data/lung1_image.nrrd + data/lung1_label.nrrd, ...): "
                              f"is it the {PACKAGE} {VERSION} source distribution?")
  return dict(sorted(cases.items(), key=lambda kv: int(kv[0][4:])))


def _extract_member(tar, member, dest):
  # Copies the bytes to a name we choose: tar member paths are never used as paths (no traversal).
  with tar.extractfile(member) as src, open(dest, "wb") as dst:
    shutil.copyfileobj(src, dst)


def convert_case(image_nrrd, label_nrrd, out_root, case_id, *, image_name=None, label_name=None):
  """Converts one NRRD image/label pair to NIfTI in the dataset layout.

  The image keeps its HU values (int16 when integral, else float32) and the NRRD's voxel order; the affine
  carries the orientation (readers reorient to RAS). The label becomes a uint8 0/1 mask.

  Raises:
    DataError: as :func:`read_nrrd`; image/label grid mismatch; no tumor voxel; not HU.
  """
  image_name = image_name or os.fspath(image_nrrd)
  label_name = label_name or os.fspath(label_nrrd)
  image, image_affine, _ = read_nrrd(image_nrrd, name=image_name)
  label, label_affine, _ = read_nrrd(label_nrrd, name=label_name)
  if image.shape != label.shape:
    raise DataError(label_name, f"label shape {label.shape} differs from image shape {image.shape} of {image_name}")
  if not np.allclose(image_affine, label_affine, atol=nifti_io.AFFINE_ATOL):
    raise DataError(label_name, f"label grid differs from the grid of {image_name}:\nlabel:\n"
                                f"{np.round(label_affine, 4)}\nimage:\n{np.round(image_affine, 4)}")
  try:
    mask, others = binarize_label(label)
  except ValueError as e:
    raise DataError(label_name, str(e)) from e
  if not mask.any():
    values = np.unique(label)[:10].tolist()
    raise DataError(label_name, f"has no voxel with the tumor label {TUMOR_LABEL} (values: {values})")
  check_hu(image, image_name)
  if np.issubdtype(image.dtype, np.integer) and image.min() >= -32768 and image.max() <= 32767:
    image = image.astype(np.int16)
  else:
    image = image.astype(np.float32)
  image_path = nifti_io.save_nifti(dataset_index.image_path(out_root, case_id), image, image_affine)
  label_path = nifti_io.save_nifti(dataset_index.label_path(out_root, case_id), mask, image_affine)
  spacing = tuple(float(s) for s in np.sqrt((image_affine[:3, :3] ** 2).sum(axis=0)))
  voxels = int(mask.sum())
  return ExampleCase(case_id=case_id, image_path=image_path, label_path=label_path, shape=tuple(image.shape),
                     spacing=spacing, tumor_voxels=voxels, tumor_ml=voxels * float(np.prod(spacing)) / 1000.0,
                     hu_range=(float(image.min()), float(image.max())), other_label_values=others)


def convert_sdist(tar_path, out_root, *, cases=None, progress_out=None):
  """Converts the lung cases of a pyradiomics sdist into a labelled CT dataset at ``out_root``.

  Args:
    tar_path: the sdist (.tar.gz).
    out_root: dataset folder to write (dataset.json, imagesTr/, labelsTr/).
    cases: case ids to convert (default: every ``data/lungN`` case found).
    progress_out: where the per-case lines go.

  Returns:
    The list of :class:`ExampleCase`.

  Raises:
    DataError: see :func:`list_lung_cases` and :func:`convert_case`; a requested case that is missing.
  """
  progress_out = progress_out or sys.stdout  # looked up at call time (tests capture stdout)
  available = list_lung_cases(tar_path)
  wanted = list(available) if cases is None else list(cases)
  missing = [c for c in wanted if c not in available]
  if missing:
    raise DataError(tar_path, f"has no case {', '.join(missing)} (data/<case>_image.nrrd); found: "
                              f"{', '.join(available)}")
  written = []
  with tempfile.TemporaryDirectory() as tmp, tarfile.open(tar_path, "r:*") as tar:
    for case_id in wanted:
      image_member, label_member = available[case_id]
      image_tmp, label_tmp = os.path.join(tmp, "image.nrrd"), os.path.join(tmp, "label.nrrd")
      _extract_member(tar, image_member, image_tmp)
      _extract_member(tar, label_member, label_tmp)
      case = convert_case(image_tmp, label_tmp, out_root, case_id, image_name=f"{tar_path}::{image_member}",
                          label_name=f"{tar_path}::{label_member}")
      written.append(case)
      line = (f"  {case.case_id}: shape {case.shape}, spacing {'x'.join(f'{s:.4g}' for s in case.spacing)} mm, "
              f"HU {case.hu_range[0]:.0f}..{case.hu_range[1]:.0f}, tumor {case.tumor_voxels} voxels = "
              f"{case.tumor_ml:.2f} ml")
      if case.other_label_values:
        line += f"; other label values set to background: {case.other_label_values}"
      print(line, file=progress_out)
  dataset_index.write_dataset_json(
      out_root, [c.case_id for c in written], modality="CT", labels={"background": 0, "tumor": 1},
      name=f"{PACKAGE}-{VERSION} lung examples",
      description=(f"Chest CTs with one lung lesion each, from the test data of the {PACKAGE} {VERSION} source "
                   f"distribution on PyPI ({SDIST_NAME}, data/lungN_image.nrrd and data/lungN_label.nrrd, "
                   "BSD-3-Clause); HU kept, label value 1 = tumor."),
      extra={"source": {"package": PACKAGE, "version": VERSION, "file": os.path.basename(tar_path),
                        "members": {c: list(available[c]) for c in wanted}}})
  return written


def prepare_examples(out=DEFAULT_OUT, *, sdist=None, cache=None, sha256=None, json_urls=PYPI_JSON_URLS,
                     progress_out=None):
  """Fetches (or takes) the pyradiomics sdist and writes its lung cases to ``OUT/CT``.

  Returns:
    (dataset folder, list of :class:`ExampleCase`).
  """
  progress_out = progress_out or sys.stdout  # looked up at call time (tests capture stdout)
  tar_path = fetch_sdist(sdist, cache=cache, sha256=sha256, json_urls=json_urls, progress_out=progress_out)
  root = os.path.join(out, "CT")
  print(f"converting the lung cases of {tar_path} into {root}", file=progress_out)
  return root, convert_sdist(tar_path, root, progress_out=progress_out)
