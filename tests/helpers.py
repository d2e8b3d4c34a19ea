"""Helpers shared by tests: experiment configs at tiny size and running the CLI as a subprocess."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(REPO_ROOT, "experiments")
# Every subprocess a test starts is bounded by this many seconds.
SUBPROCESS_TIMEOUT = 600


def load_experiment(name: str) -> Any:
  """Imports experiments/<name>.py and returns its module."""
  path = os.path.join(EXPERIMENTS, f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"experiment_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def experiment_config(name: str, **overrides: Any):
  """An experiment's config with dotted-key overrides, e.g. {'model.name': 'mlp'}."""
  return set_values(load_experiment(name).get_config(), overrides)


def set_values(config, overrides: dict[str, Any]):
  """`config` with each dotted key of `overrides` set (cnnjax.config.set_value)."""
  from cnnjax import config as config_lib  # pylint: disable=import-outside-toplevel
  for key, value in overrides.items():
    config_lib.set_value(config, key, value)
  return config


def tiny(config, **overrides: Any):
  """Shrinks a config to a few steps with quiet output."""
  defaults = {"num_train_steps": 4, "log_every_steps": 2, "checkpoint_every_steps": 2,
              "eval_every_steps": 0, "progress_bar": False, "data.num_threads": 2}
  defaults.update(overrides)
  return set_values(config, defaults)


def run_cli(module: str, *args: str, timeout: float = SUBPROCESS_TIMEOUT, env: dict | None = None,
            wrapper: str | None = None) -> subprocess.CompletedProcess:
  """Runs `python -m module args...` (or a wrapper script) from the repository root."""
  command = [sys.executable] + ([wrapper] if wrapper else ["-m", module]) + list(args)
  return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
                        env={**os.environ, **(env or {})})


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def checkpoint_steps(workdir) -> list[int]:
  """The steps of a run's complete checkpoints."""
  from cnnjax.train import RunDir  # pylint: disable=import-outside-toplevel
  return RunDir(str(workdir)).checkpoint_steps()


def final_state(workdir, config, step: int | None = None):
  """A run's state (host arrays) at its newest good checkpoint, or at `step`."""
  import jax  # pylint: disable=import-outside-toplevel
  from cnnjax import train  # pylint: disable=import-outside-toplevel
  template = jax.device_get(train.build(config).init_state())
  rundir = train.RunDir(str(workdir))
  restored = (rundir.restore_latest(config, template) if step is None else
              rundir.restore_step(config, template, step))
  return restored.state
