"""torchvision weight import: eval-mode logits equal to the PyTorch twins', file formats, tampered files,
classifier replacement, and a fine-tune step from imported weights.

torchvision itself is not needed (its wheel does not import beside the CPU
PyTorch here): the twins in `cnnjax/lab/bench/torch_models.py` carry torchvision's
module names, so their state dicts have the keys and shapes of torchvision's
weight files. PyTorch is part of the `test` extra; without it this module fails
to import rather than being skipped.
"""

import os
import pickle
import re
import zipfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from cnnjax import train
from cnnjax.lab.bench import harness, torch_models
from cnnjax.errors import CheckpointError, ConfigError
from cnnjax.models import build_model
from cnnjax.models import torchvision_import as tvi
from helpers import final_state
from model_helpers import quick_variables

NUM_CLASSES = 10
BATCH = 2
LOGITS_RTOL = 1e-5
# Input sizes that keep each test small yet leave a grid of distinct positions before VGG's and
# AlexNet's classifiers (2x2 and 3x3), so that a wrong flatten order shows.
INPUT_SIZES = {"alexnet": 127}
DEFAULT_INPUT_SIZE = 64
# Narrow classifiers keep VGG and AlexNet small; the layout of their first linear layer is unchanged.
SMALL_CLASSIFIER = 64
TWIN_OPTIONS = {**{name: {"classifier_features": SMALL_CLASSIFIER} for name in tvi.VGGS + ("alexnet",)},
                "googlenet": {"transform_input": True, "aux_logits": True}}
CNNJAX_OPTIONS = {**{name: {"classifier_features": SMALL_CLASSIFIER} for name in tvi.VGGS + ("alexnet",)},
                  "googlenet": {"transform_input": True}}


def twin(name: str, num_classes: int = NUM_CLASSES, seed: int = 0) -> torch.nn.Module:
  """The PyTorch twin in eval mode, with BatchNorm statistics and affine parameters drawn at random."""
  torch.manual_seed(seed)
  model = torch_models.build(name, num_classes, **TWIN_OPTIONS.get(name, {})).eval()
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        features = module.num_features
        module.running_mean.copy_(torch.randn(features, generator=generator) * 0.1)
        module.running_var.copy_(torch.rand(features, generator=generator) + 0.5)
        module.weight.copy_(torch.rand(features, generator=generator) + 0.5)
        module.bias.copy_(torch.randn(features, generator=generator) * 0.1)
  return model


def numpy_state_dict(model: torch.nn.Module) -> dict:
  return {key: value.numpy() for key, value in model.state_dict().items()}


def cnnjax_model(name: str, num_classes: int = NUM_CLASSES):
  return build_model(name, num_classes=num_classes, **CNNJAX_OPTIONS.get(name, {}))


def abstract_template(model, size: int):
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)), train=False))


def relative_error(actual, expected) -> float:
  return float(np.max(np.abs(np.asarray(actual) - expected)) / np.max(np.abs(expected)))


@pytest.mark.parametrize("name", tvi.ARCHITECTURES)
@pytest.mark.slow
def test_imported_weights_give_the_twins_eval_logits(name):
  size = INPUT_SIZES.get(name, DEFAULT_INPUT_SIZE)
  reference = twin(name)
  images = np.random.default_rng(0).standard_normal((BATCH, 3, size, size)).astype(np.float32)
  with torch.no_grad():
    expected = reference(torch.from_numpy(images)).numpy()
  model = cnnjax_model(name)
  variables = tvi.convert_state_dict(name, numpy_state_dict(reference), abstract_template(model, size))
  logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images.transpose(0, 2, 3, 1))
  assert relative_error(logits, expected) < LOGITS_RTOL


def test_googlenet_files_keep_auxiliary_heads_that_are_dropped():
  assert any(key.startswith("aux1.") for key in twin("googlenet").state_dict())


@pytest.fixture(scope="module")
def resnet18_state_dict():
  return numpy_state_dict(twin("resnet18", num_classes=1000))


def write_formats(state_dict: dict, directory) -> dict[str, str]:
  """The same state dict as a zip .pth, a legacy .pth and a safetensors file."""
  tensors = {key: torch.from_numpy(value) for key, value in state_dict.items()}
  paths = {"zip": str(directory / "weights.pth"), "legacy": str(directory / "legacy.pth"),
           "safetensors": str(directory / "weights.safetensors")}
  torch.save(tensors, paths["zip"])
  torch.save(tensors, paths["legacy"], _use_new_zipfile_serialization=False)
  save_file(state_dict, paths["safetensors"])
  return paths


