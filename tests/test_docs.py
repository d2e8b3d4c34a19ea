"""The docs: every link resolves, and the measurements they quote are those of the committed results files."""

import json
import os
import re

import pytest

from cnnjax.lab.bench import bn_precision, design_choices, gpu_check, pipeline
from helpers import REPO_ROOT

DOCS = os.path.join(REPO_ROOT, "docs")
RESULTS = os.path.join(DOCS, "results")
NOTES_RESULTS = os.path.join(RESULTS, "notes")
# A Markdown link's target, skipping web addresses.
LINK = re.compile(r"\]\((?!https?:)([^)#\s]+)(?:#[^)]*)?\)")
BN_STUDY_BLOCK = re.compile(r"<!-- bn_study summary:[^\n]*-->\n(.*?)<!-- end of the bn_study summary -->", re.S)


def markdown_files():
  return [os.path.join(REPO_ROOT, "README.md")] + sorted(
      os.path.join(DOCS, name) for name in os.listdir(DOCS) if name.endswith(".md"))


def read(path):
  with open(path) as f:
    return f.read()


@pytest.mark.parametrize("path", markdown_files(), ids=os.path.basename)
def test_every_relative_link_resolves(path):
  missing = [target for target in LINK.findall(read(path))
             if not os.path.exists(os.path.join(os.path.dirname(path), target))]
  assert not missing, f"{os.path.relpath(path, REPO_ROOT)} links to missing files: {missing}"


def test_the_bn_study_summary_is_the_studys_own():
  block = BN_STUDY_BLOCK.search(read(os.path.join(DOCS, "bn_study.md")))
  assert block, "docs/bn_study.md lost its generated summary block"
  assert block.group(1).strip() == read(os.path.join(RESULTS, "bn_study", "summary.md")).strip()


def test_the_pipeline_table_and_its_derived_numbers_are_the_results_files():
  with open(os.path.join(RESULTS, "pipeline_workers.json")) as f:
    payload = json.load(f)
  text = read(os.path.join(DOCS, "performance.md"))
  assert pipeline.markdown_table(dict(sorted(payload["settings"].items()))) in text
  derived = payload["derived"]
  assert f"about {derived['images_per_second_per_core']:.0f} ImageNet images per" in text
  assert f"needs about {derived['cores_for_target']:.0f} host cores" in text
  with open(os.path.join(RESULTS, "pipeline_workers_host_finished.json")) as f:
    before = json.load(f)["settings"]
  flat = " ".join(text.split())
  assert (f"one thread spent {before['0x1']['cpu_seconds_per_image'] * 1e3:.2f} CPU ms per image and two threads "
          f"{before['0x2']['cpu_seconds_per_image'] * 1e3:.2f}") in flat


def test_the_gpu_numbers_are_the_gpu_checks():
  with open(os.path.join(RESULTS, "gpu_check_h100.json")) as f:
    check = json.load(f)
  with open(os.path.join(RESULTS, "gpu_check_h100_first.json")) as f:
    first = {entry["model"]: entry for entry in json.load(f)["throughput"]}
  performance = read(os.path.join(DOCS, "performance.md"))
  assert gpu_check.markdown_table(check) in performance
  assert check["tests"]["gpu"]["status"] == "ok" and f"All {check['tests']['gpu']['passed']} GPU tests" in performance
  cost = f"{check['throughput'][0]['deterministic_over_fastest_step_time']:.2f}x"
  assert f"they cost {cost} in step time" in performance
  assert f"trains {cost} faster on one H100" in read(os.path.join(DOCS, "running.md"))
  flat = " ".join(performance.split())
  for model in ("resnet50", "resnet20"):
    assert f"{first[model]['torch_compiled']['images_per_second']:,.0f} img/s" in flat
    assert f"{first[model]['torch_eager']['images_per_second']:,.0f}" in flat


def test_results_files_record_their_command_commit_and_machine():
  # bn_study/ holds the study's own report (scripts/bn_study.py), not a benchmark's results file.
  for folder in (RESULTS, NOTES_RESULTS):
    for name in os.listdir(folder):
      if name.endswith(".json"):
        with open(os.path.join(folder, name)) as f:
          payload = json.load(f)
        assert {"command", "commit", "machine"} <= set(payload), os.path.join(folder, name)


def notes_results(script):
  with open(os.path.join(NOTES_RESULTS, f"{script}.json")) as f:
    return json.load(f)


def percent(fraction):
  return f"{fraction * 100:.1f}%"


def at_shift(result, shift):
  return result["shifted_accuracy"][result["shifts"].index(shift)]


