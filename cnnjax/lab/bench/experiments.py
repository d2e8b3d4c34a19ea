"""The experiments that run on this machine, run with their documented commands, and what they gave.

`scripts/run_experiments.py` runs each of `RECORDED` as its docstring says
(`python -m cnnjax.main` or `python -m cnnjax.sweep`, with the seeds listed
here), each in its own workdir, and writes docs/results/experiments.json: per
run, the summary's eval numbers, the steps and examples per second, and the
command's wall-clock seconds; per sweep, every trial's row of results.csv and
the best one. The experiment docstrings point to this file for their measured
results, and `tests/test_experiments.py` checks each recorded result against
the expectation its docstring states (`min_eval_accuracy`). Each experiment's
record names the commit it was measured at; the file's command, commit and
machine are those of the invocation that last wrote it.

Experiments that need data this machine cannot download (ImageNet, CIFAR-10,
IMDB, Oxford pets) are not recorded; the BatchNorm study's are recorded by
`scripts/bn_study.py` in docs/results/bn_study.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

from cnnjax.lab.bench import harness

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
RUN_TIMEOUT_SECONDS = 1800
# What a single run's summary contributes to the record.
SUMMARY_FIELDS = ("eval_accuracy", "eval_loss", "eval_mean_iou", "step", "examples_per_second", "wall_seconds")


@dataclasses.dataclass(frozen=True)
class Recorded:
  """One experiment this machine runs: how, and the expectation its docstring states."""

  name: str
  seeds: tuple[int, ...] = (0,)
  sweep: bool = False
  # The docstring's "Expected" as a number: every run (every trial of a sweep's best row) reaches it.
  min_eval_accuracy: float = 0.0


RECORDED = (
    Recorded("lenet5_digits", seeds=(0, 1, 2), min_eval_accuracy=0.97),
    Recorded("simple_cnn_digits", seeds=(0, 1, 2), min_eval_accuracy=0.98),
    Recorded("bn_base", seeds=(0, 1, 2), min_eval_accuracy=0.97),
    Recorded("unet_shapes", min_eval_accuracy=0.98),
    Recorded("unet3d_shapes3d", min_eval_accuracy=0.98),
    Recorded("lr_sweep_digits", sweep=True, min_eval_accuracy=0.98),
    Recorded("norm_sweep_digits", sweep=True, min_eval_accuracy=0.98),
)
BY_NAME = {entry.name: entry for entry in RECORDED}


def command(entry: Recorded, workdir: str, seed: int | None = None) -> list[str]:
  """The experiment's documented command (the progress bar off, the seed set where one is given)."""
  module = "cnnjax.sweep" if entry.sweep else "cnnjax.main"
  arguments = [sys.executable, "-m", module, f"--config=experiments/{entry.name}.py", f"--workdir={workdir}"]
  if not entry.sweep:
    arguments += ["--config.progress_bar=false"] + ([] if seed is None else [f"--config.seed={seed}"])
  return arguments


def _run(arguments: list[str], env: dict[str, str]) -> float:
  """Runs a command to its end; returns its wall-clock seconds (raises with its stderr's end on failure)."""
  start = time.monotonic()
  result = subprocess.run(arguments, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_SECONDS, check=False)
  if result.returncode != 0:
    raise RuntimeError(f"{' '.join(arguments)} exited {result.returncode}: {result.stderr[-2000:]}")
  return time.monotonic() - start


def _summary(workdir: str) -> dict[str, Any]:
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  return {field: summary[field] for field in SUMMARY_FIELDS if field in summary}


def _sweep_rows(workdir: str) -> list[dict[str, Any]]:
  """The sweep's results.csv, numbers as numbers and `best` as a bool."""
  from cnnjax.sweep import results  # pylint: disable=import-outside-toplevel
  with open(os.path.join(workdir, results.CSV_FILE), newline="") as f:
    return [{key: _typed(key, value) for key, value in row.items()} for row in csv.DictReader(f)]


def _typed(key: str, value: str) -> Any:
  if key == "best":
    return value == "True"
  for kind in (int, float):
    try:
      return kind(value)
    except ValueError:
      pass
  return value


def record(entry: Recorded, root: str, env: dict[str, str]) -> dict[str, Any]:
  """Runs one experiment (every seed, or the sweep) under `root`; returns what it gave."""
  shown = [a for a in command(entry, f"/tmp/cnnjax/{entry.name}") if a != sys.executable]
  result: dict[str, Any] = {"command": " ".join(["python"] + shown),
                            "min_eval_accuracy": entry.min_eval_accuracy}
  if entry.sweep:
    workdir = os.path.join(root, entry.name)
    result["command_seconds"] = _run(command(entry, workdir), env)
    result["trials"] = _sweep_rows(workdir)
    return result
  result["runs"] = []
  for seed in entry.seeds:
    workdir = os.path.join(root, f"{entry.name}-seed{seed}")
    seconds = _run(command(entry, workdir, seed), env)
    result["runs"].append({"seed": seed, "command_seconds": seconds, **_summary(workdir)})
  return result


def run(json_path: str, names: tuple[str, ...] = tuple(BY_NAME)) -> dict[str, Any]:
  """Runs the experiments named (all of `RECORDED` by default) and writes their results to `json_path`,
  keeping the earlier record of any experiment not run this time."""
  unknown = sorted(set(names) - set(BY_NAME))
  if unknown:
    raise ValueError(f"unknown experiments {unknown}; choose from {', '.join(BY_NAME)}")
  payload: dict[str, Any] = {"experiments": {}}
  if os.path.exists(json_path):
    with open(json_path) as f:
      payload = json.load(f)
  provenance = harness.provenance()
  with tempfile.TemporaryDirectory() as root:
    # A private TFDS directory: the embedded and synthetic datasets are written there, not into ~.
    env = {**os.environ, "TFDS_DATA_DIR": os.path.join(root, "tfds"), "PYTHONUNBUFFERED": "1"}
    for name in names:
      print(f"running {name}", flush=True)
      # Each record keeps the commit it was measured at: a later invocation may rerun only some.
      payload["experiments"][name] = {**record(BY_NAME[name], root, env), "commit": provenance["commit"]}
      print(f"  {json.dumps(payload['experiments'][name])[:400]}", flush=True)
  payload.update(provenance)
  payload["experiments"] = dict(sorted(payload["experiments"].items()))
  harness.write_results(json_path, payload)
  return payload


def accuracies(result: dict[str, Any]) -> list[float]:
  """The eval accuracies an experiment's expectation is held against: every run's, or a sweep's best
  trial's."""
  if "runs" in result:
    return [run_["eval_accuracy"] for run_ in result["runs"]]
  best = [row for row in result["trials"] if row["best"]]
  return [float(row["eval_accuracy"]) for row in best]
