"""Experiment 1: synchronized vs per-device BatchNorm statistics as a fixed global batch is spread over
more devices, and how far the devices' batch statistics drift apart without synchronization.

Runs `experiments/bn_sync_vs_devices.py`; then, for each finished run, applies
its final weights to its first training batches on its own strategy and
devices and compares the statistics every device normalized with
(`probes.replica_divergence`). Running averages cannot show the drift: they are
synchronized every step, so every replica holds the same ones.
"""

from __future__ import annotations

import os
from typing import Any

from cnnjax import train
from cnnjax.lab.bn_study import probes, report
from cnnjax.lab.bn_study.plan import FINISHED, Context, Task, TrialPlan, group_record, seed_groups, train_task

KEY = "sync_vs_devices"
EXPERIMENT_FILE = "bn_sync_vs_devices.py"
TITLE = "1. Synchronized vs per-device statistics as devices are added"
QUESTION = ("At a fixed global batch, does it matter whether BatchNorm's statistics are synchronized over "
            "the devices (`bn_sync=global`) or computed on each device's slice (`local`, or `ghost` groups), "
            "and how far apart are the statistics the devices normalize with when they are not synchronized?")
MEASUREMENT_MISSING = "measurement missing"
MARKERS = ("o", "s", "^", "D", "v")
X_OFFSET = 1.05  # each mode this factor apart along the log2 device axis, so that equal points stay visible


def tasks(ctx: Context) -> list[Task]:
  """Every seed's run (one after another: each needs its device layout), then the divergence of each
  configuration's first seed (an invariant of the configuration, not a score)."""
  plans = ctx.trials(KEY, EXPERIMENT_FILE)
  return [train_task(ctx, KEY, plan) for plan in plans] + [
      _divergence_task(ctx, group.first) for group in seed_groups(plans)]


def _divergence_task(ctx: Context, plan: TrialPlan) -> Task:
  def run() -> str:
    if plan.summary() is None:
      return "skipped: its run is missing"
    exp = train.build(plan.config)
    result = probes.replica_divergence(exp, probes.load_state(exp, plan.workdir), ctx.scale.divergence_batches)
    ctx.write_probe(KEY, plan.name, result, plan)
    return f"replica statistics divergence {result['replica_stat_divergence']:.3g}"

  return Task(KEY, f"{plan.name} (divergence)", done=lambda: ctx.read_probe(KEY, plan.name, plan) is not None,
              run=run)


def statistics_batch(config: Any) -> int:
  """Examples per BatchNorm statistics group in a run of this experiment."""
  devices = config.parallel.num_devices
  if config.model.bn_sync == "global":
    return config.batch_size
  return config.model.bn_group_size if config.model.bn_sync == "ghost" else config.batch_size // devices


def results(ctx: Context) -> dict[str, Any]:
  records = []
  for group in ctx.seed_groups(KEY, EXPERIMENT_FILE):
    config = group.config
    probe = ctx.read_probe(KEY, group.first.name, group.first) or {}
    record = group_record(group)
    record.update(
        devices=config.parallel.num_devices, bn_sync=config.model.bn_sync,
        bn_group_size=config.model.bn_group_size if config.model.bn_sync == "ghost" else None,
        per_device_batch=config.batch_size // config.parallel.num_devices, statistics_batch=statistics_batch(config),
        replica_stat_divergence=probe.get("replica_stat_divergence"),
        replica_std_divergence=probe.get("replica_std_divergence"), statistics_sets=probe.get("statistics_sets"))
    if record["status"] == FINISHED and not probe:
      record["status"] = MEASUREMENT_MISSING
    records.append(record)
  return {KEY: records}


def _label(record: dict[str, Any]) -> str:
  return f"ghost {record['bn_group_size']}" if record["bn_sync"] == "ghost" else record["bn_sync"]


