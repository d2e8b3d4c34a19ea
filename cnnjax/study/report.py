"""The study's outputs: results.json (every number), report.md (a section per experiment) and the plots.

Everything here reads files the runs and measurements wrote; nothing trains. A
run or measurement that is not there is `null` in results.json and "missing" in
the report, and a sentence of a reading that needs it says so, so that a
partial study (interrupted, or run with `--only`) still reports honestly what
it has. The formatting helpers below are what every experiment's section uses,
so that a missing number reads the same everywhere.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
from typing import Any, Sequence

import jax

from cnnjax import metrics as metrics_lib
from cnnjax.study.plan import FINISHED, MISSING, Context
from cnnjax.sweep.results import CONFIDENCE_QUANTILE

RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
MISSING_TEXT = "missing"
NOT_APPLICABLE_TEXT = "n/a"
PLOT_DPI = 100
PANEL_INCHES = (5.0, 3.8)  # one panel of a figure: width, height
SIGNIFICANT_DIGITS = 3
PERCENT = 100.0  # accuracies are fractions; tables and plots show percentages
ERROR_CAP = 3  # points: the caps of error bars


# -- formatting ----------------------------------------------------------------------------------

def present(*values: Any) -> bool:
  """Whether every value was measured (not None, not NaN)."""
  return all(v is not None and not (isinstance(v, float) and math.isnan(v)) for v in values)


def pct(value: float | None) -> str:
  """An accuracy as a percentage with two decimals, or 'missing'."""
  return f"{PERCENT * value:.2f}%" if present(value) else MISSING_TEXT


def num(value: float | None, digits: int = SIGNIFICANT_DIGITS) -> str:
  """A number to `digits` significant digits (0 shown as 0), or 'missing'."""
  if not present(value):
    return MISSING_TEXT
  return "0" if value == 0 else f"{value:.{digits}g}"


def points(difference: float | None) -> str:
  """An accuracy difference in percentage points, signed."""
  return f"{PERCENT * difference:+.2f} points" if present(difference) else MISSING_TEXT


def examples(difference: float | None, eval_examples: int | None) -> str:
  """An accuracy difference as a count of eval examples, e.g. '3 of 360 test examples'."""
  if not present(difference, eval_examples):
    return f"{MISSING_TEXT} test examples"
  return f"{round(abs(difference) * eval_examples)} of {eval_examples} test examples"


def change(first: float | None, last: float | None, formatter=pct) -> str:
  """'rose from A to B', 'fell from A to B' or 'stayed at A', compared as shown (so never 'rose from
  99.17% to 99.17%'); 'missing' phrases when either is."""
  if not present(first, last):
    return f"went from {formatter(first)} to {formatter(last)}"
  shown_first, shown_last = formatter(first), formatter(last)
  if shown_first == shown_last:
    return f"stayed at {shown_first}"
  return f"{'rose' if last > first else 'fell'} from {shown_first} to {shown_last}"


def monotone(values: Sequence[float]) -> str | None:
  """'never falling' / 'never rising' when every step goes one way (ties allowed), else None."""
  pairs = list(zip(values, values[1:]))
  if len(values) < 2:
    return None
  if all(b >= a for a, b in pairs):
    return "never falling"
  if all(b <= a for a, b in pairs):
    return "never rising"
  return None


# -- seeds -----------------------------------------------------------------------------------------
# Every configuration runs with several seeds (`cnnjax.study.plan.group_record`): a record's metric is the
# mean over them, with `<metric>_std`, `<metric>_ci95` (the 95% interval's half-width) and `<metric>_seeds`.
# Two configurations differ *beyond the seed spread* when the 95% interval of the difference of their means
# (Welch's t) excludes 0; anything else is no evidence of an effect, and the readings say so.

def pct_ci(record: dict[str, Any], metric: str) -> str:
  """A mean accuracy with its 95% interval, e.g. '95.20% ± 0.35'; without one when fewer than two seeds."""
  half_width = record.get(f"{metric}_ci95")
  if not present(record.get(metric)) or not present(half_width):
    return pct(record.get(metric))
  return f"{pct(record[metric])} ± {PERCENT * half_width:.2f}"


def num_ci(record: dict[str, Any], metric: str) -> str:
  """A mean loss with its 95% interval, e.g. '0.183 ± 0.012'."""
  half_width = record.get(f"{metric}_ci95")
  if not present(record.get(metric)) or not present(half_width):
    return num(record.get(metric))
  return f"{num(record[metric])} ± {num(half_width, 2)}"


def difference_interval(a: dict[str, Any], b: dict[str, Any], metric: str) -> tuple[float, float] | None:
  """(mean of a - mean of b, half-width of its 95% interval by Welch's t), or None without two finished seeds
  on each side."""
  values_a, values_b = a.get(f"{metric}_seeds") or [], b.get(f"{metric}_seeds") or []
  if len(values_a) < 2 or len(values_b) < 2:
    return None
  import scipy.stats  # pylint: disable=import-outside-toplevel  (only reports need it)
  variance_a = statistics.variance(values_a) / len(values_a)
  variance_b = statistics.variance(values_b) / len(values_b)
  difference = statistics.fmean(values_a) - statistics.fmean(values_b)
  if variance_a + variance_b == 0:
    return difference, 0.0
  freedom = (variance_a + variance_b) ** 2 / (variance_a ** 2 / (len(values_a) - 1)
                                              + variance_b ** 2 / (len(values_b) - 1))
  return difference, float(scipy.stats.t.ppf(CONFIDENCE_QUANTILE, freedom) * math.sqrt(variance_a + variance_b))


def beyond_seeds(a: dict[str, Any], b: dict[str, Any], metric: str = "eval_accuracy") -> bool | None:
  """Whether a and b differ beyond the seed spread (None: not enough seeds to say)."""
  interval = difference_interval(a, b, metric)
  return None if interval is None else abs(interval[0]) > interval[1]


def compared(a: dict[str, Any], b: dict[str, Any], metric: str = "eval_accuracy") -> str:
  """'+1.20 points (95% interval +0.80 to +1.60): beyond the seed spread', or 'within the seed spread'."""
  interval = difference_interval(a, b, metric)
  if interval is None:
    return "not comparable with the seed spread (fewer than two finished seeds)"
  difference, half_width = interval
  scale, unit = (PERCENT, " points") if "accuracy" in metric or "gap" in metric else (1.0, "")
  where = "beyond" if abs(difference) > half_width else "within"
  return (f"{scale * difference:+.2f}{unit} (95% interval {scale * (difference - half_width):+.2f} to "
          f"{scale * (difference + half_width):+.2f}): {where} the seed spread")


def seed_spread(results: dict[str, Any]) -> tuple[float, int, int] | None:
  """(median over configurations of the seed-to-seed standard deviation of eval accuracy, configurations,
  most seeds per configuration) over every seeded record of the study; None before any has two seeds."""
  stds, seeds = [], 0
  for records in results.values():
    for record in records if isinstance(records, list) else []:
      if isinstance(record, dict) and present(record.get("eval_accuracy_std")):
        stds.append(record["eval_accuracy_std"])
        seeds = max(seeds, len(record.get("eval_accuracy_seeds") or []))
  return (statistics.median(stds), len(stds), seeds) if stds else None


def unfinished(records: Sequence[dict[str, Any]]) -> list[str]:
  """'Missing: a, b (diverged).' for the records whose run or measurement is not finished; [] if none."""
  names = [r["trial"] if r["status"] == MISSING else f"{r['trial']} ({r['status']})"
           for r in records if r["status"] != FINISHED]
  return [f"Missing: {', '.join(names)}."] if names else []


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
  return "\n".join(lines)


def section(title: str, question: str, table_text: str, plot_file: str | None, reading: str,
            notes: str = "") -> str:
  """One experiment's part of report.md: the question, the table, the plot and the reading."""
  parts = [f"## {title}", "", f"**Question.** {question}", "", table_text, ""]
  if notes:
    parts += [notes, ""]
  parts += [f"![{title}]({plot_file})" if plot_file else "*(no plot: no finished runs yet)*", ""]
  parts += [f"**Reading.** {reading}", ""]
  return "\n".join(parts)


# -- plots ---------------------------------------------------------------------------------------

def figure(columns: int, title: str) -> tuple[Any, Any]:
  """A row of `columns` panels (matplotlib without a display); the axes as a list."""
  import matplotlib  # pylint: disable=import-outside-toplevel  (only reports need it)
  matplotlib.use("Agg")
  from matplotlib import pyplot  # pylint: disable=import-outside-toplevel
  fig, axes = pyplot.subplots(1, columns, figsize=(PANEL_INCHES[0] * columns, PANEL_INCHES[1]), squeeze=False)
  fig.suptitle(title)
  return fig, list(axes[0])


def error_bars(axis: Any, xs: Sequence[float], records: Sequence[dict[str, Any]], metric: str, scale: float = 1.0,
               **style: Any) -> None:
  """Means over seeds with their 95% intervals as error bars (none where a record has fewer than two seeds)."""
  means = [scale * r[metric] for r in records]
  errors = [scale * (r.get(f"{metric}_ci95") or 0.0) for r in records]
  axis.errorbar(xs, means, yerr=errors, capsize=ERROR_CAP, **style)


def powers_of_two(panels: Sequence[tuple[Any, str]], xlabel: str, *, legend: bool = True) -> None:
  """Labels each (axis, y label) panel over an x axis of powers of two (devices, batch sizes)."""
  for axis, ylabel in panels:
    axis.set_xscale("log", base=2)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    if legend:
      axis.legend()


def save(fig: Any, path: str) -> str:
  """Writes the figure as PNG; returns the file name relative to the report."""
  from matplotlib import pyplot  # pylint: disable=import-outside-toplevel
  fig.tight_layout()
  fig.savefig(path, dpi=PLOT_DPI)
  pyplot.close(fig)
  return os.path.basename(path)


# -- the whole report ----------------------------------------------------------------------------

def machine() -> dict[str, Any]:
  """Where the numbers were measured."""
  devices = jax.devices()
  return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
          "cpu_count": os.cpu_count(), "device_kind": devices[0].device_kind, "device_count": len(devices),
          "jax_version": jax.__version__}


