"""The field's faults: preemption, several processes, shared and damaged workdirs, failing trials, bad inputs.

Each test is one case of the reliability fault matrix (docs/guarantees.md), with the message or checksum it must produce. Signals go only to
processes these tests start, by their ids, and every wait is bounded. Tests that
start several processes or whole sweeps are marked `slow`.
"""

import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from cnnjax import config as config_lib
from cnnjax import train
from cnnjax.errors import CheckpointError, ConfigError, DataError, Preempted
from cnnjax.sweep import Trial, load_trials, results, run_sweep
from cnnjax.train import population
from cnnjax.train.preemption import Preemption
from helpers import (EXPERIMENTS, REPO_ROOT, SUBPROCESS_TIMEOUT, checkpoint_steps, experiment_config, read_jsonl,
                     run_cli, tiny)

FAULT_MAIN = os.path.join(os.path.dirname(__file__), "fault_main.py")
# The notes' CNN with BatchNorm, dropout and random rotations: every source of state and randomness.
SIMPLE = ["--config=experiments/simple_cnn_digits.py", "--config.batch_size=32", "--config.progress_bar=false",
          "--config.data.num_threads=2"]
# How long a test waits for a process it started to reach a point (it fails, naming the point, after that).
REACH_SECONDS = 240
POLL_SECONDS = 0.1


def lenet_config(**overrides):
  return tiny(experiment_config("lenet5_digits"), **{"batch_size": 32, "num_train_steps": 6, **overrides})


def summary(workdir) -> dict:
  with open(os.path.join(workdir, "summary.json")) as f:
    return json.load(f)


def error_lines(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.startswith("error: ")]


def assert_one_line_error(result, message: str) -> None:
  lines = error_lines(result.stderr)
  assert result.returncode == 2, result.stderr[-3000:]
  assert len(lines) == 1 and message in lines[0], result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]


def start(args, *, module="cnnjax.main", env=None):
  return subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def wait_until(condition, process, what: str) -> None:
  """Polls `condition` until it holds; fails if `process` ends first or the wait runs out."""
  deadline = time.time() + REACH_SECONDS
  while time.time() < deadline:
    if condition():
      return
    assert process.poll() is None, f"the process ended before {what}: {process.communicate()[1][-3000:]}"
    time.sleep(POLL_SECONDS)
  raise AssertionError(f"never reached {what} within {REACH_SECONDS} s")


def metrics_logged(workdir) -> bool:
  path = os.path.join(workdir, "metrics.jsonl")
  return os.path.exists(path) and os.path.getsize(path) > 0


def finish(process, timeout=SUBPROCESS_TIMEOUT):
  try:
    out, err = process.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    process.kill()
    out, err = process.communicate(timeout=30)
  return process.returncode, out, err


def metric_points(workdir) -> list[tuple]:
  return [(r["split"], r["step"], r.get("loss")) for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))]


# -- 1. Several processes never silently lose data ------------------------------------------------

class FakeDevice:
  def __init__(self, device_id, process_index):
    self.id, self.process_index = device_id, process_index


