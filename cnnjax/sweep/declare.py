"""Declaring sweeps: trials as config overrides, built by grid, zip, product and seeded random sampling.

An experiment file may define `sweep()` next to `get_config()`. It returns the
trials as a list of overrides, each a dict from a dotted config key to a value:

    def sweep():
      return grid({"optimizer.learning_rate": (1e-3, 3e-3), "seed": (0, 1)})

The helpers compose: `grid` is the cartesian product of its axes, `zipped`
pairs its axes position by position, `product` combines trial lists (for example
a zipped schedule times a grid of seeds), `random_search` draws a seeded sample,
and lists concatenate with `+`.

Every trial gets a stable name derived from its overrides alone (keys sorted,
each shown by the shortest dotted suffix that is unambiguous within the trial),
e.g. `learning_rate=0.003,seed=1`. The name is the trial's directory under the
sweep's workdir, so re-running the same declaration finds the same directories.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import itertools
import json
import math
import os
import re
import shlex
from typing import Any, Mapping, Sequence

import ml_collections
import numpy as np

from cnnjax import config as config_lib
from cnnjax.errors import ConfigError

Overrides = dict[str, Any]

# Directory names stay well below file-system limits; longer names end in a hash of the overrides.
MAX_NAME_CHARS = 100
NAME_HASH_CHARS = 8
# Significant digits of floats in trial names (the values themselves are kept exactly).
NAME_FLOAT_DIGITS = 6
EMPTY_TRIAL_NAME = "default"
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._=,+-]")


# -- building trial lists ------------------------------------------------------------------------

def grid(axes: Mapping[str, Sequence[Any]]) -> list[Overrides]:
  """Every combination of the axes' values (the first axis varies slowest)."""
  keys = list(axes)
  return [dict(zip(keys, values)) for values in itertools.product(*(_values(axes, k) for k in keys))]


def zipped(axes: Mapping[str, Sequence[Any]]) -> list[Overrides]:
  """Trial i takes the i-th value of every axis; the axes must have equal lengths."""
  lengths = {key: len(_values(axes, key)) for key in axes}
  if len(set(lengths.values())) > 1:
    raise ConfigError(f"zipped() needs axes of equal length, got {lengths}; give every axis as many values "
                      "or use grid() for all combinations")
  keys = list(axes)
  return [dict(zip(keys, values)) for values in zip(*(_values(axes, k) for k in keys))]


def product(*trial_lists: Sequence[Overrides]) -> list[Overrides]:
  """Every combination of one trial from each list, their overrides merged; the lists must set distinct keys."""
  combined = []
  for parts in itertools.product(*trial_lists):
    merged: Overrides = {}
    for part in parts:
      shared = set(merged) & set(part)
      if shared:
        raise ConfigError(f"product() combines trial lists that both set {sorted(shared)}; each key may come "
                          "from one list only")
      merged.update(part)
    combined.append(merged)
  return combined


@dataclasses.dataclass(frozen=True)
class uniform:  # pylint: disable=invalid-name  (reads like a distribution in a search space)
  """Uniform on [low, high), rounded to `significant_digits` so names and tables stay readable."""

  low: float
  high: float
  significant_digits: int = 3

  def sample(self, rng: np.random.Generator) -> float:
    return _round_significant(float(rng.uniform(self.low, self.high)), self.significant_digits)


@dataclasses.dataclass(frozen=True)
class log_uniform:  # pylint: disable=invalid-name
  """Log-uniform on [low, high) (both positive), e.g. learning rates; rounded like `uniform`."""

  low: float
  high: float
  significant_digits: int = 3

  def sample(self, rng: np.random.Generator) -> float:
    if self.low <= 0 or self.high <= self.low:
      raise ConfigError(f"log_uniform({self.low}, {self.high}) needs 0 < low < high")
    value = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
    return _round_significant(value, self.significant_digits)


@dataclasses.dataclass(frozen=True)
class choice:  # pylint: disable=invalid-name
  """One of `values`, uniformly."""

  values: tuple[Any, ...]

  def sample(self, rng: np.random.Generator) -> Any:
    return self.values[int(rng.integers(len(self.values)))]


def random_search(space: Mapping[str, Any], *, num_trials: int, seed: int) -> list[Overrides]:
  """`num_trials` draws from `space` (key -> uniform / log_uniform / choice, or a sequence meaning choice).

  The same seed gives the same trials on every machine (NumPy's PCG64 stream).
  """
  if num_trials <= 0:
    raise ConfigError(f"random_search(num_trials={num_trials}) needs num_trials > 0")
  rng = np.random.default_rng(seed)
  distributions = {key: value if hasattr(value, "sample") else choice(tuple(value)) for key, value in space.items()}
  return [{key: distribution.sample(rng) for key, distribution in distributions.items()} for _ in range(num_trials)]


def _values(axes: Mapping[str, Sequence[Any]], key: str) -> list[Any]:
  values = axes[key]
  if isinstance(values, np.ndarray):
    values = values.tolist()  # e.g. np.logspace(-4, -1, 4): Python numbers, as configs hold them
  if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
    raise ConfigError(f"sweep axis {key!r} must be a non-empty list or tuple of values, got {values!r}")
  return list(values)


def _round_significant(value: float, digits: int) -> float:
  return float(f"{value:.{digits}g}")


