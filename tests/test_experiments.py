"""End to end: every experiment file runs a few steps at tiny size through `python -m cnnjax.main`; its
docstring points to its measured result, which meets the docstring's expectation.

Digits experiments run as they are; TFDS experiments (CIFAR-10, ImageNet) run
through tests/mock_tfds_main.py, which is `cnnjax.main` under
`tfds.testing.mock_data`, so no test touches the network.
"""

import json
import os
import re

import pytest

from cnnjax.lab.bench import experiments
from helpers import EXPERIMENTS, REPO_ROOT, load_experiment, read_jsonl, run_cli

TINY = ["--config.num_train_steps=3", "--config.log_every_steps=1", "--config.checkpoint_every_steps=2",
        "--config.eval_every_steps=2", "--config.progress_bar=false", "--config.data.num_threads=2"]
# experiment -> extra overrides that make it tiny, and whether its data is a mocked TFDS dataset
# (True: tfds.testing.mock_data's random records; "realistic": records shaped like the real ones,
# for trimaps and reviews, from tests/mock_tfds_realistic_main.py).
CASES = {
    "lenet5_digits": ([], False),
    "bn_base": ([], False),  # the BatchNorm study's reference run; its bn_* sweeps run in tests/test_bn_study.py
    "simple_cnn_digits": ([], False),
    "resnet20_cifar10": (["--config.batch_size=8"], True),
    "resnet50_imagenet": (["--config.batch_size=4", "--config.data.image_size=32", "--config.eval_batch_size=8"],
                          True),
    # From scratch here (no weights file); tests/test_torchvision_import.py fine-tunes from imported weights.
    "resnet18_finetune": (["--config.batch_size=4", "--config.data.image_size=32", "--config.eval_batch_size=8",
                           "--config.init_from="], True),
    "unet_shapes": (["--config.batch_size=8", "--config.eval_batch_size=100", "--config.model.features=(4, 8)"],
                    False),
    "unet3d_shapes3d": (["--config.batch_size=4", "--config.model.features=(4, 8)", "--config.eval_batch_size=32"],
                        False),
    "unet_pets": (["--config.batch_size=4", "--config.data.image_size=32", "--config.model.features=(8, 16)"],
                  "realistic"),
    "text_cnn_imdb": (["--config.batch_size=8"], "realistic"),
    "alexnet_imagenet": (["--config.batch_size=4", "--config.data.image_size=64", "--config.eval_batch_size=8",
                          "--config.model.classifier_features=16"], True),
    "vgg16_imagenet": (["--config.batch_size=4", "--config.data.image_size=32", "--config.eval_batch_size=8",
                        "--config.model.classifier_features=16", "--config.model.stage_features=(8, 8, 8, 8, 8)"],
                       True),
    "googlenet_imagenet": (["--config.batch_size=4", "--config.data.image_size=32", "--config.eval_batch_size=8",
                            '--config.model.inception_modules=(("3a", (8, 8, 8, 4, 4, 4)),)'], True),
}
MOCK_MAINS = {True: os.path.join(os.path.dirname(__file__), "mock_tfds_main.py"),
              "realistic": os.path.join(os.path.dirname(__file__), "mock_tfds_realistic_main.py")}


def experiment_names():
  return sorted(name[:-3] for name in os.listdir(EXPERIMENTS) if name.endswith(".py"))


def test_every_experiment_has_an_end_to_end_case_and_a_documented_command():
  names = [n for n in experiment_names() if not hasattr(load_experiment(n), "sweep")]
  missing = sorted(set(names) - set(CASES))
  assert not missing, f"experiments without an end-to-end test: {missing}"
  for name in experiment_names():
    doc = load_experiment(name).__doc__ or ""
    assert f"experiments/{name}.py" in doc or "scripts/" in doc, f"{name}: docstring lacks its command"
    assert "Expected" in doc and "\nResult: " in doc, f"{name}: docstring lacks its expected result or its result"


RESULTS = os.path.join(REPO_ROOT, "docs", "results")
# What a measurement in prose looks like: a duration or a rate. Results files hold those, not docstrings.
MEASUREMENT = re.compile(r"\d\s*(s|ms|min|minutes|seconds|hours)\b|examples/s|img/s|\bmeasured\b")


