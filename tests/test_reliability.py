"""Fault injection: exact resume after SIGKILL, damaged checkpoints, foreign workdirs, bad inputs.

Kills are made by tests/fault_main.py, which runs `cnnjax.main` and SIGKILLs its
own process at a chosen point (between steps, during a step, at the start of a
checkpoint save, just before a save commits). Every wait is bounded and only the
processes these tests start are affected.
"""

import json
import os
import signal
import time

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cnnjax import train
from cnnjax.data import ProcessSlice, train_dataset
from cnnjax.errors import CheckpointError
from cnnjax.parallel import check_divisible
from helpers import checkpoint_steps, experiment_config, read_jsonl, run_cli, tiny

FAULT_MAIN = os.path.join(os.path.dirname(__file__), "fault_main.py")
# The notes' CNN with BatchNorm, dropout and random rotations: every source of state and randomness.
RUN = ["--config=experiments/simple_cnn_digits.py", "--config.batch_size=32", "--config.num_train_steps=40",
       "--config.checkpoint_every_steps=10", "--config.log_every_steps=5", "--config.progress_bar=false",
       "--config.data.num_threads=2"]


def checksum(workdir) -> str:
  return json.load(open(os.path.join(workdir, "summary.json")))["param_checksum"]


def killed_run(args, fault: str):
  result = run_cli("", *args, wrapper=FAULT_MAIN, env={"CNNJAX_FAULT": fault})
  assert result.returncode == -signal.SIGKILL, (fault, result.returncode, result.stderr[-2000:])
  return result


