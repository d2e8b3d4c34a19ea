"""python -m cnnjax.export: a trained run's weights in torchvision's layout give the PyTorch twin cnnjax's
eval-mode logits; the StableHLO export computes cnnjax's eval-mode apply; bad inputs are one line, exit
status 2, and leave the run's directory byte-identical.

The PyTorch side is the twin in `cnnjax/lab/bench/torch_models.py`, which carries torchvision's module
names, so its `state_dict()` has torchvision's keys and shapes (torchvision itself is not a dependency;
tests/test_torchvision_import.py builds its weight files the same way).
"""

import dataclasses
import functools
import hashlib
import os
import re
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from cnnjax import train
from cnnjax.errors import CnnjaxError
from cnnjax.lab.bench import harness, torch_models
from cnnjax.models import build_model
from cnnjax.models import torchvision_import as tvi
from cnnjax.train import export
from helpers import final_state, run_cli

NUM_CLASSES = 10
IMAGE_SIZE = 32
BATCH = 8
STEPS = 2
LOGITS_RTOL = 1e-5
CONVENTIONS = ("biased", "unbiased")
# The sizes each architecture's twin is compared at (AlexNet needs 127 for a 3x3 grid before its classifier);
# narrow classifiers keep VGG and AlexNet small.
TWIN_SIZES = {"alexnet": 127}
NARROW = {name: {"classifier_features": 64} for name in tvi.VGGS + ("alexnet",)}


def tiny_run(directory, convention: str):
  """Trains ResNet-18 for two steps on random 32x32 arrays (10 classes) with BatchNorm's running variance in
  `convention`, keeping the best checkpoint; returns (workdir, config)."""
  os.makedirs(directory)
  config = harness.case_config(harness.Case("resnet18", BATCH, IMAGE_SIZE, 3, NUM_CLASSES, "none", "float32",
                                            "cifar"), str(directory))
  config.num_train_steps = config.checkpoint_every_steps = config.eval_every_steps = STEPS
  config.log_every_steps, config.progress_bar = 1, False
  config.keep_best_metric = "eval_accuracy"  # its one checkpoint is the best, for --checkpoint=best
  config.model.bn_running_variance = convention
  workdir = str(directory / "run")
  train.run(config, workdir)
  return workdir, config


@dataclasses.dataclass(frozen=True)
class Run:
  """A tiny trained run, its state as the tests' own helper restores it, and its eval-mode model."""

  workdir: str
  config: Any
  state: Any
  model: Any

  def logits(self, inputs: np.ndarray) -> np.ndarray:
    variables = {"params": self.state.params, "batch_stats": self.state.batch_stats}
    return np.asarray(jax.jit(functools.partial(self.model.apply, train=False))(variables, inputs))


class Runs:
  """{convention: Run}, each trained on first use: the same run (seed, data, steps) in each running-variance
  convention. Lazily, so that a test worker trains only the runs its tests read."""

  def __init__(self, root):
    self.root, self.trained = root, {}

  def __getitem__(self, convention: str) -> Run:
    if convention not in self.trained:
      workdir, config = tiny_run(self.root / convention, convention)
      self.trained[convention] = Run(workdir, config, final_state(workdir, config), train.build(config).model)
    return self.trained[convention]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  return Runs(tmp_path_factory.mktemp("export"))


def snapshot(directory) -> dict[str, str]:
  """{relative path: sha256 of its bytes, or 'dir'} of everything under `directory`."""
  entries = {}
  for root, dirs, files in os.walk(directory):
    for name in dirs:
      entries[os.path.relpath(os.path.join(root, name), directory)] = "dir"
    for name in files:
      with open(os.path.join(root, name), "rb") as f:
        entries[os.path.relpath(os.path.join(root, name), directory)] = hashlib.sha256(f.read()).hexdigest()
  return entries


def images(count: int = 4, size: int = IMAGE_SIZE) -> np.ndarray:
  return np.random.default_rng(0).standard_normal((count, size, size, 3)).astype(np.float32)


def relative_error(actual, expected) -> float:
  return float(np.max(np.abs(np.asarray(actual) - expected)) / np.max(np.abs(expected)))


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_torchvision_export_gives_the_twin_cnnjax_eval_logits_in_either_variance_convention(runs, tmp_path,
                                                                                           convention):
  run = runs[convention]
  path = str(tmp_path / "resnet18.safetensors")
  before = snapshot(run.workdir)
  exported = export.export(run.workdir, "torchvision", path, checkpoint="best")
  assert snapshot(run.workdir) == before
  assert exported.step == STEPS
  twin = torch_models.build("resnet18", NUM_CLASSES).eval()
  tensors = load_file(path)
  assert sorted(tensors) == sorted(twin.state_dict())  # torchvision's keys exactly, num_batches_tracked too
  twin.load_state_dict(tensors, strict=True)
  inputs = images()
  with torch.no_grad():
    torch_logits = twin(torch.from_numpy(inputs.transpose(0, 3, 1, 2))).numpy()
  assert relative_error(torch_logits, run.logits(inputs)) < LOGITS_RTOL
  # The running variance is written as the run stored it, in its convention, which the metadata names.
  np.testing.assert_array_equal(tensors["layer1.0.bn1.running_var"].numpy(),
                                run.state.batch_stats["stage1_block1"]["norm1"]["var"])
  np.testing.assert_array_equal(tensors["bn1.running_mean"].numpy(), run.state.batch_stats["stem_norm"]["mean"])
  assert int(tensors["bn1.num_batches_tracked"]) == STEPS
  with safe_open(path, "np") as f:
    assert f.metadata()["bn_running_variance"] == convention
    assert f.metadata()["cnnjax_model"] == "resnet18"


