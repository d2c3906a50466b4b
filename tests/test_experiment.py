"""cmedl-experiment: per-run configs, and the report's numbers against independent numpy/scipy computations."""

import json
import os
import re

import numpy as np
import pytest
from scipy import ndimage, stats

from cmedl_jax import config_base
from cmedl_jax.data import dataset_index, nifti_io, phantoms
from cmedl_jax.errors import DataError
from cmedl_jax.evaluate import scoring
from cmedl_jax.experiment import report, runner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_experiment_config_overrides_method_seeds_and_shares_the_phantoms(tmp_path):
  base = config_base.load_config_file(os.path.join(REPO, "configs", "quickstart.py"))
  cfg = runner.experiment_config(base, str(tmp_path), "ct_pmri_concat", 2, steps=7, num_test=3)
  assert (cfg.method, cfg.seed, cfg.data.seed, cfg.train.total_steps) == ("ct_pmri_concat", 2, 2, 7)
  assert cfg.data.ct_dir == os.path.join(str(tmp_path), "phantoms", "CT")
  assert cfg.eval.data_dir == os.path.join(str(tmp_path), "phantoms", "test", "CT")
  assert cfg.data.phantoms.num_test == 3
  # The base config is left as it was (every run starts from the same one).
  assert (base.method, base.seed, base.train.total_steps) == ("cmedl", 0, 600)
  other = runner.experiment_config(base, str(tmp_path), "cmedl", 0)
  assert other.model.to_dict() == cfg.model.to_dict() and other.data.crop_size == cfg.data.crop_size


def test_experiment_cli_rejects_unknown_methods_and_seeds(capsys):
  with pytest.raises(SystemExit) as e:
    runner.main(["--methods", "cmedl,nnunet"])
  assert e.value.code == 2 and "nnunet" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    runner.main(["--seeds", "0,x"])
  with pytest.raises(SystemExit):
    runner.main(["--methods", "ct_only", "--reference", "cmedl"])


def test_collect_names_the_missing_results_file(tmp_path):
  with pytest.raises(DataError) as e:
    report.collect(str(tmp_path), ["cmedl"], [0])
  assert os.path.join("cmedl_seed0", "eval", "CT", "cases.csv") in str(e.value)


def _numpy_dice(a, b):
  return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.fixture(scope="module")
def fake_experiment(tmp_path_factory):
  """Held-out phantoms and evaluation folders of two 'methods' x two seeds with known predictions.

  "cmedl" predicts the reference exactly; "ct_only" predicts it eroded once (seed 0) or twice (seed 1).
  """
  out = tmp_path_factory.mktemp("experiment")
  test_dir = out / "phantoms" / "test"
  phantoms.write_phantom_dataset(test_dir, num_ct=3, num_mri=0, seed=11, shape=(48, 48, 16))
  index = dataset_index.load_dataset(str(test_dir / "CT"), require_labels=True)
  expected_dice = {}
  for method in ("cmedl", "ct_only"):
    for seed in (0, 1):
      case_rows, lesion_rows, fp_rows = [], [], []
      for case in index.cases:
        image, label = nifti_io.load_case(case.image, case.label)
        ref = label.data > 0
        pred = ref if method == "cmedl" else ndimage.binary_erosion(ref, iterations=seed + 1)
        expected_dice[(method, seed, case.case_id)] = _numpy_dice(pred, ref)
        row, lesions, fps = scoring.score_case(case.case_id, pred, ref, image.spacing)
        case_rows.append(row)
        lesion_rows += lesions
        fp_rows += fps
      scoring.write_results(str(out / "runs" / f"{method}_seed{seed}" / "eval" / "CT"), case_rows, lesion_rows,
                            fp_rows)
  return out, expected_dice


def test_report_tables_match_numpy_and_scipy(fake_experiment, tmp_path):
  out, expected_dice = fake_experiment
  results = report.collect(str(out / "runs"), ["cmedl", "ct_only"], [0, 1])
  extra = tmp_path / "docs" / "RESULTS.md"
  written = report.write_report(results, str(out), reference="cmedl",
                                phantom_info=str(out / "phantoms" / "test" / "phantoms.json"),
                                settings={"config": "c.py", "steps": 5, "seeds": [0, 1], "num_test": 3},
                                extra_markdown=str(extra))
  text = (out / "RESULTS.md").read_text()
  assert extra.read_text() == text
  ct_only = np.array([v for (m, _, _), v in sorted(expected_dice.items()) if m == "ct_only"])
  row = next(line for line in text.splitlines() if line.startswith("| CT only |"))
  assert f"{ct_only.mean():.3f} ± {ct_only.std(ddof=1):.3f}" in row
  assert next(line for line in text.splitlines() if line.startswith("| CMEDL |")).split(" | ")[2] == "1.000 ± 0.000"
  # Seed SD: the SD of the two per-seed means.
  per_seed = [np.mean([v for (m, s, _), v in expected_dice.items() if m == "ct_only" and s == seed]) for seed in (0, 1)]
  assert f"| {np.std(per_seed, ddof=1):.3f} |" in row
  # The paired test: scipy's Wilcoxon on the (seed, case) pairs, reference minus baseline.
  keys = sorted(k[1:] for k in expected_dice if k[0] == "cmedl")
  diff = np.array([expected_dice[("cmedl",) + k] - expected_dice[("ct_only",) + k] for k in keys])
  p = stats.wilcoxon(np.ones(len(keys)), np.ones(len(keys)) - diff).pvalue
  test_row = next(line for line in text.splitlines() if line.startswith("| CT only | +"))
  assert re.search(rf"\+{np.median(diff):.3f}, p = {report._fmt_p(p)} \(n = {len(keys)}\)", test_row), test_row
  # Plots are PNG files, copied next to the extra report.
  for name in ("results_cases.png", "results_lesions.png"):
    assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (extra.parent / name).exists()
  assert str(out / "results.csv") in written


def test_lesion_locations_follow_the_phantom_tumors(fake_experiment):
  out, _ = fake_experiment
  info_path = out / "phantoms" / "test" / "phantoms.json"
  lesions = report.collect(str(out / "runs"), ["cmedl"], [0])["cmedl"]["lesions"]
  locations = report.lesion_locations(str(info_path), str(out / "phantoms" / "test" / "CT"), lesions)
  info = json.loads(info_path.read_text())
  assert set(locations) == {(r["case"], r["lesion_id"]) for r in lesions}
  for case in info["cases"]["CT"]:
    found = sorted(v for (c, _), v in locations.items() if c == case["case_id"])
    # Tumors of a phantom are separate components, so each lesion is one tumor and the locations agree.
    assert found == sorted(t["location"] for t in case["tumors"]), case["case_id"]