def write_report(ctx: Context, experiments: Sequence[Any], run_info: dict[str, Any]) -> dict[str, Any]:
  """Writes results.json, report.md and each experiment's plot into the study's workdir; returns the
  results. `experiments` are the study's experiment modules (see `cnnjax.study.study`)."""
  os.makedirs(ctx.workdir, exist_ok=True)
  results: dict[str, Any] = {}
  for experiment in experiments:
    results.update(experiment.results(ctx))
  header = {"scale": ctx.scale.name, "machine": machine(), "written": datetime.datetime.now().isoformat(
      timespec="seconds"), **run_info}
  sections = [experiment.section(results, ctx) for experiment in experiments]
  results = {"study": header, **results}
  metrics_lib.write_json(os.path.join(ctx.workdir, RESULTS_FILE), results)
  with open(os.path.join(ctx.workdir, REPORT_FILE), "w") as f:
    f.write(_preamble(header, results) + "\n".join(sections))
  return results


def missing_runs(results: dict[str, Any]) -> list[str]:
  """Every record in results.json whose run or measurement is missing, as 'experiment/trial'."""
  missing = []
  for key, records in results.items():
    if isinstance(records, list):
      missing += [f"{key}/{r.get('trial', r.get('mode'))}" for r in records
                  if isinstance(r, dict) and r.get("status", "finished") != "finished"]
  return missing