def test_the_two_variance_conventions_store_different_variances(runs):
  biased, unbiased = (runs[convention].state.batch_stats["stem_norm"]["var"] for convention in CONVENTIONS)
  # Both runs normalize alike while training; only what enters the running average differs, by m / (m - 1).
  assert np.all(unbiased > biased)


# One architecture per path of the mapping: basic and bottleneck blocks, VGG's positions with and without
# BatchNorm, the flattened grid before AlexNet's and VGG's classifiers, GoogLeNet's Inception branches.
INVERSE_CASES = ("resnet18", "resnet50", "vgg11", "vgg11_bn", "alexnet", "googlenet")


@pytest.mark.parametrize("name", INVERSE_CASES)
def test_to_state_dict_is_the_exact_inverse_of_the_import(name):
  size = TWIN_SIZES.get(name, 64)
  twin = torch_models.build(name, NUM_CLASSES, **NARROW.get(name, {}))
  state_dict = {key: value.numpy() for key, value in twin.state_dict().items()}
  model = build_model(name, num_classes=NUM_CLASSES, **NARROW.get(name, {}))
  template = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)), train=False))
  variables = tvi.convert_state_dict(name, state_dict, template)
  back = tvi.to_state_dict(name, variables)
  assert sorted(back) == sorted(state_dict)
  for key, value in state_dict.items():
    assert back[key].dtype == value.dtype, key
    np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_stablehlo_export_runs_in_plain_jax_as_cnnjax_apply(runs, tmp_path):
  run = runs["biased"]
  path = str(tmp_path / "resnet18.stablehlo")
  before = snapshot(run.workdir)
  exported = export.export(run.workdir, "stablehlo", path)
  assert snapshot(run.workdir) == before
  with open(path, "rb") as f:
    served = jax.export.deserialize(bytearray(f.read()))
  assert served.platforms == export.DEFAULT_PLATFORMS  # lowered for each; called here on the CPU
  for count in (1, 3):  # any batch size
    inputs = images(count)
    assert relative_error(served.call(inputs), run.logits(inputs)) < LOGITS_RTOL
  assert exported.input_shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and "normalized with mean" in exported.describe()


@pytest.mark.parametrize("name, options, match", [
    ("resnet18", {"norm_kind": "group"}, "model.norm=group"),
    ("vgg11", {"norm_kind": "batch"}, "model.norm=batch"),
    ("resnet18", {"norm_options": {"epsilon": 1e-3}}, "epsilon 0.001, torchvision's 1e-05"),
    ("googlenet", {"norm_options": {"epsilon": 1e-5}}, "epsilon 1e-05, torchvision's 0.001"),
    ("alexnet", {"activation": "tanh"}, "another activation"),
])
def test_a_model_that_computes_otherwise_than_torchvisions_is_not_exported_to_it(name, options, match):
  export.check_torchvision_model(name, build_model(name, num_classes=NUM_CLASSES))  # as torchvision builds it
  with pytest.raises(CnnjaxError, match=re.escape(match)):
    export.check_torchvision_model(name, build_model(name, num_classes=NUM_CLASSES, **options))


def largest_array_file(workdir: str, step: int) -> str:
  state_dir = os.path.join(workdir, "checkpoints", str(step), "state")
  return max((os.path.join(root, name) for root, _, names in os.walk(state_dir) for name in names),
             key=os.path.getsize)


def assert_refused(args, match: str, run_dir: str) -> None:
  before = snapshot(run_dir)
  result = run_cli("cnnjax.export", *args)
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2, result.stderr
  assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], result.stderr
  assert snapshot(run_dir) == before


