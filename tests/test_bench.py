"""The benchmark harness (scripts/benchmark.py): its cases and the fields of its JSON, on tiny cases.

Speed itself is never asserted here (the brief: benchmarks measure, tests check
behaviour); these tests check that a run produces every field docs/performance.md
promises, that the multi-device and bfloat16 paths run, and
that the PyTorch twin, where PyTorch is installed, is the same architecture; that the
pipeline benchmark against worker counts (scripts/bench_pipeline.py) writes its rates; and that
the design-choice measurements (scripts/bench_design_choices.py) run and refuse to time two
sides that compute different values.
"""

import dataclasses
import importlib.util
import json
import os

import numpy as np
import pytest

from cnnjax import config as config_lib
from cnnjax.lab.bench import design_choices, harness
from helpers import REPO_ROOT, run_cli

BENCH_PIPELINE = os.path.join(REPO_ROOT, "scripts", "bench_pipeline.py")
# Seconds a benchmark script may take in these tests (a few tiny steps, or a flag error).
SCRIPT_TIMEOUT = 300

REQUIRED_FIELDS = ("model", "batch", "strategy", "dtype", "images_per_second", "compile_seconds",
                   "flops_per_step", "fraction_of_peak", "median_step_seconds", "peak_host_memory_mb",
                   "pipeline_images_per_second", "pipeline_over_step", "params")
TORCH_FIELDS = ("torch_eager_images_per_second", "torch_channels_last_images_per_second", "ratio_vs_torch_eager",
                "ratio_vs_torch_channels_last")


def test_every_full_case_is_a_valid_run_that_divides_over_its_devices(tmp_path):
  full = harness.cases(quick=False)
  assert len(set(full)) == len(full)
  models = {case.model for case in full}
  # Each model is timed under every strategy and dtype the harness offers, once.
  assert len(full) == len(models) * len(harness.STRATEGIES) * len(harness.DTYPES)
  for case in full:
    config = harness.case_config(case, str(tmp_path))
    config_lib.validate(config)
    assert case.batch % case.devices == 0, case
    assert case.num_classes == config.data.num_classes and case.devices == (1 if case.strategy == "none"
                                                                             else harness.SIMULATED_DEVICES)


def test_quick_case_list_keeps_resnet20_whole_and_shrinks_imagenet_inputs():
  quick = harness.cases(quick=True)
  assert {(c.strategy, c.dtype) for c in quick if c.model == "resnet20"} == {
      (s, d) for s in harness.STRATEGIES for d in harness.DTYPES}
  assert {c.image_size for c in quick if c.model in ("resnet18", "resnet50")} == {64}


@pytest.mark.slow
def test_benchmark_run_has_every_field_on_one_and_eight_devices():
  tiny = [harness.Case("lenet5", 16, 32, 1, 10, "none", "float32", "mnist"),
          harness.Case("lenet5", 16, 32, 1, 10, "pmap", "bfloat16", "mnist")]
  has_torch = importlib.util.find_spec("torch") is not None
  lines = []
  payload = harness.benchmark(tiny, quick=True, torch_reference=True, warmup_steps=1, timed_steps=2,
                              progress=lines.append)
  assert payload["peak_matmul_flops_per_second"] > 0
  assert payload["machine"]["cpu_count"] >= 1
  assert len(payload["cases"]) == 2 and len(lines) == 3  # the peak, then one line per case
  single, multi = payload["cases"]
  for record in payload["cases"]:
    assert "error" not in record, record
    missing = [f for f in REQUIRED_FIELDS if f not in record]
    assert not missing, missing
    assert record["images_per_second"] > 0 and record["flops_per_step"] > 0
    assert 0 < record["fraction_of_peak"]
    assert record["params"] == 61_706  # LeNet-5 at 10 classes, the pinned count
    if has_torch:
      assert all(f in record for f in TORCH_FIELDS), record
      assert record["torch_params_match"], (record["torch_params"], record["params"])
    else:
      assert "not installed" in record["torch_reference"]
  assert single["devices"] == 1 and multi["devices"] == harness.SIMULATED_DEVICES
  # FLOPs are counted for the whole global step, so the strategy does not change them much.
  assert abs(multi["flops_per_step"] / single["flops_per_step"] - 1) < 0.5


def test_pipeline_benchmark_writes_rates_per_worker_count_and_per_core(tmp_path):
  out = tmp_path / "pipeline.json"
  result = run_cli("", "--settings=0x1,1x1", "--repeats=1", "--seconds=0.2", "--batch=4", "--examples=8",
                   f"--data_dir={tmp_path / 'data'}", f"--json={out}", wrapper=BENCH_PIPELINE)
  assert result.returncode == 0, result.stderr[-3000:]
  payload = json.loads(out.read_text())
  assert payload["data"]["examples"] == 8 and payload["data"]["mean_jpeg_bytes"] > 0
  assert set(payload["settings"]) == {"0x1", "1x1"}
  for name, values in payload["settings"].items():
    assert values["images_per_second"] > 0 and values["cpu_seconds_per_image"] > 0, name
  threads, workers = payload["rounds"]["0x1"][0], payload["rounds"]["1x1"][0]
  assert threads["worker_processes"] == 0 and workers["worker_processes"] == 1
  assert workers["worker_cpu_counted"] and workers["worker_cpu_fraction"] > 0
  derived = payload["derived"]
  assert derived["cores_for_target"] == derived["target_images_per_second"] / derived["images_per_second_per_core"]
  assert {"command", "commit", "machine"} <= set(payload)


