"""The command line as users run it: someone else's arrays through npz, and kill-and-resume."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import sklearn.datasets

from helpers import REPO_ROOT, read_jsonl, run_cli

LENET = "--config=experiments/lenet5_digits.py"
QUIET = ["--config.progress_bar=false", "--config.data.num_threads=2"]


def mnist_format_arrays(path_prefix):
  """scikit-learn's digits upsampled to 28x28 uint8: arrays in MNIST's format from outside cnnjax."""
  digits = sklearn.datasets.load_digits()
  upsampled = np.repeat(np.repeat(digits.images, 3, axis=1), 3, axis=2)  # 24x24
  images = np.pad(upsampled, ((0, 0), (2, 2), (2, 2)))[..., None] * (255.0 / 16)
  images = images.round().astype(np.uint8)
  labels = digits.target.astype(np.int64)
  order = np.random.default_rng(1).permutation(len(labels))
  train, test = order[:1500], order[1500:]
  np.savez(f"{path_prefix}_train.npz", image=images[train], label=labels[train])
  np.savez(f"{path_prefix}_test.npz", image=images[test], label=labels[test])
  return f"{path_prefix}_train.npz", f"{path_prefix}_test.npz"


@pytest.mark.slow
def test_lenet5_trains_on_foreign_mnist_format_npz_without_code_changes(tmp_path):
  train_path, test_path = mnist_format_arrays(tmp_path / "mnistlike")
  result = run_cli("cnnjax.main", LENET, f"--workdir={tmp_path / 'run'}", "--config.data.name=npz",
                   f"--config.data.train_path={train_path}", f"--config.data.eval_path={test_path}",
                   "--config.num_train_steps=200", *QUIET)
  assert result.returncode == 0, result.stderr[-2000:]
  summary = json.load(open(tmp_path / "run" / "summary.json"))
  assert summary["eval_examples"] == 297 and summary["eval_accuracy"] > 0.85, summary


@pytest.mark.slow
def test_killed_run_resumes_from_its_last_checkpoint(tmp_path, tfds_data_dir):
  workdir = tmp_path / "run"
  args = [LENET, f"--workdir={workdir}", "--config.num_train_steps=400", "--config.checkpoint_every_steps=25",
          "--config.log_every_steps=25", *QUIET]
  process = subprocess.Popen([sys.executable, "-m", "cnnjax.main", *args], cwd=REPO_ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  checkpoints = workdir / "checkpoints"
  deadline = time.time() + 300
  try:
    while time.time() < deadline:
      steps = [int(d) for d in os.listdir(checkpoints) if d.isdigit()] if checkpoints.exists() else []
      if steps and max(steps) >= 50:
        break
      assert process.poll() is None, "the run ended before it could be killed"
      time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
  finally:
    process.kill()
    process.wait(timeout=60)
  assert not (workdir / "summary.json").exists()
  resumed = run_cli("cnnjax.main", *args)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "resuming from step" in resumed.stderr
  train_steps = [r["step"] for r in read_jsonl(workdir / "metrics.jsonl") if r["split"] == "train"]
  assert train_steps == list(range(25, 401, 25))  # every point once, none lost or duplicated
  assert json.load(open(workdir / "summary.json"))["step"] == 400


@pytest.mark.parametrize("module", ["cnnjax.main", "cnnjax.sweep", "cnnjax.summary", "cnnjax.prepare"])
def test_help_is_no_error(module):
  result = run_cli(module, "--help")
  assert result.returncode == 0 and "flags" in (result.stdout + result.stderr).lower(), result.stderr[-2000:]