def equivariance_quotes(payload):
  rows = payload["layers"]
  circular = [row["error"] for row in rows if row["padding"] == "circular" and row["stride"] == 1]
  same = [row for row in rows if row["padding"] == "same" and row["stride"] == 1]
  strided = [row for row in rows if row["padding"] == "circular" and row["stride"] == 2]
  # What the row says is exact must be exactly 0 in the file.
  assert circular and max(circular) == 0.0 and max(row["interior_error"] for row in same) == 0.0
  assert max(row["error"] for row in strided if row["shift"] % 2 == 0) == 0.0
  odd = {f"{row['error']:.2f}" for row in strided if row["shift"] % 2}
  assert len(odd) == 1, odd
  errors = [row["error"] for row in same]
  classifiers = payload["classifiers"]
  unshifted = [at_shift(result, 0) for result in classifiers.values()]
  return ([f"zero padding: {min(errors):.2f}-{max(errors):.2f} over the map", f"{odd.pop()} for odd ones",
           f"({min(unshifted) * 100:.1f}-{percent(max(unshifted))} unshifted)"] +
          [f"{label} {percent(at_shift(result, 4))}" for label, result in classifiers.items()])


def mlp_vs_cnn_quotes(payload):
  models = payload["models"]
  mlp, flatten, pooled = (models[label] for label in ("MLP (128 hidden)", "max pooling + flatten",
                                                      "max pooling + global average"))
  assert flatten["reused"] and pooled["reused"]  # as the wall-clock column says
  quotes = [(f"MLP {mlp['params']:,} parameters, {percent(at_shift(mlp, 0))}, {percent(at_shift(mlp, 2))} at a "
             "2-pixel shift")]
  for name, model in (("CNN (flatten)", flatten), ("CNN (global average)", pooled)):
    quotes.append(f"{name} {model['params']:,}, {percent(at_shift(model, 0))}, {percent(at_shift(model, 2))}")
  return quotes


def degradation_quotes(payload):
  models = payload["models"]
  names = {"plain20": "plain-20", "plain56": "plain-56", "resnet20": "ResNet-20", "resnet56": "ResNet-56"}
  accuracies = ", ".join(percent(models[model]["eval_accuracy"]) for model in names)
  return [f"{name} {models[model]['final_train_loss']:.2g}" for model, name in names.items()] + [
      f"{payload['steps']} steps", f"test accuracy {accuracies}"]


def deep_image_prior_quotes(payload):
  return [(f"noisy {payload['noisy_psnr']:.2f} dB; output {payload['best_psnr']:.2f} dB at iteration "
           f"{payload['best_iteration']:,}, back to {payload['final_psnr']:.2f} dB at {payload['iterations'][-1]:,}"),
          f"{payload['size']}x{payload['size']} photo"]


def filter_bank_quotes(payload):
  sharpness = payload["relative_sharpness"]
  names = {"box_blur": "box blur", "gaussian_blur_3x3": "3x3 Gaussian", "gaussian_blur_5x5": "5x5 Gaussian",
           "sharpen": "sharpen"}
  return [f"x{sharpness[kernel]:.2f} {name}" for kernel, name in names.items()] + [f"`{payload['photo']}`"]


STUDY_QUOTES = {"equivariance": equivariance_quotes, "mlp_vs_cnn": mlp_vs_cnn_quotes,
                "degradation": degradation_quotes, "deep_image_prior": deep_image_prior_quotes,
                "filter_bank": filter_bank_quotes}


@pytest.mark.parametrize("script", sorted(STUDY_QUOTES))
def test_the_studies_table_quotes_the_studies_results_files(script):
  rows = [line for line in read(os.path.join(DOCS, "studies.md")).splitlines()
          if line.startswith(f"| `scripts/{script}.py` |")]
  assert len(rows) == 1, f"docs/studies.md has no single row for scripts/{script}.py"
  payload = notes_results(script)
  for quote in STUDY_QUOTES[script](payload) + [f"| {payload['wall_seconds']:.0f} s"]:
    assert quote in rows[0], f"docs/studies.md's {script} row does not say {quote!r} (results/notes/{script}.json)"


def test_the_bn_precision_table_is_the_results_files():
  payload = notes_results("bn_precision")
  assert bn_precision.markdown_table(payload["records"]) in read(os.path.join(DOCS, "parallel.md"))
  assert payload["shape"] == [32, 8, 8, 16]  # "32 examples of 8x8x16", as the passage says


def test_the_design_choice_measurements_are_the_results_files():
  with open(os.path.join(RESULTS, "design_choices.json")) as f:
    payload = json.load(f)
  assert set(payload["choices"]) == set(design_choices.CHOICES) and not payload["tiny"]
  performance = read(os.path.join(DOCS, "performance.md"))
  for row in design_choices.markdown_rows(payload):
    assert row in performance, f"docs/performance.md's design-choice table lacks {row!r}"
  flat = " ".join(performance.split())  # the lowering paragraph wraps its quotes over lines
  for phrase in design_choices.quoted_phrases(payload):
    assert phrase in flat, f"docs/performance.md's lowering paragraph does not say {phrase!r}"


