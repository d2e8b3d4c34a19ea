"""Experiment 4: an ensemble trained at once by vmapping over its members' parameters; each member's
BatchNorm must normalize over its own batch only.

Three trainings of the same members (`experiments/bn_ensemble.py`, seeds 0-3):

* the population, through `cnnjax.train.population.run_population` (vmap over the
  member axis with no axis name: the member axis is never a BatchNorm axis);
* one member alone, through `cnnjax.train.run`;
* the population with the axes confused, trained here (it is a mistake to
  measure, not a feature to offer): the same vmapped train step, but the vmap
  carries an axis name that BatchNorm also reduces over, so every member
  normalizes with statistics pooled over all members' batches.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from cnnjax import train
from cnnjax.errors import NonFiniteError
from cnnjax.nn import BatchNormGrouping
from cnnjax.parallel.strategies import device_part
from cnnjax.lab.bn_study import probes, report
from cnnjax.lab.bn_study.plan import MISSING, Context, Task, TrialPlan, run_record, seed_statistics, train_task
from cnnjax.train import population
from cnnjax.train.preemption import Preemption
from cnnjax.train.state import TrainState
from cnnjax.train.step import train_step

KEY = "ensemble"
EXPERIMENT_FILE = "bn_ensemble.py"
TITLE = "4. Ensembles and populations with vmap"
QUESTION = ("When several models train at once by vmapping over their parameters, does each member equal the "
            "same model trained alone, and what goes wrong when BatchNorm's statistics are (wrongly) taken over "
            "the member axis?")
SOLO_DIR = "solo"
MEMBER_VS_SOLO, CONFUSED = "member_vs_solo", "confused_axes"
# The axis name the confused population's vmap carries and its BatchNorm reduces over.
CONFUSED_AXIS = "members"
# Two trainings of one model count as the same run when no parameter or statistic differs by more than
# this fraction of the largest entry: float rounding accumulated over training, not another computation.
SAME_RUN_RTOL = 1e-3
BAR_WIDTH = 0.4  # two bars (population, confused) per member
ACCURACY_AXIS_MARGIN = 5.0  # percentage points shown below the lowest accuracy


def _plans(ctx: Context) -> tuple[list[TrialPlan], TrialPlan | None]:
  members = ctx.trials(KEY, EXPERIMENT_FILE)
  solo_seed = ctx.module(EXPERIMENT_FILE).SOLO_SEED
  twin = next((p for p in members if p.config.seed == solo_seed), None)
  solo = (TrialPlan(twin.trial, twin.config, os.path.join(ctx.experiment_dir(KEY), SOLO_DIR, twin.name))
          if twin is not None else None)
  return members, solo


def tasks(ctx: Context) -> list[Task]:
  members, solo = _plans(ctx)

  def train_population() -> str:
    outcomes = population.run_population([p.config for p in members], [p.workdir for p in members],
                                         preemption=ctx.preemption)
    return "member eval accuracies " + ", ".join(
        f"failed ({o})" if isinstance(o, Exception) else f"{o['eval_accuracy']:.4f}" if o else "diverged"
        for o in outcomes)

  result = [Task(KEY, f"population of {len(members)}", done=lambda: all(p.status() != MISSING for p in members),
                 run=train_population)]
  if solo is None:
    return result
  twin = next(p for p in members if p.name == solo.name)
  result.append(train_task(ctx, KEY, solo))
  result.append(Task(KEY, "member vs solo", run=lambda: _compare_member(ctx, members, twin, solo),
                     done=lambda: ctx.read_probe(KEY, MEMBER_VS_SOLO, *members, solo) is not None))
  result.append(Task(KEY, "population with confused axes", run=lambda: _confused(ctx, members, twin, solo),
                     done=lambda: ctx.read_probe(KEY, CONFUSED, solo) is not None))
  return result


def ensemble_accuracy(outputs: Sequence[tuple[np.ndarray, np.ndarray]]) -> float:
  """Accuracy of the members' averaged probabilities."""
  labels = outputs[0][1]
  return float(np.mean(np.argmax(np.mean([p for p, _ in outputs], 0), -1) == labels))


