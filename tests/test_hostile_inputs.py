"""Hostile and broken inputs around a run (issue 26): each ends in success (with one warning line where the
run would do less than asked) or in one `error:` line with exit status 2 that names the problem and the
fix, before anything is written that would make the fix be refused.

Kinds covered (the letters in the test names): (a) a run resumed after its `init_from` weights file was
deleted; (b) an unbiased BatchNorm running variance over groups of one value; (c) a read-only metrics or
event file on resume; (d) a damaged ArrayRecord chunk met while training; (e) a warmup or profile window
past the run; (f) a step too large for memory, by its batch key; (g) control characters in error lines.
"""

import errno
import os
import shutil
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from cnnjax import cli, train
from cnnjax.errors import ConfigError, DiskFullError, one_line
from cnnjax.lab.bench import harness
from cnnjax.train.experiment import warn_past_the_run
from helpers import experiment_config, run_cli, tiny

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
    config.num_train_steps = 1
    config.progress_bar = False
  workdir = tmp_path / "run"
  uninterrupted = train.run(config, str(workdir))
  # The weights file goes away, and so does the summary: the run resumes from its checkpoint (a run starting
  # from scratch would need the file) and summarizes it again.
  os.remove(weights)
  os.remove(workdir / "summary.json")
  resumed = train.run(config, str(workdir))
  assert resumed["step"] == 1 and resumed["param_checksum"] == uninterrupted["param_checksum"]
  # A run that would start from the missing file is refused before it writes anything.
  with pytest.raises(ConfigError, match="init_from=.* is not a file"):
    train.run(config, str(tmp_path / "fresh"))
  assert not (tmp_path / "fresh").exists()
  before = sorted(os.listdir(workdir))
  with pytest.raises(ConfigError, match="init_from=.* is not a file"):
    train.run(config, str(workdir), fresh=True)
  assert sorted(os.listdir(workdir)) == before


# An MLP's BatchNorm layers see one position per example: with one example per device, `bn_sync=local`
# leaves one value per channel in each group.
ONE_EXAMPLE_PER_DEVICE = ["--config=experiments/bn_per_device_batch.py", "--config.model.norm=batch",
                          "--config.batch_size=8", "--simulate_devices=8", "--config.parallel.strategy=pmap",
                          "--config.model.bn_sync=local", "--config.num_train_steps=2", "--config.progress_bar=false"]


def error_lines(result) -> list[str]:
  return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


def test_b_an_unbiased_running_variance_of_one_value_is_refused_before_anything_is_written(tmp_path):
  workdir = tmp_path / "run"
  refused = run_cli("cnnjax.main", *ONE_EXAMPLE_PER_DEVICE, "--config.model.bn_running_variance=unbiased",
                    f"--workdir={workdir}")
  assert refused.returncode == 2, refused.stderr[-2000:]
  assert "Traceback" not in refused.stderr
  lines = error_lines(refused)
  assert len(lines) == 1 and "BatchNorm layer norm0" in lines[0] and "bn_running_variance=biased" in lines[0]
  assert not workdir.exists()
  # The fix it names is not refused as a different config: nothing of the refused run was kept.
  config = experiment_config("bn_per_device_batch", **{
      "model.norm": "batch", "batch_size": 8, "parallel.strategy": "pmap", "model.bn_sync": "local",
      "num_train_steps": 2, "progress_bar": False, "model.bn_running_variance": "biased"})
  assert train.run(config, str(workdir))["step"] == 2


@pytest.mark.parametrize("overrides,step,key", [
    ({"eval_batch_size": 8_000_000}, "evaluation step", "eval_batch_size"),
    ({"data.image_size": 2048}, "training step", "batch_size"),
])
def test_f_a_step_that_cannot_fit_memory_names_the_batch_key_that_sets_it(tfds_data_dir, overrides, step, key):
  config = tiny(experiment_config("lenet5_digits"), batch_size=32, **overrides)
  with pytest.raises(ConfigError, match=f"the {step} on .* use a smaller data.image_size, {key} or model$"):
    train.build(config)