def test_devices_are_taken_evenly_from_every_process_or_refused():
  from cnnjax.parallel import select_devices  # pylint: disable=import-outside-toplevel
  devices = [FakeDevice(i, i // 2) for i in range(4)]  # two processes with two devices each
  assert [d.id for d in select_devices("jit", 2, devices)] == [0, 2]
  assert [d.id for d in select_devices("pmap", 0, devices)] == [0, 1, 2, 3]
  with pytest.raises(ValueError, match="does not split evenly over the 2 processes"):
    select_devices("jit", 3, devices)
  with pytest.raises(ValueError, match="parallel.strategy=none trains on one device of one process, but this run "
                                       "has 2 processes"):
    select_devices("none", 0, devices)


@pytest.mark.slow
def test_strategy_none_over_two_processes_is_refused_before_anything_is_written(tmp_path, tfds_data_dir):
  from test_multiprocess import finish as finish_all, start_pair  # pylint: disable=import-outside-toplevel
  workdir = tmp_path / "run"
  outcomes = finish_all(start_pair(SIMPLE + ["--config.num_train_steps=4", "--config.parallel.strategy=none",
                                             f"--workdir={workdir}", "--peer_timeout_seconds=20"]), 240)
  for rc, _, err in outcomes:
    assert rc == 2, err[-3000:]
    assert "parallel.strategy=none trains on one device of one process" in error_lines(err)[-1], err[-3000:]
  assert not workdir.exists()


# -- 2. One run per workdir ---------------------------------------------------------------------

@pytest.mark.slow
def test_a_second_run_on_a_busy_workdir_is_refused_naming_the_holder(tmp_path, tfds_data_dir):
  workdir = tmp_path / "run"
  args = SIMPLE + ["--config.num_train_steps=3000", "--config.log_every_steps=5", f"--workdir={workdir}"]
  first = start(args)
  try:
    wait_until(lambda: metrics_logged(workdir), first, "the first run's first log line")
    began = time.time()
    second = run_cli("cnnjax.main", *args, timeout=120)
    assert time.time() - began < 60  # interpreter and JAX start-up included
    assert_one_line_error(second, f"another run is using {workdir} (pid {first.pid} on")
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
  finally:
    if first.poll() is None:
      first.kill()
      first.wait(timeout=60)
  # The OS released the dead run's lock: the same workdir runs again (a shorter run of another config is
  # refused for its config, not for the lock).
  after = run_cli("cnnjax.main", *args, "--config.optimizer.learning_rate=0.5", timeout=120)
  assert_one_line_error(after, "holds a run with a different config (optimizer.learning_rate")


# -- 3. A checkpoint knows what it belongs to, and that it is intact ------------------------------

def test_a_copied_workdir_without_config_json_is_refused_by_its_checkpoint_fingerprint(tmp_path, tfds_data_dir):
  original = tmp_path / "original"
  train.run(lenet_config(), str(original))
  copy = tmp_path / "copy"
  shutil.copytree(original, copy)
  for name in ("config.json", "summary.json"):
    os.remove(copy / name)
  other = lenet_config(seed=7, **{"optimizer.learning_rate": 0.05})
  with pytest.raises(CheckpointError, match=r"checkpoint 6 in .* belongs to a run of another config \(its "
                                            r"fingerprint \w+ is not this config's \w+\); .*--fresh"):
    train.run(other, str(copy))
  assert not (copy / "config.json").exists()  # nothing claims the new config


def swap_state_bytes(workdir, step: int, donor_step: int) -> None:
  """Replaces checkpoint `step`'s arrays with checkpoint `donor_step`'s: readable, but not its own."""
  target = os.path.join(workdir, "checkpoints", str(step), "state")
  shutil.rmtree(target)
  shutil.copytree(os.path.join(workdir, "checkpoints", str(donor_step), "state"), target)


def damage_bytes(workdir, step: int, how: str) -> None:
  """Flips one bit, or writes 40 bytes of 0xFF, in the middle of checkpoint `step`'s largest array file."""
  state_dir = os.path.join(workdir, "checkpoints", str(step), "state")
  files = [os.path.join(root, name) for root, _, names in os.walk(state_dir) for name in names]
  largest = max(files, key=os.path.getsize)
  with open(largest, "r+b") as f:
    data = bytearray(f.read())
    middle = len(data) // 2
    if how == "one_bit":
      data[middle] ^= 0x10
    else:
      data[middle:middle + 40] = b"\xff" * 40
    f.seek(0)
    f.write(bytes(data))


@pytest.mark.parametrize("how", ["swapped_arrays", "one_bit", "forty_0xff_bytes"])
@pytest.mark.slow
def test_damaged_checkpoint_is_detected_set_aside_and_the_previous_one_used(tmp_path, tfds_data_dir, caplog, how):
  reference = train.run(lenet_config(), str(tmp_path / "reference"))
  workdir = tmp_path / "run"
  train.run(lenet_config(), str(workdir))
  os.remove(workdir / "summary.json")
  if how == "swapped_arrays":
    swap_state_bytes(workdir, 6, 4)
  else:
    damage_bytes(workdir, 6, how)
  with caplog.at_level("WARNING", logger="cnnjax"):
    resumed = train.run(lenet_config(), str(workdir))
  assert "checkpoint 6" in caplog.text and ("damaged" in caplog.text or "unreadable" in caplog.text)
  if how == "swapped_arrays":
    assert "do not match the checksum" in caplog.text
  assert resumed["param_checksum"] == reference["param_checksum"]
  assert [name.split("-")[0] for name in os.listdir(workdir / "unreadable_checkpoints")] == ["6"]
  assert not (workdir / "error.json").exists()  # error.json is only for a divergence in training


def test_interrupted_fresh_moves_checkpoints_before_config(tmp_path, tfds_data_dir):
  workdir = tmp_path / "run"
  train.run(lenet_config(), str(workdir))
  order = []
  original_move = shutil.move
  try:
    shutil.move = lambda src, dst: order.append(os.path.basename(src)) or original_move(src, dst)
    train.RunDir(str(workdir)).set_aside_run()
  finally:
    shutil.move = original_move
  assert order[0] == "checkpoints" and order[-1] == "config.json"


# -- 4. Preemption: SIGTERM and SIGINT save and stop ------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_the_current_step_and_the_rerun_is_bit_identical(tmp_path, tfds_data_dir, signum):
  args = SIMPLE + ["--config.num_train_steps=300", "--config.log_every_steps=7",
                   "--config.checkpoint_every_steps=1000"]
  reference = tmp_path / "uninterrupted"
  done = run_cli("cnnjax.main", *args, f"--workdir={reference}")
  assert done.returncode == 0, done.stderr[-3000:]

  workdir = tmp_path / "stopped"
  process = start(args + [f"--workdir={workdir}"])
  wait_until(lambda: metrics_logged(workdir), process, "the first log line")
  process.send_signal(signum)
  rc, _, err = finish(process, timeout=120)
  assert rc == 128 + signum, err[-3000:]
  saved = checkpoint_steps(workdir)
  assert len(saved) == 1 and 0 < saved[0] < 300, (saved, err[-3000:])
  name = signal.Signals(signum).name
  assert f"{name}: saved a checkpoint at step {saved[0]} of 300" in err, err[-3000:]
  assert "Traceback" not in err and not (workdir / "summary.json").exists()

  resumed = run_cli("cnnjax.main", *args, f"--workdir={workdir}")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"resuming from step {saved[0]}" in resumed.stderr
  assert summary(workdir)["param_checksum"] == summary(reference)["param_checksum"]
  assert metric_points(workdir) == metric_points(reference)


@pytest.mark.slow
def test_sigterm_to_one_process_saves_the_same_step_on_every_process(tmp_path, tfds_data_dir):
  from test_multiprocess import finish as finish_all, start_pair  # pylint: disable=import-outside-toplevel
  args = SIMPLE + ["--config.num_train_steps=120", "--config.log_every_steps=2",
                   "--config.checkpoint_every_steps=1000", "--config.parallel.strategy=jit",
                   "--peer_timeout_seconds=30"]
  reference = tmp_path / "uninterrupted"
  for rc, _, err in finish_all(start_pair(args + [f"--workdir={reference}"]), SUBPROCESS_TIMEOUT):
    assert rc == 0, err[-3000:]

  workdir = tmp_path / "stopped"
  processes = start_pair(args + [f"--workdir={workdir}"])
  try:
    wait_until(lambda: metrics_logged(workdir), processes[0], "the first log line")
    processes[1].send_signal(signal.SIGTERM)
    outcomes = finish_all(processes, 180)
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
        process.wait(timeout=30)
  for rc, _, err in outcomes:
    assert rc == 128 + signal.SIGTERM, err[-3000:]
  saved = checkpoint_steps(workdir)
  assert len(saved) == 1 and 0 < saved[0] < 120, saved
  assert f"saved a checkpoint at step {saved[0]}" in outcomes[0][2]

  for rc, _, err in finish_all(start_pair(args + [f"--workdir={workdir}"]), SUBPROCESS_TIMEOUT):
    assert rc == 0, err[-3000:]
  assert summary(workdir)["param_checksum"] == summary(reference)["param_checksum"]
  assert metric_points(workdir) == metric_points(reference)


@pytest.mark.slow
def test_sigterm_stops_a_sweep_whose_rerun_completes_every_trial_exactly_once(tmp_path, tfds_data_dir):
  sweep_dir = tmp_path / "sweep"
  args = ["--config=experiments/lr_sweep_digits.py", f"--workdir={sweep_dir}", "--mode=sequential",
          "--trials=seed=0", "--config.parallel.strategy=none", "--config.num_train_steps=150",
          "--config.log_every_steps=5", "--config.checkpoint_every_steps=1000", "--config.data.num_threads=2"]
  trials = [t for t in load_trials(os.path.join(EXPERIMENTS, "lr_sweep_digits.py")) if "seed=0" in t.name]
  first = sweep_dir / trials[0].name
  process = start(args, module="cnnjax.sweep")
  wait_until(lambda: metrics_logged(first), process, "the first trial's first log line")
  process.send_signal(signal.SIGTERM)
  rc, _, err = finish(process, timeout=180)
  assert rc == 128 + signal.SIGTERM, err[-3000:]
  stopped = [e for e in read_jsonl(sweep_dir / "sweep_log.jsonl") if e["event"] == "stopped"]
  assert [e["trial"] for e in stopped] == [trials[0].name]
  assert checkpoint_steps(first) == [stopped[0]["step"]]
  assert not any((sweep_dir / t.name).exists() for t in trials[1:])  # no new trial started

  rerun = run_cli("cnnjax.sweep", *args)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  ends = [e["trial"] for e in read_jsonl(sweep_dir / "sweep_log.jsonl") if e["event"] == "end"]
  assert sorted(ends) == sorted(t.name for t in trials)
  # The stopped trial ends as it would have alone, uninterrupted.
  solo = experiment_config("lr_sweep_digits", **{"parallel.strategy": "none", "num_train_steps": 150,
                                                 "log_every_steps": 5, "checkpoint_every_steps": 1000,
                                                 "data.num_threads": 2, "progress_bar": False,
                                                 **trials[0].overrides})
  assert train.run(solo, str(tmp_path / "solo"))["param_checksum"] == summary(first)["param_checksum"]


def test_a_requested_stop_ends_the_bn_study_before_it_trains(tmp_path, tfds_data_dir):
  from cnnjax.lab import bn_study as study  # pylint: disable=import-outside-toplevel
  preemption = Preemption()
  preemption.signum = signal.SIGTERM
  with pytest.raises(Preempted, match="stopped by SIGTERM"):
    study.run_study(str(tmp_path), "tiny", experiments_dir=EXPERIMENTS, preemption=preemption)
  assert not any(os.path.isdir(os.path.join(root, "checkpoints")) for root, _, _ in os.walk(tmp_path))


# -- 5. Exact resume everywhere ---------------------------------------------------------------------

@pytest.mark.slow
def test_a_vectorized_sweep_killed_while_saving_resumes_bit_identical(tmp_path, tfds_data_dir):
  args = ["--config=experiments/lr_sweep_digits.py", "--mode=vectorized", "--trials=seed=0",
          "--config.num_train_steps=40", "--config.checkpoint_every_steps=20", "--config.log_every_steps=10",
          "--config.data.num_threads=2"]
  reference = tmp_path / "uninterrupted"
  done = run_cli("cnnjax.sweep", *args, f"--workdir={reference}")
  assert done.returncode == 0, done.stderr[-3000:]
  workdir = tmp_path / "killed"
  # The third of four members dies committing checkpoint 40: two members saved it, two did not.
  killed = run_cli("", *args, f"--workdir={workdir}", wrapper=FAULT_MAIN,
                   env={"CNNJAX_FAULT": "save_commit:40:3", "CNNJAX_FAULT_ENTRY": "sweep"})
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  trials = [t.name for t in load_trials(os.path.join(EXPERIMENTS, "lr_sweep_digits.py")) if "seed=0" in t.name]
  assert sorted(checkpoint_steps(workdir / name)[-1] for name in trials) == [20, 20, 40, 40]
  rerun = run_cli("cnnjax.sweep", *args, f"--workdir={workdir}")
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  for name in trials:
    assert summary(workdir / name)["param_checksum"] == summary(reference / name)["param_checksum"], name
    assert metric_points(workdir / name) == metric_points(reference / name), name


def test_a_run_killed_after_its_last_checkpoint_writes_a_complete_summary_and_logs_once(tmp_path,
                                                                                         tfds_data_dir):
  workdir = tmp_path / "run"
  first = train.run(lenet_config(), str(workdir))
  before = metric_points(workdir)
  os.remove(workdir / "summary.json")  # killed between the last checkpoint (and the final eval) and the summary
  again = train.run(lenet_config(), str(workdir))
  assert metric_points(workdir) == before  # the final eval point is not logged twice
  for key in ("train_loss", "train_accuracy", "eval_loss", "eval_accuracy", "param_checksum", "step"):
    assert again[key] == first[key], key
  assert again["examples_per_second"] == pytest.approx(first["examples_per_second"])
  assert again["examples_per_second"] > 0


def write_trial(sweep_dir, name: str, payload: dict) -> None:
  """A finished trial's directory: its config and summary."""
  os.makedirs(sweep_dir / name)
  with open(sweep_dir / name / "config.json", "w") as f:
    json.dump(config_lib.as_json(config_lib.base_config()), f)
  with open(sweep_dir / name / "summary.json", "w") as f:
    json.dump(payload, f)


def test_a_sweep_never_ranks_on_a_missing_metric(tmp_path):
  trials = [Trial("lr=0.1", {"optimizer.learning_rate": 0.1}),
            Trial("lr=0.01", {"optimizer.learning_rate": 0.01})]
  write_trial(tmp_path, "lr=0.1", {"eval_accuracy": 0.9, "eval_loss": 0.3, "train_loss": 0.2, "step": 4})
  write_trial(tmp_path, "lr=0.01", {"eval_accuracy": 0.95, "eval_loss": 0.2, "train_loss": None, "step": 4})
  written = results.write_results(str(tmp_path), trials, "train_loss")
  assert written["best"] is None and written["missing"] == ["lr=0.01"]
  rows = list(csv.DictReader(open(tmp_path / "results.csv")))
  assert rows[1]["train_loss"] == "missing" and rows[0]["best"] == rows[1]["best"] == "False"
  assert "lr=0.01 finished without train_loss" in (tmp_path / "results.md").read_text()


@pytest.mark.slow
def test_a_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path, tfds_data_dir, caplog):
  reference = tmp_path / "reference"
  train.run(lenet_config(), str(reference))
  workdir = tmp_path / "run"
  train.run(lenet_config(), str(workdir))
  os.remove(workdir / "summary.json")
  shutil.rmtree(workdir / "checkpoints" / "6")
  with open(workdir / "metrics.jsonl", "a") as f:
    f.write('{"accuracy": 0.5, "loss": 1.2, "spl')  # a write torn by a full disk
  with caplog.at_level("WARNING", logger="cnnjax"):
    train.run(lenet_config(), str(workdir))
  assert "dropped 1 line(s) that were not whole records" in caplog.text
  assert metric_points(workdir) == metric_points(reference)


@pytest.mark.slow
def test_log_and_checkpoint_intervals_that_do_not_divide_resume_exactly(tmp_path, tfds_data_dir):
  config = lenet_config(num_train_steps=30, log_every_steps=7, checkpoint_every_steps=10)
  reference = tmp_path / "reference"
  train.run(config, str(reference))
  workdir = tmp_path / "run"
  train.run(config, str(workdir))
  # Killed at step 23: checkpoints 10 and 20 survive, metrics up to step 21 were logged.
  shutil.rmtree(workdir / "checkpoints" / "30")
  os.remove(workdir / "summary.json")
  resumed = train.run(config, str(workdir))
  assert metric_points(workdir) == metric_points(reference)  # the window of steps 15-21 spans the resume
  assert resumed["train_loss"] == summary(reference)["train_loss"]


# -- 6. One failing trial never sinks a sweep -----------------------------------------------------

@pytest.mark.slow
def test_a_failing_trial_is_recorded_the_others_run_and_a_rerun_retries_it(tmp_path, tfds_data_dir):
  sweep_dir = tmp_path / "sweep"
  args = ["--config=experiments/lr_sweep_digits.py", f"--workdir={sweep_dir}", "--mode=sequential",
          "--trials=seed=0", "--config.num_train_steps=4", "--config.checkpoint_every_steps=4",
          "--config.data.num_threads=2"]
  trials = [t.name for t in load_trials(os.path.join(EXPERIMENTS, "lr_sweep_digits.py")) if "seed=0" in t.name]
  failing = trials[1]
  from fault_main import INJECTED_FAILURE  # pylint: disable=import-outside-toplevel
  failed = run_cli("", *args, wrapper=FAULT_MAIN, env={"CNNJAX_FAULT": f"trial_fails:{failing}",
                                                      "CNNJAX_FAULT_ENTRY": "sweep"})
  assert failed.returncode == 1, failed.stderr[-3000:]
  assert error_lines(failed.stderr) == [
      f"error: 1 trial(s) failed: {failing} (RuntimeError: {INJECTED_FAILURE}); the other trials ran; rerun the "
      "same command to retry the failed ones"]
  rows = {r["trial"]: r for r in csv.DictReader(open(sweep_dir / "results.csv"))}
  assert rows[failing]["status"] == "failed" and INJECTED_FAILURE in rows[failing]["reason"]
  assert all(rows[name]["status"] == "finished" for name in trials if name != failing)
  assert INJECTED_FAILURE in (sweep_dir / "results.md").read_text()
  ends = {e["trial"]: e for e in read_jsonl(sweep_dir / "sweep_log.jsonl") if e["event"] == "end"}
  assert ends[failing]["status"] == "failed" and INJECTED_FAILURE in ends[failing]["reason"]

  retried = run_cli("cnnjax.sweep", *args)
  assert retried.returncode == 0, retried.stderr[-3000:]
  assert "3 finished or diverged, 1 to train (1 of them failed before and are retried)" in retried.stderr
  rows = list(csv.DictReader(open(sweep_dir / "results.csv")))
  assert all(r["status"] == "finished" for r in rows) and not (sweep_dir / failing / "failure.json").exists()


def test_a_diverged_trial_is_not_retried(tmp_path, tfds_data_dir):
  base = lenet_config(num_train_steps=4)
  base.lock()
  trial_list = [Trial("a", {"seed": 0}), Trial("b", {"seed": 1})]
  os.makedirs(tmp_path / "b")
  with open(tmp_path / "b" / "error.json", "w") as f:
    json.dump({"step": 3, "error": "loss or gradients became non-finite at step 3"}, f)
  report = run_sweep(base, trial_list, str(tmp_path), mode="sequential")
  assert [r.trained for r in report.runs] == [True, False] and report.runs[1].status == "diverged"


def test_a_member_that_cannot_be_built_is_split_out_of_its_population(tmp_path, tfds_data_dir):
  configs = [lenet_config(seed=seed, num_train_steps=2, checkpoint_every_steps=2) for seed in (0, -1, 1)]
  outcomes = population.run_population(configs, [str(tmp_path / str(i)) for i in range(3)])
  assert isinstance(outcomes[1], ConfigError) and "seed=-1 is outside" in str(outcomes[1])
  assert outcomes[0]["step"] == outcomes[2]["step"] == 2 and outcomes[0]["strategy"] == "vectorized"


# -- 7. Impossible sizes and values fail before any work ------------------------------------------

def write_npz(path, images, labels) -> str:
  np.savez(path, image=images, label=labels)
  return str(path)


def npz_overrides(train_path, eval_path) -> list[str]:
  return ["--config.data.name=npz", f"--config.data.train_path={train_path}", f"--config.data.eval_path={eval_path}",
          "--config.data.image_size=0"]  # (a later --config.data.image_size wins)


@pytest.mark.parametrize("case", ["batch_larger_than_training_set", "absurd_labels", "model_beyond_memory"])
def test_impossible_sizes_fail_in_seconds_with_nothing_written(tmp_path, tfds_data_dir, case):
  rng = np.random.default_rng(0)
  overrides, message = [], ""
  if case == "batch_larger_than_training_set":
    overrides, message = ["--config.batch_size=100000"], "batch_size=100000 exceeds the 1437 training examples"
  elif case == "absurd_labels":
    images = rng.integers(0, 256, (32, 32, 32, 1)).astype(np.uint8)
    labels = (np.arange(32) % 10) * 100_000_000
    overrides = npz_overrides(write_npz(tmp_path / "train.npz", images, labels),
                              write_npz(tmp_path / "eval.npz", images[:8], labels[:8]))
    message = "the npz labels reach 900000000 but only 10 distinct values occur"
  else:
    # LeNet-5 on 2048x2048 inputs: its first dense layer alone holds 2 GB, and the activations of a batch of 32
    # tens of GB more.
    images = rng.integers(0, 256, (64, 32, 32, 1)).astype(np.uint8)
    overrides = npz_overrides(write_npz(tmp_path / "train.npz", images, np.arange(64) % 10),
                              write_npz(tmp_path / "eval.npz", images[:8], np.arange(8)))
    overrides += ["--config.batch_size=32", "--config.data.image_size=2048"]
    message = "GiB (parameters, gradients and optimizer state"
  workdir = tmp_path / "run"
  began = time.time()
  result = run_cli("cnnjax.main", "--config=experiments/lenet5_digits.py", f"--workdir={workdir}", *overrides,
                   timeout=120)
  assert time.time() - began < 60
  assert_one_line_error(result, message)
  assert not workdir.exists()


@pytest.mark.parametrize("key,value,message", [
    ("optimizer.learning_rate", float("inf"), "optimizer.learning_rate=inf must be a finite number"),
    ("optimizer.weight_decay", float("inf"), "optimizer.weight_decay=inf must be a finite number"),
    ("optimizer.b1", 1.0, "optimizer.b1=1.0 must be in [0, 1)"),
    ("optimizer.b2", -0.1, "optimizer.b2=-0.1 must be in [0, 1)"),
    ("optimizer.decay_boundaries", (0.5, 1.5), "must lie in (0, 1)"),
    ("optimizer.decay_boundaries", (0.75, 0.5), "must be increasing"),
    ("optimizer.decay_boundaries", ("abc",), "must be a tuple of fractions of training"),
    ("seed", -1, "seed=-1 is outside [0, 4294967295]"),
    ("seed", 2 ** 40, "seed=1099511627776 is outside"),
    ("num_epochs", float("inf"), "num_epochs=inf must be a finite number"),
])
def test_out_of_range_values_are_refused_naming_the_key(key, value, message):
  config = config_lib.base_config()
  *parents, leaf = key.split(".")
  node = config
  for part in parents:
    node = node[part]
  node[leaf] = value
  with pytest.raises(ConfigError) as info:
    config_lib.validate(config)
  assert message in str(info.value)
  assert "learning_rate" not in str(info.value) or key == "optimizer.learning_rate"


# -- 8. No traceback for any user input -------------------------------------------------------------

@pytest.mark.parametrize("override,message", [
    ("--config.num_epochs=inf", "num_epochs=inf must be a finite number"),
    ("--config.seed=-1", "seed=-1 is outside"),
    ("--config.seed=99999999999", "seed=99999999999 is outside"),
    ("--config.optimizer.decay_boundaries=abc", "must be a tuple of fractions of training"),
    ("--config.optimizer.weight_decay=inf", "optimizer.weight_decay=inf must be a finite number"),
    ("--config.eval_batch_size=10000000", "needs about"),  # evaluation's own memory
    ("--config.num_epochs=1e30", "more than the step counter holds"),
])
@pytest.mark.slow
def test_bad_config_values_on_the_command_line_are_one_line_errors(tmp_path, override, message):
  workdir = tmp_path / "run"
  result = run_cli("cnnjax.main", "--config=experiments/lenet5_digits.py", f"--workdir={workdir}", override,
                   timeout=120)
  assert_one_line_error(result, message)
  assert not workdir.exists()


def test_a_get_config_that_returns_a_dict_is_a_one_line_error(tmp_path):
  config_file = tmp_path / "dict_config.py"
  config_file.write_text('"""A config file that returns a dict."""\n\ndef get_config():\n  return {"seed": 0}\n')
  result = run_cli("cnnjax.main", f"--config={config_file}", f"--workdir={tmp_path / 'run'}", timeout=120)
  assert_one_line_error(result, "get_config() returned a dict; return an ml_collections.ConfigDict")


def read_only_workdir(tmp_path):
  """A directory on a read-only filesystem, mounted in a private mount namespace of the command."""
  mount_point = tmp_path / "read_only"
  mount_point.mkdir()
  return mount_point, ["unshare", "-r", "-m", "sh", "-c",
                       f"mount -t tmpfs -o ro,size=1m tmpfs {mount_point} && exec \"$0\" \"$@\""]


@pytest.mark.parametrize("case", ["empty", "a_file", "under_a_file", "read_only"])
def test_unusable_workdirs_are_one_line_errors(tmp_path, case):
  prefix = []
  (tmp_path / "file").write_text("not a directory")
  workdir, message = {"empty": ("", "--workdir is empty"),
                      "a_file": (tmp_path / "file", "is a file, not a directory"),
                      "under_a_file": (tmp_path / "file" / "run", "lies under"),
                      "read_only": (None, "cannot be written")}[case]
  if case == "read_only":
    mount_point, prefix = read_only_workdir(tmp_path)
    workdir = mount_point / "run"
  result = subprocess.run(prefix + [sys.executable, "-m", "cnnjax.main", "--config=experiments/lenet5_digits.py",
                                    f"--workdir={workdir}"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)
  assert_one_line_error(result, message)


@pytest.mark.parametrize("damage", ["truncated", "empty", "not_an_object"])
@pytest.mark.parametrize("name", ["config.json", "summary.json"])
@pytest.mark.slow
def test_damaged_run_files_are_set_aside_and_the_run_goes_on(tmp_path, tfds_data_dir, caplog, name, damage):
  workdir = tmp_path / "run"
  first = train.run(lenet_config(), str(workdir))
  content = (workdir / name).read_text()
  (workdir / name).write_text({"truncated": content[:len(content) // 2], "empty": "",
                               "not_an_object": "[1, 2, 3]"}[damage])
  with caplog.at_level("WARNING", logger="cnnjax"):
    again = train.run(lenet_config(), str(workdir))
  assert f"{workdir / name} is damaged" in caplog.text and "moved to" in caplog.text
  assert again["param_checksum"] == first["param_checksum"]
  assert len(os.listdir(workdir / "damaged_files")) == 1 and json.loads((workdir / name).read_text())


@pytest.mark.parametrize("damage,message", [
    ("truncated", "BadZipFile"), ("not_a_zip", "neither a zip archive nor a NumPy file"),
    ("npy", "holds a single array (an .npy file)"), ("empty", "it is empty")])
def test_bad_npz_files_are_one_line_errors(tmp_path, damage, message):
  from cnnjax.data import open_dataset  # pylint: disable=import-outside-toplevel
  good = write_npz(tmp_path / "good.npz", np.zeros((8, 8, 8, 1), np.uint8), np.arange(8) % 2)
  bad = tmp_path / "bad.npz"
  data = open(good, "rb").read()
  if damage == "npy":
    with open(bad, "wb") as f:
      np.save(f, np.zeros(3))
  else:
    bad.write_bytes({"truncated": data[:len(data) // 2], "not_a_zip": b"hello, not an archive", "empty": b""}[damage])
  with pytest.raises(DataError, match=re.escape(message)):
    open_dataset("npz", train_path=str(bad), eval_path=good)


@pytest.mark.parametrize("case,message", [
    ("a_file", "is (or lies under) the file"),
    ("read_only", "cannot be written into the TFDS data directory"),
    ("garbage", "are damaged (ParseError"),
])
def test_unusable_tfds_data_directories_are_one_line_errors(tmp_path, tfds_data_dir, case, message):
  prefix = []
  if case == "a_file":
    data_dir = tmp_path / "file"
    data_dir.write_text("not a directory")
  elif case == "read_only":
    data_dir, prefix = read_only_workdir(tmp_path)
  else:
    data_dir = tmp_path / "garbage"
    shutil.copytree(tfds_data_dir, data_dir)
    info = next(os.path.join(root, "dataset_info.json") for root, _, names in os.walk(data_dir / "digits")
                if "dataset_info.json" in names)
    with open(info, "w") as f:
      f.write("{garbage")
  result = subprocess.run(prefix + [sys.executable, "-m", "cnnjax.main", "--config=experiments/lenet5_digits.py",
                                    f"--workdir={tmp_path / 'run'}", f"--config.data.tfds_data_dir={data_dir}"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
  assert_one_line_error(result, message)


def test_missing_and_empty_splits_say_so(tfds_data_dir):
  from cnnjax.data import open_dataset  # pylint: disable=import-outside-toplevel
  with pytest.raises(DataError, match=r"dataset 'digits' has no split 'validation' \(it has train, test\)"):
    open_dataset("digits", tfds_data_dir=tfds_data_dir, eval_split="validation")
  with pytest.raises(DataError, match=r"split 'train\[:0\]' of dataset 'digits' selects no examples"):
    open_dataset("digits", tfds_data_dir=tfds_data_dir, train_split="train[:0]")


def test_a_one_class_dataset_warns_that_its_accuracy_says_nothing(tmp_path, tfds_data_dir, caplog):
  images = np.random.default_rng(0).integers(0, 256, (32, 32, 32, 1)).astype(np.uint8)
  config = lenet_config(**{"data.name": "npz", "data.image_size": 0,
                           "data.train_path": write_npz(tmp_path / "train.npz", images, np.zeros(32, np.int64)),
                           "data.eval_path": write_npz(tmp_path / "eval.npz", images[:8], np.zeros(8, np.int64))})
  with caplog.at_level("WARNING", logger="cnnjax"):
    train.build(config)
  assert "has 1 class: every prediction is right, so its accuracy of 100% says nothing" in caplog.text


def busy_port() -> socket.socket:
  listener = socket.socket(socket.AF_INET6)
  listener.bind(("::", 0))
  listener.listen()
  return listener


def test_a_coordinator_port_in_use_is_a_one_line_error(tmp_path):
  with busy_port() as listener:
    port = listener.getsockname()[1]
    result = run_cli("cnnjax.main", "--config=experiments/lenet5_digits.py", f"--workdir={tmp_path / 'run'}",
                     f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", "--process_id=0", timeout=120)
  assert_one_line_error(result, f"the coordinator port {port} is in use on this host")
  assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_peer_that_never_starts_is_an_error_within_the_peer_timeout(tmp_path):
  from test_multiprocess import free_port  # pylint: disable=import-outside-toplevel
  peer_timeout = 10
  began = time.time()
  result = run_cli("cnnjax.main", "--config=experiments/lenet5_digits.py", f"--workdir={tmp_path / 'run'}",
                   f"--coordinator_address=127.0.0.1:{free_port()}", "--num_processes=2", "--process_id=0",
                   f"--peer_timeout_seconds={peer_timeout}", timeout=180)
  # JAX start-up (a few seconds) plus the timeout.
  assert time.time() - began < peer_timeout + 40
  assert_one_line_error(result, "for the other 1 of 2 processes, which did not all connect")


def test_a_full_disk_keeps_the_last_good_checkpoint_and_says_so_in_one_line(tmp_path, tfds_data_dir):
  mount_point = tmp_path / "small_disk"
  mount_point.mkdir()
  workdir = mount_point / "run"
  command = (f"mount -t tmpfs -o size=1200k tmpfs {mount_point} && \"$0\" \"$@\"; status=$?; "
             f"ls {workdir / 'checkpoints'}; exit $status")
  result = subprocess.run(
      ["unshare", "-r", "-m", "sh", "-c", command, sys.executable, "-m", "cnnjax.main",
       "--config=experiments/lenet5_digits.py", f"--workdir={workdir}", "--config.num_train_steps=40",
       "--config.checkpoint_every_steps=2", "--config.keep_checkpoints=40", "--config.progress_bar=false"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=180)
  assert_one_line_error(result, "the disk is full: checkpoint ")
  saved = [int(name) for name in result.stdout.split() if name.isdigit()]
  failed_step = int(error_lines(result.stderr)[0].split("checkpoint ")[1].split()[0])
  assert saved and saved[-1] == failed_step - 2
  assert f"the last good checkpoint ({saved[-1]}) is kept" in result.stderr


# -- Found by a red-team pass over the above ----------------------------------------------------------

class StopAt(Preemption):
  """A preemption that arrives after `step` steps (as SIGTERM would), without sending a signal."""

  def __init__(self, step: int):
    super().__init__()
    self.stop_step = step

  def reached(self, step, checkpointer):
    if step >= self.stop_step:
      self.signum = signal.SIGTERM
    return super().reached(step, checkpointer)


def population_configs(learning_rates, **overrides):
  return [tiny(experiment_config("simple_cnn_digits"), **{
      "batch_size": 16, "num_train_steps": 12, "checkpoint_every_steps": 4, "log_every_steps": 4,
      "optimizer.learning_rate": lr, "optimizer.warmup_steps": 0, "optimizer.schedule": "constant", **overrides})
          for lr in learning_rates]


@pytest.mark.slow
def test_a_population_with_a_diverged_member_resumes_bit_identical(tmp_path, tfds_data_dir):
  import jax  # pylint: disable=import-outside-toplevel
  two_devices = jax.local_devices()[:2]  # two members per device: the population's size decides the rounding
  configs = population_configs((1e-3, 1e30, 3e-3, 1e-2))
  reference = population.run_population(configs, [str(tmp_path / "ref" / str(i)) for i in range(4)],
                                        devices=two_devices)
  assert reference[1] is None and all(reference[i] for i in (0, 2, 3))  # the second member diverged
  workdirs = [str(tmp_path / "run" / str(i)) for i in range(4)]
  with pytest.raises(Preempted):
    population.run_population(configs, workdirs, devices=two_devices, preemption=StopAt(6))
  # As a sweep reruns it: the diverged trial is not pending, the others resume in their old places.
  pending = [0, 2, 3]
  resumed = population.run_population([configs[i] for i in pending], [workdirs[i] for i in pending],
                                      devices=two_devices)
  for i, summary_now in zip(pending, resumed):
    assert summary_now["param_checksum"] == reference[i]["param_checksum"], i
  assert not os.path.exists(os.path.join(workdirs[1], "summary.json"))  # the stand-in wrote nothing


def test_a_busy_member_is_left_out_and_its_directory_untouched(tmp_path, tfds_data_dir):
  from cnnjax.errors import WorkdirBusyError  # pylint: disable=import-outside-toplevel
  from cnnjax.train.rundir import exclusive_lock  # pylint: disable=import-outside-toplevel
  configs = population_configs((1e-3, 3e-3))
  busy = tmp_path / "sweep" / "busy"
  with exclusive_lock(str(busy), what="run"):
    outcomes = population.run_population(configs, [str(busy), str(tmp_path / "alone")])
    assert isinstance(outcomes[0], WorkdirBusyError) and outcomes[1]["step"] == 12
    trials = [Trial("busy", {"optimizer.learning_rate": 1e-3}), Trial("free", {"optimizer.learning_rate": 3e-3})]
    base = configs[0]
    base.lock()
    report = run_sweep(base, trials, str(tmp_path / "sweep"), mode="vectorized")
  assert [r.status for r in report.runs] == ["failed", "finished"]
  assert "another run is using" in report.runs[0].reason
  assert sorted(os.listdir(busy)) == [".lock"]  # no failure.json, nothing else


def test_a_population_needs_two_kept_checkpoints(tmp_path):
  from cnnjax.sweep import runner  # pylint: disable=import-outside-toplevel
  configs = population_configs((1e-3, 3e-3), keep_checkpoints=1)
  with pytest.raises(ConfigError, match="keep_checkpoints=1: a vectorized population keeps at least 2"):
    population.check_vectorizable(configs)
  assert runner.resolve_mode("auto", configs, 8) == "partitioned"


def test_a_newer_failure_outranks_an_older_summary(tmp_path):
  rundir = train.RunDir(str(tmp_path))
  rundir.write_config(config_lib.base_config())
  rundir.write_summary({"step": 6, "eval_accuracy": 0.5})
  assert rundir.status() == "finished"
  rundir.write_failure("RuntimeError: out of memory")
  assert rundir.status() == "failed"
  rundir.write_summary({"step": 6, "eval_accuracy": 0.5})  # a later attempt finished
  assert rundir.status() == "finished" and rundir.failure() is None


def test_reading_checkpoints_beside_a_run_disturbs_nothing(tmp_path, tfds_data_dir):
  import jax  # pylint: disable=import-outside-toplevel
  config = lenet_config()
  train.run(config, str(tmp_path))
  in_progress = tmp_path / "checkpoints" / "8.orbax-checkpoint-tmp-1234"  # another process's save
  in_progress.mkdir()
  state = train.RunDir(str(tmp_path)).restore_latest(config, jax.device_get(train.build(config).init_state()))
  assert state.step == 6 and in_progress.exists()


def test_a_checkpoint_that_lost_its_meta_item_is_set_aside_as_damaged(tmp_path, tfds_data_dir, caplog):
  reference = train.run(lenet_config(), str(tmp_path / "reference"))
  workdir = tmp_path / "run"
  train.run(lenet_config(), str(workdir))
  os.remove(workdir / "summary.json")
  shutil.rmtree(workdir / "checkpoints" / "6" / "meta")
  with caplog.at_level("WARNING", logger="cnnjax"):
    resumed = train.run(lenet_config(), str(workdir))
  assert "checkpoint 6" in caplog.text and "meta item is missing" in caplog.text
  assert resumed["param_checksum"] == reference["param_checksum"]


@pytest.mark.parametrize("name,kind", [(".lock", "directory"), ("checkpoints", "file"),
                                       ("metrics.jsonl", "directory")])
def test_workdir_entries_of_the_wrong_kind_are_one_line_errors(tmp_path, tfds_data_dir, name, kind):
  workdir = tmp_path / "run"
  workdir.mkdir()
  if kind == "directory":
    (workdir / name).mkdir()
  else:
    (workdir / name).write_text("not a directory")
  with pytest.raises(ConfigError, match=re.escape(f"{workdir / name} should be a "
                                                  f"{'file' if kind == 'directory' else 'directory'}")):
    train.run(lenet_config(), str(workdir))


def test_summarizing_a_sweep_that_is_not_there_is_a_one_line_error(tmp_path):
  result = run_cli("cnnjax.sweep", "--config=experiments/lr_sweep_digits.py", f"--workdir={tmp_path / 'none'}",
                   "--summarize_only", timeout=120)
  assert_one_line_error(result, "holds no sweep to summarize")


def test_a_damaged_study_probe_is_set_aside_and_measured_again(tmp_path, caplog):
  from cnnjax.lab import bn_study as study  # pylint: disable=import-outside-toplevel
  ctx = study.Context(str(tmp_path), study.SCALES["tiny"], EXPERIMENTS)
  path = ctx.probe_path("ensemble", "member_vs_solo")
  os.makedirs(os.path.dirname(path))
  with open(path, "w") as f:
    f.write('{"sources": {"ens')
  with caplog.at_level("WARNING", logger="cnnjax"):
    assert ctx.read_probe("ensemble", "member_vs_solo") is None
  assert "is damaged" in caplog.text and not os.path.exists(path)


def test_the_confused_population_stops_on_a_preemption(tfds_data_dir):
  from cnnjax.lab.bn_study import ensembles  # pylint: disable=import-outside-toplevel
  stop = Preemption()
  stop.signum = signal.SIGTERM
  with pytest.raises(Preempted):
    ensembles.train_confused_population(population_configs((1e-3, 3e-3)), stop)


def test_a_signal_ignored_at_start_stays_ignored():
  previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
  try:
    with Preemption().handling():
      assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
      assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
  finally:
    signal.signal(signal.SIGINT, previous)