def section(results: dict[str, Any], ctx: Context) -> str:
  records = results[KEY]
  rows = [[r["devices"], _label(r), r["per_device_batch"], r["statistics_batch"], report.pct_ci(r, "eval_accuracy"),
           report.num_ci(r, "eval_loss"), report.pct_ci(r, "train_accuracy"), report.points(r["train_eval_gap"]),
           report.num(r["replica_stat_divergence"]), report.num(r["replica_std_divergence"])]
          for r in records]
  text = report.table(["devices", "bn_sync", "per-device batch", "statistics batch", "eval accuracy", "eval loss",
                       "train accuracy", "train - eval", "divergence of means", "divergence of stds"], rows)
  notes = ("*Divergence*: the mean over BatchNorm layers, channels and devices (and ghost groups) of "
           "|statistics-group mean - full-batch mean| / full-batch std, and the same for the standard "
           "deviation, from the statistics each device actually normalized with at the final weights, over "
           f"the run's first training batches ({ctx.scale.divergence_batches}). *train - eval*: training "
           "accuracy (training mode, last logged batches) minus eval accuracy (running averages). Accuracies "
           "and losses: mean over seeds ± the half-width of its 95% interval; divergences: the first seed.")
  return report.section(TITLE, QUESTION, text, _plot(records, ctx), reading(records), notes)


def _plot(records: list[dict[str, Any]], ctx: Context) -> str | None:
  finished = [r for r in records if report.present(r["eval_accuracy"])]
  if not finished:
    return None
  fig, (accuracy_axis, divergence_axis) = report.figure(2, "BatchNorm sync vs devices (fixed global batch; "
                                                            "accuracy: mean and 95% interval over seeds)")
  for index, label in enumerate(dict.fromkeys(_label(r) for r in finished)):
    chosen = sorted((r for r in finished if _label(r) == label), key=lambda r: r["devices"])
    # Lines that coincide (global and local on one device, equal accuracies) stay visible: each mode is drawn
    # a little apart along the device axis, with its own marker.
    marker = MARKERS[index % len(MARKERS)]
    style = f"{marker}-" if len(chosen) > 1 else marker
    xs = [r["devices"] * X_OFFSET ** index for r in chosen]
    report.error_bars(accuracy_axis, xs, chosen, "eval_accuracy", report.PERCENT, fmt=style, label=label)
    measured = [(x, r) for x, r in zip(xs, chosen) if report.present(r["replica_stat_divergence"])]
    divergence_axis.plot([x for x, _ in measured], [r["replica_stat_divergence"] for _, r in measured], style,
                         label=label)
  report.powers_of_two([(accuracy_axis, "eval accuracy (%)"), (divergence_axis, "divergence of batch means (stds)")],
                       "devices")
  return report.save(fig, os.path.join(ctx.workdir, f"{KEY}.png"))