def test_the_benchmark_tables_are_the_benchmarks_results_files():
  from cnnjax.lab.bench import harness  # pylint: disable=import-outside-toplevel
  with open(os.path.join(RESULTS, "benchmark.json")) as f:
    full = json.load(f)
  with open(os.path.join(RESULTS, "benchmark_quick.json")) as f:
    quick = {c["model"]: c for c in json.load(f)["cases"] if c["strategy"] == "none" and c["dtype"] == "float32"}
  text = read(os.path.join(DOCS, "performance.md"))
  flat = " ".join(text.split())
  assert harness.markdown_table(full) in text
  assert harness.default_against_one_device_table(full, "resnet20", "jit") in text
  assert f"float32 matmul peak {full['peak_matmul_flops_per_second'] / 1e9:.0f} GFLOP/s" in flat
  r18, r50 = quick["resnet18"], quick["resnet50"]
  assert (f"{r18['images_per_second']:.0f} and {r50['images_per_second']:.0f} images/s on one device, "
          f"x{r18['ratio_vs_torch_eager']:.2f} and x{r50['ratio_vs_torch_eager']:.2f} of PyTorch eager") in flat
  for model, name in (("resnet20", "ResNet-20"), ("resnet18", "ResNet-18"), ("resnet50", "ResNet-50")):
    times = [c["compile_seconds"] for c in full["cases"] if c["model"] == model]
    assert f"{min(times):.1f}-{max(times):.1f} s for {name}" in flat


def test_the_newer_jax_data_point_is_its_results_file():
  with open(os.path.join(RESULTS, "benchmark_quick_jax012.json")) as f:
    payload = json.load(f)
  cases = {(c["model"], c["strategy"], c["dtype"]): c for c in payload["cases"]}
  flat = " ".join(read(os.path.join(DOCS, "performance.md")).split())
  one, jit = cases[("resnet20", "none", "float32")], cases[("resnet20", "jit", "float32")]
  assert (f"Python {payload['machine']['python']} with jax {payload['machine']['jax']}" in flat and
          f"x{one['ratio_vs_torch_eager']:.2f} of PyTorch eager on one device and "
          f"x{jit['ratio_vs_torch_eager']:.2f} under `jit`" in flat)


def test_the_bn_sync_cost_is_its_results_file():
  with open(os.path.join(RESULTS, "bn_sync_cost.json")) as f:
    ratios = json.load(f)["global_over_local_step_time"]
  flat = " ".join(read(os.path.join(DOCS, "performance.md")).split())
  assert (f"local statistics at {ratios['pmap']:.2f} (pmap), {ratios['shard_map']:.2f} (shard_map) and "
          f"{ratios['jit']:.2f} (jit)") in flat


def test_the_run_against_its_step_is_its_results_file():
  from cnnjax.lab.bench import run_vs_step  # pylint: disable=import-outside-toplevel
  with open(os.path.join(RESULTS, "run_vs_step.json")) as f:
    payload = json.load(f)
  text = read(os.path.join(DOCS, "performance.md"))
  assert run_vs_step.markdown_table(payload) in text
  cases = {case["case"]: case for case in payload["cases"]}
  mlp, lenet = cases["mlp_digits"], cases["lenet5_digits"]
  flat = " ".join(text.split())
  assert (f"{mlp['before']['loop_microseconds_per_step']:,.0f} microseconds per step before, "
          f"{mlp['after']['loop_microseconds_per_step']:,.0f} after") in flat
  assert (f"from {mlp['before']['median_run_images_per_second']:,.0f} to "
          f"{mlp['after']['median_run_images_per_second']:,.0f} images per second") in flat
  assert (f"LeNet-5 keeps {lenet['after']['run_over_step']:.2f} of its step "
          f"({lenet['before']['run_over_step']:.2f} before)") in flat
  assert f"runs at {cases['lenet5_digits_4_steps_per_dispatch']['after']['run_over_step']:.2f} of the bare" in flat
  assert payload["checkouts"]["before"]["commit"].startswith("3a5025d")


def test_the_sweep_mode_table_is_its_results_file():
  from cnnjax.lab.bench import harness  # pylint: disable=import-outside-toplevel
  with open(os.path.join(RESULTS, "sweep_modes.json")) as f:
    payload = json.load(f)
  cases = {(c["mode"], c["strategy"]): c for c in payload["cases"]}
  text = read(os.path.join(DOCS, "sweeps.md"))
  flat = " ".join(text.split())
  assert harness.sweep_modes_table(payload) in text
  assert (f"({cases[('vectorized', 'jit')]['compile_seconds_total']:.1f} s against "
          f"{cases[('sequential', 'jit')]['compile_seconds_total']:.1f} s)") in flat
  assert f"({cases[('partitioned', 'jit')]['compile_seconds_total']:.0f} s of compilation summed)" in flat
