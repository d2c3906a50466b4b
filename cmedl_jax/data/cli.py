"""``cmedl-data``: dataset utilities.

    cmedl-data check ROOT [--require-labels]       validate every case, list every problem, print statistics
    cmedl-data preprocess [DIR --modality CT|MRI] [--config FILE.py[:ARGS]] [--ct DIR --mri DIR]
                          [--cache-dir DIR] [--target-spacing MM[,MM]]
                                                   write the preprocessed, memory-mapped form training reads
                                                   (DIR, or the config's CT and MRI folders)
    cmedl-data preview --ct CT_ROOT --mri MRI_ROOT --out preview.png [--crop 64 --batch 8 --seed 0]
                       [--config FILE.py[:ARGS]]   write one training batch (augmented as configured) as PNG
    cmedl-data examples [--out runs/examples] [--sdist PATH_OR_URL] [--cache DIR] [--sha256 HEX|any]
                                                   real chest CTs with lung-tumor masks from the pyradiomics
                                                   3.0.1 sdist on PyPI, written as a labelled dataset OUT/CT
"""

from __future__ import annotations

import argparse
import logging
import sys

import numpy as np

from cmedl_jax.data import augment, dataset_index, nifti_io, pipeline, store
from cmedl_jax.errors import ConfigError, DataError
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


def data_config(args):
  """The ``data`` section preprocessing and previews use: the --config file's (else the defaults), with the
  command line's --ct/--mri/--cache-dir/--target-spacing over it."""
  from cmedl_jax import config_base
  if args.config:
    path, _, arg = args.config.partition(":")
    cfg = config_base.load_config_file(path, arg or None)
  else:
    cfg = config_base.base_config()
  d = cfg.data
  for field, value in (("ct_dir", getattr(args, "ct", None)), ("mri_dir", getattr(args, "mri", None)),
                       ("cache_dir", args.cache_dir)):
    if value:
      d[field] = value
  if args.target_spacing:
    try:
      d.target_spacing_mm = tuple(float(v) for v in args.target_spacing.split(","))
    except ValueError:
      raise DataError(None, f"--target-spacing must be one or two numbers of mm, got {args.target_spacing!r}")
  return d


def preview(data_cfg, out_path, *, crop_size=64, batch_size=8, seed=0):
  """Writes the first training batch as a 3-row grid: CT, CT with label overlay, MRI."""
  ct, mri = pipeline.training_stores(data_cfg)
  ds = pipeline.make_train_dataset(ct, mri, global_batch_size=batch_size, crop_size=crop_size, seed=seed,
                                   foreground_fraction=data_cfg.foreground_fraction,
                                   augment=augment.Augment.from_config(data_cfg.augment), process_index=0,
                                   process_count=1)
  batch = ds[0]
  ct_gray = [png.to_uint8(x[..., 0]) for x in batch["ct"]]
  rows = ([np.repeat(g[..., None], 3, -1) for g in ct_gray]
          + [png.overlay_mask(g, m > 0) for g, m in zip(ct_gray, batch["ct_label"])]
          + [np.repeat(png.to_uint8(x[..., 0])[..., None], 3, -1) for x in batch["mri"]])
  return png.write_png(out_path, png.tile(rows, columns=batch_size))


def preprocess_command(args, out=None):
  """``cmedl-data preprocess``: one folder (DIR) or the config's CT and MRI folders, as training will read them."""
  out = out or sys.stdout
  d = data_config(args)
  if args.root:
    modality = args.modality or dataset_index.load_dataset(args.root).modality or "CT"
    modality = "CT" if modality.upper() == "CT" else "MRI"
    jobs = [(args.root, modality, "required" if modality == "CT" else "ignore")]
  else:
    if not (d.ct_dir and d.mri_dir):
      raise DataError(None, "give a dataset folder (cmedl-data preprocess DIR) or a --config with data.ct_dir and "
                            "data.mri_dir")
    jobs = [(d.ct_dir, "CT", "required"), (d.mri_dir, "MRI", "ignore")]
  for root, modality, labels in jobs:
    prepared = store.prepare(root, store.settings_from_config(d, modality), cache_dir=d.cache_dir or None,
                             labels=labels)
    spacing = prepared.spacings
    print(f"{root}: {len(prepared)} {modality} case(s), {prepared.num_slices} slices, in-plane spacing "
          f"{spacing[:, 0].min():.3f}-{spacing[:, 0].max():.3f} mm -> {prepared.folder}", file=out)
  return 0


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
  p_pre = sub.add_parser("preprocess", help="write the preprocessed, memory-mapped cases training reads")
  p_pre.add_argument("root", nargs="?", default=None, help="a dataset folder (default: the config's CT and MRI)")
  p_pre.add_argument("--ct", default=None, help="CT folder (over the config's data.ct_dir)")
  p_pre.add_argument("--mri", default=None, help="MRI folder (over the config's data.mri_dir)")
  p_pre.add_argument("--modality", choices=["CT", "MRI"], default=None,
                     help="how DIR is normalised (default: dataset.json's channel name; CT unless it names MRI)")
  p_prev = sub.add_parser("preview", help="write one training batch as PNG")
  p_prev.add_argument("--ct", required=True)
  p_prev.add_argument("--mri", required=True)
  p_prev.add_argument("--out", required=True)
  p_prev.add_argument("--crop", type=int, default=64)
  p_prev.add_argument("--batch", type=int, default=8)
  p_prev.add_argument("--seed", type=int, default=0)
  for p in (p_pre, p_prev):
    p.add_argument("--config", default=None, metavar="FILE.py[:ARGS]",
                   help="take the data settings from this run config (default: the defaults)")
    p.add_argument("--cache-dir", default=None, help="cache root (default: data.cache_dir, $CMEDL_CACHE_DIR or "
                                                     "~/.cache/cmedl_jax/preprocessed)")
    p.add_argument("--target-spacing", default=None, metavar="MM[,MM]",
                   help="in-plane pixel size to resample to (default: data.target_spacing_mm)")
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
    if args.command == "preprocess":
      return preprocess_command(args)
    path = preview(data_config(args), args.out, crop_size=args.crop, batch_size=args.batch, seed=args.seed)
  except (DataError, ConfigError) as e:
    print(f"ERROR {e}", file=sys.stderr)
    return 1
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