def test_g_every_error_line_escapes_control_characters(tmp_path, capsys, monkeypatch):
  assert one_line("a\nb\t c\x1b[31md\x07 \udcffé") == "a b c\\x1b[31md\\x07 \\udcffé"
  hostile = "run\x1b]0;title\x07\x1b[2J"
  # Both ways out of `run_reporting_errors`: `fail` (sys.exit), and `stop_at_once` (os._exit, made to raise).
  monkeypatch.setattr(cli.os, "_exit", sys.exit)
  for error in (ConfigError(f"{hostile} is a file"), DiskFullError(f"the disk is full ({hostile})")):

    def go(error=error):
      raise error

    with pytest.raises(SystemExit) as stop:
      cli.run_reporting_errors(go)
    assert stop.value.code == 2
    printed = capsys.readouterr().err
    assert printed.count("\n") == 1 and "\x1b" not in printed and "\x07" not in printed
    assert "run\\x1b]0;title\\x07\\x1b[2J" in printed
  # The same through the entry point, from a name the user gave: a workdir that is a file.
  workdir = tmp_path / f"file{hostile}"
  workdir.write_text("")
  result = run_cli("cnnjax.main", "--config=experiments/lenet5_digits.py", f"--workdir={workdir}")
  assert result.returncode == 2 and "\x1b" not in result.stderr and "\x07" not in result.stderr
  lines = error_lines(result)
  assert len(lines) == 1 and "file" + one_line(hostile) in lines[0], result.stderr[-2000:]


@pytest.fixture(scope="module")
def incomplete_run(tmp_path_factory, tfds_data_dir):
  """(config, workdir) of a LeNet-5 run stopped after its checkpoint at step 2 of 4, to resume from."""
  config = tiny(experiment_config("lenet5_digits"), batch_size=32)
  workdir = tmp_path_factory.mktemp("incomplete") / "run"
  train.run(config, str(workdir))
  os.remove(workdir / "summary.json")
  shutil.rmtree(workdir / "checkpoints" / "4")
  return config, workdir


def directory_state(directory) -> dict[str, bytes]:
  """Every file under `directory` (its lock file aside, which each attempt takes) with its bytes."""
  state = {}
  for root, _, names in os.walk(directory):
    for name in names:
      if name != ".lock":
        path = os.path.join(root, name)
        state[os.path.relpath(path, directory)] = open(path, "rb").read()
  return state


def test_c_a_read_only_metrics_or_event_file_on_resume_is_one_line_naming_it(incomplete_run, tmp_path, capsys,
                                                                             monkeypatch):
  config, source = incomplete_run
  workdir = tmp_path / "run"
  shutil.copytree(source, workdir)
  events = [name for name in os.listdir(workdir) if name.startswith("events.out.tfevents")]
  assert len(events) == 1
  for name in ("metrics.jsonl", events[0]):
    read_only = str(workdir / name)
    os.chmod(read_only, 0o444)
    if os.geteuid() == 0:  # root may write anywhere: let the check see the file as another user does
      monkeypatch.setattr(os, "access", lambda path, mode, read_only=read_only: str(path) != read_only)
    before = directory_state(workdir)
    with pytest.raises(SystemExit) as stop:
      cli.run_reporting_errors(lambda: train.run(config, str(workdir)))
    assert stop.value.code == 2
    printed = capsys.readouterr().err.strip().splitlines()
    assert len(printed) == 1 and printed[0].startswith(f"error: {read_only} is read-only"), printed
    assert "chmod u+w" in printed[0]
    assert directory_state(workdir) == before
    os.chmod(read_only, 0o644)
    monkeypatch.undo()
  assert train.run(config, str(workdir))["step"] == 4
  # A file that turns unwritable after the check (made immutable, a mount remounted read-only) is one line
  # too, naming the file that the failed call was writing (os.replace's target, not its temporary file).
  target = str(workdir / "metrics.jsonl")

  def replace_fails():
    raise PermissionError(errno.EPERM, "Operation not permitted", f"{target}.tmp", None, target)

  with pytest.raises(SystemExit) as stop:
    cli.run_reporting_errors(replace_fails)
  assert stop.value.code == 2
  assert capsys.readouterr().err == (f"error: {target}: Operation not permitted; make it writable for this user "
                                     "(chmod u+w), or use another --workdir\n")