def assert_same_arrays(actual: dict, expected: dict):
  assert sorted(actual) == sorted(expected)
  for key, value in expected.items():
    assert actual[key].dtype == value.dtype, key
    np.testing.assert_array_equal(actual[key], value, err_msg=key)


def test_every_format_reads_the_same_with_and_without_torch(tmp_path, resnet18_state_dict, monkeypatch):
  paths = write_formats(resnet18_state_dict, tmp_path)
  for path in paths.values():
    assert_same_arrays(tvi.read_state_dict(path), resnet18_state_dict)
  for kind in ("zip", "legacy"):
    assert_same_arrays(tvi.read_pickle_without_torch(paths[kind]), resnet18_state_dict)
  monkeypatch.setitem(__import__("sys").modules, "torch", None)  # `import torch` now fails
  assert_same_arrays(tvi.read_state_dict(paths["zip"]), resnet18_state_dict)


def test_strided_and_half_precision_tensors_without_torch(tmp_path):
  tensors = {"transposed": torch.arange(12, dtype=torch.float32).reshape(3, 4).t(),
             "half": torch.linspace(-1, 1, 5, dtype=torch.float16),
             "bfloat16": torch.linspace(-1, 1, 5, dtype=torch.bfloat16), "count": torch.tensor(7)}
  path = str(tmp_path / "mixed.pth")
  torch.save(tensors, path)
  loaded = tvi.read_pickle_without_torch(path)
  np.testing.assert_array_equal(loaded["transposed"], tensors["transposed"].numpy())
  np.testing.assert_array_equal(loaded["half"], tensors["half"].numpy())
  np.testing.assert_array_equal(loaded["bfloat16"], tensors["bfloat16"].float().numpy())
  assert loaded["count"] == 7


class RunsACommand:
  """What a tampered weights file carries: unpickling it would run a shell command."""

  def __init__(self, marker: str):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)


def tampered_files(directory) -> dict[str, str]:
  marker = str(directory / "the_payload_ran")
  payload = pickle.dumps({"conv1.weight": RunsACommand(marker)}, protocol=2)
  code_payload = (b"\x80\x02cmarshal\nloads\nq\x00C\x01\x00\x85q\x01Rq\x02.")  # marshal.loads(b"\x00")
  not_tensors = pickle.dumps({"conv1.weight": [1.0, 2.0]}, protocol=2)
  # torch.FloatStorage, then BUILD: sets the state of what the global gave.
  sets_state = b"\x80\x02ctorch\nFloatStorage\n}X\x01\x00\x00\x00aK\x01sb."
  files = {}
  for label, data in (("system", payload), ("code", code_payload), ("not_tensors", not_tensors),
                      ("sets_state", sets_state)):
    zipped = str(directory / f"{label}.pth")
    with zipfile.ZipFile(zipped, "w") as archive:
      archive.writestr("weights/data.pkl", data)
      archive.writestr("weights/byteorder", "little")
      archive.writestr("weights/version", "3\n")
    files[f"{label}_zip"] = zipped
    raw = str(directory / f"{label}_raw.pth")
    with open(raw, "wb") as f:
      f.write(data)
    files[f"{label}_raw"] = raw
  return files


@pytest.mark.parametrize("reader", ["torch", "without_torch"])
def test_tampered_files_are_refused_unread_with_one_line(tmp_path, reader):
  read = tvi.read_state_dict if reader == "torch" else tvi.read_pickle_without_torch
  for label, path in tampered_files(tmp_path).items():
    with pytest.raises(CheckpointError) as caught:
      read(path)
    message = str(caught.value)
    assert "\n" not in message and path in message, (label, message)
    assert not os.path.exists(tmp_path / "the_payload_ran"), label
  with pytest.raises(CheckpointError, match="tampered"):
    read(str(tmp_path / "system.pth"))


