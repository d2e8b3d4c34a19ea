"""Summarizing a sweep: results.csv and results.md (one row per trial, the best marked) and plots.

Rows come from each trial's own run directory (`summary.json`, `error.json`,
`failure.json`), so the tables can be rebuilt at any time, also for trials that
ran elsewhere (for example a cluster running the commands of
`--print_commands`). The best trial is the finished one with the highest
`metric`, or the lowest for losses; when a finished trial lacks the metric, it
is shown as missing and no trial is called best, since that one might be.
Failed and diverged trials carry their one-line reason. When seeds are
swept, results.md adds the mean and spread over seeds of every other
combination, and each swept key other than a seed gets a plot of the metric
against it: one series per combination of the other swept keys (never an
average over them), lines for numeric keys and points for categorical ones,
each mean with its 95% interval over seeds, every trial a faint dot.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import math
import os
import re
import statistics
from typing import Any, Sequence

import ml_collections

from cnnjax.errors import CheckpointError, ConfigError
from cnnjax.sweep.declare import Trial, apply_overrides
from cnnjax.train.rundir import CONFIG_FILE, DIVERGED, FAILED, FINISHED, INCOMPLETE, NOT_STARTED, SUMMARY_FILE, RunDir

CSV_FILE = "results.csv"
MARKDOWN_FILE = "results.md"
# Metrics a sweep can be ranked by: every run's summary has them.
METRICS = ("eval_accuracy", "eval_loss", "train_accuracy", "train_loss")
# Summary values shown for every trial, after its overrides.
SUMMARY_COLUMNS = ("eval_accuracy", "eval_loss", "train_accuracy", "train_loss", "step", "wall_seconds",
                   "examples_per_second", "strategy", "num_devices")
# A numeric axis is drawn logarithmic when its positive values span at least this ratio.
LOG_AXIS_RATIO = 10.0
PLOT_SIZE_INCHES = (5.0, 3.5)
PLOT_DPI = 100
# Series of one plot sit this far apart along x: a fraction of a category's slot or of the numeric span,
# or a factor on a log axis; enough to tell equal series apart, too little to suggest another x value.
SERIES_OFFSET = 0.04
LOG_SERIES_OFFSET = 1.04
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
COLOR_CYCLE = 10  # matplotlib's default colours C0..C9
ERROR_CAP = 3  # points
TRIAL_DOT_SIZE = 10  # points^2
TRIAL_DOT_ALPHA = 0.35
CONFIDENCE_QUANTILE = 0.975  # two-sided 95% intervals: Student's t at 0.975
MISSING = "missing"  # a finished trial's metric that its summary lacks
__all__ = ["DIVERGED", "FAILED", "FINISHED", "INCOMPLETE", "MISSING", "NOT_STARTED", "Row", "best_row",
           "check_trial_dirs", "read_rows", "write_results"]


@dataclasses.dataclass
class Row:
  """One trial in the tables: what it overrides, how it ended, its summary, and why it failed."""

  trial: Trial
  status: str
  summary: dict[str, Any] | None
  reason: str = ""  # failed or diverged: the one-line reason


def check_metric(metric: str) -> None:
  if metric not in METRICS:
    raise ConfigError(f"--metric={metric} is unknown; rank trials by one of {', '.join(METRICS)}")


def lower_is_better(metric: str) -> bool:
  return metric.endswith("loss")


def read_row(trial: Trial, trial_dir: str) -> Row:
  """A trial's row from its directory: finished, diverged, failed, incomplete or not started."""
  rundir = RunDir(trial_dir)
  status = rundir.status(require_config=False)
  reason = ""
  if status == DIVERGED:
    reason = (rundir.error() or {}).get("error", "")
  elif status == FAILED:
    reason = (rundir.failure() or {}).get("reason", "")
  return Row(trial, status, rundir.summary() if status == FINISHED else None, reason)