# -- naming --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Trial:
  """One trial of a sweep: its directory name and the config overrides that define it."""

  name: str
  overrides: Overrides


def trial_name(overrides: Mapping[str, Any]) -> str:
  """A file-system-safe name derived from the overrides alone, e.g. `learning_rate=0.003,seed=1`."""
  if not overrides:
    return EMPTY_TRIAL_NAME
  keys = sorted(overrides)
  short = _short_keys(keys)
  name = ",".join(f"{short[key]}={_name_value(overrides[key])}" for key in keys)
  name = _UNSAFE_NAME_CHARS.sub("_", name)
  if len(name) > MAX_NAME_CHARS:
    digest = hashlib.sha256(json.dumps(_canonical(overrides), sort_keys=True, default=str).encode()).hexdigest()
    name = f"{name[:MAX_NAME_CHARS - NAME_HASH_CHARS - 1]}-{digest[:NAME_HASH_CHARS]}"
  return name


def _short_keys(keys: Sequence[str]) -> dict[str, str]:
  """Each dotted key's shortest suffix of components that no other key of the trial ends with."""
  short = {}
  for key in keys:
    parts = key.split(".")
    for length in range(1, len(parts) + 1):
      suffix = ".".join(parts[-length:])
      if not any(other != key and (other == suffix or other.endswith("." + suffix)) for other in keys):
        break
    short[key] = suffix
  return short


def _name_value(value: Any) -> str:
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, float):
    return f"{value:.{NAME_FLOAT_DIGITS}g}"
  if isinstance(value, (tuple, list)):
    return "x".join(_name_value(v) for v in value)
  return str(value)


def _canonical(value: Any) -> Any:
  if isinstance(value, Mapping):
    return {str(k): _canonical(v) for k, v in value.items()}
  if isinstance(value, (tuple, list)):
    return [_canonical(v) for v in value]
  return value


def _plain(value: Any) -> Any:
  """Config-ready values: NumPy scalars as Python numbers, lists as tuples."""
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, (list, tuple)):
    return tuple(_plain(v) for v in value)
  return value


def make_trials(declared: Sequence[Mapping[str, Any]]) -> list[Trial]:
  """Names the declared overrides; refuses malformed entries, repeated trials and colliding names."""
  if isinstance(declared, Mapping) or not isinstance(declared, Sequence) or not declared:
    raise ConfigError("sweep() must return a non-empty list of trials, each a dict of config overrides "
                      "(build it with cnnjax.sweep.grid, zipped, product or random_search)")
  trials, by_name = [], {}
  for overrides in declared:
    if not isinstance(overrides, Mapping) or not all(isinstance(k, str) and k for k in overrides):
      raise ConfigError(f"sweep() returned {overrides!r}; every trial must be a dict from dotted config keys "
                        "(e.g. 'optimizer.learning_rate') to values")
    plain = {k: _plain(v) for k, v in overrides.items()}
    trial = Trial(trial_name(plain), plain)
    if trial.name in by_name:
      same = by_name[trial.name] == trial.overrides
      raise ConfigError(
          f"sweep() declares trial {trial.name!r} twice" + ("" if same else " with different overrides "
                                                            f"({by_name[trial.name]} and {trial.overrides})")
          + "; give every trial distinct values")
    by_name[trial.name] = trial.overrides
    trials.append(trial)
  return trials


# -- applying ------------------------------------------------------------------------------------

def apply_overrides(config: ml_collections.ConfigDict, trial: Trial) -> ml_collections.ConfigDict:
  """A copy of `config` (locked as it was) with the trial's overrides set; ConfigError on a bad key or type."""
  result = config.copy_and_resolve_references()
  for key, value in trial.overrides.items():
    try:
      config_lib.set_value(result, key, value)
    except ConfigError as e:
      raise ConfigError(f"trial {trial.name!r} sets {e}") from None
  return result


def command_line_overrides(overrides: Mapping[str, Any]) -> list[str]:
  """`--config.KEY=VALUE` arguments that `cnnjax.main` parses back into the same values."""
  return [f"--config.{key}={_flag_value(value)}" for key, value in overrides.items()]


def _flag_value(value: Any) -> str:
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, (tuple, list)):
    return repr(tuple(value))
  return repr(value) if isinstance(value, float) else str(value)


def shell_join(arguments: Sequence[str]) -> str:
  return " ".join(shlex.quote(a) for a in arguments)


# -- loading an experiment file ------------------------------------------------------------------

def load_experiment_file(config_path: str) -> Any:
  """Imports an experiment file (`path` or `path:argument`) and returns the module."""
  path = config_path.split(":", 1)[0]
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} does not exist; pass --config=experiments/NAME.py")
  spec = importlib.util.spec_from_file_location("_cnnjax_sweep_declaration", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_trials(config_path: str) -> list[Trial]:
  """The named trials of an experiment file's `sweep()`; ConfigError if it has none."""
  path = config_path.split(":", 1)[0]
  module = load_experiment_file(path)
  if not callable(getattr(module, "sweep", None)):
    raise ConfigError(f"{path} defines no sweep(); add `def sweep():` returning the trials as config overrides "
                      "(see cnnjax.sweep.grid), or train it alone with python -m cnnjax.main")
  return make_trials(module.sweep())