def test_experiment_docstrings_point_to_results_that_meet_their_expectations():
  with open(os.path.join(RESULTS, "experiments.json")) as f:
    recorded = json.load(f)["experiments"]
  with open(os.path.join(RESULTS, "bn_study", "summary.md")) as f:
    bn_summary = f.read()
  pointed_to = set()
  for name in experiment_names():
    doc = load_experiment(name).__doc__
    assert not MEASUREMENT.search(doc), f"{name}: a measurement in the docstring ({MEASUREMENT.search(doc)[0]!r})"
    result = " ".join(doc[doc.index("\nResult: ") + 1:].split())
    if result.startswith('Result: docs/results/experiments.json, "'):
      assert result.startswith(f'Result: docs/results/experiments.json, "{name}"'), result
      expected = experiments.BY_NAME[name].min_eval_accuracy
      assert f"at least {expected * 100:g}%" in " ".join(doc.split()), f"{name}: the docstring's expectation"
      pointed_to.add(name)
    elif result.startswith("Result: docs/results/bn_study/summary.md, "):
      section = re.match(r'Result: docs/results/bn_study/summary.md, "([^"]+)"', result)[1]
      assert f"* **{section}**" in bn_summary, f"{name}: no section {section!r} in the study's summary"
    else:
      assert result.startswith("Result: not run here ("), f"{name}: {result}"
  assert pointed_to == set(recorded) == set(experiments.BY_NAME)
  for name, result in recorded.items():
    assert len(result["commit"]) == 40, name  # the commit each experiment was measured at
    entry = experiments.BY_NAME[name]
    accuracies = experiments.accuracies(result)
    assert accuracies and min(accuracies) >= entry.min_eval_accuracy, (name, accuracies)
    if not entry.sweep:
      assert [run["seed"] for run in result["runs"]] == list(entry.seeds), name


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.slow
def test_experiment_end_to_end(tmp_path, tfds_data_dir, name):
  extra, mocked = CASES[name]
  workdir = tmp_path / name
  args = [f"--config=experiments/{name}.py", f"--workdir={workdir}"] + TINY + extra
  result = run_cli("cnnjax.main", *args, wrapper=MOCK_MAINS[mocked] if mocked else None)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "eval_accuracy=" in result.stdout
  summary = json.load(open(workdir / "summary.json"))
  for key in ("eval_accuracy", "eval_loss", "train_loss", "step", "examples_per_second", "compile_seconds",
              "wall_seconds", "param_checksum", "param_l2"):
    assert key in summary, key
  assert summary["step"] == 3 and 0.0 <= summary["eval_accuracy"] <= 1.0
  # Segmentation runs report their mean IoU beside the pixel accuracy; classifiers have none.
  segmentation = name.startswith("unet")  # the U-Nets are the segmentation experiments
  assert ("eval_mean_iou" in summary) == segmentation and 0.0 <= summary.get("eval_mean_iou", 0.0) <= 1.0
  assert json.load(open(workdir / "config.json"))["model"]["name"] == load_experiment(name).get_config().model.name
  records = read_jsonl(workdir / "metrics.jsonl")
  assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3]
  assert [r["step"] for r in records if r["split"] == "eval"] == [2, 3]
  assert {"2", "3"} <= set(os.listdir(workdir / "checkpoints"))


@pytest.mark.slow
def test_run_experiments_records_each_seeds_summary_and_keeps_earlier_records(tmp_path):
  path = tmp_path / "experiments.json"
  path.write_text(json.dumps({"experiments": {"lenet5_digits": {"kept": True}}}))
  payload = experiments.run(str(path), ("bn_base",))
  assert json.loads(path.read_text()) == payload and payload["experiments"]["lenet5_digits"] == {"kept": True}
  assert {"command", "commit", "machine"} <= set(payload)
  result = payload["experiments"]["bn_base"]
  assert result["commit"] == payload["commit"]
  assert result["command"] == ("python -m cnnjax.main --config=experiments/bn_base.py "
                               "--workdir=/tmp/cnnjax/bn_base --config.progress_bar=false")
  assert [run["seed"] for run in result["runs"]] == list(experiments.BY_NAME["bn_base"].seeds)
  for run in result["runs"]:
    assert 0.0 <= run["eval_accuracy"] <= 1.0 and run["step"] > 0 and run["command_seconds"] > 0
  with pytest.raises(ValueError, match="unknown experiments"):
    experiments.run(str(path), ("bn_bass",))
