"""Running the whole BatchNorm study: every experiment's runs and measurements, resumably, with one
progress bar over them, then the report.

`run_study(workdir, scale)` lists every task of the six experiments (training
runs first, then the measurements that read them), skips the ones an earlier
invocation finished (a run's summary at its last step; a measurement's JSON
made on the current final parameters of the runs it reads), does the rest in
order, and writes results.csv/results.md per experiment (as `python -m
cnnjax.sweep` would), then results.json, report.md and the plots. An
interrupted run resumes from its checkpoints the next time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import time
from typing import Any, Iterator, Sequence

import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from cnnjax import metrics as metrics_lib
from cnnjax.errors import ConfigError
from cnnjax.lab.bn_study import (ensembles, ghost_batch, per_device_batch, report, sync_vs_devices, train_vs_eval,
                          vmap_leakage)
from cnnjax.lab.bn_study.plan import SCALES, Context, Scale, Task
from cnnjax.sweep import write_results
from cnnjax.train.preemption import Preemption
from cnnjax.train.rundir import DAMAGED_DIR, read_json_object

# In report order. Each module has KEY, EXPERIMENT_FILE, tasks(ctx), results(ctx), section(results, ctx) and
# summary(results) (its bullet of the README's summary).
EXPERIMENTS = (sync_vs_devices, per_device_batch, vmap_leakage, ensembles, train_vs_eval, ghost_batch)
EXPERIMENT_KEYS = tuple(e.KEY for e in EXPERIMENTS)

logger = logging.getLogger("cnnjax")
# In the workdir: the scale it holds, so that scales are never mixed in one directory, and every invocation that
# trained or measured something (tasks done, wall seconds), so that a report rewritten later still says what
# the study cost.
STUDY_FILE = "study.json"
STUDY_LINE = "bn_study_line"  # marks the study's own log records (kept while the runs' step lines are not)


def resolve_scale(scale: str | Scale) -> Scale:
  if isinstance(scale, Scale):
    return scale
  if scale not in SCALES:
    raise ConfigError(f"--scale={scale} is unknown; choose one of {', '.join(SCALES)}")
  return SCALES[scale]


def select(only: Sequence[str]) -> tuple[Any, ...]:
  """The experiment modules named in `only` (all when empty), in report order."""
  unknown = sorted(set(only) - set(EXPERIMENT_KEYS))
  if unknown:
    raise ConfigError(f"--only names unknown experiments {unknown}; choose from {', '.join(EXPERIMENT_KEYS)}")
  return tuple(e for e in EXPERIMENTS if not only or e.KEY in only)


class StudyProgress:
  """A bar over the study's runs and measurements on a terminal; one log line per finished task always."""

  def __init__(self, total: int, done: int):
    self.total, self.done = total, done
    self._bar = (tqdm.tqdm(total=total, initial=done, unit="run", desc="BatchNorm study", dynamic_ncols=True)
                 if sys.stderr.isatty() else None)

  def finished(self, task: Task, result: str, seconds: float) -> None:
    self.done += 1
    if self._bar is not None:
      self._bar.update(1)
    logger.info("[%d/%d] %s / %s: %s (%.0f s)", self.done, self.total, task.experiment, task.name, result, seconds,
                extra={STUDY_LINE: True})

  @contextlib.contextmanager
  def showing(self) -> Iterator[None]:
    """Log lines print above the bar; the runs' own step lines are held back (the bar counts runs)."""
    level = logger.level
    logger.setLevel(logging.INFO)
    quiet = _OnlyStudyLines()
    logger.addFilter(quiet)
    try:
      with logging_redirect_tqdm([logger]) if self._bar is not None else contextlib.nullcontext():
        yield
    finally:
      logger.removeFilter(quiet)
      logger.setLevel(level)
      if self._bar is not None:
        self._bar.close()


