"""`--summarize_only` checks the trial directories as a sweep does: a directory holding another trial's run, a
run of another config, or a summary without its config.json is refused in one line instead of being listed
as the trial's result."""

import json
import os
import re

import pytest

from cnnjax import config as config_lib
from cnnjax.errors import CheckpointError
from cnnjax.sweep import apply_overrides, load_trials, results
from helpers import REPO_ROOT, experiment_config, run_cli

SWEEP_FILE = os.path.join("experiments", "lr_sweep_digits.py")


def write_trial_dir(workdir, name: str, config, accuracy: float) -> None:
  """A trial directory as a finished run leaves it: its config and summary."""
  directory = workdir / name
  directory.mkdir(parents=True)
  (directory / "config.json").write_text(json.dumps(config_lib.as_json(config)))
  (directory / "summary.json").write_text(json.dumps({"eval_accuracy": accuracy, "eval_loss": 1.0, "step": 1}))


@pytest.mark.parametrize("case", ["another_trials_run", "another_config", "summary_without_config"])
def test_summarize_only_refuses_a_trial_directory_holding_another_run(tmp_path, case):
  base = experiment_config("lr_sweep_digits")
  trials = load_trials(os.path.join(REPO_ROOT, SWEEP_FILE))
  for trial in trials:
    write_trial_dir(tmp_path, trial.name, apply_overrides(base, trial), 0.5)
  results.check_trial_dirs(base, trials, str(tmp_path))  # every directory holds its own trial's run
  victim = tmp_path / trials[0].name
  if case == "another_trials_run":
    (victim / "config.json").write_text(json.dumps(config_lib.as_json(apply_overrides(base, trials[1]))))
  elif case == "summary_without_config":
    os.remove(victim / "config.json")
  else:
    other = apply_overrides(base, trials[0])
    with other.unlocked():
      other.num_train_steps += 1
    (victim / "config.json").write_text(json.dumps(config_lib.as_json(other)))
  message = ("holds a summary.json without the config.json" if case == "summary_without_config" else
             "holds a run of another config")
  with pytest.raises(CheckpointError, match=f"trial {re.escape(repr(trials[0].name))}: .* {message}"):
    results.check_trial_dirs(base, trials, str(tmp_path))
  if case == "another_trials_run":
    result = run_cli("cnnjax.sweep", f"--config={SWEEP_FILE}", f"--workdir={tmp_path}", "--summarize_only",
                     timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: trial ") and "holds a run of another config" in lines[0], \
        result.stderr
    assert not (tmp_path / results.CSV_FILE).exists()
