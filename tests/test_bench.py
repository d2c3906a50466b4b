"""The benchmark tools themselves (cmedl_jax.bench): the convolution profile's arithmetic and the metrics benchmark.

The other test files do not use the benchmark code (the step benchmark's tests are in test_torch_port.py).
"""

import jax
import numpy as np
import pytest

from cmedl_jax.bench import conv_profile, metrics_bench
from cmedl_jax.ops import onednn
from tests.kernel_helpers import needs_onednn


def test_profile_keys_of_the_library_kernels_parse():
  direct = conv_profile.gflop("fwd n2 66x66x256 -> 64x64x256 k3x3 s1")
  assert conv_profile.gflop("fwd n2 66x66x256 -> 64x64x256 k3x3 s1 winograd") == direct
  assert conv_profile.gflop("dx  n4 134x134x1 -> 128x128x8 k7x7 s1 thin") == pytest.approx(
      2 * 4 * 128 * 128 * 8 * 49 / 1e9)


@needs_onednn
def test_summary_of_a_onednn_profile_counts_calls_and_work():
  rng = np.random.default_rng(30)
  x = rng.standard_normal((3, 18, 14, 5)).astype(np.float32)
  kernel = rng.standard_normal((4, 4, 5, 7)).astype(np.float32)
  geometry = dict(stride=(2, 2), padding=((1, 1), (1, 1)))
  onednn.profile_start()
  for _ in range(2):
    y = jax.block_until_ready(onednn.conv_forward(x, kernel, **geometry))
  jax.block_until_ready(onednn.conv_backward_weights(x, y, kernel.shape, **geometry))
  profile = onednn.profile_stop()
  # multiply-adds x 2: every output element sums kh * kw * in products
  assert conv_profile.gflop("fwd n3 18x14x5 -> 9x7x7 k4x4 s2") == pytest.approx(2 * 3 * 9 * 7 * 7 * 4 * 4 * 5 / 1e9)
  summary = conv_profile.summarize(profile, step_s=1.0)
  assert [row["calls"] for row in summary["rows"]] in ([2, 1], [1, 2])
  assert summary["gflop"] == pytest.approx(3 * conv_profile.gflop("fwd n3 18x14x5 -> 9x7x7 k4x4 s2"))
  assert summary["seconds_per_kind"]["dx"] == 0
  with pytest.raises(ValueError, match="not a oneDNN profile key"):
    conv_profile.gflop("conv 3x3")


# surface-distance 0.1 imports from deprecated scipy.ndimage namespaces.
@pytest.mark.filterwarnings("ignore:Please import:DeprecationWarning")
def test_metrics_benchmark_runs_small(capsys):
  pytest.importorskip("surface_distance")
  assert metrics_bench.main(["--size", "24,24,12", "--repeats", "1"]) == 0
  output = capsys.readouterr().out
  assert "ratio jitted/reference" in output
  values = [line[line.index(" dice "):line.index(" mm")] for line in output.splitlines() if " dice " in line]
  assert len(values) == 4 and len(set(values)) == 1, output  # all four print the same metric values


def test_data_benchmark_runs_small(tmp_path, capsys):
  from cmedl_jax.bench import data_bench
  report = tmp_path / "data.json"
  argv = ["--cases", "2", "--size", "48", "--slices", "6", "--mri-cases", "2", "--crop", "32", "--batch", "4",
          "--batches", "3", "--rounds", "2", "--workers", "0,2", "--work-dir", str(tmp_path / "work"), "--no-progress",
          "--json", str(report)]
  assert data_bench.main(argv) == 0
  output = capsys.readouterr().out
  for store in ("mmap", "in-RAM"):
    for workers in (0, 2):
      assert f"{store:6s}   2 cases, {workers} workers:" in output, output
  import json
  run = json.loads(report.read_text())["runs"]["2"]
  rows = run["throughput"]
  assert len(rows) == 4
  assert all(r["examples"] == (2 if r["store"] == "in-RAM" and r["workers"] == 0 else 1) * 3 * 4 for r in rows)
  in_ram_0 = next(r for r in rows if r["store"] == "in-RAM" and r["workers"] == 0)
  # 0 workers: the stores took two rounds each in turn; the in-RAM rate is the median of its rounds', the ratio the
  # median of the per-round ratios
  assert len(in_ram_0["ratios_per_round"]) == 2
  assert in_ram_0["examples_per_s"] == pytest.approx(np.median(in_ram_0["examples_per_s_per_round"]))
  assert in_ram_0["ratio_mmap_over_in_ram"] == pytest.approx(np.median(in_ram_0["ratios_per_round"]))
  assert in_ram_0["ratios_per_round"] == pytest.approx(
      [a / b for a, b in zip(in_ram_0["mmap_interleaved_examples_per_s_per_round"],
                             in_ram_0["examples_per_s_per_round"])])
  in_ram_2, mmap_2 = (next(r for r in rows if r["store"] == s and r["workers"] == 2) for s in ("in-RAM", "mmap"))
  assert in_ram_2["ratio_mmap_over_in_ram"] == pytest.approx(mmap_2["examples_per_s"] / in_ram_2["examples_per_s"])
  # the same stream from both stores: the in-RAM store's first batch is bitwise the memory-mapped one's
  assert all(r["same_first_batch"] for r in rows if r["store"] == "in-RAM")
  assert max(r["child_processes"] for r in rows if r["workers"] == 2) >= 2  # the grain workers were sampled
  assert not (tmp_path / "work").exists()  # the generated volumes and caches are deleted
