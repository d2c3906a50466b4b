"""``cmedl-predict``: segments unlabelled scans with a trained run's test-time network (CMEDL: the student).

    cmedl-predict --workdir RUN --input FILE_OR_DIR [--input ...] --out DIR [--step N|best] [--probabilities]
                  [--tta mirror] [--inplane-spacing MM] [--overwrite]

Inputs are NIfTI files, plain folders of them, or dataset folders (``imagesTr/``, dataset.json; labels are not
needed and not read). Each scan is resampled in-plane to the run's ``data.target_spacing_mm`` (or
``--inplane-spacing``), segmented, and its label map written on the scan's own grid, with its affine, header and
voxel order, as ``OUT/<case>.nii.gz``; ``--probabilities`` adds ``OUT/<case>_probabilities.nii.gz`` (float32,
X x Y x Z x K). Existing outputs are not replaced without ``--overwrite``, and ``--out`` may not lie in an input
folder (or be an input file's folder); all inputs are indexed and checked before anything is written, and each
file is written atomically.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import numpy as np

from cmedl_jax.data import dataset_index, nifti_io
from cmedl_jax.errors import DataError

log = logging.getLogger(__name__)


def collect_inputs(inputs):
  """[(case id, image path)] of every input (files, plain folders, dataset folders), in the given order.

  Raises:
    DataError: an input that does not exist or is not NIfTI, an empty folder, or two inputs with one case id.
  """
  cases, seen = [], {}
  for item in inputs:
    if os.path.isdir(item):
      found = [(c.case_id, c.image) for c in dataset_index.load_dataset(item).cases]
    elif os.path.isfile(item):
      case_id = dataset_index.case_id_of(item)
      if case_id is None:
        raise DataError(item, "is not a NIfTI file (.nii or .nii.gz)")
      found = [(case_id, item)]
    else:
      raise DataError(item, "input does not exist")
    for case_id, path in found:
      if case_id in seen:
        raise DataError(path, f"case id {case_id!r} is also the case id of {seen[case_id]}; outputs are named by "
                              "case id, so predict them into separate --out folders")
      seen[case_id] = path
      cases.append((case_id, path))
  return cases


def output_paths(out_dir, case_id, probabilities):
  paths = [os.path.join(out_dir, f"{case_id}.nii.gz")]
  if probabilities:
    paths.append(os.path.join(out_dir, f"{case_id}_probabilities.nii.gz"))
  return paths


def predict(workdir, inputs, out_dir, *, step=None, probabilities=False, mirror_tta=False, inplane_spacing_mm=None,
            overwrite=False, batch_size=None, kernels=None, progress=True):
  """Segments every input scan; returns {case id: label file}.

  Raises:
    DataError: unusable inputs (named), outputs that exist (without ``overwrite``), a run that cannot be read.
    FileNotFoundError: the run has no checkpoint.
  """
  from cmedl_jax.evaluate import inference
  cases = collect_inputs(inputs)
  out_real = os.path.realpath(out_dir)
  for item in inputs:  # predictions never go into an input folder (or the folder of an input file)
    item_real = os.path.realpath(item)
    inside = (os.path.commonpath([out_real, item_real]) == item_real if os.path.isdir(item)
              else out_real == os.path.dirname(item_real))
    if inside:
      raise DataError(out_dir, f"lies in the input folder of {item}; write the predictions elsewhere (--out)")
  if not overwrite:
    existing = [p for case_id, _ in cases for p in output_paths(out_dir, case_id, probabilities) if os.path.exists(p)]
    if existing:
      raise DataError(existing[0], f"exists ({len(existing)} output file(s) in {out_dir} would be replaced); pass "
                                   "--overwrite or choose another --out")
  predictor = inference.load_predictor(workdir, step, kernels)
  segmenter = inference.VolumeSegmenter(predictor, batch_size, target_spacing_mm=inplane_spacing_mm,
                                        mirror_tta=mirror_tta)
  bar = None
  if progress:
    from tqdm import tqdm
    bar = tqdm(total=len(cases), desc="predict", dynamic_ncols=True)
  written = {}
  try:
    for case_id, path in cases:
      image = nifti_io.load_volume(path)
      probs = segmenter.probabilities(image.data, image.spacing)
      label_path, *prob_path = output_paths(out_dir, case_id, probabilities)
      written[case_id] = nifti_io.save_like(label_path, np.argmax(probs, axis=-1).astype(np.uint8), image)
      if prob_path:
        nifti_io.save_like(prob_path[0], probs, image, dtype=np.float32)
      if bar is not None:
        bar.update(1)
        bar.set_postfix_str(case_id)
  finally:
    if bar is not None:
      bar.close()
  return written


def main(argv=None):
  from cmedl_jax.evaluate.cli import parse_step
  parser = argparse.ArgumentParser(prog="cmedl-predict", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="the training run folder (with checkpoints/)")
  parser.add_argument("--input", required=True, action="append",
                      help="a NIfTI file, a folder of them or a dataset folder (repeatable)")
  parser.add_argument("--out", required=True, help="output folder")
  parser.add_argument("--step", type=parse_step, default=None,
                      help="checkpoint step, or best (the best by validation; default: the latest)")
  parser.add_argument("--probabilities", action="store_true", help="also write the class probabilities")
  parser.add_argument("--tta", choices=["none", "mirror"], default="none",
                      help="test-time augmentation: mirror averages the 4 in-plane mirrorings")
  parser.add_argument("--inplane-spacing", type=float, default=None, metavar="MM",
                      help="segment at this in-plane pixel size instead of the run's data.target_spacing_mm")
  parser.add_argument("--batch-size", type=int, default=None, help="slices per inference batch")
  parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
  args = parser.parse_args(argv)
  if args.inplane_spacing is not None and not args.inplane_spacing > 0:
    parser.error(f"--inplane-spacing must be a positive number of mm, got {args.inplane_spacing}")
  logging.basicConfig(level=logging.WARNING, format="%(message)s")
  from cmedl_jax.utils import compilation_cache
  compilation_cache.enable_persistent_cache()
  try:
    written = predict(args.workdir, args.input, args.out, step=args.step, probabilities=args.probabilities,
                      mirror_tta=args.tta == "mirror", inplane_spacing_mm=args.inplane_spacing,
                      overwrite=args.overwrite, batch_size=args.batch_size)
  except (DataError, FileNotFoundError) as e:
    print(f"ERROR {e}", file=sys.stderr)
    return 1
  print(f"wrote {len(written)} prediction(s) to {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