class _OnlyStudyLines(logging.Filter):
  """Keeps the study's own lines and warnings; drops the per-step lines of the runs it starts."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or getattr(record, STUDY_LINE, False)


def run_study(workdir: str, scale: str | Scale = "small", *, experiments_dir: str,
              only: Sequence[str] = (), preemption: Preemption | None = None) -> dict[str, Any]:
  """Runs what is not done yet of the selected experiments, then writes the report of all of them.

  Returns the contents of results.json. `experiments_dir` holds the bn_*.py
  experiment files; `only` restricts what runs (the report still covers every
  experiment, showing what is missing). SIGTERM or SIGINT (through `preemption`)
  stop it: the run in training saves its step and `Preempted` is raised; a
  rerun goes on from there.
  """
  started = time.time()
  ctx = Context(os.path.abspath(workdir), resolve_scale(scale), os.path.abspath(experiments_dir),
                preemption or Preemption())
  selected = select(only)
  check_scale(ctx)
  os.makedirs(ctx.workdir, exist_ok=True)
  _write_study_file(ctx, _invocations(ctx))
  tasks = [task for experiment in selected for task in experiment.tasks(ctx)]
  pending = [task for task in tasks if not task.done()]
  progress = StudyProgress(len(tasks), len(tasks) - len(pending))
  logger.info("BatchNorm study (%s scale) in %s: %d runs and measurements, %d done already, %d to do",
              ctx.scale.name, ctx.workdir, len(tasks), len(tasks) - len(pending), len(pending))
  with progress.showing():
    for task in pending:
      if ctx.preemption.signum is not None:
        raise ctx.preemption.stopped(0)  # between tasks: everything so far is saved
      task_started = time.time()
      result = task.run()
      progress.finished(task, result, time.time() - task_started)
  for experiment in selected:
    trials = [plan.trial for plan in ctx.trials(experiment.KEY, experiment.EXPERIMENT_FILE)]
    if os.path.isdir(ctx.experiment_dir(experiment.KEY)):
      write_results(ctx.experiment_dir(experiment.KEY), trials)
  run_info = {"tasks_total": len(tasks), "tasks_run": len(pending), "wall_seconds": time.time() - started}
  if pending:
    _write_study_file(ctx, _invocations(ctx) + [{**run_info, "experiments": [e.KEY for e in selected]}])
  return write_study_report(ctx, run_info=run_info)


def _read_study_file(ctx: Context) -> dict[str, Any]:
  return read_json_object(os.path.join(ctx.workdir, STUDY_FILE), os.path.join(ctx.workdir, DAMAGED_DIR)) or {}


def _invocations(ctx: Context) -> list[dict[str, Any]]:
  """The invocations that did some of the study's tasks, oldest first."""
  return list(_read_study_file(ctx).get("invocations", []))


def _write_study_file(ctx: Context, invocations: list[dict[str, Any]]) -> None:
  metrics_lib.write_json(os.path.join(ctx.workdir, STUDY_FILE), {"scale": ctx.scale.name,
                                                                  "invocations": invocations})


def check_scale(ctx: Context) -> None:
  """Refuses a workdir that holds a study of another scale (its runs would all read as missing)."""
  held = _read_study_file(ctx).get("scale")
  if held is not None and held != ctx.scale.name:
    raise ConfigError(f"{ctx.workdir} holds a study at --scale={held}, not {ctx.scale.name}; pass --scale={held} "
                      "or use another --workdir")


def write_study_report(ctx: Context, run_info: dict[str, Any] | None = None) -> dict[str, Any]:
  """results.json, report.md and the plots from whatever the study's directory holds; trains nothing."""
  check_scale(ctx)
  run_info = run_info or {"tasks_total": None, "tasks_run": None, "wall_seconds": None}
  return report.write_report(ctx, EXPERIMENTS, {**run_info, "invocations": _invocations(ctx)})


def publish_report(workdir: str, destination: str) -> list[str]:
  """Copies what a reader of the study needs (report.md, results.json, the README summary and the plots
  report.md links to, not the runs) from the study's workdir into `destination`, where the report's plot
  links still resolve; a plot the report no longer shows is removed there. Returns the names copied."""
  report_path = os.path.join(workdir, report.REPORT_FILE)
  if not os.path.exists(report_path):
    raise ConfigError(f"{workdir} holds no {report.REPORT_FILE} to publish; run the study there first")
  with open(report_path) as f:
    report_text = f.read()
  # A plot file of an experiment without finished runs may be left from an earlier report: only links count.
  plots = {f"{experiment.KEY}.png": f"]({experiment.KEY}.png)" in report_text for experiment in EXPERIMENTS}
  os.makedirs(destination, exist_ok=True)
  copied = []
  for name, shown in [(report.REPORT_FILE, True), (report.RESULTS_FILE, True), (report.SUMMARY_FILE, True),
                      *plots.items()]:
    target = os.path.join(destination, name)
    if shown:
      shutil.copyfile(os.path.join(workdir, name), target)
      copied.append(name)
    elif os.path.exists(target):
      os.remove(target)
  return copied
