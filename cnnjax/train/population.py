"""Vectorized populations: several runs that differ only in scalar hyperparameters, trained as one.

`run_population(configs, workdirs)` trains every config in its own workdir (the
same outputs as `cnnjax.train.run`), but all of them in one compiled step: their
states are stacked on a leading member axis, the step is `jax.vmap`ped over it
(with no axis name, so each member's BatchNorm normalizes over its own batch
only), and the member axis is sharded over the local devices.

Members may differ only in values that need no recompilation: the learning rate
and weight decay (injected into the optimizer state), the label smoothing (an
argument of the step) and the seed (initialization, data order, augmentation and
dropout). Anything else changes shapes or the program and is refused.
"""

from __future__ import annotations

import collections
from typing import Any, Sequence

import ml_collections

from cnnjax import config as config_lib
from cnnjax.errors import ConfigError, NonFiniteError
from cnnjax.train import engines
from cnnjax.train.loop import Member, build, train_members

VECTORIZABLE_KEYS = ("optimizer.learning_rate", "optimizer.weight_decay", "label_smoothing", "seed")
# Keys that may differ without changing the computation: where and how often things are written.
IGNORED_KEYS = ("parallel.strategy", "parallel.num_devices", "progress_bar")


def non_vectorizable_differences(configs: Sequence[ml_collections.ConfigDict]) -> dict[str, list[Any]]:
  """The keys whose values differ between configs and that a population cannot vary."""
  flats = [config_lib.flatten(c) for c in configs]
  keys = sorted(set().union(*flats))
  differing = {}
  for key in keys:
    values = [flat.get(key) for flat in flats]
    if key not in VECTORIZABLE_KEYS and key not in IGNORED_KEYS and any(v != values[0] for v in values):
      differing[key] = values
  return differing


def check_vectorizable(configs: Sequence[ml_collections.ConfigDict]) -> None:
  """Raises ConfigError naming the first key that differs in shape or structure."""
  differing = non_vectorizable_differences(configs)
  if differing:
    key, values = next(iter(differing.items()))
    shown = ", ".join(repr(v) for v in dict.fromkeys(map(str, values)))
    raise ConfigError(
        f"trials differ in {key} ({shown}), which changes shapes or structure; a vectorized population may "
        f"differ only in {', '.join(VECTORIZABLE_KEYS)}; run these trials sequentially or partitioned")


def member_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A member trains on one device's share of the population: its own batch is never split."""
  member = config.copy_and_resolve_references()
  with member.unlocked():
    member.parallel.strategy = "none"
    member.parallel.num_devices = 0
  return member


def run_population(configs: Sequence[ml_collections.ConfigDict], workdirs: Sequence[str], *,
                   devices: Sequence[Any] | None = None) -> list[dict[str, Any] | None]:
  """Trains the configs as one vectorized population; returns each member's summary (None if it failed).

  Finished members are skipped (their summary is returned); interrupted members
  resume from their checkpoints, and members that resume from different steps
  are trained as separate populations, one per step.
  """
  if len(configs) != len(workdirs) or not configs:
    raise ValueError("give one workdir per config, and at least one config")
  check_vectorizable(configs)
  experiments = [build(member_config(config)) for config in configs]
  summaries: list[dict[str, Any] | None] = [None] * len(configs)
  members = [Member(exp, workdir) for exp, workdir in zip(experiments, workdirs)]
  by_start = collections.defaultdict(list)
  try:
    for index, member in enumerate(members):
      finished = member.finished_summary()
      if finished is not None:
        summaries[index] = finished
      else:
        by_start[member.restore()].append(index)
    for start_step, indices in sorted(by_start.items()):
      group = [members[i] for i in indices]
      engine = engines.PopulationEngine([m.exp for m in group], devices=devices)
      try:
        results = train_members(group, engine, start_step=start_step)
      except NonFiniteError:
        results = [None] * len(group)  # every member diverged; each one's error.json says where
      for i, result in zip(indices, results):
        summaries[i] = result
  finally:
    for member in members:
      member.close()
  return summaries