def _preamble(header: dict[str, Any], results: dict[str, Any]) -> str:
  host = header["machine"]
  missing = missing_runs(results)
  lines = ["# The BatchNorm study", "",
           f"Scale `{header['scale']}`; measured on {host['cpu_count']} CPU cores ({host['processor']}), "
           f"{host['device_count']} {host['device_kind']} devices, JAX {host['jax_version']}; written "
           f"{header['written']}.",
           "Every number below comes from a run or measurement in this directory (all of them in "
           f"`{RESULTS_FILE}`); a run that is not there shows as *{MISSING_TEXT}*. Accuracies are on the "
           "eval split. Every accuracy and loss is a mean over seeds (each configuration trained with "
           "several seeds and nothing else changed), shown as mean ± the half-width of its 95% interval "
           "(Student's t), and the plots show that interval as error bars. Measurements of invariants "
           "(divergences, leakage, equality of runs) read one seed.", ""]
  spread = seed_spread(results)
  if spread is not None:
    lines += [f"Seed-to-seed variation: the standard deviation of eval accuracy over seeds has a median of "
              f"{PERCENT * spread[0]:.2f} points over {spread[1]} configurations (up to {spread[2]} seeds each). "
              "A difference between two configurations counts as a finding only when the 95% interval of the "
              "difference of their means (Welch's t) excludes 0, *beyond the seed spread*; the readings say "
              "which differences are, and call the others *within the seed spread*.", ""]
  if missing:
    lines += [f"**{len(missing)} runs or measurements are missing**: {', '.join(missing)}.", ""]
  if header.get("wall_seconds") is not None:
    lines += [f"This invocation: {header['tasks_run']} of {header['tasks_total']} runs and measurements done "
              f"now, {header['wall_seconds']:.0f} s wall.", ""]
  return "\n".join(lines) + "\n"


def read_results(workdir: str) -> dict[str, Any] | None:
  path = os.path.join(workdir, RESULTS_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)
