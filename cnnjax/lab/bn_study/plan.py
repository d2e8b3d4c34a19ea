"""What the BatchNorm study runs: its scales, the trials of each experiment file, and their directories.

The study's configs live in experiment files (`experiments/bn_*.py`), each with
`get_config(scale)` and `sweep()`, so that one experiment can be rerun alone with
`python -m cnnjax.sweep`. This module turns them into concrete trials: the file's
config for the scale's config argument, the scale's overrides (a few steps for
`tiny`), then each trial's overrides; every trial trains into
`<study workdir>/<experiment key>/<trial name>/`, the directory
`python -m cnnjax.sweep --workdir=<study workdir>/<experiment key>` would use.

A task is one unit of the study's progress bar: a training run (or the seeds of
one configuration trained together as a vectorized population), or a
measurement on finished runs whose result is cached as JSON next to them. Both
know whether they are done, so a rerun of the study skips them.

Seeds: an experiment's sweep repeats each configuration over `seed` values; the
trials that differ only in the seed form a `SeedGroup`, whose record holds the
mean, standard deviation and 95% interval of every accuracy and loss over its
seeds (`group_record`). Measurements of invariants need no seeds: they read
each group's first seed.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import ml_collections

from cnnjax import metrics as metrics_lib
from cnnjax import train
from cnnjax.errors import NonFiniteError
from cnnjax.sweep import Trial, apply_overrides, load_experiment_file, make_trials, trial_name
from cnnjax.sweep.results import mean_interval
from cnnjax.train import population
from cnnjax.train.preemption import Preemption
from cnnjax.train.rundir import DAMAGED_DIR, DIVERGED, FINISHED, RunDir, read_json_object

PROBE_DIR = "probes"  # inside an experiment's directory: cached measurements, one JSON per task
# How a run or a measurement stands, as the report shows it.
MISSING = "missing"  # a run that has not finished or diverged (yet)


@dataclasses.dataclass(frozen=True)
class Scale:
  """How big the study is.

  config_arg: the argument every experiment file's `get_config` receives.
  overrides: dotted config keys set on every run (after the file, before the trial).
  keep: per experiment key, the configurations to run, named without their seed (None: all of them).
  seeds: how many of each configuration's seeds to run, the first ones of its sweep (None: all).
  leakage_examples: examples in the cross-example gradient measurement.
  divergence_batches: training batches over which devices' batch statistics are compared.
  """

  name: str
  config_arg: str
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  keep: Mapping[str, Sequence[str]] | None = None
  seeds: int | None = None
  leakage_examples: int = 16
  divergence_batches: int = 4

  def keeps(self, experiment: str, trial: Trial, seed_index: int) -> bool:
    kept = self.keep is None or group_name(trial) in self.keep.get(experiment, ())
    return kept and (self.seeds is None or seed_index < self.seeds)


SCALES = {
    # The default: the digits (the MNIST sample for the per-device batch) on CPU, every trial (docs/bn_study.md
    # quotes this run).
    "small": Scale("small", "small"),
    # CIFAR-10 and ResNet-20 on an accelerator host with 8 devices.
    "full": Scale("full", "full", seeds=3, leakage_examples=32, divergence_batches=8),
    # A smoke test of the whole pipeline: a few steps, a few trials per experiment, two seeds (the fewest
    # that have a spread).
    "tiny": Scale("tiny", "small", overrides={"num_train_steps": 3, "checkpoint_every_steps": 2,
                                              "log_every_steps": 1, "data.num_threads": 2},
                  keep={"sync_vs_devices": ("bn_sync=global,num_devices=8", "bn_sync=local,num_devices=8"),
                        "per_device_batch": ("bn_group_size=2,bn_sync=ghost,norm=renorm", "norm=group"),
                        "vmap_leakage": ("norm=batch", "norm=group"),
                        "ensemble": ("default",),
                        "train_vs_eval": ("bn_momentum=0.99",),
                        "ghost_batch": ("bn_group_size=8",)},
                  seeds=2, leakage_examples=4, divergence_batches=1),
}


@dataclasses.dataclass(frozen=True)
class TrialPlan:
  """One training run of the study: its trial (name and overrides), full config and directory."""

  trial: Trial
  config: ml_collections.ConfigDict
  workdir: str

  @property
  def name(self) -> str:
    return self.trial.name

  @functools.cached_property
  def total_steps(self) -> int:
    return train.total_steps(self.config)

  def summary(self) -> dict[str, Any] | None:
    """The run's summary if it reached its last step, else None."""
    return RunDir(self.workdir).finished_summary(self.total_steps)

  def status(self) -> str:
    """finished, diverged, or missing (anything else: not started, interrupted, failed)."""
    status = RunDir(self.workdir).status(self.total_steps)
    return status if status in (FINISHED, DIVERGED) else MISSING


