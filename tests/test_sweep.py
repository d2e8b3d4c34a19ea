"""Sweeps end to end at tiny size: every sweep experiment file, each mode, printed commands, kill and resume.

Experiment files that define `sweep()` have no case in tests/test_experiments.py;
SWEEP_CASES here runs each of them instead (checked by
`test_every_sweep_experiment_runs_here`).
"""

import csv
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from cnnjax.sweep import apply_overrides, load_trials, run_sweep
from cnnjax.parallel import strategies as engines
from helpers import (EXPERIMENTS, REPO_ROOT, experiment_config, final_state, load_experiment, read_jsonl, run_cli,
                     tiny)

QUIET = ["--config.progress_bar=false", "--config.data.num_threads=2"]
# experiment -> the test that runs its sweep end to end.
SWEEP_CASES = {
    "lr_sweep_digits": "test_lr_sweep_vectorized_end_to_end_and_a_member_equals_its_printed_solo_command",
    "norm_sweep_digits": "test_norm_sweep_partitioned_runs_trials_at_once_on_disjoint_devices",
}
# The BatchNorm study's sweeps (experiments/bn_*.py) run end to end, a few trials each, in the tiny study of
# tests/test_bn_study.py (through the study, which trains their trials into sweep directories).
BN_STUDY_TEST = "test_tiny_study_end_to_end"
SWEEPS_RUN_BY_THE_BN_STUDY = ("bn_ensemble", "bn_ghost_batch", "bn_per_device_batch", "bn_sync_vs_devices",
                              "bn_train_vs_eval", "bn_vmap_leakage")
# How long a test waits for a sweep it started to reach the point where it is killed.
KILL_WAIT_SECONDS = 300


def test_every_sweep_experiment_runs_here():
  names = sorted(n[:-3] for n in os.listdir(EXPERIMENTS) if n.endswith(".py") and hasattr(load_experiment(n[:-3]),
                                                                                         "sweep"))
  assert names == sorted(list(SWEEP_CASES) + list(SWEEPS_RUN_BY_THE_BN_STUDY))
  assert all(test in globals() for test in SWEEP_CASES.values())
  with open(os.path.join(REPO_ROOT, "tests", "test_bn_study.py")) as f:
    assert f"def {BN_STUDY_TEST}(" in f.read()


def final_params(workdir, config):
  state = final_state(workdir, config)
  return state.params, state.batch_stats


