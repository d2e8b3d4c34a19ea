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
import contextlib
import os
from typing import Any, Sequence

import jax
import ml_collections

from cnnjax import config as config_lib
from cnnjax.errors import ConfigError, NonFiniteError
from cnnjax.train import engines
from cnnjax.train.loop import Member, build, train_members
from cnnjax.train.preemption import Preemption

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
                   devices: Sequence[Any] | None = None,
                   preemption: Preemption | None = None) -> list[dict[str, Any] | None | Exception]:
  """Trains the configs as one vectorized population; returns each member's outcome: its summary, None
  if it diverged, or the exception that kept it from training (a member that cannot be built is left
  out of the population; the others train).

  Finished members are skipped (their summary is returned). Interrupted members
  resume from their checkpoints, in populations that give every one of them the
  result of an uninterrupted run:

  * members that last trained in one population resume as that population, all
    from the newest step every one of them has a good checkpoint for
    (checkpoints are saved member by member, so a kill during a save can leave
    some members a checkpoint ahead; those newer checkpoints are deleted, and
    written again, identically, by the resumed population);
  * the others (not started, or interrupted in a run of their own) train
    together with those that resume from the same step.
  """
  if len(configs) != len(workdirs) or not configs:
    raise ValueError("give one workdir per config, and at least one config")
  if jax.process_count() > 1:
    raise ConfigError("a vectorized population trains in one process; run a multi-process job's trials "
                      "one after another (python -m cnnjax.main per trial, see --print_commands)")
  check_vectorizable(configs)
  outcomes: list[dict[str, Any] | None | Exception] = [None] * len(configs)
  members: dict[int, Member] = {}
  for index, (config, workdir) in enumerate(zip(configs, workdirs)):
    try:
      members[index] = Member(build(member_config(config)), workdir)
    except Exception as error:  # pylint: disable=broad-except  (this member only; the rest train)
      outcomes[index] = error
  with contextlib.ExitStack() as stack:
    for member in members.values():
      stack.enter_context(member.rundir.lock())
      stack.callback(member.close)
    training = []
    for index, member in members.items():
      finished = member.finished_summary()
      if finished is not None:
        outcomes[index] = finished
      else:
        training.append(index)
    for start_step, indices in _resume_groups({i: members[i] for i in training}):
      group = [members[i] for i in indices]
      population_id = [os.path.abspath(m.workdir) for m in group]
      for member in group:
        member.population = population_id
      engine = engines.PopulationEngine([m.exp for m in group], devices=devices)
      try:
        results = train_members(group, engine, start_step=start_step, preemption=preemption)
      except NonFiniteError:
        results = [None] * len(group)  # every member diverged; each one's error.json says where
      for i, result in zip(indices, results):
        outcomes[i] = result
  return outcomes


def _resume_groups(members: dict[int, Member]) -> list[tuple[int, list[int]]]:
  """Restores every member and returns the populations to train, as (start step, member indices)."""
  starts = {i: member.restore() for i, member in members.items()}
  by_start = collections.defaultdict(list)  # members not saved by a population
  by_population = collections.defaultdict(list)
  for i, member in members.items():
    if member.population:
      by_population[tuple(member.population)].append(i)
    else:
      by_start[starts[i]].append(i)
  groups = list(by_start.items())
  for indices in by_population.values():
    common = min(starts[i] for i in indices)
    while any(starts[i] != common for i in indices):  # an unreadable checkpoint pulls every member back
      starts.update({i: members[i].restore(at_most=common) for i in indices})
      common = min(starts[i] for i in indices)
    for i in indices:
      members[i].checkpointer.delete_after(common)
    groups.append((common, indices))
  return sorted(groups)
