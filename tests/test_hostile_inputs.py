"""Hostile and broken inputs around a run (issue 26): each ends in success or in one `error:` line with exit
status 2 that names the problem and the fix, before anything is written where the fix would be refused.

Kinds covered: a run resumed after its `init_from` weights file was deleted.
"""

import os
import shutil

import pytest
from safetensors.numpy import save_file

from cnnjax import train
from cnnjax.errors import ConfigError
from cnnjax.lab.bench import harness

NUM_CLASSES = 10


def resnet18_weights(path) -> str:
  """A torchvision-layout ResNet-18 weights file (the PyTorch twin's state dict) at `path`."""
  import torch  # pylint: disable=import-outside-toplevel  (only this test needs it)
  from cnnjax.lab.bench import torch_models  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  state_dict = torch_models.build("resnet18", NUM_CLASSES).state_dict()
  save_file({key: value.numpy() for key, value in state_dict.items()}, str(path))
  return str(path)


def test_a_resumed_run_never_reads_its_init_from_file(tmp_path):
  weights = resnet18_weights(tmp_path / "resnet18.safetensors")
  config = harness.case_config(harness.Case("resnet18", 8, 32, 3, NUM_CLASSES, "none", "float32", "cifar"),
                               str(tmp_path))
  with config.unlocked():
    config.init_from = weights
    config.num_train_steps, config.checkpoint_every_steps, config.log_every_steps = 2, 1, 1
    config.progress_bar = False
  workdir = tmp_path / "run"
  uninterrupted = train.run(config, str(workdir))
  # The weights file goes away, and so does the run's last step: it resumes from step 1 and trains step 2.
  os.remove(weights)
  os.remove(workdir / "summary.json")
  shutil.rmtree(workdir / "checkpoints" / "2")
  resumed = train.run(config, str(workdir))
  assert resumed["step"] == 2 and resumed["param_checksum"] == uninterrupted["param_checksum"]
  # A run that would start from the missing file is refused before it writes anything.
  with pytest.raises(ConfigError, match="init_from=.* is not a file"):
    train.run(config, str(tmp_path / "fresh"))
  assert not (tmp_path / "fresh").exists()
  before = sorted(os.listdir(workdir))
  with pytest.raises(ConfigError, match="init_from=.* is not a file"):
    train.run(config, str(workdir), fresh=True)
  assert sorted(os.listdir(workdir)) == before