def _compare_member(ctx: Context, members: list[TrialPlan], twin: TrialPlan, solo: TrialPlan) -> str:
  if any(p.summary() is None for p in members) or solo.summary() is None:
    return "skipped: a member or the solo run is missing"
  exp = train.build(solo.config)
  solo_state = probes.load_state(exp, solo.workdir)
  member_states = [probes.load_state(exp, p.workdir, config=p.config) for p in members]
  twin_state = member_states[members.index(twin)]
  result = {"member_vs_solo_max_abs_diff": probes.max_abs_state_diff(twin_state, solo_state),
            "solo_max_abs_value": probes.max_abs_state_value(solo_state),
            "ensemble_eval_accuracy": ensemble_accuracy([probes.eval_probabilities(exp, s) for s in member_states])}
  ctx.write_probe(KEY, MEMBER_VS_SOLO, result, *members, solo)
  return f"member vs solo max abs diff {result['member_vs_solo_max_abs_diff']:.3g}"


def train_confused_population(configs: Sequence[ml_collections.ConfigDict],
                              preemption: Preemption | None = None) -> list[TrainState]:
  """Trains the configs as one vmapped population whose BatchNorm reduces over the member axis too.

  Everything else is the production population's step (`cnnjax.train.step.train_step`
  with no device axis): each member keeps its own parameters, optimizer, data
  stream and gradients; only the statistics are pooled. A measurement, not a
  run: it keeps no checkpoints, so SIGTERM or SIGINT (`preemption`) stop it at
  the next step and a rerun measures again.
  """
  experiments = [train.build(population.member_config(config)) for config in configs]
  base = experiments[0]
  pooled_model = probes.with_norm(base.model, grouping=BatchNormGrouping(axis_name=CONFUSED_AXIS))

  def member_step(state, batch, label_smoothing):
    return train_step(state, batch, model_batch=base.model_batch, model=pooled_model, tx=base.tx,
                      schedule_shape=base.schedule_shape, label_smoothing=label_smoothing, axis_name=None)

  step = jax.jit(jax.vmap(member_step, axis_name=CONFUSED_AXIS), donate_argnums=(0,))
  states = [jax.device_get(exp.init_state()) for exp in experiments]
  state = jax.tree.map(lambda *leaves: np.stack(leaves), *states)
  smoothing = np.asarray([exp.config.label_smoothing for exp in experiments], np.float32)
  iterators = [exp.train_batches() for exp in experiments]
  for step_index in range(base.total_steps):
    if preemption is not None and preemption.signum is not None:
      raise preemption.stopped(step_index)
    parts = [device_part(next(iterator)) for iterator in iterators]
    state, metrics = step(state, {k: np.stack([p[k] for p in parts]) for k in parts[0]}, smoothing)
    if not np.all(np.asarray(metrics["finite"]) > 0):
      raise NonFiniteError(f"the confused-axes population stopped being finite at step {step_index + 1}")
  host = jax.device_get(state)
  return [jax.tree.map(lambda x, i=i: np.asarray(x[i]), host) for i in range(len(configs))]


def _confused(ctx: Context, members: list[TrialPlan], twin: TrialPlan, solo: TrialPlan) -> str:
  if solo.summary() is None:
    return "skipped: the solo run is missing"
  states = train_confused_population([p.config for p in members], ctx.preemption)
  exp = train.build(solo.config)
  evaluate = probes.Evaluator(exp)
  twin_state = states[members.index(twin)]
  solo_state = probes.load_state(exp, solo.workdir)
  first_stats = jax.tree.leaves(states[0].batch_stats)
  result = {
      "confused_vs_solo_max_abs_diff": probes.max_abs_state_diff(twin_state, solo_state),
      "confused_member_eval_accuracy": [evaluate(s)["accuracy"] for s in states],
      "confused_ensemble_eval_accuracy": ensemble_accuracy([probes.eval_probabilities(exp, s) for s in states]),
      # Pooled statistics give every member the same running averages: a sign of the confusion.
      "confused_running_stats_identical": all(
          all(np.array_equal(a, b) for a, b in zip(first_stats, jax.tree.leaves(s.batch_stats))) for s in states),
  }
  ctx.write_probe(KEY, CONFUSED, result, solo)
  return f"confused member vs solo max abs diff {result['confused_vs_solo_max_abs_diff']:.3g}"


