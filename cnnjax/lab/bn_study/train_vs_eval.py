"""Experiment 5: batch statistics vs running averages over training, with momentum 0.9 and 0.99, and
precise BatchNorm (population statistics recomputed at the final weights) vs the running averages.

Runs `experiments/bn_train_vs_eval.py`, which keeps a checkpoint every tenth of
training; at each one it recomputes the population statistics over one pass of
the training data (`probes.precise_batch_stats`) and evaluates the model with
the running averages and with those.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from cnnjax import train
from cnnjax.lab.bn_study import probes, report
from cnnjax.lab.bn_study.plan import FINISHED, Context, Task, TrialPlan, group_record, seed_statistics, train_task

KEY = "train_vs_eval"
EXPERIMENT_FILE = "bn_train_vs_eval.py"
TITLE = "5. Train vs eval: running averages against population statistics (precise BN)"
QUESTION = ("How far do BatchNorm's running averages lag the statistics of the network they are used with, "
            "over training, with momentum 0.9 and 0.99; and does recomputing exact population statistics after "
            "training (precise BN) evaluate better than the running averages?")
# Running and precise points of one checkpoint are drawn this fraction of training apart.
PLOT_STEP_SHIFT = 0.01
POINT_KEYS = ("step", "eval_accuracy_running", "eval_loss_running", "eval_accuracy_precise", "eval_loss_precise",
              "running_mean_gap", "running_var_log_ratio")


def tasks(ctx: Context) -> list[Task]:
  plans = ctx.trials(KEY, EXPERIMENT_FILE)
  return [train_task(ctx, KEY, plan) for plan in plans] + [_precise_task(ctx, plan) for plan in plans]


def _precise_task(ctx: Context, plan: TrialPlan) -> Task:
  def run() -> str:
    if plan.summary() is None:
      return "skipped: its run is missing"
    exp = train.build(plan.config)
    evaluate = probes.Evaluator(exp)
    batches = probes.train_batches(exp, probes.one_pass(exp))
    points = []
    for step in probes.checkpoint_steps(plan.workdir):
      state = probes.load_state(exp, plan.workdir, step)
      precise = probes.precise_batch_stats(exp, state, batches)
      running, recomputed = evaluate(state), evaluate(state, precise)
      points.append({"step": step, "eval_accuracy_running": running["accuracy"], "eval_loss_running": running["loss"],
                     "eval_accuracy_precise": recomputed["accuracy"], "eval_loss_precise": recomputed["loss"],
                     **probes.stat_gap(state.batch_stats, precise, plan.config.model.bn_epsilon)})
    ctx.write_probe(KEY, plan.name, {"points": points, "precise_batches": len(batches)}, plan)
    final = points[-1]
    return (f"final eval accuracy {final['eval_accuracy_running']:.4f} running, "
            f"{final['eval_accuracy_precise']:.4f} precise")

  return Task(KEY, f"{plan.name} (precise BN at every checkpoint)",
              done=lambda: ctx.read_probe(KEY, plan.name, plan) is not None, run=run)


def results(ctx: Context) -> dict[str, Any]:
  """`train_vs_eval`: one point per momentum and checkpoint step, each of POINT_KEYS' measurements the mean
  over the seeds measured there (with `_std`, `_ci95` and `_seeds`, as a group record); `_runs`: the runs
  over seeds per momentum."""
  runs, points = [], []
  for group in ctx.seed_groups(KEY, EXPERIMENT_FILE):
    momentum = group.config.model.bn_momentum
    probes_by_seed = [ctx.read_probe(KEY, plan.name, plan) for plan in group.plans]
    record = {**group_record(group), "bn_momentum": momentum,
              "precise_batches": next((p["precise_batches"] for p in probes_by_seed if p), None),
              "seeds_measured": sum(p is not None for p in probes_by_seed)}
    if record["status"] == FINISHED and None in probes_by_seed:
      record["status"] = "measurement missing"
    runs.append(record)
    by_step: dict[int, list[dict[str, Any]]] = {}
    for probe in probes_by_seed:
      for point in (probe or {}).get("points", []):
        by_step.setdefault(point["step"], []).append(point)
    for step, measured in sorted(by_step.items()):
      point = {"trial": group.name, "bn_momentum": momentum, "step": step, "seeds": len(measured)}
      for key in POINT_KEYS[1:]:
        point.update(seed_statistics(key, [m[key] for m in measured]))
      points.append(point)
  return {KEY: points, f"{KEY}_runs": runs}


def _by_momentum(points: list[dict[str, Any]]) -> dict[float, list[dict[str, Any]]]:
  curves: dict[float, list[dict[str, Any]]] = {}
  for point in points:
    curves.setdefault(point["bn_momentum"], []).append(point)
  return {m: sorted(c, key=lambda p: p["step"]) for m, c in sorted(curves.items())}


def section(results: dict[str, Any], ctx: Context) -> str:
  curves = _by_momentum(results[KEY])
  rows = []
  for run in results[f"{KEY}_runs"]:
    curve = curves.get(run["bn_momentum"], [])
    final = curve[-1] if curve else {}
    mean_gap = float(np.mean([p["running_mean_gap"] for p in curve])) if curve else None
    rows.append([run["bn_momentum"], final.get("step", report.MISSING_TEXT),
                 report.pct_ci(final, "eval_accuracy_running"), report.pct_ci(final, "eval_accuracy_precise"),
                 report.num_ci(final, "eval_loss_running"), report.num_ci(final, "eval_loss_precise"),
                 report.num(final.get("running_mean_gap")), report.num(final.get("running_var_log_ratio")),
                 report.num(mean_gap), f"{run['seeds_measured']} of {len(run['seeds'])}"])
  text = report.table(["momentum", "final step", "eval acc. (running)", "eval acc. (precise)", "eval loss (running)",
                       "eval loss (precise)", "mean gap (stds)", "var log ratio", "mean gap over training", "seeds"],
                      rows)
  passes = next((r["precise_batches"] for r in results[f"{KEY}_runs"] if r["precise_batches"]), None)
  notes = (f"*Precise*: population statistics at the checkpoint's weights, the equal-weight mean of the statistics "
           f"each BatchNorm layer normalizes with over {passes if passes else report.MISSING_TEXT} training batches "
           "(one pass over the training data). *Mean gap*: mean over layers and channels of |running mean - "
           "population mean| / population std; *var log ratio*: mean |log(running var / population var)|. Every "
           "number is the mean over the seeds (accuracies and losses ± the half-width of the 95% interval); every "
           "checkpoint's numbers are in results.json and the plot.")
  return report.section(TITLE, QUESTION, text, _plot(curves, ctx), reading(curves, results[f"{KEY}_runs"]), notes)


def _plot(curves: dict[float, list[dict[str, Any]]], ctx: Context) -> str | None:
  if not curves:
    return None
  fig, (accuracy_axis, gap_axis) = report.figure(2, "Running averages vs population statistics over training "
                                                    "(mean and 95% interval over seeds)")
  for index, (momentum, curve) in enumerate(curves.items()):
    # Running and precise points of one checkpoint sit a little apart so that neither hides the other.
    shift = PLOT_STEP_SHIFT * (curve[-1]["step"] if curve else 0)
    steps = [p["step"] + shift * (2 * index - 1) for p in curve]
    color = f"C{index}"
    report.error_bars(accuracy_axis, [s - shift / 2 for s in steps], curve, "eval_accuracy_running",
                      report.PERCENT, fmt="o-", color=color, label=f"running, momentum {momentum}")
    report.error_bars(accuracy_axis, [s + shift / 2 for s in steps], curve, "eval_accuracy_precise",
                      report.PERCENT, fmt="s--", color=color, label=f"precise, momentum {momentum}")
    gap_axis.plot([p["step"] for p in curve], [p["running_mean_gap"] for p in curve], "o-", color=color,
                  label=f"momentum {momentum}")
  accuracy_axis.set_xlabel("step")
  accuracy_axis.set_ylabel("eval accuracy (%)")
  accuracy_axis.legend(fontsize=7)
  gap_axis.set_yscale("log")
  gap_axis.set_xlabel("step")
  gap_axis.set_ylabel("|running - population mean| (stds)")
  gap_axis.legend()
  return report.save(fig, os.path.join(ctx.workdir, f"{KEY}.png"))


def reading(curves: dict[float, list[dict[str, Any]]], runs: list[dict[str, Any]]) -> str:
  """What the numbers say, computed from them; running vs precise is compared seed by seed."""
  missing_sentence = report.unfinished(runs)
  if not curves:
    return " ".join(["No run of this experiment has been measured yet."] + missing_sentence)
  sentences = []
  mean_gaps = {m: float(np.mean([p["running_mean_gap"] for p in c])) for m, c in curves.items()}
  for momentum, curve in curves.items():
    final, worst = curve[-1], max(curve, key=lambda p: p["running_mean_gap"])
    sentences.append(
        f"Momentum {momentum} (running averages over roughly the last {round(1 / (1 - momentum))} steps): the "
        f"running means were {report.num(mean_gaps[momentum])} population stds off on average over the "
        f"{len(curve)} checkpoints, most ({report.num(worst['running_mean_gap'])}) at step {worst['step']}; at "
        f"step {final['step']} eval accuracy was {report.pct_ci(final, 'eval_accuracy_running')} with the running "
        f"averages and {report.pct_ci(final, 'eval_accuracy_precise')} with precise statistics (precise minus "
        f"running: {_paired(final, 'eval_accuracy')}; eval loss {_paired(final, 'eval_loss')}).")
    beyond = [p["step"] for p in curve if report.paired_beyond_seeds(p.get("eval_accuracy_precise_seeds") or [],
                                                                     p.get("eval_accuracy_running_seeds") or [])]
    if beyond:
      sentences.append(f"Precise and running statistics differed in accuracy beyond the seed spread at steps "
                       f"{', '.join(map(str, beyond))} of momentum {momentum}.")
    else:
      sentences.append(f"At no checkpoint of momentum {momentum} did precise and running statistics differ in "
                       "accuracy beyond the seed spread.")
  if len(mean_gaps) >= 2:
    (low_m, low_gap), (high_m, high_gap) = min(mean_gaps.items()), max(mean_gaps.items())
    relation = "more" if high_gap > low_gap else "less" if high_gap < low_gap else "as much"
    sentences.append(f"The slower average (momentum {high_m}) lagged the network {relation} than momentum {low_m} "
                     f"({report.num(high_gap)} against {report.num(low_gap)} stds, averaged over training and "
                     "seeds).")
  return " ".join(sentences + missing_sentence)


def _paired(point: dict[str, Any], metric: str) -> str:
  """Precise minus running of one checkpoint's metric, seed by seed."""
  return report.compared_paired(point.get(f"{metric}_precise_seeds") or [], point.get(f"{metric}_running_seeds") or [],
                                metric)


def summary(results: dict[str, Any]) -> str:
  """The README's bullet: how far the running averages lag, and running vs precise at the end."""
  curves = _by_momentum(results[KEY])
  parts = []
  for momentum, curve in curves.items():
    final, mean_gap = curve[-1], float(np.mean([p["running_mean_gap"] for p in curve]))
    parts.append(f"momentum {momentum}: running means {report.num(mean_gap)} population stds off on average "
                 f"over training; at the end {report.pct_ci(final, 'eval_accuracy_running')} with "
                 f"running averages, {report.pct_ci(final, 'eval_accuracy_precise')} with precise BN (precise minus "
                 f"running: {_paired(final, 'eval_accuracy')})")
  return "**Train vs eval** (over seeds): " + ("; ".join(parts) if parts else "no checkpoint measured") + "."