@pytest.fixture(scope="module")
def damaged_array_record(tmp_path_factory):
  """(TFDS data directory, the damaged file) of an image folder prepared as `my_noise`, whose training
  ArrayRecord file was then damaged in its middle: its first record reads, others do not."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from cnnjax.data import open_dataset  # pylint: disable=import-outside-toplevel
  from cnnjax.data.prepare import prepare  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp("damaged_array_record")
  rng = np.random.default_rng(0)
  # Random pixels do not compress: 300 images make a file of many ArrayRecord chunks.
  for split, count in (("train", 150), ("val", 4)):
    for cls in ("a", "b"):
      folder = root / "images" / split / cls
      folder.mkdir(parents=True)
      for i in range(count):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)).save(folder / f"{i}.png")
  data_dir = str(root / "tfds")
  version_dir = prepare("my_noise", data_dir=data_dir, source_dir=str(root / "images"))
  open_dataset("my_noise", tfds_data_dir=data_dir)  # its normalization statistics, computed once and cached
  damaged = next(os.path.join(version_dir, name) for name in os.listdir(version_dir)
                 if name.startswith("my_noise-train.array_record"))
  data = bytearray(open(damaged, "rb").read())
  middle = len(data) // 2
  data[middle:middle + 4096] = bytes(b ^ 0xA5 for b in data[middle:middle + 4096])
  open(damaged, "wb").write(bytes(data))
  return data_dir, damaged


# Training reads the split on the host, record by record, in grain's threads or worker processes.
READS_WHILE_TRAINING = {"data.name": "my_noise", "num_train_steps": 20, "progress_bar": False,
                        "data.placement": "host", "data.cache_megabytes": 0}


def test_d_a_damaged_array_record_chunk_met_by_worker_processes_is_one_line_naming_the_file(damaged_array_record,
                                                                                            tmp_path):
  data_dir, damaged = damaged_array_record
  workdir = tmp_path / "run"
  result = run_cli("cnnjax.main", "--config=experiments/lenet5_digits.py", f"--workdir={workdir}",
                   *(f"--config.{key}={value}" for key, value in READS_WHILE_TRAINING.items()),
                   f"--config.data.tfds_data_dir={data_dir}", "--config.data.num_workers=2")
  assert result.returncode == 2, result.stderr[-2000:]
  assert (workdir / "config.json").exists()  # met while training, not when the dataset opened
  lines = error_lines(result)
  assert len(lines) == 1 and lines[0].startswith(f"error: {damaged}: record "), result.stderr[-2000:]
  assert "the file is damaged" in lines[0] and "prepare the dataset again" in lines[0]
  # Nothing after the line: no traceback, and no shared memory that worker processes left behind.
  assert result.stderr.rstrip().endswith(lines[0]), result.stderr[-2000:]


def test_d_a_damaged_array_record_chunk_met_by_threads_is_one_line_naming_the_file(damaged_array_record,
                                                                                   tmp_path, capsys):
  data_dir, damaged = damaged_array_record
  config = tiny(experiment_config("lenet5_digits"), **READS_WHILE_TRAINING,
                **{"data.tfds_data_dir": data_dir, "data.num_workers": 0})
  workdir = tmp_path / "run"
  with pytest.raises(SystemExit) as stop:
    cli.run_reporting_errors(lambda: train.run(config, str(workdir)))
  assert stop.value.code == 2 and (workdir / "config.json").exists()
  printed = capsys.readouterr().err.strip().splitlines()
  assert len(printed) == 1 and printed[0].startswith(f"error: {damaged}: record "), printed
  assert "prepare the dataset again" in printed[0]


@pytest.mark.parametrize("warmup,profile_steps,expected", [
    (100, (10, 5), ["optimizer.warmup_steps=100 is not shorter than the run's 4 steps: the learning rate rises for "
                    "the whole run and never reaches optimizer.learning_rate=0.002; lower optimizer.warmup_steps",
                    "profile_steps=10,5 traces steps 11-15, after the run's last step 4: no profile will be written; "
                    "choose a START below 4"]),
    (4, (2, 5), ["optimizer.warmup_steps=4 is not shorter than the run's 4 steps: the learning rate rises for the "
                 "whole run and never reaches optimizer.learning_rate=0.002; lower optimizer.warmup_steps",
                 "profile_steps=2,5 reaches past the run's last step 4: only steps 3-4 will be traced"]),
    (3, (1, 3), []),
    (0, (4, 0), []),
])
def test_e_a_warmup_or_profile_window_past_the_run_is_one_warning_line_each(caplog, warmup, profile_steps,
                                                                            expected):
  config = tiny(experiment_config("lenet5_digits"), **{"optimizer.warmup_steps": warmup,
                                                       "profile_steps": profile_steps})
  with caplog.at_level("WARNING", logger="cnnjax"):
    warn_past_the_run(config, 4)
  assert [record.getMessage() for record in caplog.records] == expected


def test_e_a_run_starting_from_scratch_gives_those_warnings(tmp_path, tfds_data_dir, caplog):
  config = tiny(experiment_config("lenet5_digits"), batch_size=32, num_train_steps=2, profile_steps=(10, 5))
  with caplog.at_level("WARNING", logger="cnnjax"):
    train.run(config, str(tmp_path / "run"))
  messages = [record.getMessage() for record in caplog.records]
  assert sum(message.startswith("optimizer.warmup_steps=50 is not shorter") for message in messages) == 1
  assert sum(message.startswith("profile_steps=10,5 traces steps 11-15") for message in messages) == 1
  assert not (tmp_path / "run" / "plugins").exists()
