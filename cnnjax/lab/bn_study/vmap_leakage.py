"""Experiment 3: in training mode BatchNorm makes the loss of example i depend on example j; what vmap
does to that, and when per-example gradients computed with vmap are the batch's gradients.

Runs `experiments/bn_vmap_leakage.py` (the study's model with BatchNorm and
with GroupNorm), then measures on the first eval examples the full Jacobian
d loss_i / d x_j of five computations (`probes.leakage_modes`).
"""

from __future__ import annotations

import os
from typing import Any

from cnnjax import train
from cnnjax.lab.bn_study import probes, report
from cnnjax.lab.bn_study.plan import FINISHED, MISSING, Context, SeedGroup, Task, group_record, train_task

KEY = "vmap_leakage"
EXPERIMENT_FILE = "bn_vmap_leakage.py"
TITLE = "3. vmap and the batch: cross-example gradients"
QUESTION = ("With BatchNorm in training mode the loss of example i depends on example j. How large is "
            "d loss_i / d x_j (i != j) in training mode, eval mode, with GroupNorm, and under `jax.vmap` over "
            "the examples without and with an axis name that BatchNorm reduces over; and when does the mean of "
            "per-example gradients computed with `vmap` equal the gradient of the batch's mean loss?")
PROBE_NAME = "leakage"
MODE_LABELS = {
    "batchnorm_train": "BatchNorm, training mode (batched)",
    "batchnorm_eval": "BatchNorm, eval mode (running averages)",
    "groupnorm": "GroupNorm (batched)",
    "batchnorm_vmap_no_axis": "BatchNorm, `vmap` over examples, no axis name",
    "batchnorm_vmap_named_axis": "BatchNorm, `vmap` with the axis named in BatchNorm",
}
SHORT_LABELS = {"batchnorm_train": "BN train", "batchnorm_eval": "BN eval", "groupnorm": "GroupNorm",
                "batchnorm_vmap_no_axis": "BN vmap\nno axis", "batchnorm_vmap_named_axis": "BN vmap\nnamed axis"}
# A computation "matches" the batched one when its largest difference is below this fraction of the
# largest batched value: float32 rounding, not a different computation.
MATCH_RTOL = 1e-4
MEASURED_KEYS = ("batch_size", "cross_example_grad_norm", "self_grad_norm", "cross_to_self_ratio",
                 "losses_vs_batched_max_abs_diff", "grad_mean_vs_batched_max_abs_diff", "batched_grad_max_abs")


def _groups(ctx: Context) -> dict[str, SeedGroup]:
  return {group.config.model.norm: group for group in ctx.seed_groups(KEY, EXPERIMENT_FILE)}


def _plans(ctx: Context) -> dict[str, Any]:
  """Each normalization's first seed: the model the leakage is measured on (an invariant needs no seeds)."""
  return {norm: group.first for norm, group in _groups(ctx).items()}


def tasks(ctx: Context) -> list[Task]:
  plans = _plans(ctx)
  sources = tuple(plans.values())
  every_seed = [plan for group in _groups(ctx).values() for plan in group.plans]

  def run() -> str:
    if "batch" not in plans or "group" not in plans or any(p.summary() is None for p in sources):
      return "skipped: its BatchNorm or GroupNorm run is missing"
    bn_exp, gn_exp = train.build(plans["batch"].config), train.build(plans["group"].config)
    bn_state = probes.load_state(bn_exp, plans["batch"].workdir)
    gn_state = probes.load_state(gn_exp, plans["group"].workdir)
    inputs, labels = probes.eval_examples(bn_exp, ctx.scale.leakage_examples)
    records = [probes.measure_leakage(mode, inputs, labels)
               for mode in probes.leakage_modes(bn_exp.model, bn_state, gn_exp.model, gn_state)]
    ctx.write_probe(KEY, PROBE_NAME, {"records": records}, *sources)
    return "; ".join(f"{r['mode']} {r['cross_example_grad_norm']:.3g}" for r in records)

  return ([train_task(ctx, KEY, plan) for plan in every_seed]
          + [Task(KEY, "cross-example gradients", done=lambda: ctx.read_probe(KEY, PROBE_NAME, *sources) is not None,
                  run=run)])


def results(ctx: Context) -> dict[str, Any]:
  plans = _plans(ctx)
  probe = ctx.read_probe(KEY, PROBE_NAME, *plans.values())
  measured = {r["mode"]: r for r in (probe or {}).get("records", [])}
  records = []
  for mode in probes.LEAKAGE_MODES:
    found = measured.get(mode)
    record = {"mode": mode, "status": FINISHED if found else MISSING}
    record.update({key: (found or {}).get(key) for key in MEASURED_KEYS})
    records.append(record)
  runs = [{**group_record(group), "norm": norm} for norm, group in _groups(ctx).items()]
  return {KEY: records, f"{KEY}_runs": runs}