def run_script(script: str, *args: str):
  """Runs scripts/<script>.py with no device count in XLA_FLAGS, so that the script's --simulate_devices
  decides it (tests/conftest.py sets 8 for the tests' own process)."""
  return run_cli("", *args, wrapper=os.path.join("scripts", f"{script}.py"), env={"XLA_FLAGS": ""},
                 timeout=SCRIPT_TIMEOUT)


@pytest.mark.parametrize("script,args,message", [
    ("benchmark", [], "--json must have a value"),
    ("benchmark", ["--simulate_devices=3"], "--simulate_devices=3 does not divide the batch of 32"),
    ("benchmark", ["--bogus"], "Unknown command line flag 'bogus'"),
    ("bench_parallel", ["--strategies=none,bogus"], "--strategies=none,bogus: choose from none,pmap,shard_map,jit"),
    ("bench_parallel", ["--simulate_devices=3"], "--simulate_devices=3 must be a positive count dividing --batch=128"),
    ("bench_parallel", ["--model=bogus", "--strategies=none"], "model.name='bogus' is unknown"),
    ("bench_sweep", ["--steps=0"], "--steps=0 must be positive"),
    ("bench_sweep", ["--simulate_devices=0"], "--simulate_devices=0 must be a positive device count"),
    ("bench_design_choices", ["--rounds=0"], "--rounds=0, --compile_rounds=3 and --seconds_per_round=0.3 must be"),
])
def test_benchmark_scripts_take_absl_flags_with_one_line_errors(tmp_path, script, args, message):
  out = tmp_path / "out.json"
  result = run_script(script, *([] if script == "benchmark" and not args else [f"--json={out}"]), *args)
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr[-2000:]
  assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
  assert not out.exists()


def test_benchmark_cases_run_multi_device_cases_on_the_simulated_count():
  counts = {(c.strategy, c.devices) for c in harness.cases(quick=True, devices=4)}
  assert counts == {("none", 1)} | {(s, 4) for s in harness.STRATEGIES if s != "none"}


def test_bench_parallel_starts_the_devices_it_is_asked_for(tmp_path, tfds_data_dir):
  out = tmp_path / "parallel.json"
  result = run_script("bench_parallel", f"--json={out}", "--simulate_devices=2", "--model=lenet5", "--batch=8",
                      "--strategies=none,jit", "--warmup_steps=0", "--timed_steps=1")
  assert result.returncode == 0, result.stderr[-2000:]
  payload = json.loads(out.read_text())
  assert [(c["strategy"], c["bn_sync"], c["devices"]) for c in payload["cases"]] == [
      ("none", "global", 1), ("jit", "global", 2), ("jit", "local", 2)]
  assert payload["simulated_devices"] == 2 and {"command", "commit", "machine"} <= set(payload)


@pytest.mark.slow
def test_bench_sweep_runs_a_mode_on_the_devices_it_is_asked_for(tmp_path, tfds_data_dir):
  out = tmp_path / "vectorized.json"
  result = run_script("bench_sweep", f"--json={out}", "--simulate_devices=2", "--steps=1",
                      "--case=vectorized:jit", f"--workdir={tmp_path / 'sweep'}")
  assert result.returncode == 0, result.stderr[-2000:]
  record = json.loads(out.read_text())
  assert (record["mode"], record["devices"], record["trials"]) == ("vectorized", 2, 8)


def test_design_choices_measure_every_choice_at_tiny_sizes():
  lines = []
  payload = design_choices.run(tiny=True, rounds=2, compile_rounds=1, seconds_per_round=1e-3,
                               progress=lines.append)
  assert list(payload["choices"]) == list(design_choices.CHOICES) and len(lines) == len(design_choices.CHOICES)
  for name, record in payload["choices"].items():
    assert record["max_relative_difference"] <= record["rtol"], name
    expected_rounds = 1 if record["unit"] == "s" else 2
    for side in (design_choices.CNNJAX, design_choices.ALTERNATIVE):
      variant = record["variants"][side]
      assert len(variant["per_round"]) == expected_rounds and variant["median"] > 0, (name, side)
    assert record["alternative_over_cnnjax"] > 0 and len(record["alternative_over_cnnjax_per_round"]) == expected_rounds
  # The docs' rows render from any complete payload.
  assert len(design_choices.markdown_rows(payload)) == 5 and all(design_choices.quoted_phrases(payload))


def test_design_choices_stop_before_timing_sides_that_compute_different_values():
  calls = []

  def side(factor):
    return design_choices.Variant(f"x{factor}", run=lambda _: calls.append(factor) or np.arange(4.0) * factor)

  differing = design_choices.Comparison("made_up", "nowhere", "nothing", {}, "ms", 1e-6, side(1.0), side(1.001))
  with pytest.raises(AssertionError, match="made_up: output 0 differs between cnnjax and the alternative"):
    design_choices.measure(differing, rounds=3, seconds_per_round=1e-3)
  assert calls == [1.0, 1.001]  # each side ran once, for the check, and was never timed
  agreeing = dataclasses.replace(differing, alternative=side(1.0 + 1e-8))
  assert design_choices.measure(agreeing, rounds=1, seconds_per_round=1e-3)["max_relative_difference"] < 1e-6