def check_trial_dirs(base_config: ml_collections.ConfigDict, trials: Sequence[Trial], workdir: str) -> None:
  """CheckpointError naming the first trial whose directory holds a run of another config (another trial's
  run copied there, or the sweep's config changed since), or a summary without the config.json that says
  whose run it is: a summary would list it as this trial's result. The sweep makes the same checks before
  training (and counts no summary without its config.json as finished), so that `--summarize_only` trusts
  no more than a sweep."""
  for trial in trials:
    trial_dir = os.path.join(workdir, trial.name)
    if os.path.exists(os.path.join(trial_dir, SUMMARY_FILE)) and not os.path.exists(os.path.join(trial_dir,
                                                                                                 CONFIG_FILE)):
      raise CheckpointError(f"trial {trial.name!r}: {trial_dir} holds a {SUMMARY_FILE} without the {CONFIG_FILE} "
                            "that says whose run it is; rerun the sweep (it resumes the trial from checkpoints "
                            "whose fingerprints it checks) or move that directory aside")
    differences = RunDir(trial_dir, is_writer=False).config_differences(apply_overrides(base_config, trial))
    if differences:
      raise CheckpointError(f"trial {trial.name!r}: {trial_dir} holds a run of another config ({differences}), "
                            "which a summary would list as this trial's result; move that directory aside (or "
                            "summarize with the config it was trained with) and rerun")


def read_rows(trials: Sequence[Trial], workdir: str) -> list[Row]:
  return [read_row(trial, os.path.join(workdir, trial.name)) for trial in trials]


def missing_metric(rows: Sequence[Row], metric: str) -> list[Row]:
  """Finished trials whose summary lacks a finite `metric`."""
  return [r for r in rows if r.summary is not None and not _finite(r.summary.get(metric))]


def best_row(rows: Sequence[Row], metric: str) -> Row | None:
  """The finished trial with the best `metric`; ties (accuracies on small eval sets often tie) go to the
  lower eval loss, or for a loss metric to the higher eval accuracy, then to declaration order.

  None when no trial finished, or when a finished trial lacks the metric: it could be the best.
  """
  scored = [r for r in rows if r.summary is not None and _finite(r.summary.get(metric))]
  if not scored or missing_metric(rows, metric):
    return None
  sign = 1.0 if lower_is_better(metric) else -1.0
  tie_break = "eval_accuracy" if lower_is_better(metric) else "eval_loss"

  def rank(row: Row) -> tuple[float, float]:
    second = row.summary.get(tie_break)
    second = second if _finite(second) else -sign * math.inf  # a missing value ranks last
    return sign * row.summary[metric], (-sign) * second

  return min(scored, key=rank)


def _finite(value: Any) -> bool:
  return isinstance(value, (int, float)) and math.isfinite(value)


def swept_keys(rows: Sequence[Row]) -> list[str]:
  """Every key any trial overrides, in order of first appearance."""
  return list(dict.fromkeys(key for row in rows for key in row.trial.overrides))


def _is_seed(key: str) -> bool:
  return key.split(".")[-1] == "seed"


def write_results(workdir: str, trials: Sequence[Trial], metric: str = "eval_accuracy") -> dict[str, Any]:
  """Writes results.csv, results.md and the plots into `workdir`; returns their paths and the best trial."""
  check_metric(metric)
  rows = read_rows(trials, workdir)
  best = best_row(rows, metric)
  keys = swept_keys(rows)
  csv_path = os.path.join(workdir, CSV_FILE)
  with open(csv_path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["trial", *keys, "status", *SUMMARY_COLUMNS, "best", "reason"])
    for row in rows:
      writer.writerow([row.trial.name, *(_cell(row.trial.overrides.get(k, "")) for k in keys), row.status,
                       *(_summary_cell(row, c) for c in SUMMARY_COLUMNS), row is best, row.reason])
  plots = write_plots(workdir, rows, keys, metric)
  markdown_path = os.path.join(workdir, MARKDOWN_FILE)
  with open(markdown_path, "w") as f:
    f.write(_markdown(os.path.basename(os.path.abspath(workdir)), rows, keys, metric, best, plots))
  return {"csv": csv_path, "markdown": markdown_path, "plots": plots,
          "best": best.trial.name if best is not None else None,
          "missing": [r.trial.name for r in missing_metric(rows, metric)],
          "failed": [r for r in rows if r.status == FAILED]}


def _summary_cell(row: Row, key: str) -> Any:
  """A summary value for the tables: '' for trials without a summary, 'missing' for a finished trial's
  absent value."""
  if row.summary is None:
    return ""
  value = row.summary.get(key)
  return MISSING if value is None else value


