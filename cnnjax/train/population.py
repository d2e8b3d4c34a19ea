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
import logging
import os
from typing import Any, Sequence

import jax
import ml_collections

from cnnjax import config as config_lib
from cnnjax.errors import ConfigError, NonFiniteError, WorkdirBusyError
from cnnjax import parallel
from cnnjax.models.validation import TooLargeError, check_memory
from cnnjax.train.experiment import Experiment, build
from cnnjax.train.loop import Member, train_members
from cnnjax.train.preemption import Preemption

logger = logging.getLogger("cnnjax")



def non_vectorizable_differences(configs: Sequence[ml_collections.ConfigDict]) -> dict[str, list[Any]]:
  """The keys whose values differ between configs and that a population cannot vary."""
  flats = [config_lib.flatten(c) for c in configs]
  keys = sorted(set().union(*flats))
  differing = {}
  for key in keys:
    values = [flat.get(key) for flat in flats]
    if (key not in config_lib.VECTORIZABLE_KEYS and key not in config_lib.MEMBER_IGNORED_KEYS
        and any(v != values[0] for v in values)):
      differing[key] = values
  return differing


# A kill while a population saves can leave some members one checkpoint ahead; resuming needs the one
# before it on every member.
MIN_KEPT_CHECKPOINTS = 2


def check_vectorizable(configs: Sequence[ml_collections.ConfigDict]) -> None:
  """Raises ConfigError naming the first key that differs in shape or structure, or a checkpoint count
  too small for a population to resume in lockstep."""
  kept = min(c.keep_checkpoints for c in configs)
  if kept < MIN_KEPT_CHECKPOINTS:
    raise ConfigError(f"keep_checkpoints={kept}: a vectorized population keeps at least {MIN_KEPT_CHECKPOINTS} "
                      "(its members save one after another, and a kill in between must leave a step they all "
                      "have); set keep_checkpoints >= 2, or run the trials sequentially")
  differing = non_vectorizable_differences(configs)
  if differing:
    key, values = next(iter(differing.items()))
    shown = ", ".join(repr(v) for v in dict.fromkeys(map(str, values)))
    raise ConfigError(
        f"trials differ in {key} ({shown}), which changes shapes or structure; a vectorized population may "
        f"differ only in {', '.join(config_lib.VECTORIZABLE_KEYS)}; run these trials sequentially or partitioned")


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
  if it diverged, or the exception that kept it from training (a member that cannot be built, or whose
  workdir another run holds, is left out of the population; the others train).

  Finished members are skipped (their summary is returned). Interrupted members
  resume from their checkpoints, in populations that give every one of them the
  result of an uninterrupted run:

  * members that last trained in one population resume as that population, all
    from the newest step every one of them has a good checkpoint for
    (checkpoints are saved member by member, so a kill during a save can leave
    some members a checkpoint ahead; those newer checkpoints are deleted, and
    written again, identically, by the resumed population). Members of that
    population that are not here (they diverged, or were left out) keep their
    places as inert stand-ins, since the population's size and order decide the
    device layout and with it the float rounding;
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
    for index in list(members):
      try:
        stack.enter_context(members[index].rundir.lock())
      except WorkdirBusyError as error:
        outcomes[index] = error
        del members[index]
        continue
      stack.callback(members[index].close)
    training = []
    for index, member in members.items():
      finished = member.finished_summary()
      if finished is not None:
        outcomes[index] = finished
      else:
        training.append(index)
    for start_step, group in _resume_groups({i: members[i] for i in training}):
      population_id = [workdir_name(m.workdir) for m, _ in group]
      for member, _ in group:
        member.population = population_id
      check_population_memory([m.exp for m, _ in group], devices)
      engine = parallel.PopulationEngine([m.exp for m, _ in group], devices=devices)
      try:
        results = train_members([m for m, _ in group], engine, start_step=start_step, preemption=preemption)
      except NonFiniteError:
        results = [None] * len(group)  # every member diverged; each one's error.json says where
      for (_, index), result in zip(group, results):
        if index is not None:
          outcomes[index] = result
  return outcomes


def workdir_name(workdir: str) -> str:
  """How a population names its members: their directories' names (the trial names of a sweep), which
  stay valid when the whole sweep directory moves."""
  return os.path.basename(os.path.normpath(workdir))


def check_population_memory(experiments: Sequence[Experiment], devices: Sequence[Any] | None) -> None:
  """Refuses a population whose members, as many per device as the engine will put there, cannot fit."""
  available = list(devices) if devices is not None else jax.local_devices()
  per_device = -(-len(experiments) // parallel.members_device_count(len(experiments), len(available)))
  base = experiments[0]
  try:
    check_memory(base.model, base.tx, base.input_shape, base.strategy.layout.per_device_batch, available[:1],
                 replicas=per_device, host_copies=len(experiments))
  except TooLargeError as e:
    raise ConfigError(f"a population of {len(experiments)} ({per_device} per device): {e}; use a smaller "
                      "--population_size") from None


def _resume_groups(members: dict[int, Member]) -> list[tuple[int, list[tuple[Member, int | None]]]]:
  """Restores every member and returns the populations to train: (start step, [(member, its index, or None
  for a stand-in)]), in the order of the population each member last trained in."""
  starts = {i: member.restore() for i, member in members.items()}
  by_start = collections.defaultdict(list)  # members not saved by a population
  by_population = collections.defaultdict(list)
  for i, member in members.items():
    if member.population:
      by_population[tuple(member.population)].append(i)
    else:
      by_start[starts[i]].append((member, i))
  groups = list(by_start.items())
  for population_id, indices in by_population.items():
    common = min(starts[i] for i in indices)
    while any(starts[i] != common for i in indices):  # an unreadable checkpoint pulls every member back
      starts.update({i: members[i].restore(at_most=common) for i in indices})
      common = min(starts[i] for i in indices)
    newer = sorted({os.path.basename(members[i].workdir) for i in indices
                    if members[i].checkpointer.latest_step() not in (None, common)})
    if newer:
      logger.warning("the population resumes from step %d, where each member has a checkpoint; the newer "
                     "checkpoints of %s are written again, identically", common, ", ".join(newer))
    for i in indices:
      members[i].checkpointer.delete_after(common)
    by_name = {workdir_name(members[i].workdir): i for i in indices}
    template = members[indices[0]]
    parent = os.path.dirname(os.path.normpath(template.workdir))
    groups.append((common, [(members[by_name[name]], by_name[name]) if name in by_name else
                            (template.stand_in(os.path.join(parent, name)), None) for name in population_id]))
  return sorted(groups, key=lambda group: group[0])