@dataclasses.dataclass(frozen=True)
class Context:
  """Where the study writes, at which scale, and where its experiment files are."""

  workdir: str
  scale: Scale
  experiments_dir: str
  # SIGTERM / SIGINT: a run in training saves its step and the study stops (`cnnjax.train.preemption`).
  preemption: Preemption = dataclasses.field(default_factory=Preemption)

  def experiment_dir(self, key: str) -> str:
    return os.path.join(self.workdir, key)

  def module(self, experiment_file: str) -> Any:
    return load_experiment_file(os.path.join(self.experiments_dir, experiment_file))

  def base_config(self, experiment_file: str) -> ml_collections.ConfigDict:
    """The file's config at this scale, with the scale's overrides and no progress bar of its own."""
    config = self.module(experiment_file).get_config(self.scale.config_arg)
    config = apply_overrides(config, Trial(f"scale {self.scale.name}", dict(self.scale.overrides)))
    with config.unlocked():
      config.progress_bar = False  # the study's bar counts runs
    return config

  def trials(self, key: str, experiment_file: str) -> list[TrialPlan]:
    """The file's sweep at this scale: every trial, or the scale's subset of them (configurations and seeds)."""
    base = self.base_config(experiment_file)
    trials = make_trials(self.module(experiment_file).sweep())
    seen: dict[str, int] = {}
    plans = []
    for trial in trials:
      seed_index = seen[group_name(trial)] = seen.get(group_name(trial), -1) + 1
      if self.scale.keeps(key, trial, seed_index):
        plans.append(TrialPlan(trial, apply_overrides(base, trial), os.path.join(self.experiment_dir(key), trial.name)))
    return plans

  def seed_groups(self, key: str, experiment_file: str) -> list[SeedGroup]:
    return seed_groups(self.trials(key, experiment_file))

  def probe_path(self, key: str, name: str) -> str:
    return os.path.join(self.experiment_dir(key), PROBE_DIR, f"{name}.json")

  def read_probe(self, key: str, name: str, *sources: TrialPlan) -> dict[str, Any] | None:
    """A cached measurement, if it was made on the runs' current final parameters."""
    path = self.probe_path(key, name)
    probe = read_json_object(path, os.path.join(os.path.dirname(path), DAMAGED_DIR))  # damaged: measure again
    if probe is None:
      return None
    return probe if probe.get("sources") == source_checksums(*sources) else None

  def write_probe(self, key: str, name: str, payload: dict[str, Any], *sources: TrialPlan) -> None:
    path = self.probe_path(key, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    metrics_lib.write_json(path, {**payload, "sources": source_checksums(*sources)})


SEED_KEY = "seed"


def group_name(trial: Trial) -> str:
  """The trial's name without its seed: the name of its configuration."""
  return trial_name({key: value for key, value in trial.overrides.items() if key != SEED_KEY})


@dataclasses.dataclass(frozen=True)
class SeedGroup:
  """The runs of one configuration that differ only in their seed, in sweep order."""

  name: str
  plans: tuple[TrialPlan, ...]

  @property
  def config(self) -> ml_collections.ConfigDict:
    """The first seed's config (what every seed shares, and that seed)."""
    return self.plans[0].config

  @property
  def first(self) -> TrialPlan:
    return self.plans[0]


def seed_groups(plans: Sequence[TrialPlan]) -> list[SeedGroup]:
  """The plans grouped by configuration, in the order each configuration first appears."""
  groups: dict[str, list[TrialPlan]] = {}
  for plan in plans:
    groups.setdefault(group_name(plan.trial), []).append(plan)
  return [SeedGroup(name, tuple(members)) for name, members in groups.items()]


def source_checksums(*sources: TrialPlan) -> dict[str, str | None]:
  """The final parameter checksum of each run a measurement reads (None while a run is unfinished),
  keyed by experiment and trial so that a study directory can be moved."""
  return {f"{os.path.basename(os.path.dirname(plan.workdir))}/{plan.name}":
          (plan.summary() or {}).get("param_checksum") for plan in sources}


@dataclasses.dataclass(frozen=True)
class Task:
  """One unit of the study's progress: `run()` does it and returns a one-line result; `done()` says
  whether an earlier invocation already did."""

  experiment: str
  name: str
  done: Callable[[], bool]
  run: Callable[[], str]


def train_task(ctx: Context, experiment: str, plan: TrialPlan) -> Task:
  """Trains one run through `cnnjax.train.run` (which resumes an interrupted one from its checkpoints).

  A run that needs more devices than this host has is skipped and stays missing
  (the full scale's 8-device runs on a smaller host); a diverged run keeps its
  error.json and is not retried.
  """
  def run() -> str:
    needed, available = plan.config.parallel.num_devices, jax.device_count()
    if needed > available:
      return f"skipped: needs {needed} devices, this host has {available}"
    try:
      summary = train.run(plan.config, plan.workdir, preemption=ctx.preemption)
    except NonFiniteError as e:
      return f"diverged: {e}"
    return f"eval accuracy {summary['eval_accuracy']:.4f}"

  return Task(experiment, plan.name, done=lambda: plan.status() != MISSING, run=run)


def population_task(ctx: Context, experiment: str, group: SeedGroup) -> Task:
  """Trains a configuration's seeds together as one vectorized population (`cnnjax.train.population`): the
  same runs as one by one, in one compiled step. For experiments whose runs need no device layout."""
  def run() -> str:
    outcomes = population.run_population([p.config for p in group.plans], [p.workdir for p in group.plans],
                                         preemption=ctx.preemption)
    return "eval accuracies " + ", ".join(
        f"failed ({o})" if isinstance(o, Exception) else f"{o['eval_accuracy']:.4f}" if o else "diverged"
        for o in outcomes)

  return Task(experiment, f"{group.name} ({len(group.plans)} seeds)",
              done=lambda: all(p.status() != MISSING for p in group.plans), run=run)


# Summary values every run record carries (None while the run is missing).
RUN_METRICS = ("eval_accuracy", "eval_loss", "train_accuracy", "train_loss", "eval_examples", "wall_seconds")
# The ones a group record averages over seeds, with their spread.
SEEDED_METRICS = ("eval_accuracy", "eval_loss", "train_accuracy", "train_loss", "train_eval_gap")


def run_record(plan: TrialPlan) -> dict[str, Any]:
  """The trial's name and status and its final metrics; `train_eval_gap` is train minus eval accuracy
  (training mode on the last logged training batches against eval mode on the eval split)."""
  summary = plan.summary() or {}
  record = {"trial": plan.name, "status": plan.status(), **{key: summary.get(key) for key in RUN_METRICS}}
  train_accuracy, eval_accuracy = record["train_accuracy"], record["eval_accuracy"]
  record["train_eval_gap"] = (train_accuracy - eval_accuracy
                              if train_accuracy is not None and eval_accuracy is not None else None)
  return record


def group_record(group: SeedGroup) -> dict[str, Any]:
  """The configuration's record over its seeds: for each of SEEDED_METRICS the mean (under the metric's own
  name, so that a group reads like a run), `<metric>_std`, `<metric>_ci95` (half-width of the 95% interval
  of the mean, Student's t) and `<metric>_seeds` (one value per finished seed). Finished only when every
  seed is; the statistics cover the seeds that are."""
  runs = [run_record(plan) for plan in group.plans]
  finished = [r for r in runs if r["status"] == FINISHED]
  statuses = {r["status"] for r in runs}
  status = FINISHED if statuses == {FINISHED} else (DIVERGED if DIVERGED in statuses else MISSING)
  record: dict[str, Any] = {"trial": group.name, "status": status, "seeds": [p.config.seed for p in group.plans],
                            "seeds_finished": len(finished),
                            "eval_examples": next((r["eval_examples"] for r in finished), None),
                            "wall_seconds": sum(r["wall_seconds"] for r in finished) if finished else None}
  for metric in SEEDED_METRICS:
    values = [r[metric] for r in finished if r[metric] is not None]
    record.update(seed_statistics(metric, values))
  return record


def seed_statistics(metric: str, values: Sequence[float]) -> dict[str, Any]:
  """{metric: mean, metric_std: sample std, metric_ci95: t-interval half-width, metric_seeds: values}; None
  where too few values (no mean without one, no spread without two)."""
  mean, std, half_width = mean_interval(values) if values else (None, None, None)
  return {metric: mean, f"{metric}_std": std, f"{metric}_ci95": half_width, f"{metric}_seeds": list(values)}