def results(ctx: Context) -> dict[str, Any]:
  members, solo = _plans(ctx)
  compared = (ctx.read_probe(KEY, MEMBER_VS_SOLO, *members, solo) if solo else None) or {}
  confused = (ctx.read_probe(KEY, CONFUSED, solo) if solo else None) or {}
  confused_accuracies = confused.get("confused_member_eval_accuracy") or [None] * len(members)
  member_records = [{**run_record(p), "seed": p.config.seed, "confused_eval_accuracy": accuracy}
                    for p, accuracy in zip(members, confused_accuracies)]
  finished_accuracies = [r["eval_accuracy"] for r in member_records if report.present(r["eval_accuracy"])]
  present_confused = [a for a in confused_accuracies if report.present(a)]
  summary = {
      "members": member_records,
      "solo": {**run_record(solo), "seed": solo.config.seed} if solo else None,
      "member_vs_solo_max_abs_diff": compared.get("member_vs_solo_max_abs_diff"),
      "confused_vs_solo_max_abs_diff": confused.get("confused_vs_solo_max_abs_diff"),
      "solo_max_abs_value": compared.get("solo_max_abs_value"),
      "ensemble_eval_accuracy": compared.get("ensemble_eval_accuracy"),
      "confused_ensemble_eval_accuracy": confused.get("confused_ensemble_eval_accuracy"),
      # The members are the base model's seeds: their mean and 95% interval (under "member_eval_accuracy").
      **seed_statistics("member_eval_accuracy", finished_accuracies if len(finished_accuracies) == len(members)
                        else []),
      **seed_statistics("confused_member_eval_accuracy", present_confused if len(present_confused) == len(members)
                        else []),
      "confused_running_stats_identical": confused.get("confused_running_stats_identical"),
  }
  return {KEY: summary, "ensemble_member_vs_solo_max_abs_diff": summary["member_vs_solo_max_abs_diff"]}


def section(results: dict[str, Any], ctx: Context) -> str:
  summary = results[KEY]
  solo = summary["solo"] or {}
  rows = [[f"seed {r['seed']}" + (" (also trained alone)" if r["trial"] == solo.get("trial") else ""),
           report.pct(r["eval_accuracy"]), report.pct(r["confused_eval_accuracy"])] for r in summary["members"]]
  rows.append(["mean of members (± 95% interval over the seeds)", report.pct_ci(summary, "member_eval_accuracy"),
               report.pct_ci(summary, "confused_member_eval_accuracy")])
  rows.append(["ensemble (averaged probabilities; one ensemble, no spread)",
               report.pct(summary["ensemble_eval_accuracy"]), report.pct(summary["confused_ensemble_eval_accuracy"])])
  rows.append([f"max abs difference from the solo run of seed {solo.get('seed', report.MISSING_TEXT)} "
               "(parameters and running statistics)", report.num(summary["member_vs_solo_max_abs_diff"]),
               report.num(summary["confused_vs_solo_max_abs_diff"])])
  text = report.table(["", "population (member axis apart)", "axes confused (statistics over members)"], rows)
  notes = (f"The solo run reached {report.pct(solo.get('eval_accuracy'))}; its parameters and statistics "
           f"have entries up to {report.num(summary['solo_max_abs_value'])} in size.")
  return report.section(TITLE, QUESTION, text, _plot(summary, ctx), reading(summary), notes)


def _plot(summary: dict[str, Any], ctx: Context) -> str | None:
  differences = [(label, summary[key]) for label, key in (("population member", "member_vs_solo_max_abs_diff"),
                                                          ("axes confused", "confused_vs_solo_max_abs_diff"))
                 if report.present(summary[key])]
  if not differences:
    return None
  fig, (difference_axis, accuracy_axis) = report.figure(2, "A vmapped ensemble member vs the same model alone")
  # A linear axis: a difference of exactly 0 must look like nothing, with its value written on it.
  difference_axis.bar([label for label, _ in differences], [value for _, value in differences])
  for x, (_, value) in enumerate(differences):
    difference_axis.annotate(report.num(value), (x, value), ha="center", va="bottom")
  difference_axis.set_ylabel("max abs difference from the solo run")
  members = summary["members"]
  seeds = [r["seed"] for r in members]
  width = BAR_WIDTH
  for offset, key, label in ((-width / 2, "eval_accuracy", "population"),
                             (width / 2, "confused_eval_accuracy", "axes confused")):
    values = [report.PERCENT * r[key] if report.present(r[key]) else 0.0 for r in members]
    accuracy_axis.bar([i + offset for i in range(len(seeds))], values, width, label=label)
  accuracy_axis.set_xticks(range(len(seeds)), [f"seed {s}" for s in seeds])
  accuracy_axis.set_ylabel("eval accuracy (%)")
  measured = [report.PERCENT * r[k] for r in members for k in ("eval_accuracy", "confused_eval_accuracy")
              if report.present(r[k])]
  if measured:
    accuracy_axis.set_ylim(max(0.0, min(measured) - ACCURACY_AXIS_MARGIN), report.PERCENT)
  accuracy_axis.legend()
  return report.save(fig, os.path.join(ctx.workdir, f"{KEY}.png"))