def section(results: dict[str, Any], ctx: Context) -> str:
  records = results[KEY]
  rows = []
  for r in records:
    reference = r["mode"] != "batchnorm_train"
    rows.append([MODE_LABELS[r["mode"]], report.num(r["cross_example_grad_norm"]), report.num(r["self_grad_norm"]),
                 report.num(r["cross_to_self_ratio"]),
                 report.num(r["losses_vs_batched_max_abs_diff"]) if reference else report.NOT_APPLICABLE_TEXT,
                 report.num(r["grad_mean_vs_batched_max_abs_diff"]) if reference else report.NOT_APPLICABLE_TEXT])
  text = report.table(["computation", "mean ‖d loss_i/d x_j‖, i≠j", "mean ‖d loss_i/d x_i‖", "cross / own",
                       "losses vs batched (max abs diff)", "mean per-example grad vs batched grad (max abs diff)"],
                      rows)
  batch_size = next((r["batch_size"] for r in records if r["batch_size"]), None)
  runs = {run["norm"]: run for run in results[f"{KEY}_runs"]}
  notes = (f"Measured on the first {batch_size if batch_size else report.MISSING_TEXT} eval examples with the "
           "trained BatchNorm and GroupNorm models of the first seed (eval accuracy over the seeds: BatchNorm "
           f"{report.pct_ci(runs.get('batch', {}), 'eval_accuracy')}, GroupNorm "
           f"{report.pct_ci(runs.get('group', {}), 'eval_accuracy')}). 'Batched' is the same "
           "normalization applied to the whole batch at once (training mode for the vmap rows); per-example "
           "gradients are `vmap(grad(loss_i))` over the examples, averaged. n/a: the batched computation is the "
           "reference itself.")
  return report.section(TITLE, QUESTION, text, _plot(records, ctx), reading(records), notes)


def _plot(records: list[dict[str, Any]], ctx: Context) -> str | None:
  measured = [r for r in records if report.present(r["cross_example_grad_norm"])]
  if not measured:
    return None
  fig, (axis,) = report.figure(1, "Cross-example gradient norm by computation")
  positions = range(len(measured))
  values = [r["cross_example_grad_norm"] for r in measured]
  axis.bar(positions, values)
  for x, value in zip(positions, values):
    axis.annotate(report.num(value), (x, value), ha="center", va="bottom")
  axis.set_xticks(list(positions), [SHORT_LABELS[r["mode"]] for r in measured], fontsize=8)
  axis.set_ylabel("mean ‖d loss_i / d x_j‖, i ≠ j")
  return report.save(fig, os.path.join(ctx.workdir, f"{KEY}.png"))


def _matches(difference: float | None, scale: float | None) -> bool | None:
  if not report.present(difference, scale):
    return None
  return difference <= MATCH_RTOL * scale if scale > 0 else difference == 0


def reading(records: list[dict[str, Any]]) -> str:
  """What the numbers say, computed from them."""
  by_mode = {r["mode"]: r for r in records}
  if not any(report.present(r["cross_example_grad_norm"]) for r in records):
    return "The measurement is missing: its BatchNorm or GroupNorm run has not finished."
  sentences = []
  zero = [MODE_LABELS[m] for m, r in by_mode.items() if r["cross_example_grad_norm"] == 0]
  nonzero = [m for m, r in by_mode.items() if report.present(r["cross_example_grad_norm"])
             and r["cross_example_grad_norm"] != 0]
  batched = by_mode["batchnorm_train"]
  if report.present(batched["cross_example_grad_norm"]):
    sentences.append(
        f"In training mode the loss of one example has a gradient with respect to every other example of the "
        f"batch of {batched['batch_size']}: its mean norm was {report.num(batched['cross_example_grad_norm'])}, "
        f"{report.num(batched['cross_to_self_ratio'])} times the gradient with respect to the example itself.")
  if zero:
    sentences.append(f"It was exactly 0 for: {'; '.join(zero)}.")
  if nonzero:
    sentences.append(f"It was non-zero for: {'; '.join(MODE_LABELS[m] for m in nonzero)}.")
  unnamed, named = by_mode["batchnorm_vmap_no_axis"], by_mode["batchnorm_vmap_named_axis"]
  for record, label in ((unnamed, "Without an axis name, `vmap` hands BatchNorm one example at a time, which it "
                                  "normalizes as a batch of one"),
                        (named, "With the vmapped axis named in BatchNorm, its statistics are a `pmean` over the "
                                "examples")):
    grads_match = _matches(record["grad_mean_vs_batched_max_abs_diff"], record["batched_grad_max_abs"])
    if grads_match is None:
      sentences.append(f"{label}; its comparison with the batched gradient is missing.")
      continue
    verdict = ("equals the batched gradient up to float rounding" if grads_match
               else "is a different gradient from the batched one")
    sentences.append(
        f"{label}: the losses differ from the batched training-mode losses by at most "
        f"{report.num(record['losses_vs_batched_max_abs_diff'])}, and the mean of the per-example gradients "
        f"{verdict} (largest difference {report.num(record['grad_mean_vs_batched_max_abs_diff'])} against "
        f"gradient entries up to {report.num(record['batched_grad_max_abs'])}).")
  for mode in ("batchnorm_eval", "groupnorm"):
    record = by_mode[mode]
    grads_match = _matches(record["grad_mean_vs_batched_max_abs_diff"], record["batched_grad_max_abs"])
    if grads_match is not None:
      sentences.append(f"{MODE_LABELS[mode]}: per-example gradients from `vmap` "
                       f"{'average to' if grads_match else 'do not average to'} the batched gradient (largest "
                       f"difference {report.num(record['grad_mean_vs_batched_max_abs_diff'])}).")
  return " ".join(sentences)


def summary(results: dict[str, Any]) -> str:
  """The README's bullet: the cross-example gradients by computation (a measurement on one seed)."""
  by_mode = {r["mode"]: r for r in results[KEY]}
  listing = "; ".join(f"{MODE_LABELS[m]}: {report.num(r['cross_example_grad_norm'])}" for m, r in by_mode.items())
  examples = report.num(by_mode["batchnorm_train"]["batch_size"])
  return (f"**vmap leakage** (mean norm of d loss_i / d x_j, i != j, over {examples} examples of the first seed's "
          f"models): {listing}.")
