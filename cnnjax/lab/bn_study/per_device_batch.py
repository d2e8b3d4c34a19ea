"""Experiment 2: accuracy against the per-device batch for BatchNorm and Batch Renormalization against
GroupNorm, LayerNorm and no normalization (the curve of Wu & He 2018, Figure 1), over seeds.

Runs `experiments/bn_per_device_batch.py`: BatchNorm's statistics batch b is a
ghost group of b examples on one device, which is the computation of local
BatchNorm with b examples per device; the per-example normalizations do not
depend on b at a fixed global batch, so each is a single configuration. Each
configuration's seeds train together as one vectorized population.
"""

from __future__ import annotations

import os
from typing import Any

from cnnjax.nn import BATCH_NORM_KINDS
from cnnjax.lab.bn_study import report
from cnnjax.lab.bn_study.plan import Context, Task, group_record, population_task

KEY = "per_device_batch"
EXPERIMENT_FILE = "bn_per_device_batch.py"
TITLE = ("2. Accuracy against the per-device batch: BatchNorm and Batch Renorm vs GroupNorm, LayerNorm, "
         "none")
QUESTION = ("How does accuracy depend on the number of examples BatchNorm computes its statistics over (the "
            "per-device batch of local BatchNorm); does Batch Renormalization recover what small batches cost; "
            "and how do normalizations that treat each example alone compare?")
NORM_LABELS = {"batch": "BatchNorm", "renorm": "Batch Renorm", "group": "GroupNorm", "layer": "LayerNorm",
               "none": "no normalization"}
# Wu & He 2018, Figure 1 / Table 2 (ResNet-50, ImageNet, 8 GPUs): quoted for context, not measured here.
LITERATURE = ("Wu & He 2018 (ResNet-50 on ImageNet) report BatchNorm's error rising from 23.6% at 32 images "
              "per device to 34.7% at 2, while GroupNorm stayed near 24.1%")
REFERENCE_BATCH = 32  # Wu & He's largest per-device batch: the one the small batches are compared with
COLORS = {"batch": "tab:blue", "renorm": "tab:orange", "group": "tab:green", "layer": "tab:red",
          "none": "tab:gray"}
MARKERS = {"batch": "o", "renorm": "s"}
# BatchNorm and Batch Renorm are drawn this factor apart along the log2 batch axis, so that neither hides
# the other where they agree.
X_OFFSET = 1.06
BAND_ALPHA = 0.15  # the shaded 95% interval of a per-example normalization


def tasks(ctx: Context) -> list[Task]:
  return [population_task(ctx, KEY, group) for group in ctx.seed_groups(KEY, EXPERIMENT_FILE)]


def results(ctx: Context) -> dict[str, Any]:
  records = []
  for group in ctx.seed_groups(KEY, EXPERIMENT_FILE):
    config = group.config
    record = group_record(group)
    record.update(norm=config.model.norm, global_batch=config.batch_size, model=config.model.name,
                  data=config.data.name,
                  per_device_batch=config.model.bn_group_size if config.model.norm in BATCH_NORM_KINDS else None)
    records.append(record)
  return {KEY: records}


