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
from cnnjax.study import probes, report
from cnnjax.study.plan import FINISHED, Context, Task, TrialPlan, run_record, train_task

KEY = "train_vs_eval"
EXPERIMENT_FILE = "bn_train_vs_eval.py"
TITLE = "5. Train vs eval: running averages against population statistics (precise BN)"
QUESTION = ("How far do BatchNorm's running averages lag the statistics of the network they are used with, "
            "over training, with momentum 0.9 and 0.99; and does recomputing exact population statistics after "
            "training (precise BN) evaluate better than the running averages?")
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
  runs, points = [], []
  for plan in ctx.trials(KEY, EXPERIMENT_FILE):
    probe = ctx.read_probe(KEY, plan.name, plan)
    record = {**run_record(plan), "bn_momentum": plan.config.model.bn_momentum,
              "precise_batches": (probe or {}).get("precise_batches")}
    if record["status"] == FINISHED and probe is None:
      record["status"] = "measurement missing"
    runs.append(record)
    for point in (probe or {}).get("points", []):
      points.append({"trial": plan.name, "bn_momentum": plan.config.model.bn_momentum,
                     **{key: point[key] for key in POINT_KEYS}})
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
                 report.pct(final.get("eval_accuracy_running")), report.pct(final.get("eval_accuracy_precise")),
                 report.num(final.get("eval_loss_running")), report.num(final.get("eval_loss_precise")),
                 report.num(final.get("running_mean_gap")), report.num(final.get("running_var_log_ratio")),
                 report.num(mean_gap)])
  text = report.table(["momentum", "final step", "eval acc. (running)", "eval acc. (precise)", "eval loss (running)",
                       "eval loss (precise)", "mean gap (stds)", "var log ratio", "mean gap over training"], rows)
  passes = next((r["precise_batches"] for r in results[f"{KEY}_runs"] if r["precise_batches"]), None)
  notes = (f"*Precise*: population statistics at the checkpoint's weights, the equal-weight mean of the statistics "
           f"each BatchNorm layer normalizes with over {passes if passes else report.MISSING_TEXT} training batches "
           "(one pass over the training data). *Mean gap*: mean over layers and channels of |running mean - "
           "population mean| / population std; *var log ratio*: mean |log(running var / population var)|. "
           "Every checkpoint's numbers are in results.json and the plot.")
  return report.section(TITLE, QUESTION, text, _plot(curves, ctx), reading(curves, results[f"{KEY}_runs"]), notes)


def _plot(curves: dict[float, list[dict[str, Any]]], ctx: Context) -> str | None:
  if not curves:
    return None
  fig, (accuracy_axis, gap_axis) = report.figure(2, "Running averages vs population statistics over training")
  for momentum, curve in curves.items():
    steps = [p["step"] for p in curve]
    line, = accuracy_axis.plot(steps, [report.PERCENT * p["eval_accuracy_running"] for p in curve], "o-",
                               label=f"running, momentum {momentum}")
    accuracy_axis.plot(steps, [report.PERCENT * p["eval_accuracy_precise"] for p in curve], "s--",
                       color=line.get_color(), label=f"precise, momentum {momentum}")
    gap_axis.plot(steps, [p["running_mean_gap"] for p in curve], "o-", label=f"momentum {momentum}")
  accuracy_axis.set_xlabel("step")
  accuracy_axis.set_ylabel("eval accuracy (%)")
  accuracy_axis.legend(fontsize=7)
  gap_axis.set_yscale("log")
  gap_axis.set_xlabel("step")
  gap_axis.set_ylabel("|running - population mean| (stds)")
  gap_axis.legend()
  return report.save(fig, os.path.join(ctx.workdir, f"{KEY}.png"))


def reading(curves: dict[float, list[dict[str, Any]]], runs: list[dict[str, Any]]) -> str:
  """What the numbers say, computed from them."""
  missing_sentence = report.unfinished(runs)
  if not curves:
    return " ".join(["No run of this experiment has been measured yet."] + missing_sentence)
  sentences = []
  mean_gaps = {m: float(np.mean([p["running_mean_gap"] for p in c])) for m, c in curves.items()}
  for momentum, curve in curves.items():
    final, worst = curve[-1], max(curve, key=lambda p: p["running_mean_gap"])
    difference = final["eval_accuracy_precise"] - final["eval_accuracy_running"]
    sentences.append(
        f"Momentum {momentum} (running averages over roughly the last {round(1 / (1 - momentum))} steps): the "
        f"running means were {report.num(mean_gaps[momentum])} population stds off on average over the "
        f"{len(curve)} checkpoints, most ({report.num(worst['running_mean_gap'])}) at step {worst['step']}; at "
        f"step {final['step']} eval accuracy was {report.pct(final['eval_accuracy_running'])} with the running "
        f"averages and {report.pct(final['eval_accuracy_precise'])} with precise statistics "
        f"({report.points(difference)}; eval loss {report.num(final['eval_loss_running'])} vs "
        f"{report.num(final['eval_loss_precise'])}).")
    widest = max(curve, key=lambda p: abs(p["eval_accuracy_precise"] - p["eval_accuracy_running"]))
    if widest is not final:
      sentences.append(
          f"Its widest accuracy gap was at step {widest['step']}: {report.pct(widest['eval_accuracy_running'])} "
          f"with the running averages against {report.pct(widest['eval_accuracy_precise'])} with population "
          "statistics of the same weights.")
  if len(mean_gaps) >= 2:
    (low_m, low_gap), (high_m, high_gap) = min(mean_gaps.items()), max(mean_gaps.items())
    relation = "more" if high_gap > low_gap else "less" if high_gap < low_gap else "as much"
    sentences.append(f"The slower average (momentum {high_m}) lagged the network {relation} than momentum {low_m} "
                     f"({report.num(high_gap)} against {report.num(low_gap)} stds, averaged over training).")
  helped = [m for m, c in curves.items() if c[-1]["eval_loss_precise"] < c[-1]["eval_loss_running"]]
  if helped:
    sentences.append(f"Precise statistics lowered the final eval loss for momentum {', '.join(map(str, helped))}.")
  else:
    sentences.append("Precise statistics lowered the final eval loss for no momentum measured.")
  return " ".join(sentences + missing_sentence)