def tensorboard_steps(workdir) -> dict[str, list[int]]:
  """{tag: steps} of a run's event files, every event kept (repeats included)."""
  accumulator = EventAccumulator(str(workdir), purge_orphaned_data=False)
  accumulator.Reload()
  return {tag: [e.step for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def complete_steps(workdir) -> list[int]:
  return checkpoint_steps(workdir)


@pytest.mark.parametrize("strategy,faults", [
    ("none", [("between_steps:7", []), ("during_step:15", [10]), ("save_begin:20", [10]),
              ("save_commit:30", [10, 20])]),
    ("pmap", [("save_commit:20", [10])]),
])
@pytest.mark.slow
def test_sigkill_anywhere_then_resume_is_bit_identical(tmp_path, tfds_data_dir, strategy, faults):
  args = RUN + [f"--config.parallel.strategy={strategy}"]
  reference = tmp_path / "uninterrupted"
  result = run_cli("cnnjax.main", *args, f"--workdir={reference}")
  assert result.returncode == 0, result.stderr[-2000:]

  workdir = tmp_path / "killed"
  for fault, steps_after in faults:
    killed_run(args + [f"--workdir={workdir}"], fault)
    # The kill never damages or hides an earlier complete checkpoint.
    assert complete_steps(workdir) == steps_after, fault
    assert not (workdir / "summary.json").exists()
  resumed = run_cli("cnnjax.main", *args, f"--workdir={workdir}")
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert checksum(workdir) == checksum(reference)
  # The metrics log holds every point exactly once, as the uninterrupted run's does.
  steps = [(r["split"], r["step"]) for r in read_jsonl(workdir / "metrics.jsonl")]
  assert steps == [(r["split"], r["step"]) for r in read_jsonl(reference / "metrics.jsonl")]
  # So do the TensorBoard event files, as TensorBoard reads them.
  assert tensorboard_steps(workdir) == tensorboard_steps(reference)


def lenet_config(**overrides):
  return tiny(experiment_config("lenet5_digits"), **{"batch_size": 32, "num_train_steps": 6, **overrides})


def test_unreadable_latest_checkpoint_is_reported_skipped_and_kept(tmp_path, tfds_data_dir, caplog):
  reference = train.run(lenet_config(), str(tmp_path / "reference"))
  workdir = tmp_path / "run"
  train.run(lenet_config(), str(workdir))
  os.remove(workdir / "summary.json")
  damaged = workdir / "checkpoints" / "6" / "state"
  for root, _, files in os.walk(damaged):
    for name in files:
      with open(os.path.join(root, name), "r+b") as f:
        f.truncate(max(0, os.path.getsize(os.path.join(root, name)) // 2))
  with caplog.at_level("WARNING", logger="cnnjax"):
    resumed = train.run(lenet_config(), str(workdir))
  assert "checkpoint 6" in caplog.text and "unreadable" in caplog.text
  assert resumed["param_checksum"] == reference["param_checksum"]
  kept = os.listdir(workdir / "unreadable_checkpoints")
  assert len(kept) == 1 and kept[0].startswith("6-")
  assert complete_steps(workdir) == [2, 4, 6]


@pytest.mark.slow
def test_workdir_of_another_config_is_refused_unless_fresh(tmp_path, tfds_data_dir):
  workdir = tmp_path / "run"
  args = ["--config=experiments/lenet5_digits.py", f"--workdir={workdir}", "--config.num_train_steps=4",
          "--config.progress_bar=false"]
  assert run_cli("cnnjax.main", *args).returncode == 0
  before = sorted(os.listdir(workdir))
  refused = run_cli("cnnjax.main", *args, "--config.optimizer.learning_rate=0.5")
  assert refused.returncode == 2
  message = refused.stderr.strip().splitlines()[-1]
  assert "optimizer.learning_rate: 0.002 -> 0.5" in message and "--fresh" in message
  assert sorted(os.listdir(workdir)) == before
  fresh = run_cli("cnnjax.main", *args, "--config.optimizer.learning_rate=0.5", "--fresh")
  assert fresh.returncode == 0, fresh.stderr[-2000:]
  replaced = [d for d in os.listdir(workdir) if d.startswith("replaced-")]
  assert len(replaced) == 1 and "summary.json" in os.listdir(workdir / replaced[0])
  assert json.load(open(workdir / "config.json"))["optimizer"]["learning_rate"] == 0.5


def write_npz(path, images, labels):
  np.savez(path, image=images, label=labels)
  return str(path)


def test_checkpoint_of_other_input_channels_is_refused_naming_the_parameter(tmp_path, tfds_data_dir):
  rng = np.random.default_rng(0)
  train_path, eval_path = tmp_path / "train.npz", tmp_path / "eval.npz"
  for channels in (1, 3):
    write_npz(train_path, rng.integers(0, 256, (64, 32, 32, channels)).astype(np.uint8), np.arange(64) % 10)
    write_npz(eval_path, rng.integers(0, 256, (16, 32, 32, channels)).astype(np.uint8), np.arange(16) % 10)
    config = lenet_config(**{"data.name": "npz", "data.train_path": str(train_path),
                             "data.eval_path": str(eval_path), "data.image_size": 0})
    if channels == 1:
      train.run(config, str(tmp_path / "run"))
      os.remove(tmp_path / "run" / "summary.json")
  with pytest.raises(CheckpointError, match=r"params\.c1\.kernel is \(5, 5, 1, 6\) float32 in the checkpoint "
                                            r"but \(5, 5, 3, 6\) float32 in this run"):
    train.run(config, str(tmp_path / "run"))


@pytest.mark.parametrize("override,message", [
    ("--config.data.image_size=0", "layer c3 fails"),
    ("--config.model.bn_sync=ghost", "needs model.bn_group_size > 0"),
    ("--config.data.name=cifar10", "python -m cnnjax.prepare cifar10"),
    ("--config.data.name=npz", "needs data.train_path"),
])
def test_bad_inputs_fail_fast_with_one_line_and_write_nothing(tmp_path, override, message):
  workdir = tmp_path / "run"
  start = time.time()
  result = run_cli("cnnjax.main", "--config=experiments/lenet5_digits.py", f"--workdir={workdir}", override,
                   f"--config.data.tfds_data_dir={tmp_path / 'empty_tfds'}" if "cifar10" in override else
                   "--config.progress_bar=false", timeout=120)
  assert time.time() - start < 60  # includes interpreter and JAX start-up; the check itself is immediate
  assert result.returncode == 2, result.stderr[-2000:]
  lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(lines) == 1 and message in lines[0], result.stderr[-2000:]
  assert not workdir.exists()


def test_unprepared_dataset_fails_within_ten_seconds(tmp_path):
  from cnnjax.data import open_dataset  # pylint: disable=import-outside-toplevel
  from cnnjax.errors import DataError  # pylint: disable=import-outside-toplevel
  start = time.time()
  with pytest.raises(DataError, match="not prepared"):
    open_dataset("cifar10", tfds_data_dir=str(tmp_path))
  assert time.time() - start < 10


def test_batches_that_do_not_divide_over_processes_are_refused():
  with pytest.raises(ValueError, match="batch_size=32 does not divide over 3 processes"):
    check_divisible(32, 4, 3)


@pytest.mark.parametrize("strategy", ["pmap", "shard_map", "jit"])
def test_every_example_reaches_exactly_one_device_once_per_epoch(strategy, tfds_data_dir):
  config = lenet_config(**{"parallel.strategy": strategy, "batch_size": 64})
  exp = train.build(config)
  num_examples, steps = len(exp.dataset.train), 2 * len(exp.dataset.train) // 64 + 1
  stream = []
  dataset = train_dataset(exp.dataset.train, exp.preprocess, seed=0, batch=ProcessSlice(64), num_steps=steps)
  for step in range(steps):
    placed = exp.strategy.put_batch({"index": dataset[step]["index"]})["index"]
    shards = sorted(placed.addressable_shards, key=lambda s: s.device.id)
    assert len(shards) == 8
    per_device = [np.asarray(s.data).reshape(-1) for s in shards]
    assert all(len(ids) == 8 for ids in per_device)
    stream.extend(np.concatenate(per_device).tolist())
  for epoch in range(2):
    assert sorted(stream[epoch * num_examples:(epoch + 1) * num_examples]) == list(range(num_examples))
