"""Configuration: bad keys, types and values are one-line errors with exit status 2, before anything runs."""

import os

import ml_collections
import pytest

from cnnjax import config as config_lib
from cnnjax.errors import ConfigError
from helpers import experiment_config, run_cli

LENET = "--config=experiments/lenet5_digits.py"


@pytest.mark.parametrize("override,message", [
    ("--config.model.nonexistent=1", "unknown config key 'model.nonexistent'"),
    ("--config.optimiser.learning_rate=0.1", "unknown config key 'optimiser.learning_rate'"),
    ("--config.batch_size=many", "config.batch_size expects int"),
    ("--config.data.flip=sometimes", "config.data.flip expects a bool"),
    ("--config.optimizer.learning_rate=-0.1", "optimizer.learning_rate=-0.1 must be positive"),
    ("--config.batch_size=0", "batch_size=0 must be positive"),
    ("--config.model.name=resnet9000", "model.name='resnet9000' is unknown"),
    ("--config.data.name=SVHN!", "data.name='SVHN!' is neither one of digits, npz"),
])
@pytest.mark.slow
def test_cli_config_errors_are_one_line_and_write_nothing(tmp_path, override, message):
  workdir = tmp_path / "run"
  result = run_cli("cnnjax.main", LENET, f"--workdir={workdir}", override, timeout=120)
  assert result.returncode == 2, result.stderr
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert lines[-1].startswith("error: ") and message in lines[-1], result.stderr
  assert len([line for line in lines if line.startswith("error")]) == 1
  assert not os.path.exists(workdir)


@pytest.mark.parametrize("name", ["svhn_cropped", "my_pets", "cifar10_corrupted/brightness_1:1.0.0"])
def test_any_tfds_dataset_name_passes_validation(name):
  config = experiment_config("lenet5_digits")
  config.data.name = name
  config_lib.validate(config)  # whether it is prepared is checked when it is opened


def test_missing_config_file_is_one_line(tmp_path):
  result = run_cli("cnnjax.main", "--config=experiments/nope.py", f"--workdir={tmp_path}", timeout=60)
  assert result.returncode == 2 and "does not exist" in result.stderr.splitlines()[-1]


@pytest.mark.parametrize("key,value,message", [
    ("parallel.strategy", "dp", "parallel.strategy='dp' is unknown"),
    ("model.bn_sync", "sometimes", "model.bn_sync='sometimes' is unknown"),
    ("model.norm", "instance", "model.norm='instance' is unknown"),
    ("model.bn_running_variance", "sample", "model.bn_running_variance='sample' is unknown"),
    ("optimizer.weight_decay", -1.0, "must be >= 0"),
    ("num_epochs", 0.0, "one must be positive"),
    ("model.renorm_rmax", 0.5, "model.renorm_rmax=0.5 must be >= 1"),
    ("model.renorm_dmax", -1.0, "model.renorm_dmax=-1.0 must be >= 0"),
    ("model.renorm_rmax_steps", -1, "model.renorm_rmax_steps=-1 must be >= 0"),
])
def test_validate_rejects_impossible_values(key, value, message):
  config = experiment_config("lenet5_digits", **{key: value})
  with pytest.raises(ConfigError, match=message):
    config_lib.validate(config)


def test_ghost_needs_a_group_size():
  config = experiment_config("lenet5_digits", **{"model.bn_sync": "ghost"})
  with pytest.raises(ConfigError, match="bn_group_size"):
    config_lib.validate(config)


def test_shared_keys_exist_in_every_experiment():
  for name in sorted(os.listdir(os.path.join(os.path.dirname(__file__), "..", "experiments"))):
    if not name.endswith(".py"):
      continue
    config = experiment_config(name[:-3])
    for key in ("model.name", "data.name", "batch_size", "num_epochs", "num_train_steps", "seed",
                "optimizer.learning_rate", "parallel.strategy", "model.bn_sync"):
      node = config
      for part in key.split("."):
        node = node[part]


def test_a_key_added_to_the_schema_at_its_default_keeps_earlier_runs_resumable():
  config = experiment_config("lenet5_digits")
  # What an earlier cnnjax, without the renorm keys, wrote into config.json.
  saved = config_lib.as_json(config)
  for key in ("renorm_rmax", "renorm_dmax"):
    del saved["model"][key]
  assert config_lib.resume_differences(saved, config) == []
  earlier = ml_collections.ConfigDict(saved)
  assert config_lib.fingerprint(earlier) == config_lib.fingerprint(config)
  # Set away from its default, the new key is a different run.
  config.model.renorm_rmax = 2.0
  assert [key for key, *_ in config_lib.resume_differences(saved, config)] == ["model.renorm_rmax"]
  assert config_lib.fingerprint(earlier) != config_lib.fingerprint(config)
  # Any other change still counts, default or not.
  config.model.renorm_rmax = 3.0
  config.optimizer.learning_rate = 0.5
  assert config_lib.fingerprint(earlier) != config_lib.fingerprint(config)