def reading(summary: dict[str, Any]) -> str:
  """What the numbers say, computed from them."""
  sentences = []
  scale = summary["solo_max_abs_value"]
  member, confused = summary["member_vs_solo_max_abs_diff"], summary["confused_vs_solo_max_abs_diff"]
  if report.present(member, scale):
    sentences.append(
        f"Trained inside the vmapped population, the member differs from the same model trained alone by at most "
        f"{report.num(member)} in any parameter or running statistic (entries up to {report.num(scale)}, a "
        f"relative {report.num(member / scale)}): "
        + ("bit for bit the same run." if member == 0 else
           "the same run up to float rounding (the vmapped step orders its sums differently)."
           if member <= SAME_RUN_RTOL * scale else
           f"more than float rounding (above a relative {SAME_RUN_RTOL}), so the population is not computing "
           "the solo run."))
  else:
    sentences.append("The member-vs-solo comparison is missing.")
  if report.present(confused, scale):
    comparison = (f", {report.num(confused / member)} times the population member's difference"
                  if report.present(member) and member > 0 else "")
    verdict = (f"a different model from the one trained alone (relative difference above {SAME_RUN_RTOL}), "
               "whose training depended on the other members' batches"
               if confused > SAME_RUN_RTOL * scale else
               f"still within a relative {SAME_RUN_RTOL} of the solo run at this length of training")
    sentences.append(
        f"With the member axis confused for a batch axis, every member normalized with statistics pooled over all "
        f"members' batches and the same member ended {report.num(confused)} away from its solo run{comparison}: "
        f"{verdict}.")
    if summary["confused_running_stats_identical"]:
      sentences.append("All confused members ended with identical running averages, the pooled ones.")
    accuracy, confused_accuracy = summary["member_eval_accuracy"], summary["confused_member_eval_accuracy"]
    if report.present(accuracy, confused_accuracy):
      sentences.append(f"Mean member eval accuracy: {report.pct_ci(summary, 'member_eval_accuracy')} kept apart, "
                       f"{report.pct_ci(summary, 'confused_member_eval_accuracy')} confused (confused minus apart, "
                       f"member by member: {_confused_minus_apart(summary)}); the ensembles of averaged "
                       f"probabilities, one each, scored {report.pct(summary['ensemble_eval_accuracy'])} and "
                       f"{report.pct(summary['confused_ensemble_eval_accuracy'])}.")
  else:
    sentences.append("The confused-axes population is missing.")
  sentences += report.unfinished(summary["members"] + ([summary["solo"]] if summary["solo"] else []))
  return " ".join(sentences)


def _confused_minus_apart(summary: dict[str, Any]) -> str:
  """Each member's eval accuracy confused minus kept apart, over the seeds (the same seeds both ways)."""
  return report.compared_paired(summary["confused_member_eval_accuracy_seeds"], summary["member_eval_accuracy_seeds"])


def summary(results: dict[str, Any]) -> str:
  """The README's bullet: member vs solo, the confused population, and the members' accuracy over seeds."""
  summary_ = results[KEY]
  member = summary_["member_vs_solo_max_abs_diff"]
  versus_solo = ("is bit for bit its solo run" if member == 0 else
                 f"differs from its solo run by at most {report.num(member)}")
  return (f"**Ensembles**: the population member {versus_solo} (entries up to "
          f"{report.num(summary_['solo_max_abs_value'])}); with BatchNorm pooling over the member axis it differs by "
          f"{report.num(summary_['confused_vs_solo_max_abs_diff'])}. Member eval accuracy over the "
          f"{len(summary_['members'])} seeds {report.pct_ci(summary_, 'member_eval_accuracy')} apart, "
          f"{report.pct_ci(summary_, 'confused_member_eval_accuracy')} confused (confused minus apart: "
          f"{_confused_minus_apart(summary_)}).")