def _cell(value: Any) -> str:
  return str(tuple(value)) if isinstance(value, (tuple, list)) else str(value)


def _number(value: Any, key: str) -> str:
  if value is None or value == "" or value == MISSING:
    return value or ""
  if isinstance(value, float):
    return f"{value:.4f}" if key.endswith(("accuracy", "loss")) else f"{value:.4g}"
  return str(value)


def _markdown(title: str, rows: Sequence[Row], keys: Sequence[str], metric: str, best: Row | None,
              plots: Sequence[str]) -> str:
  counts = collections.Counter(row.status for row in rows)
  direction = "lower" if lower_is_better(metric) else "higher"
  missing = missing_metric(rows, metric)
  if best is not None:
    verdict = f"**{best.trial.name}** ({best.summary[metric]:.4f})."
  elif missing:
    verdict = (f"none: {', '.join(r.trial.name for r in missing)} finished without {metric} (shown as "
               f"{MISSING}), so no trial can be called best; rerun the sweep to complete its summary.")
  else:
    verdict = "none finished yet."
  lines = [f"# Sweep results: {title}", "",
           f"{len(rows)} trials: " + ", ".join(f"{n} {status}" for status, n in counts.items()) + ".",
           f"Best by {metric} ({direction} is better): {verdict}", ""]
  shown = ("eval_accuracy", "eval_loss", "train_loss", "step", "wall_seconds")
  lines += _table(["", "trial", *keys, "status", *shown, "reason"],
                  [["**best**" if row is best else "", row.trial.name,
                    *(_cell(row.trial.overrides.get(k, "")) for k in keys), row.status,
                    *(_number(_summary_cell(row, c), c) for c in shown), row.reason.replace("|", "/")]
                   for row in rows])
  seed_keys = [k for k in keys if _is_seed(k)]
  if seed_keys:
    lines += ["", f"## {metric} over seeds", ""]
    lines += _table([*[k for k in keys if not _is_seed(k)], "finished trials", "mean", "std", "min", "max"],
                    _over_seeds(rows, keys, metric))
  if plots:
    lines += ["", "## Plots", ""] + [f"![{os.path.splitext(p)[0]}]({p})" for p in plots]
  return "\n".join(lines) + "\n"


def _table(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
  return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
          + ["| " + " | ".join(cells) + " |" for cells in body])


def _over_seeds(rows: Sequence[Row], keys: Sequence[str], metric: str) -> list[list[str]]:
  others = [k for k in keys if not _is_seed(k)]
  groups: dict[tuple[str, ...], list[float]] = {}
  for row in rows:
    values = groups.setdefault(tuple(_cell(row.trial.overrides.get(k, "")) for k in others), [])
    if row.summary is not None and _finite(row.summary.get(metric)):
      values.append(float(row.summary[metric]))
  body = []
  for combination, values in groups.items():
    stats = ([f"{statistics.fmean(values):.4f}", f"{statistics.stdev(values):.4f}" if len(values) > 1 else "",
              f"{min(values):.4f}", f"{max(values):.4f}"] if values else ["", "", "", ""])
    body.append([*combination, str(len(values)), *stats])
  return body


@dataclasses.dataclass(frozen=True)
class Point:
  """One x value of a plotted series: the metric's mean over the trials there (its seeds), the half-width
  of the mean's 95% interval (0 with one trial), and every trial's value."""

  x: Any
  mean: float
  half_width: float
  values: tuple[float, ...]


def mean_interval(values: Sequence[float]) -> tuple[float, float | None, float | None]:
  """(mean, sample standard deviation, half-width of the mean's 95% interval by Student's t); the spread
  and interval are None with fewer than two values."""
  mean = statistics.fmean(values)
  if len(values) < 2:
    return mean, None, None
  import scipy.stats  # pylint: disable=import-outside-toplevel  (only summaries need it)
  std = statistics.stdev(values)
  return mean, std, float(scipy.stats.t.ppf(CONFIDENCE_QUANTILE, len(values) - 1) * std / math.sqrt(len(values)))


