"""``cmedl-data``: dataset utilities.

    cmedl-data check ROOT [--require-labels]       validate every case, list every problem, print statistics
    cmedl-data preview --ct CT_ROOT --mri MRI_ROOT --out preview.png [--crop 64 --batch 8 --seed 0]
                                                   write one training batch as a PNG grid
    cmedl-data examples [--out runs/examples] [--sdist PATH_OR_URL] [--cache DIR] [--sha256 HEX|any]
                                                   real chest CTs with lung-tumor masks from the pyradiomics
                                                   3.0.1 sdist on PyPI, written as a labelled dataset OUT/CT
"""

from __future__ import annotations

import argparse
import logging
import sys

import numpy as np

from cmedl_jax.data import dataset_index, nifti_io, pipeline
from cmedl_jax.errors import DataError
from cmedl_jax.utils import png


def check(root, require_labels=False, out=sys.stdout):
  """Reads every case of ``root``; returns the list of problems (empty when the dataset is usable)."""
  try:
    index = dataset_index.load_dataset(root, require_labels=require_labels)
  except DataError as e:
    return [str(e)]
  allowed = set(index.labels.values())
  problems, shapes, spacings, tumor_ml = [], [], [], []
  for i, case in enumerate(index.cases):
    try:
      image, label = nifti_io.load_case(case.image, case.label, allowed_labels=allowed)
    except DataError as e:
      problems.append(str(e))
      continue
    shapes.append(image.shape)
    spacings.append(image.spacing)
    if label is not None:
      tumor_ml.append(float((label.data > 0).sum() * np.prod(label.spacing)) / 1000.0)
    print(f"  [{i + 1}/{len(index.cases)}] {case.case_id}: shape {image.shape}, spacing "
          f"{'x'.join(f'{s:.2f}' for s in image.spacing)} mm"
          + (f", foreground {tumor_ml[-1]:.2f} ml" if label is not None else ", no label"), file=out)
  if shapes:
    spacings = np.array(spacings)
    print(f"{index.root}: {len(index.cases)} case(s), modality {index.modality or '?'}, labels {index.labels}; "
          f"spacing min {np.round(spacings.min(0), 3).tolist()} max {np.round(spacings.max(0), 3).tolist()} mm",
          file=out)
  return problems


def preview(ct_root, mri_root, out_path, *, crop_size=64, batch_size=8, seed=0):
  """Writes the first training batch as a 3-row grid: CT, CT with label overlay, MRI."""
  ct = pipeline.load_store(ct_root, require_labels=True)
  mri = pipeline.load_store(mri_root)
  ds = pipeline.make_train_dataset(ct, mri, global_batch_size=batch_size, crop_size=crop_size, seed=seed,
                                   process_index=0, process_count=1)
  batch = ds[0]
  ct_gray = [png.to_uint8(x[..., 0]) for x in batch["ct"]]
  rows = ([np.repeat(g[..., None], 3, -1) for g in ct_gray]
          + [png.overlay_mask(g, m > 0) for g, m in zip(ct_gray, batch["ct_label"])]
          + [np.repeat(png.to_uint8(x[..., 0])[..., None], 3, -1) for x in batch["mri"]])
  return png.write_png(out_path, png.tile(rows, columns=batch_size))


def _examples(args):
  from cmedl_jax.data import examples  # pynrrd and urllib are only needed here
  try:
    root, cases = examples.prepare_examples(args.out, sdist=args.sdist, cache=args.cache, sha256=args.sha256)
  except DataError as e:
    print(f"ERROR {e}", file=sys.stderr)
    return 1
  print(f"wrote {len(cases)} case(s) to {root} (dataset.json, imagesTr/, labelsTr/)")
  print(f"check with:    cmedl-data check {root} --require-labels")
  print(f"evaluate with: cmedl-evaluate --workdir RUN --data {root}")
  return 0


def main(argv=None):
  parser = argparse.ArgumentParser(prog="cmedl-data", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  p_check = sub.add_parser("check", help="validate a dataset folder")
  p_check.add_argument("root")
  p_check.add_argument("--require-labels", action="store_true", help="every case must have a label")
  p_prev = sub.add_parser("preview", help="write one training batch as PNG")
  p_prev.add_argument("--ct", required=True)
  p_prev.add_argument("--mri", required=True)
  p_prev.add_argument("--out", required=True)
  p_prev.add_argument("--crop", type=int, default=64)
  p_prev.add_argument("--batch", type=int, default=8)
  p_prev.add_argument("--seed", type=int, default=0)
  p_ex = sub.add_parser("examples", help="fetch real chest CTs with tumor masks (pyradiomics 3.0.1 sdist)")
  p_ex.add_argument("--out", default="runs/examples", help="output folder; the dataset goes to OUT/CT")
  p_ex.add_argument("--sdist", default=None,
                    help="local pyradiomics-3.0.1.tar.gz (offline use) or its URL (default: look it up on PyPI)")
  p_ex.add_argument("--cache", default=None, help="download cache (default ~/.cache/cmedl_jax/downloads)")
  p_ex.add_argument("--sha256", default=None,
                    help="expected sha256 of the sdist (default: PyPI's, or the known digest of "
                         "pyradiomics-3.0.1.tar.gz for --sdist); 'any' skips the check")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")

  if args.command == "check":
    problems = check(args.root, args.require_labels)
    for problem in problems:
      print(f"ERROR {problem}", file=sys.stderr)
    if problems:
      print(f"{len(problems)} problem(s) found", file=sys.stderr)
      return 1
    print("OK")
    return 0
  if args.command == "examples":
    return _examples(args)
  try:
    path = preview(args.ct, args.mri, args.out, crop_size=args.crop, batch_size=args.batch, seed=args.seed)
  except DataError as e:
    print(f"ERROR {e}", file=sys.stderr)
    return 1
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