def test_missing_and_unknown_files_are_one_line_errors(tmp_path):
  with pytest.raises(CheckpointError, match="no weights file"):
    tvi.read_state_dict(str(tmp_path / "absent.pth"))
  (tmp_path / "weights.h5").write_bytes(b"\x00")
  with pytest.raises(CheckpointError, match="unknown weights format"):
    tvi.read_state_dict(str(tmp_path / "weights.h5"))
  (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
  with pytest.raises(CheckpointError, match="not a readable safetensors file"):
    tvi.read_state_dict(str(tmp_path / "broken.safetensors"))


def test_a_new_classifier_replaces_the_files_only_when_asked(resnet18_state_dict):
  model = build_model("resnet18", num_classes=NUM_CLASSES)
  template = quick_variables(model, jnp.zeros((1, DEFAULT_INPUT_SIZE, DEFAULT_INPUT_SIZE, 3)), train=False)
  with pytest.raises(CheckpointError, match="replace_classifier=True"):
    tvi.convert_state_dict("resnet18", resnet18_state_dict, template)
  variables = tvi.convert_state_dict("resnet18", resnet18_state_dict, template, replace_classifier=True)
  np.testing.assert_array_equal(variables["params"]["classifier"]["kernel"], template["params"]["classifier"]["kernel"])
  np.testing.assert_array_equal(variables["params"]["stem_conv"]["kernel"],
                                resnet18_state_dict["conv1.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(variables["batch_stats"]["stage4_block2"]["norm2"]["var"],
                                resnet18_state_dict["layer4.1.bn2.running_var"])


@pytest.mark.parametrize("damage,message", [
    ("nan_in_a_convolution", r"tensor layer1\.0\.conv1\.weight holds 1 non-finite value\(s\)"),
    ("negative_variance", r"tensor layer2\.1\.bn2\.running_var holds a negative BatchNorm running variance"),
])
def test_damaged_weights_are_refused_naming_the_file_and_the_tensor(tmp_path, resnet18_state_dict, damage, message,
                                                                     monkeypatch):
  state_dict = {key: value.copy() for key, value in resnet18_state_dict.items()}
  if damage == "nan_in_a_convolution":
    state_dict["layer1.0.conv1.weight"][0, 0, 0, 0] = np.nan
  else:
    state_dict["layer2.1.bn2.running_var"][3] = -0.5
  paths = write_formats(state_dict, tmp_path)
  for path in paths.values():
    with pytest.raises(CheckpointError, match=message) as caught:
      tvi.read_state_dict(path)
    assert str(caught.value).startswith(path) and "download torchvision's file again" in str(caught.value)
  monkeypatch.setitem(__import__("sys").modules, "torch", None)  # the reader without torch
  with pytest.raises(CheckpointError, match=message):
    tvi.read_state_dict(paths["legacy"])


def test_a_view_of_more_elements_than_its_storage_is_refused_before_allocating(tmp_path, monkeypatch):
  # Four floats on disk viewed as 10^10 of them (stride 0): copying the view would take 37 GiB.
  huge = torch.zeros(4).as_strided((100_000, 100_000), (0, 0))
  path = str(tmp_path / "stride0.pth")
  torch.save({"conv1.weight": huge}, path)
  assert os.path.getsize(path) < 4096
  with pytest.raises(CheckpointError, match="overlapping strides"):
    tvi.read_state_dict(path)
  with pytest.raises(CheckpointError, match="overlapping strides"):
    tvi.read_pickle_without_torch(path)
  monkeypatch.setitem(__import__("sys").modules, "torch", None)
  with pytest.raises(CheckpointError, match="overlapping strides"):
    tvi.read_state_dict(path)


def test_shape_errors_print_torchvisions_layout(resnet18_state_dict):
  state_dict = dict(resnet18_state_dict, **{"conv1.weight": np.zeros((32, 3, 7, 7), np.float32)})
  template = abstract_template(cnnjax_model("resnet18", num_classes=1000), DEFAULT_INPUT_SIZE)
  with pytest.raises(CheckpointError, match=re.escape("conv1.weight has shape (32, 3, 7, 7) where resnet18's "
                                                      "stem_conv/kernel needs (64, 3, 7, 7) in torchvision's layout "
                                                      "((7, 7, 3, 64) in cnnjax's)")):
    tvi.convert_state_dict("resnet18", state_dict, template)


def test_another_architectures_file_is_refused(resnet18_state_dict):
  resnet34 = numpy_state_dict(twin("resnet34"))
  with pytest.raises(CheckpointError, match="has no place for"):
    tvi.convert_state_dict("resnet18", resnet34, abstract_template(cnnjax_model("resnet18"), DEFAULT_INPUT_SIZE))
  with pytest.raises(CheckpointError, match=r"has no layer1\.2\."):
    tvi.convert_state_dict("resnet34", resnet18_state_dict,
                           abstract_template(cnnjax_model("resnet34"), DEFAULT_INPUT_SIZE))
  with pytest.raises(ConfigError, match="has no torchvision weights"):
    tvi.convert_state_dict("resnet20", resnet18_state_dict, {})


def test_googlenet_weights_need_torchvisions_epsilon_and_input_transform(tmp_path):
  config = ml_collections.ConfigDict({"init_from": str(tmp_path / "googlenet.pth"),
                                      "init_from_replace_classifier": False, "model": {"name": "googlenet"}})
  for epsilon, options in ((1e-5, {"transform_input": True}), (1e-3, {})):
    model = build_model("googlenet", num_classes=NUM_CLASSES, norm_options={"epsilon": epsilon}, **options)
    with pytest.raises(ConfigError, match="model.bn_epsilon=0.001 and model.transform_input=True"):
      tvi.init_from(config, model, {})
  model = build_model("googlenet", num_classes=NUM_CLASSES, transform_input=True)  # its own epsilon: 1e-3
  with pytest.raises(CheckpointError, match="no weights file"):
    tvi.init_from(config, model, {})


def finetune_config(tmp_path, weights: str):
  """ResNet-18 on random 32x32 RGB arrays with 10 classes, starting from 1000-class weights."""
  config = harness.case_config(harness.Case("resnet18", 8, 32, 3, NUM_CLASSES, "none", "float32", "cifar"),
                               str(tmp_path))
  config.init_from = weights
  config.init_from_replace_classifier = True
  config.model.bn_running_variance = "unbiased"
  return config


@pytest.mark.slow
def test_a_finetune_step_runs_from_imported_weights(tmp_path, resnet18_state_dict):
  weights = str(tmp_path / "resnet18.safetensors")
  save_file(resnet18_state_dict, weights)
  exp = train.build(finetune_config(tmp_path, weights))
  state = exp.init_state()
  variables = tvi.init_from(exp.config, exp.model, {"params": state.params, "batch_stats": state.batch_stats})
  np.testing.assert_array_equal(variables["params"]["stage1_block1"]["conv1"]["kernel"],
                                resnet18_state_dict["layer1.0.conv1.weight"].transpose(2, 3, 1, 0))
  state = state.replace(params=variables["params"], batch_stats=variables["batch_stats"])
  imported = jax.device_get(state.params)  # the step donates its input state
  step = exp.train_step_fn()
  batch = next(exp.train_batches())
  batch.pop("index")
  new_state, metrics = step(exp.strategy.put_state(state), exp.strategy.put_batch(batch))
  assert np.isfinite(float(exp.strategy.get_outputs(metrics)["loss"]))
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                       exp.strategy.get_state(new_state).params, imported)
  assert moved["stem_conv"]["kernel"] > 0
  empty = finetune_config(tmp_path, "")
  assert tvi.init_from(empty, exp.model, {"params": imported})["params"] is imported


@pytest.mark.slow
def test_a_run_starts_from_init_from_once_and_resumes_from_its_own_checkpoints(tmp_path, resnet18_state_dict):
  weights = str(tmp_path / "resnet18.safetensors")
  save_file(resnet18_state_dict, weights)
  config = finetune_config(tmp_path, weights)
  with config.unlocked():
    config.num_train_steps, config.checkpoint_every_steps, config.log_every_steps = 1, 1, 1
    config.optimizer.learning_rate = 1e-12  # one step that leaves the imported weights as they were
  workdir = tmp_path / "run"
  train.run(config, str(workdir))
  trained = final_state(workdir, config).params["stage1_block1"]["conv1"]["kernel"]
  np.testing.assert_allclose(trained, resnet18_state_dict["layer1.0.conv1.weight"].transpose(2, 3, 1, 0), atol=1e-6)
  # A missing weights file is refused before a fresh run writes anything.
  with config.unlocked():
    config.init_from = str(tmp_path / "missing.pth")
  with pytest.raises(ConfigError, match="init_from=.* is not a file"):
    train.run(config, str(tmp_path / "fresh"))
  assert not (tmp_path / "fresh").exists()


def test_bfloat16_safetensors_read_as_float32(tmp_path):
  from safetensors.torch import save_file as save_torch_file  # pylint: disable=import-outside-toplevel
  tensor = torch.linspace(-1, 1, 5, dtype=torch.bfloat16)
  path = str(tmp_path / "half.safetensors")
  save_torch_file({"fc.bias": tensor}, path)
  loaded = tvi.read_state_dict(path)
  assert loaded["fc.bias"].dtype == np.float32
  np.testing.assert_array_equal(loaded["fc.bias"], tensor.float().numpy())