def plot_series(rows: Sequence[Row], key: str, keys: Sequence[str], metric: str) -> dict[str, list[Point]]:
  """What the plot of `metric` against `key` draws: one series per combination of the other swept keys
  (seeds aside), labelled by it ('all trials' when nothing else is swept), each a Point per value of
  `key`, in order of appearance. Trials that do not set `key` are not in it."""
  others = [k for k in keys if k != key and not _is_seed(k)]
  series: dict[str, dict[str, list[Any]]] = {}
  for row in rows:
    if key not in row.trial.overrides or row.summary is None or not _finite(row.summary.get(metric)):
      continue
    label = ", ".join(f"{k.split('.')[-1]}={_cell(row.trial.overrides[k])}" for k in others
                      if k in row.trial.overrides) or "all trials"
    value = row.trial.overrides[key]
    entry = series.setdefault(label, {}).setdefault(_cell(value), [value, []])
    entry[1].append(float(row.summary[metric]))
  result = {}
  for label, by_value in series.items():
    points = []
    for value, values in by_value.values():
      mean, _, half_width = mean_interval(values)
      points.append(Point(value, mean, half_width or 0.0, tuple(values)))
    result[label] = points
  return result


def _numeric(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def write_plots(workdir: str, rows: Sequence[Row], keys: Sequence[str], metric: str) -> list[str]:
  """One PNG per swept key (seeds aside) with at least two values among finished trials; file names.

  Nothing is averaged over the other swept keys: each combination of them is
  its own series, in its own colour and marker. A numeric key draws lines
  through the means; a categorical one (strings, booleans) draws points only,
  since its order means nothing. Series sit slightly apart along x so that
  equal ones stay visible; each mean carries its 95% interval over seeds as an
  error bar, and every trial is a faint dot.
  """
  import matplotlib  # pylint: disable=import-outside-toplevel  (only summaries need it)
  matplotlib.use("Agg")
  from matplotlib import pyplot  # pylint: disable=import-outside-toplevel
  names = []
  for key in keys:
    if _is_seed(key):
      continue
    series = plot_series(rows, key, keys, metric)
    distinct = list(dict.fromkeys(_cell(p.x) for points in series.values() for p in points))
    if len(distinct) < 2:
      continue
    numeric = all(_numeric(p.x) for points in series.values() for p in points)
    xs_all = [float(p.x) for points in series.values() for p in points] if numeric else []
    log_axis = numeric and min(xs_all) > 0 and max(xs_all) / min(xs_all) >= LOG_AXIS_RATIO
    figure, axes = pyplot.subplots(figsize=PLOT_SIZE_INCHES)
    for index, (label, points) in enumerate(series.items()):
      shift = (index - (len(series) - 1) / 2) * SERIES_OFFSET
      if not numeric:
        xs = [distinct.index(_cell(p.x)) + shift for p in points]
      elif log_axis:
        xs = [float(p.x) * LOG_SERIES_OFFSET ** (index - (len(series) - 1) / 2) for p in points]
      else:
        span = (max(xs_all) - min(xs_all)) or 1.0
        xs = [float(p.x) + shift * span for p in points]
      color, marker = f"C{index % COLOR_CYCLE}", MARKERS[index % len(MARKERS)]
      seeds = max(len(p.values) for p in points)
      for x, p in zip(xs, points):
        axes.scatter([x] * len(p.values), p.values, s=TRIAL_DOT_SIZE, color=color, alpha=TRIAL_DOT_ALPHA)
      axes.errorbar(xs, [p.mean for p in points], yerr=[p.half_width for p in points], color=color, marker=marker,
                    linestyle="-" if numeric else "none", capsize=ERROR_CAP,
                    label=f"{label} ({seeds} seed{'s' if seeds > 1 else ''})")
    if log_axis:
      axes.set_xscale("log")
    if not numeric:
      axes.set_xticks(range(len(distinct)), distinct)
    axes.set_xlabel(key)
    axes.set_ylabel(metric)
    axes.set_title(f"{metric} vs {key}", fontsize="medium")
    axes.legend(fontsize="x-small", title="mean, 95% interval; dots: trials", title_fontsize="x-small")
    figure.tight_layout()
    name = re.sub(r"[^A-Za-z0-9._-]", "_", f"plot_{metric}_vs_{key}.png")
    figure.savefig(os.path.join(workdir, name), dpi=PLOT_DPI)
    pyplot.close(figure)
    names.append(name)
  return names