def test_bad_inputs_are_one_line_and_leave_the_run_byte_identical(runs, tmp_path):
  workdir = runs["biased"].workdir
  output = str(tmp_path / "out.safetensors")
  with open(output, "wb") as f:
    f.write(b"keep")
  refusals = [({"to": "onnx"}, "--to='onnx' is unknown"),
              ({"output": str(tmp_path / "missing" / "out.safetensors")}, "does not exist"),
              ({"output": str(tmp_path / "out.pt")}, "ending in .safetensors"),
              ({"output": str(tmp_path)}, "is a directory"),
              ({}, "pass --overwrite"),
              ({"to": "stablehlo", "output": os.path.join(workdir, "config.json"), "overwrite": True},
               "a file of the run"),
              ({"to": "stablehlo", "output": str(tmp_path / "x.stablehlo"), "platforms": ("gpu",)}, "unknown gpu")]
  before = snapshot(workdir)
  for overrides, match in refusals:
    arguments = {"to": "torchvision", "output": output, **overrides}
    with pytest.raises(CnnjaxError, match=re.escape(match)):
      export.export(workdir, arguments.pop("to"), arguments.pop("output"), **arguments)
  assert snapshot(workdir) == before
  with open(output, "rb") as f:
    assert f.read() == b"keep"
  # The data is read where the overrides say (here: nowhere); a step without a checkpoint and a damaged one
  # are named.
  moved = ml_collections.ConfigDict(runs["biased"].config.to_dict())
  moved.data.train_path = str(tmp_path / "moved.npz")
  with pytest.raises(CnnjaxError, match=re.escape(moved.data.train_path)):
    export.export(workdir, "torchvision", str(tmp_path / "new.safetensors"), config=moved)
  damaged = str(tmp_path / "damaged")
  shutil.copytree(workdir, damaged)
  with open(largest_array_file(damaged, STEPS), "r+b") as f:
    f.seek(8)
    f.write(b"garbage!")
  with pytest.raises(CnnjaxError, match="has no checkpoint at step 7"):
    export.export(workdir, "torchvision", str(tmp_path / "new.safetensors"), step=7)
  # Through the command: one line, exit status 2, the run's directory byte-identical.
  assert_refused(["--to=torchvision", f"--workdir={damaged}", f"--output={tmp_path / 'new.safetensors'}"],
                 f"checkpoint {STEPS} in {damaged}/checkpoints is damaged or unreadable", damaged)
  shutil.rmtree(damaged)
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(CnnjaxError, match="holds no run: its config.json is missing"):
    export.export(str(empty), "stablehlo", str(tmp_path / "x.stablehlo"))
  assert snapshot(workdir) == before
  assert sorted(os.listdir(tmp_path)) == ["empty", "out.safetensors"]  # nothing else written
  assert not os.listdir(empty)


def test_a_model_without_a_torchvision_counterpart_is_one_line_naming_those_with_one_and_exports_to_stablehlo(
    tmp_path):
  config = harness.case_config(harness.Case("lenet5", BATCH, IMAGE_SIZE, 3, NUM_CLASSES, "none", "float32",
                                            "cifar"), str(tmp_path))
  config.num_train_steps = config.checkpoint_every_steps = STEPS
  config.progress_bar = False
  run_dir = str(tmp_path / "lenet5")
  train.run(config, run_dir)
  assert_refused(["--to=torchvision", f"--workdir={run_dir}", f"--output={tmp_path / 'lenet5.safetensors'}"],
                 f"has no torchvision counterpart to export to; the models with torchvision's layout: "
                 f"{', '.join(tvi.ARCHITECTURES)}", run_dir)
  path = str(tmp_path / "lenet5.stablehlo")
  export.export(run_dir, "stablehlo", path, platforms=("cpu",))
  with open(path, "rb") as f:
    served = jax.export.deserialize(bytearray(f.read()))
  lenet = Run(run_dir, config, final_state(run_dir, config), train.build(config).model)
  inputs = images(2)
  assert relative_error(served.call(inputs), lenet.logits(inputs)) < LOGITS_RTOL


def test_overwrite_replaces_the_output_and_the_command_says_what_it_wrote(runs, tmp_path):
  run = runs["unbiased"]
  output = tmp_path / "resnet18.safetensors"
  output.write_bytes(b"old")
  data = tmp_path / "data"  # the run's arrays moved: the overrides say where they are now
  shutil.copytree(os.path.dirname(run.config.data.train_path), data, ignore=shutil.ignore_patterns("run"))
  overrides = [f"--config.data.{role}_path={data / os.path.basename(run.config.data[role + '_path'])}"
               for role in ("train", "eval")]
  result = run_cli("cnnjax.export", f"--workdir={run.workdir}", "--to=torchvision", f"--output={output}",
                   "--overwrite", f"--step={STEPS}", *overrides)
  assert result.returncode == 0, result.stderr
  assert f"wrote {output}: resnet18 at step {STEPS} as torchvision" in result.stdout
  assert len(load_file(str(output))) == len(torch_models.build("resnet18", NUM_CLASSES).state_dict())
  assert sorted(os.listdir(tmp_path)) == ["data", "resnet18.safetensors"]  # no temporary file left beside it


def test_help_exits_zero_and_offers_the_librarys_choices():
  result = run_cli("cnnjax.export", "--help")
  assert result.returncode == 0, result.stderr
  assert f"<{'|'.join(export.FORMATS)}>" in result.stdout
  assert f"default: '{','.join(export.DEFAULT_PLATFORMS)}'" in result.stdout