def reading(records: list[dict[str, Any]]) -> str:
  """What the numbers say, computed from them; accuracy differences are compared with the seed spread."""
  sentences = []
  by_mode: dict[str, list[dict[str, Any]]] = {}
  for record in records:
    by_mode.setdefault(_label(record), []).append(record)
  for mode in by_mode.values():
    mode.sort(key=lambda r: r["devices"])
  eval_examples = next((r["eval_examples"] for r in records if r["eval_examples"]), None)

  synced = by_mode.get("global", [])
  if synced:
    accuracies = [r["eval_accuracy"] for r in synced]
    divergences = [r["replica_stat_divergence"] for r in synced]
    listing = ", ".join(f"{report.pct_ci(r, 'eval_accuracy')} on {r['devices']}" for r in synced)
    sentence = f"With `bn_sync=global` the mean eval accuracy was {listing} device(s)"
    if report.present(*accuracies) and len(accuracies) > 1:
      device_spread = max(accuracies) - min(accuracies)
      most, least = max(synced, key=lambda r: r["eval_accuracy"]), min(synced, key=lambda r: r["eval_accuracy"])
      sentence += (": identical, as synchronized statistics make it one computation whatever the device count"
                   if device_spread == 0 else
                   f", means {report.examples(device_spread, eval_examples)} apart at most "
                   f"({report.compared(most, least)}) although it is mathematically one computation: the order "
                   "of floating-point reductions differs with the device count and training amplifies it")
    if report.present(*divergences):
      worst = max(divergences)
      sentence += (". Every device normalized with identical statistics: the divergence was exactly 0"
                   if worst == 0 else f". The devices' statistics diverged by at most {report.num(worst)}")
    else:
      sentence += ". The divergence of some global runs is missing"
    sentences.append(sentence + ".")

  local = by_mode.get("local", [])
  if local:
    divergences = [r["replica_stat_divergence"] for r in local]
    listing = ", ".join(f"{report.num(r['replica_stat_divergence'])} on {r['devices']} device(s) "
                        f"({r['per_device_batch']} examples each)" for r in local)
    sentence = (f"With `local` each device normalizes only its own slice: the statistics of the devices' "
                f"slices differed from the full batch's by {listing}, in full-batch standard deviations")
    trend = report.monotone(divergences) if report.present(*divergences) else None
    if trend:
      sentence += f" ({trend} as the slices shrink)"
    first, last = local[0], local[-1]
    if len(local) > 1:
      sentence += (f"; the eval accuracy {report.change(first['eval_accuracy'], last['eval_accuracy'])} from "
                   f"{first['devices']} to {last['devices']} devices")
    sentences.append(sentence + ".")
    synced_at = {r["devices"]: r for r in synced}
    paired = [(r, synced_at[r["devices"]]) for r in local if r["devices"] in synced_at
              and report.present(r["eval_accuracy"], synced_at[r["devices"]]["eval_accuracy"]) and r["devices"] > 1]
    if paired:
      comparisons = ", ".join(
          f"{report.points(loc['eval_accuracy'] - glob['eval_accuracy'])} on {loc['devices']} devices "
          f"({report.examples(loc['eval_accuracy'] - glob['eval_accuracy'], eval_examples)})" for loc, glob in paired)
      beyond = [f"{loc['devices']}" for loc, glob in paired if report.beyond_seeds(loc, glob)]
      largest_loc, largest_glob = max(paired, key=lambda pair: abs(pair[0]["eval_accuracy"] - pair[1]["eval_accuracy"]))
      sentences.append(f"Local minus global mean eval accuracy: {comparisons}; the largest, on "
                       f"{largest_loc['devices']} devices, is {report.compared(largest_loc, largest_glob)}; "
                       + (f"beyond the seed spread on {', '.join(beyond)} devices."
                          if beyond else "no difference is beyond the seed spread."))
    gaps = [(r, synced_at.get(r["devices"])) for r in local]
    measured = [(loc, glob) for loc, glob in gaps
                if glob is not None and report.present(loc["train_eval_gap"], glob["train_eval_gap"])]
    if measured:
      loc, glob = measured[-1]
      sentences.append(f"The train - eval accuracy gap on {loc['devices']} devices was "
                       f"{report.points(loc['train_eval_gap'])} with local and "
                       f"{report.points(glob['train_eval_gap'])} with global statistics.")

  for label, chosen in by_mode.items():
    if not label.startswith("ghost"):
      continue
    for r in chosen:
      span = ("within one device's slice" if r["statistics_batch"] <= r["per_device_batch"]
              else f"spanning {r['statistics_batch'] // r['per_device_batch']} devices")
      sentences.append(f"Ghost groups of {r['bn_group_size']} ({span}) on {r['devices']} devices: eval accuracy "
                       f"{report.pct_ci(r, 'eval_accuracy')}, divergence {report.num(r['replica_stat_divergence'])}.")
  sentences += report.unfinished(records)
  return " ".join(sentences) if sentences else "No runs of this experiment are finished yet."


def summary(results: dict[str, Any]) -> str:
  """The README's bullet: accuracies over seeds by sync mode and devices, and the divergences."""
  records = results[KEY]
  parts = []
  for label in dict.fromkeys(_label(r) for r in records):
    chosen = sorted((r for r in records if _label(r) == label), key=lambda r: r["devices"])
    parts.append(f"{label}: " + ", ".join(
        f"{report.pct_ci(r, 'eval_accuracy')} (divergence {report.num(r['replica_stat_divergence'])}) on "
        f"{r['devices']}" for r in chosen))
  beyond = [f"{_label(r)} on {r['devices']}" for r in records for other in records
            if _label(other) == "global" and other["devices"] == r["devices"] and r is not other
            and report.beyond_seeds(r, other)]
  return ("**Sync vs devices** (eval accuracy over seeds, and the devices' statistics divergence in full-batch "
          "stds, by device count): " + "; ".join(parts) + ". Against global sync on the same devices, "
          + (f"beyond the seed spread: {', '.join(beyond)}." if beyond else
             "no accuracy difference is beyond the seed spread."))
