"""Experiment 6: accuracy against the ghost batch size (`model.bn_group_size`) at a fixed large global batch.

Runs `experiments/bn_ghost_batch.py`: BatchNorm statistics over groups of g
consecutive examples of a global batch of 512, sharded over every device.
"""

from __future__ import annotations

import os
from typing import Any

from cnnjax.lab.bn_study import report
from cnnjax.lab.bn_study.plan import Context, Task, group_record, train_task

KEY = "ghost_batch"
EXPERIMENT_FILE = "bn_ghost_batch.py"
TITLE = "6. Ghost batch size at a fixed global batch"
QUESTION = ("At a fixed, large global batch, how does accuracy depend on the number of examples each BatchNorm "
            "statistics group (ghost batch) holds, from a few examples up to the whole batch?")


def tasks(ctx: Context) -> list[Task]:
  return [train_task(ctx, KEY, plan) for plan in ctx.trials(KEY, EXPERIMENT_FILE)]


def results(ctx: Context) -> dict[str, Any]:
  records = []
  for group in ctx.seed_groups(KEY, EXPERIMENT_FILE):
    summary = group.first.summary() or {}
    records.append({**group_record(group), "bn_group_size": group.config.model.bn_group_size,
                    "global_batch": group.config.batch_size, "devices": summary.get("num_devices")})
  return {KEY: sorted(records, key=lambda r: r["bn_group_size"])}


def section(results: dict[str, Any], ctx: Context) -> str:
  records = results[KEY]
  rows = [[r["bn_group_size"], r["global_batch"] // r["bn_group_size"], report.pct_ci(r, "eval_accuracy"),
           report.num_ci(r, "eval_loss"), report.pct_ci(r, "train_accuracy"), report.points(r["train_eval_gap"])]
          for r in records]
  text = report.table(["ghost batch (bn_group_size)", "groups per step", "eval accuracy", "eval loss",
                       "train accuracy", "train - eval"], rows)
  devices = next((r["devices"] for r in records if r["devices"]), None)
  global_batch = records[0]["global_batch"] if records else None
  notes = (f"Global batch {global_batch}, sharded over {devices if devices else report.MISSING_TEXT} devices; a "
           f"ghost batch of {global_batch} is ordinary (global) BatchNorm.")
  return report.section(TITLE, QUESTION, text, _plot(records, ctx), reading(records), notes)


def _plot(records: list[dict[str, Any]], ctx: Context) -> str | None:
  finished = [r for r in records if report.present(r["eval_accuracy"])]
  if not finished:
    return None
  fig, (accuracy_axis, loss_axis) = report.figure(2, f"Ghost batch size (global batch {finished[0]['global_batch']}; "
                                                     "mean and 95% interval over seeds)")
  sizes = [r["bn_group_size"] for r in finished]
  report.error_bars(accuracy_axis, sizes, finished, "eval_accuracy", report.PERCENT, fmt="o-", label="eval")
  with_train = [r for r in finished if report.present(r["train_accuracy"])]
  report.error_bars(accuracy_axis, [r["bn_group_size"] for r in with_train], with_train, "train_accuracy",
                    report.PERCENT, fmt="s--", label="train (last logged batches)")
  report.error_bars(loss_axis, sizes, finished, "eval_loss", fmt="o-")
  report.powers_of_two([(accuracy_axis, "accuracy (%)"), (loss_axis, "eval loss")],
                       "ghost batch (examples per statistics group)", legend=False)
  accuracy_axis.legend()
  return report.save(fig, os.path.join(ctx.workdir, f"{KEY}.png"))


def reading(records: list[dict[str, Any]]) -> str:
  """What the numbers say, computed from them; accuracy differences are compared with the seed spread."""
  finished = [r for r in records if report.present(r["eval_accuracy"])]
  sentences = []
  eval_examples = next((r["eval_examples"] for r in records if r["eval_examples"]), None)
  if len(finished) >= 2:
    best = max(finished, key=lambda r: (r["eval_accuracy"], -r["eval_loss"]))
    worst = min(finished, key=lambda r: (r["eval_accuracy"], -r["eval_loss"]))
    smallest, whole = finished[0], finished[-1]
    trend = report.monotone([r["eval_accuracy"] for r in finished])
    sentences.append(
        f"Eval accuracy {report.change(smallest['eval_accuracy'], whole['eval_accuracy'])} from ghost batches of "
        f"{smallest['bn_group_size']} to {whole['bn_group_size']} examples"
        + (f" ({trend} with the ghost batch)" if trend else " (not monotonically)")
        + f"; the best mean was {report.pct_ci(best, 'eval_accuracy')} at {best['bn_group_size']} and the worst "
        f"{report.pct_ci(worst, 'eval_accuracy')} at {worst['bn_group_size']}, "
        f"{report.examples(best['eval_accuracy'] - worst['eval_accuracy'], eval_examples)} apart "
        f"({report.compared(best, worst)}).")
    best_loss = min(finished, key=lambda r: r["eval_loss"])
    sentences.append(f"The lowest eval loss, {report.num(best_loss['eval_loss'])}, was at a ghost batch of "
                     f"{best_loss['bn_group_size']}.")
    gaps = [r for r in finished if report.present(r["train_eval_gap"])]
    if len(gaps) >= 2:
      moved = report.change(gaps[0]["train_eval_gap"], gaps[-1]["train_eval_gap"], report.points)
      sentences.append(f"The train - eval accuracy gap {moved} from the smallest to the largest ghost batch.")
  elif finished:
    sentences.append(f"Only one run is finished: {report.pct(finished[0]['eval_accuracy'])} at a ghost batch of "
                     f"{finished[0]['bn_group_size']}.")
  else:
    sentences.append("No run of this experiment is finished yet.")
  sentences += report.unfinished(records)
  return " ".join(sentences)


def summary(results: dict[str, Any]) -> str:
  """The README's bullet: accuracy over seeds by ghost batch, and whether best and worst differ."""
  finished = [r for r in results[KEY] if report.present(r["eval_accuracy"])]
  if not finished:
    return "**Ghost batch**: no run finished."
  best = max(finished, key=lambda r: r["eval_accuracy"])
  worst = min(finished, key=lambda r: r["eval_accuracy"])
  listing = ", ".join(f"{r['bn_group_size']}: {report.pct_ci(r, 'eval_accuracy')}" for r in finished)
  text = (f"**Ghost batch** (global batch {finished[0]['global_batch']}, eval accuracy over seeds by ghost batch): "
          f"{listing}")
  return text + (f"; best minus worst: {report.compared(best, worst)}." if best is not worst else ".")