def _curves(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
  """BatchNorm's and Batch Renorm's records by kind, each sorted by per-device batch."""
  return {kind: sorted((r for r in records if r["norm"] == kind), key=lambda r: r["per_device_batch"])
          for kind in BATCH_NORM_KINDS}


def _others(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
  return [r for r in records if r["norm"] not in BATCH_NORM_KINDS]


def section(results: dict[str, Any], ctx: Context) -> str:
  records = results[KEY]
  ordered = [r for curve in _curves(records).values() for r in curve] + _others(records)
  rows = [[NORM_LABELS[r["norm"]], r["per_device_batch"] if r["per_device_batch"] else "any (per example)",
           report.pct_ci(r, "eval_accuracy"), report.num_ci(r, "eval_loss"), report.pct_ci(r, "train_accuracy"),
           f"{r['seeds_finished']} of {len(r['seeds'])}"]
          for r in ordered]
  text = report.table(["normalization", "per-device batch", "eval accuracy", "eval loss", "train accuracy",
                       "seeds"], rows)
  first = records[0] if records else {}
  notes = (f"{first.get('model')} on {first.get('data')}; global batch {first.get('global_batch')} throughout. "
           "BatchNorm (and Batch Renorm) with per-device batch b is ghost BatchNorm with groups of b: the same "
           f"computation as local BatchNorm on {first.get('global_batch')}/b devices. Each cell: the mean over "
           "the seeds ± the half-width of its 95% interval.")
  return report.section(TITLE, QUESTION, text, _plot(records, ctx), reading(records), notes)


def _plot(records: list[dict[str, Any]], ctx: Context) -> str | None:
  curves = {kind: [r for r in curve if report.present(r["eval_accuracy"])] for kind, curve in _curves(records).items()}
  others = [r for r in _others(records) if report.present(r["eval_accuracy"])]
  if not any(curves.values()) and not others:
    return None
  fig, (accuracy_axis, loss_axis) = report.figure(2, "Accuracy against the per-device batch (fixed global batch; "
                                                     "mean and 95% interval over seeds)")
  sizes = [r["per_device_batch"] for curve in _curves(records).values() for r in curve] or [1]
  for axis, metric, scale in ((accuracy_axis, "eval_accuracy", report.PERCENT), (loss_axis, "eval_loss", 1.0)):
    for index, (kind, curve) in enumerate(curves.items()):
      if curve:
        report.error_bars(axis, [r["per_device_batch"] * X_OFFSET ** index for r in curve], curve, metric, scale,
                          fmt=f"{MARKERS[kind]}-", color=COLORS[kind], label=NORM_LABELS[kind])
    for r in others:
      mean, half_width = scale * r[metric], scale * (r.get(f"{metric}_ci95") or 0.0)
      axis.hlines(mean, min(sizes), max(sizes), linestyles="--", colors=COLORS[r["norm"]],
                  label=f"{NORM_LABELS[r['norm']]} (any batch)")
      axis.fill_between([min(sizes), max(sizes)], mean - half_width, mean + half_width, color=COLORS[r["norm"]],
                        alpha=BAND_ALPHA)
  report.powers_of_two([(accuracy_axis, "eval accuracy (%)"), (loss_axis, "eval loss")],
                       "per-device batch (BatchNorm statistics batch)", legend=False)
  accuracy_axis.legend(fontsize="small")
  return report.save(fig, os.path.join(ctx.workdir, f"{KEY}.png"))


def reading(records: list[dict[str, Any]]) -> str:
  """What the numbers say, computed from them: every difference named is compared with the seed spread."""
  curves = _curves(records)
  others = [r for r in _others(records) if report.present(r["eval_accuracy"])]
  sentences = []
  references = {}
  for kind, curve in curves.items():
    measured = [r for r in curve if report.present(r["eval_accuracy"])]
    reference = next((r for r in measured if r["per_device_batch"] == REFERENCE_BATCH), None)
    if reference is None or len(measured) < 2:
      if measured:
        sentences.append(f"{NORM_LABELS[kind]}: too few finished configurations to compare.")
      continue
    references[kind] = reference
    smallest = measured[0]
    worse = [str(r["per_device_batch"]) for r in measured
             if r is not reference and report.beyond_seeds(r, reference) and r["eval_accuracy"] < reference[
                 "eval_accuracy"]]
    sentences.append(
        f"{NORM_LABELS[kind]}'s eval accuracy was {report.pct_ci(smallest, 'eval_accuracy')} at "
        f"{smallest['per_device_batch']} examples per device against {report.pct_ci(reference, 'eval_accuracy')} "
        f"at {REFERENCE_BATCH}: {report.compared(smallest, reference)}. "
        + (f"It was below its accuracy at {REFERENCE_BATCH} beyond the seed spread at per-device batches "
           f"{', '.join(worse)}, and within it or above at the others."
           if worse else f"No per-device batch scored below {REFERENCE_BATCH} beyond the seed spread."))
  batch_curve = {r["per_device_batch"]: r for r in curves["batch"] if report.present(r["eval_accuracy"])}
  renorm_curve = {r["per_device_batch"]: r for r in curves["renorm"] if report.present(r["eval_accuracy"])}
  shared = sorted(set(batch_curve) & set(renorm_curve))
  if shared:
    better = [str(b) for b in shared if report.beyond_seeds(renorm_curve[b], batch_curve[b])
              and renorm_curve[b]["eval_accuracy"] > batch_curve[b]["eval_accuracy"]]
    worse = [str(b) for b in shared if report.beyond_seeds(renorm_curve[b], batch_curve[b])
             and renorm_curve[b]["eval_accuracy"] < batch_curve[b]["eval_accuracy"]]
    smallest = shared[0]
    sentences.append(
        f"Batch Renorm minus BatchNorm at {smallest} per device: "
        f"{report.compared(renorm_curve[smallest], batch_curve[smallest])}. Batch Renorm scored above BatchNorm "
        f"beyond the seed spread at per-device batches {', '.join(better) or 'none'}, below it at "
        f"{', '.join(worse) or 'none'}, and within the seed spread at the others.")
  if others:
    listing = ", ".join(f"{NORM_LABELS[r['norm']]} {report.pct_ci(r, 'eval_accuracy')}" for r in others)
    sentences.append("GroupNorm, LayerNorm and no normalization treat each example alone, so at a fixed global "
                     f"batch they are one computation whatever the per-device batch: {listing}.")
    reference = references.get("batch")
    smallest = next((r for r in curves["batch"] if report.present(r["eval_accuracy"])), None)
    for r in others:
      if reference is not None and smallest is not None:
        label = NORM_LABELS[r["norm"]]
        sentences.append(f"{label[:1].upper()}{label[1:]} minus BatchNorm at {REFERENCE_BATCH} per device: "
                         f"{report.compared(r, reference)}; minus BatchNorm at {smallest['per_device_batch']}: "
                         f"{report.compared(r, smallest)}.")
  shape = _wu_he_shape(curves["batch"], others)
  if shape:
    sentences.append(shape)
  sentences.append(f"For scale: {LITERATURE}; this study's model and data are far smaller, so only the "
                   "direction, not the size, is comparable.")
  sentences += report.unfinished(records)
  return " ".join(sentences)


def _wu_he_shape(batch_curve: list[dict[str, Any]], others: list[dict[str, Any]]) -> str | None:
  """Whether the measured curve has Wu & He's shape: BatchNorm at 2 below BatchNorm at 32 beyond the seed
  spread (the per-example normalizations are flat by construction here)."""
  by_batch = {r["per_device_batch"]: r for r in batch_curve if report.present(r["eval_accuracy"])}
  smallest = min(by_batch, default=None)
  if smallest is None or REFERENCE_BATCH not in by_batch or smallest == REFERENCE_BATCH:
    return None
  drop = report.beyond_seeds(by_batch[smallest], by_batch[REFERENCE_BATCH])
  if drop is None:
    return None
  if drop and by_batch[smallest]["eval_accuracy"] < by_batch[REFERENCE_BATCH]["eval_accuracy"]:
    return (f"So Wu & He's shape holds here: BatchNorm's error at {smallest} examples per device exceeds its error "
            f"at {REFERENCE_BATCH} beyond the seed spread, while the normalizations of single examples do not "
            "depend on the per-device batch.")
  return (f"So Wu & He's shape is absent here: BatchNorm at {smallest} examples per device is not below "
          f"{REFERENCE_BATCH} beyond the seed spread.")


def summary(results: dict[str, Any]) -> str:
  """The README's bullet: the curve's means and intervals, and what exceeds the seed spread."""
  records = results[KEY]
  curves = _curves(records)
  first = records[0] if records else {}
  parts = []
  for kind, curve in curves.items():
    if curve:  # a partial study (`--only`, the tiny scale) may lack a kind
      listing = ", ".join(f"{r['per_device_batch']}: {report.pct_ci(r, 'eval_accuracy')}" for r in curve)
      parts.append(f"{NORM_LABELS[kind]} {listing}")
  others = _others(records)
  if others:
    parts.append(", ".join(f"{NORM_LABELS[r['norm']]} {report.pct_ci(r, 'eval_accuracy')}" for r in others)
                 + " (any per-device batch)")
  seeds = max((len(r["seeds"]) for r in records), default=0)
  text = (f"**Per-device batch** ({first.get('model')} on {first.get('data')}, global batch "
          f"{first.get('global_batch')}, eval accuracy over {seeds} seeds by examples per device): "
          + "; ".join(parts) + ".")
  by_batch = {kind: {r["per_device_batch"]: r for r in curve if report.present(r["eval_accuracy"])}
              for kind, curve in curves.items()}
  batch, renorm = by_batch["batch"], by_batch["renorm"]
  smallest = min(batch, default=None)
  if smallest is not None and REFERENCE_BATCH in batch:
    text += (f" BatchNorm at {smallest} minus at {REFERENCE_BATCH}: "
             f"{report.compared(batch[smallest], batch[REFERENCE_BATCH])}.")
  if smallest is not None and smallest in renorm:
    text += f" Batch Renorm minus BatchNorm at {smallest}: {report.compared(renorm[smallest], batch[smallest])}."
  shape = _wu_he_shape(curves["batch"], [r for r in others if report.present(r["eval_accuracy"])])
  return text + (f" {shape}" if shape else "")
