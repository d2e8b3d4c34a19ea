"""Experiment 2: accuracy against the per-device batch for BatchNorm, GroupNorm, LayerNorm and no
normalization (the curve of Wu & He 2018, Figure 1).

Runs `experiments/bn_per_device_batch.py`: BatchNorm's statistics batch b is a
ghost group of b examples on one device, which is the computation of local
BatchNorm with b examples per device; the per-example normalizations do not
depend on b at a fixed global batch, so each is a single run.
"""

from __future__ import annotations

import os
from typing import Any

from cnnjax.study import report
from cnnjax.study.plan import Context, Task, run_record, train_task

KEY = "per_device_batch"
EXPERIMENT_FILE = "bn_per_device_batch.py"
TITLE = "2. Accuracy against the per-device batch: BatchNorm vs GroupNorm, LayerNorm, none"
QUESTION = ("How does accuracy depend on the number of examples BatchNorm computes its statistics over (the "
            "per-device batch of local BatchNorm), and how do normalizations that treat each example alone "
            "compare?")
NORM_LABELS = {"batch": "BatchNorm", "group": "GroupNorm", "layer": "LayerNorm", "none": "no normalization"}
# Wu & He 2018, Figure 1 / Table 2 (ResNet-50, ImageNet, 8 GPUs): quoted for context, not measured here.
LITERATURE = ("Wu & He 2018 (ResNet-50 on ImageNet) report BatchNorm's error rising from 23.6% at 32 images "
              "per device to 34.7% at 2, while GroupNorm stayed near 24.1%")


def tasks(ctx: Context) -> list[Task]:
  return [train_task(ctx, KEY, plan) for plan in ctx.trials(KEY, EXPERIMENT_FILE)]


def results(ctx: Context) -> dict[str, Any]:
  records = []
  for plan in ctx.trials(KEY, EXPERIMENT_FILE):
    config = plan.config
    record = run_record(plan)
    record.update(norm=config.model.norm, global_batch=config.batch_size,
                  per_device_batch=config.model.bn_group_size if config.model.norm == "batch" else None)
    records.append(record)
  return {KEY: records}


def _split(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
  batch = sorted((r for r in records if r["norm"] == "batch"), key=lambda r: r["per_device_batch"])
  return batch, [r for r in records if r["norm"] != "batch"]


def section(results: dict[str, Any], ctx: Context) -> str:
  records = results[KEY]
  batch_norm, others = _split(records)
  rows = [[NORM_LABELS[r["norm"]], r["per_device_batch"] if r["per_device_batch"] else "any (per example)",
           report.pct(r["eval_accuracy"]), report.num(r["eval_loss"]), report.pct(r["train_accuracy"])]
          for r in batch_norm + others]
  text = report.table(["normalization", "per-device batch", "eval accuracy", "eval loss", "train accuracy"], rows)
  global_batch = records[0]["global_batch"] if records else None
  notes = (f"Global batch {global_batch} throughout; BatchNorm with per-device batch b is ghost BatchNorm with "
           f"groups of b (the same computation as local BatchNorm on {global_batch}/b devices).")
  return report.section(TITLE, QUESTION, text, _plot(records, ctx), reading(records, report.seed_spread(results)),
                        notes)


def _plot(records: list[dict[str, Any]], ctx: Context) -> str | None:
  batch_norm, others = _split(records)
  finished = [r for r in batch_norm if report.present(r["eval_accuracy"])]
  measured_others = [r for r in others if report.present(r["eval_accuracy"])]
  if not finished and not measured_others:
    return None
  fig, (accuracy_axis, loss_axis) = report.figure(2, "Accuracy against the per-device batch (fixed global batch)")
  sizes = [r["per_device_batch"] for r in batch_norm] or [1]
  for axis, metric, scale in ((accuracy_axis, "eval_accuracy", report.PERCENT), (loss_axis, "eval_loss", 1.0)):
    if finished:
      axis.plot([r["per_device_batch"] for r in finished], [scale * r[metric] for r in finished], "o-",
                label=NORM_LABELS["batch"])
    for r in measured_others:
      axis.hlines(scale * r[metric], min(sizes), max(sizes), linestyles="--", colors=_COLORS[r["norm"]],
                  label=f"{NORM_LABELS[r['norm']]} (any batch)")
  report.powers_of_two([(accuracy_axis, "eval accuracy (%)"), (loss_axis, "eval loss")],
                       "per-device batch (BatchNorm statistics batch)")
  return report.save(fig, os.path.join(ctx.workdir, f"{KEY}.png"))


_COLORS = {"group": "tab:green", "layer": "tab:red", "none": "tab:gray"}


def reading(records: list[dict[str, Any]], spread: tuple[float, int] | None) -> str:
  """What the numbers say, computed from them; `spread` is the base model's seed-to-seed range."""
  batch_norm, others = _split(records)
  eval_examples = next((r["eval_examples"] for r in records if r["eval_examples"]), None)
  sentences = []
  measured = [r for r in batch_norm if report.present(r["eval_accuracy"])]
  if len(measured) >= 2:
    largest, smallest = measured[-1], measured[0]
    accuracies = [r["eval_accuracy"] for r in reversed(measured)]
    trend = report.monotone(accuracies)
    best = max(measured, key=lambda r: r["eval_accuracy"])
    sentences.append(
        f"BatchNorm's eval accuracy {report.change(largest['eval_accuracy'], smallest['eval_accuracy'])} as its "
        f"statistics batch shrank from {largest['per_device_batch']} to {smallest['per_device_batch']} examples "
        f"({report.examples(smallest['eval_accuracy'] - largest['eval_accuracy'], eval_examples)}, "
        f"{report.against_seeds(smallest['eval_accuracy'] - largest['eval_accuracy'], spread)}; eval loss "
        f"{report.change(largest['eval_loss'], smallest['eval_loss'], report.num)})"
        + (f", {trend} along the way" if trend else ", not monotonically")
        + f"; its best was {report.pct(best['eval_accuracy'])} at {best['per_device_batch']} per device.")
  elif measured:
    sentences.append(f"Only one BatchNorm run is finished ({report.pct(measured[0]['eval_accuracy'])} at "
                     f"{measured[0]['per_device_batch']} per device).")
  listing = ", ".join(f"{NORM_LABELS[r['norm']]} {report.pct(r['eval_accuracy'])}" for r in others)
  if others:
    sentences.append(f"Normalizing each example alone does not depend on the per-device batch: {listing}.")
  group = next((r for r in others if r["norm"] == "group" and report.present(r["eval_accuracy"])), None)
  if group is not None and measured:
    below = [str(r["per_device_batch"]) for r in measured if r["eval_accuracy"] < group["eval_accuracy"]]
    above = [str(r["per_device_batch"]) for r in measured if r["eval_accuracy"] >= group["eval_accuracy"]]
    if below and above:
      sentences.append(f"BatchNorm scored below GroupNorm at per-device batches {', '.join(below)} and at or "
                       f"above it at {', '.join(above)}.")
    else:
      sentences.append(f"BatchNorm scored {'below' if below else 'at or above'} GroupNorm at every per-device "
                       "batch measured.")
  sentences.append(f"For scale: {LITERATURE}; this study's model and data are far smaller, so only the "
                   "direction, not the size, is comparable.")
  sentences += report.unfinished(records)
  return " ".join(sentences)