@pytest.mark.slow
def test_lr_sweep_vectorized_end_to_end_and_a_member_equals_its_printed_solo_command(tmp_path, tfds_data_dir):
  sweep_dir = tmp_path / "sweep"
  args = ["--config=experiments/lr_sweep_digits.py", f"--workdir={sweep_dir}", "--config.num_train_steps=4",
          "--config.log_every_steps=2", "--config.checkpoint_every_steps=2", *QUIET]
  printed = run_cli("cnnjax.sweep", *args, "--print_commands")
  assert printed.returncode == 0, printed.stderr[-2000:]
  commands = printed.stdout.splitlines()
  trials = load_trials(os.path.join(EXPERIMENTS, "lr_sweep_digits.py"))
  assert len(commands) == len(trials) == 8 and not sweep_dir.exists()

  result = run_cli("cnnjax.sweep", *args)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "in vectorized mode" in result.stdout
  rows = list(csv.DictReader(open(sweep_dir / "results.csv")))
  assert [r["trial"] for r in rows] == [t.name for t in trials]
  assert all(r["status"] == "finished" and r["strategy"] == "vectorized" for r in rows)
  best = max(rows, key=lambda r: float(r["eval_accuracy"]))
  assert [r["best"] for r in rows].count("True") == 1 and best["best"] == "True"
  assert f"| **best** | {best['trial']} |" in (sweep_dir / "results.md").read_text()
  assert (sweep_dir / "plot_eval_accuracy_vs_optimizer.learning_rate.png").exists()
  for trial in trials:  # the outputs of a single run, in each trial's directory
    assert {"config.json", "metrics.jsonl", "summary.json", "checkpoints"} <= set(os.listdir(sweep_dir / trial.name))
    assert [r["step"] for r in read_jsonl(sweep_dir / trial.name / "metrics.jsonl")
            if r["split"] == "train"] == [2, 4]

  # The printed command of one trial, run alone (strategy jit over all 8 devices) elsewhere, trains the
  # same network as its population member (BatchNorm included) up to float32 rounding.
  index = 5
  solo_dir = tmp_path / "solo"
  command = shlex.split(commands[index])
  assert command[:3] == ["python", "-m", "cnnjax.main"]
  assert command[4] == f"--workdir={sweep_dir}/{trials[index].name}"
  solo = run_cli("cnnjax.main", *[a for a in command[3:] if not a.startswith("--workdir=")],
                 f"--workdir={solo_dir}")
  assert solo.returncode == 0, solo.stderr[-3000:]
  solo_summary = json.load(open(solo_dir / "summary.json"))
  member_summary = json.load(open(sweep_dir / trials[index].name / "summary.json"))
  assert solo_summary["strategy"] == "jit" and solo_summary["num_devices"] == 8
  config = apply_overrides(tiny(experiment_config("lr_sweep_digits"), num_train_steps=4), trials[index])
  for member, alone in zip(jax.tree.leaves(final_params(sweep_dir / trials[index].name, config)),
                           jax.tree.leaves(final_params(solo_dir, config))):
    np.testing.assert_allclose(member, alone, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(member_summary["eval_loss"], solo_summary["eval_loss"], rtol=1e-4)
  np.testing.assert_allclose(member_summary["train_loss"], solo_summary["train_loss"], rtol=1e-4)


@pytest.mark.slow
def test_norm_sweep_partitioned_runs_trials_at_once_on_disjoint_devices(tmp_path, tfds_data_dir, monkeypatch):
  base = tiny(experiment_config("norm_sweep_digits"), num_train_steps=3, checkpoint_every_steps=3)
  base.lock()
  trials = [t for t in load_trials(os.path.join(EXPERIMENTS, "norm_sweep_digits.py")) if t.name.endswith("seed=0")]
  # Where each trial's state and batches really are, seen at the engine that puts them on devices.
  placed = {}

  def recording(method):
    def wrapper(self, *args):
      result = method(self, *args)
      devices = set().union(*(leaf.sharding.device_set for leaf in jax.tree.leaves(result)))
      placed.setdefault(self.exp.config.model.norm, set()).update(d.id for d in devices)
      return result
    return wrapper

  monkeypatch.setattr(engines.SingleEngine, "put_state", recording(engines.SingleEngine.put_state))
  monkeypatch.setattr(engines.SingleEngine, "put_batch", recording(engines.SingleEngine.put_batch))
  report = run_sweep(base, trials, str(tmp_path / "sweep"), mode="partitioned", devices_per_trial=2)
  assert report.mode == "partitioned" and len(report.trained) == 4
  groups = [set(run.device_ids) for run in report.runs]
  assert all(len(g) == 2 for g in groups)
  assert set().union(*groups) == {d.id for d in jax.local_devices()}  # 4 disjoint pairs cover all 8 devices
  for run in report.runs:
    assert placed[run.config.model.norm] == set(run.device_ids), run.trial.name
    assert run.status == "finished" and run.summary["num_devices"] == 2 and run.summary["strategy"] == "jit"
  # All four trained at the same time: each started before any of them ended.
  assert max(r.start_time for r in report.runs) < min(r.end_time for r in report.runs)
  events = read_jsonl(tmp_path / "sweep" / "sweep_log.jsonl")
  assert sorted(e["trial"] for e in events if e["event"] == "end") == sorted(t.name for t in trials)


@pytest.mark.slow
def test_killed_sweep_completes_on_rerun_with_every_trial_exactly_once(tmp_path, tfds_data_dir):
  sweep_dir = tmp_path / "sweep"
  steps, every = 24, 4
  args = ["--config=experiments/lr_sweep_digits.py", f"--workdir={sweep_dir}", "--mode=sequential",
          "--trials=seed=0", "--config.parallel.strategy=none", f"--config.num_train_steps={steps}",
          f"--config.log_every_steps={every}", f"--config.checkpoint_every_steps={every}", *QUIET]
  trials = [t for t in load_trials(os.path.join(EXPERIMENTS, "lr_sweep_digits.py")) if "seed=0" in t.name]
  first, second = (sweep_dir / trials[0].name, sweep_dir / trials[1].name)
  process = subprocess.Popen([sys.executable, "-m", "cnnjax.sweep", *args], cwd=REPO_ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + KILL_WAIT_SECONDS
  try:
    # Kill while the second trial is mid-run: the first finished, the others not started.
    while time.time() < deadline:
      checkpoints = second / "checkpoints"
      steps_saved = [int(d) for d in os.listdir(checkpoints) if d.isdigit()] if checkpoints.exists() else []
      if steps_saved and max(steps_saved) >= 2 * every:
        break
      assert process.poll() is None, "the sweep ended before it could be killed"
      time.sleep(0.1)
    else:
      raise AssertionError(f"the second trial saved no checkpoint past step {2 * every} in {KILL_WAIT_SECONDS} s")
    process.send_signal(signal.SIGKILL)
  finally:
    process.kill()
    process.wait(timeout=60)
  assert (first / "summary.json").exists() and not (second / "summary.json").exists()
  first_summary = (first / "summary.json").read_text()

  # Re-run vectorized: the interrupted trial resumes at its step as a population of one, the two not
  # started train together from step 0 (a trial may change mode between runs, never its config).
  rerun = run_cli("cnnjax.sweep", *[a.replace("--mode=sequential", "--mode=vectorized") for a in args])
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "1 finished or diverged, 3 to train" in rerun.stderr
  assert "[population of 3] resuming from step" in rerun.stderr
  assert (first / "summary.json").read_text() == first_summary  # not trained again
  assert [json.load(open(sweep_dir / t.name / "summary.json"))["strategy"] for t in trials] == [
      "none", "vectorized", "vectorized", "vectorized"]
  for trial in trials:
    records = read_jsonl(sweep_dir / trial.name / "metrics.jsonl")
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(every, steps + 1, every))
    assert [r["step"] for r in records if r["split"] == "eval"] == [steps]
    assert json.load(open(sweep_dir / trial.name / "summary.json"))["step"] == steps
  events = read_jsonl(sweep_dir / "sweep_log.jsonl")
  ends = [e["trial"] for e in events if e["event"] == "end"]
  assert sorted(ends) == sorted(t.name for t in trials)  # each trial finished exactly once
  rows = list(csv.DictReader(open(sweep_dir / "results.csv")))
  assert [r["trial"] for r in rows] == [t.name for t in trials] and all(r["status"] == "finished" for r in rows)


def test_sweep_user_errors_are_one_line_and_write_nothing(tmp_path):
  workdir = tmp_path / "sweep"
  for args, message in [
      (["--config=experiments/norm_sweep_digits.py", "--mode=vectorized"], "trials differ in model.norm"),
      (["--config=experiments/lr_sweep_digits.py", "--trials=nothing-like-this"], "matches none of the 8 trials"),
  ]:
    result = run_cli("cnnjax.sweep", *args, f"--workdir={workdir}", timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and lines[-1].startswith("error: ") and message in lines[-1], result.stderr
    assert not workdir.exists()
