"""The BatchNorm study: the invariants its numbers rely on, and the report built end to end at tiny scale.

The invariants hold by construction, so they are asserted to float tolerance:
synchronized statistics are the full batch's, unsynchronized devices each
normalize with their own slice's (and diverge); vmap with a named axis is the
batched computation; cross-example gradients are exactly zero in eval mode,
for GroupNorm and for vmap without an axis name, and not in training mode; a
vectorized ensemble member is its solo run. Most are read from one tiny study
(a few steps of a few trials of every experiment) that also checks the report,
results.json, resuming and how missing runs show.
"""

import io
import json
import os
import shutil

import jax
import numpy as np
import pytest

from cnnjax import train
from cnnjax.lab import bn_study as study
from cnnjax.errors import ConfigError
from cnnjax.lab.bn_study import probes
from cnnjax.lab.bn_study.plan import Context
from helpers import EXPERIMENTS, REPO_ROOT, run_cli

DEVICES = 8
TOLERANCE = 1e-5  # float32 rounding of one forward pass
SCRIPT = os.path.join(REPO_ROOT, "scripts", "bn_study.py")


def test_synced_statistics_are_the_full_batch_ones_and_local_ones_each_slices_own(tmp_path, tfds_data_dir):
  ctx = Context(str(tmp_path), study.SCALES["tiny"], EXPERIMENTS)
  plans = {p.config.model.bn_sync: p for p in ctx.trials("sync_vs_devices", "bn_sync_vs_devices.py")}
  one_device = plans["global"].config.copy_and_resolve_references()
  one_device.parallel.strategy, one_device.parallel.num_devices = "none", 0
  reference = train.build(one_device)
  state = jax.device_get(reference.init_state())
  batch = probes.train_batches(reference, 1)[0]
  full = probes.normalization_moments(reference, state, [batch])[0]  # {layer: (1, 2, 1, features)}
  per_device = len(batch["input"]) // DEVICES
  slices = [probes.normalization_moments(reference, state, [{k: v[d * per_device:(d + 1) * per_device]
                                                              for k, v in batch.items()}])[0] for d in range(DEVICES)]
  for bn_sync, plan in plans.items():
    exp = train.build(plan.config)
    assert exp.strategy.layout.num_devices == DEVICES and exp.strategy.name == "shard_map"
    moments = probes.normalization_moments(exp, state, [batch])[0]  # {layer: (devices, 2, 1, features)}
    assert moments.keys() == full.keys() and len(moments) == 2
    divergences = []
    for layer, value in moments.items():
      expected = (np.broadcast_to(full[layer], value.shape) if bn_sync == "global"
                  else np.concatenate([s[layer] for s in slices]))
      np.testing.assert_allclose(value, expected, rtol=TOLERANCE, atol=TOLERANCE, err_msg=f"{bn_sync} {layer}")
      divergences.append(probes.stat_divergence(value, plan.config.model.bn_epsilon)[0])
    if bn_sync == "global":
      assert divergences == [0.0, 0.0]  # identical statistics on every device, exactly
    else:
      assert min(divergences) > 0.01, divergences


@pytest.mark.slow
def test_tiny_study_end_to_end(tmp_path, tfds_data_dir):
  """One test, so that parallel test workers never run the study twice: the report, the invariants in its
  measurements, resuming, how missing runs show, and the scale a workdir holds."""
  workdir = str(tmp_path / "study")
  results = study.run_study(workdir, "tiny", experiments_dir=EXPERIMENTS)
  check_report(workdir, results)
  check_invariants(results)
  check_rerun_and_missing(workdir, results, str(tmp_path / "copy"))
  with pytest.raises(ConfigError, match=r"holds a study at --scale=tiny, not small; pass --scale=tiny"):
    study.write_study_report(Context(workdir, study.SCALES["small"], EXPERIMENTS))


def check_report(workdir, results):
  assert results == study.read_results(workdir)
  assert results["study"]["tasks_run"] == results["study"]["tasks_total"] > 0
  report = open(os.path.join(workdir, "report.md")).read()
  for experiment in study.EXPERIMENTS:
    assert f"## {experiment.TITLE}" in report
    assert f"![{experiment.TITLE}]({experiment.KEY}.png)" in report
    assert os.path.getsize(os.path.join(workdir, f"{experiment.KEY}.png")) > 0
  assert report.count("**Question.**") == report.count("**Reading.**") == len(study.EXPERIMENTS)
  assert "| missing" not in report and "Missing" not in report  # every run of the tiny scale finished
  for record in results["sync_vs_devices"]:
    assert {"devices", "bn_sync", "eval_accuracy", "replica_stat_divergence"} <= record.keys()
    assert 0.0 <= record["eval_accuracy"] <= 1.0
  assert {r["mode"] for r in results["vmap_leakage"]} == set(probes.LEAKAGE_MODES)
  assert isinstance(results["ensemble_member_vs_solo_max_abs_diff"], float)
  # Each experiment's runs are a sweep directory the normal tools read.
  assert os.path.exists(os.path.join(workdir, "per_device_batch", "results.md"))
  # The reading is computed from the numbers: e.g. the local run's divergence appears in it.
  local = next(r for r in results["sync_vs_devices"] if r["bn_sync"] == "local")
  assert study.report.num(local["replica_stat_divergence"]) in report
  check_seeds(workdir, results, report)
  check_summary(workdir, results)


def check_seeds(workdir, results, report):
  """Every accuracy of a trained configuration is a mean over its seeds, with its interval in the report."""
  seeds = study.SCALES["tiny"].seeds
  for key in ("sync_vs_devices", "per_device_batch", "ghost_batch"):
    for record in results[key]:
      values = record["eval_accuracy_seeds"]
      assert len(values) == len(record["seeds"]) == seeds, (key, record["trial"])
      assert record["eval_accuracy"] == pytest.approx(np.mean(values))
      assert record["eval_accuracy_ci95"] is not None and study.report.pct_ci(record, "eval_accuracy") in report
  # The per-device batch's seeds trained as one population: each seed's run is its own directory.
  renorm = next(r for r in results["per_device_batch"] if r["norm"] == "renorm")
  for seed in renorm["seeds"]:
    summary = json.load(open(os.path.join(workdir, "per_device_batch", f"{renorm['trial']},seed={seed}",
                                          "summary.json")))
    assert summary["eval_accuracy"] in renorm["eval_accuracy_seeds"]
  assert "beyond the seed spread" in report or "within the seed spread" in report


def check_summary(workdir, results):
  """The README's summary: the cost of the invocation that trained, one bullet per experiment, its numbers."""
  summary = open(os.path.join(workdir, study.report.SUMMARY_FILE)).read()
  paragraph, bullets = summary.split("\n\n")
  done = results["study"]["tasks_total"]
  assert paragraph.startswith("Measured with `--scale=tiny` on ") and "with 8 simulated CPU devices" in paragraph
  seconds = results["study"]["wall_seconds"]
  assert f"{done} runs and measurements in {seconds:.0f} s wall, in one invocation" in paragraph
  assert "missing" not in summary
  lines = bullets.strip().splitlines()
  assert [line.split("**")[1] for line in lines] == [
      "Sync vs devices", "Per-device batch", "vmap leakage", "Ensembles", "Train vs eval", "Ghost batch"]
  per_device = lines[1]
  for record in results["per_device_batch"]:
    assert study.report.pct_ci(record, "eval_accuracy") in per_device
  local = next(r for r in results["sync_vs_devices"] if r["bn_sync"] == "local")
  assert study.report.num(local["replica_stat_divergence"]) in lines[0]
  assert study.report.num(results["ensemble_member_vs_solo_max_abs_diff"]) in lines[3]


def check_invariants(results):
  divergence = {r["bn_sync"]: r["replica_stat_divergence"] for r in results["sync_vs_devices"]}
  assert divergence["global"] == 0.0 and divergence["local"] > 0.01

  leakage = {r["mode"]: r for r in results["vmap_leakage"]}
  for mode in ("batchnorm_eval", "groupnorm", "batchnorm_vmap_no_axis"):
    assert leakage[mode]["cross_example_grad_norm"] == 0.0, mode
  batched, named = leakage["batchnorm_train"], leakage["batchnorm_vmap_named_axis"]
  assert batched["cross_example_grad_norm"] > 0.01 * batched["self_grad_norm"]
  np.testing.assert_allclose(named["cross_example_grad_norm"], batched["cross_example_grad_norm"], rtol=1e-4)
  for mode in ("batchnorm_vmap_named_axis", "batchnorm_eval", "groupnorm"):
    record = leakage[mode]
    assert record["losses_vs_batched_max_abs_diff"] <= TOLERANCE, mode
    assert record["grad_mean_vs_batched_max_abs_diff"] <= TOLERANCE * record["batched_grad_max_abs"] * 10, mode
  unnamed = leakage["batchnorm_vmap_no_axis"]
  assert unnamed["grad_mean_vs_batched_max_abs_diff"] > 0.01 * unnamed["batched_grad_max_abs"]

  ensemble = results["ensemble"]
  scale = ensemble["solo_max_abs_value"]
  # Member and solo run each train their whole batch on one device: the same run, bit for bit.
  assert results["ensemble_member_vs_solo_max_abs_diff"] == 0.0
  assert ensemble["confused_vs_solo_max_abs_diff"] > 1e-3 * scale
  assert ensemble["confused_running_stats_identical"] is True

  (final, *_) = sorted(results["train_vs_eval"], key=lambda p: -p["step"])
  assert final["running_mean_gap"] > 0 and 0.0 <= final["eval_accuracy_precise"] <= 1.0


def check_rerun_and_missing(workdir, results, copy):
  shutil.copytree(workdir, copy)
  again = study.run_study(copy, "tiny", experiments_dir=EXPERIMENTS)
  assert again["study"]["tasks_run"] == 0
  # An invocation that did nothing leaves the study's recorded cost alone.
  assert again["study"]["invocations"] == results["study"]["invocations"] and len(again["study"]["invocations"]) == 1
  assert again["sync_vs_devices"] == results["sync_vs_devices"]

  local = next(r for r in results["sync_vs_devices"] if r["bn_sync"] == "local")
  for seed in local["seeds"]:  # every seed of the configuration
    shutil.rmtree(os.path.join(copy, "sync_vs_devices", f"{local['trial']},seed={seed}"))
  ghost = results["ghost_batch"][0]
  for seed in ghost["seeds"]:
    os.remove(os.path.join(copy, "ghost_batch", f"{ghost['trial']},seed={seed}", "summary.json"))
  # One seed missing of a configuration: the configuration is missing, its statistics cover the seed left.
  group = next(r for r in results["per_device_batch"] if r["norm"] == "group")
  os.remove(os.path.join(copy, "per_device_batch", f"norm=group,seed={group['seeds'][-1]}", "summary.json"))
  # A measurement made on other weights than the run's current ones is stale, hence missing too.
  solo_summary = os.path.join(copy, "ensemble", "solo", "seed=1", "summary.json")
  summary = json.load(open(solo_summary))
  summary["param_checksum"] = "0" * len(summary["param_checksum"])
  json.dump(summary, open(solo_summary, "w"))

  readme = os.path.join(copy, "README.md")
  with open(readme, "w") as f:
    f.write(f"# Title\n\nBefore.\n{study.report.SUMMARY_BEGIN}\nan old summary\n{study.report.SUMMARY_END}\nAfter.\n")
  published = os.path.join(copy, "published")
  os.makedirs(published)
  open(os.path.join(published, "ghost_batch.png"), "w").close()  # a plot the study no longer has: removed
  os.remove(os.path.join(copy, "ghost_batch.png"))
  written = run_cli("bn_study", f"--workdir={copy}", "--scale=tiny", "--report_only", f"--readme={readme}",
                    f"--publish={published}", wrapper=SCRIPT)
  assert written.returncode == 0, written.stderr[-2000:]
  assert "runs or measurements missing" in written.stdout
  # The README's block is the new summary, which still gives the cost of the invocation that trained.
  summary = open(os.path.join(copy, study.report.SUMMARY_FILE)).read()
  assert open(readme).read() == (f"# Title\n\nBefore.\n{study.report.SUMMARY_BEGIN}\n{summary}"
                                 f"{study.report.SUMMARY_END}\nAfter.\n")
  assert f"{results['study']['tasks_total']} runs and measurements in" in summary
  assert f"**{len(study.report.missing_runs(study.read_results(copy)))} runs or measurements missing**" in summary
  # What the repository keeps of a study: the report, its numbers, the summary and the plots it links to.
  report = open(os.path.join(copy, "report.md")).read()
  plots = [f"{e.KEY}.png" for e in study.EXPERIMENTS if f"({e.KEY}.png)" in report]
  assert "ghost_batch.png" not in plots and "per_device_batch.png" in plots
  assert sorted(os.listdir(published)) == sorted(["report.md", "results.json", "summary.md"] + plots)
  for name in os.listdir(published):
    assert open(os.path.join(published, name), "rb").read() == open(os.path.join(copy, name), "rb").read()
  partial = study.read_results(copy)
  record = next(r for r in partial["sync_vs_devices"] if r["bn_sync"] == "local")
  assert record["status"] == "missing" and record["eval_accuracy"] is None and record["replica_stat_divergence"] is None
  assert partial["ghost_batch"][0]["status"] == "missing" and partial["ghost_batch"][0]["eval_accuracy"] is None
  group_left = next(r for r in partial["per_device_batch"] if r["norm"] == "group")
  assert group_left["status"] == "missing" and group_left["seeds_finished"] == 1
  assert group_left["eval_accuracy"] == group["eval_accuracy_seeds"][0] and group_left["eval_accuracy_ci95"] is None
  assert partial["ensemble_member_vs_solo_max_abs_diff"] is None
  assert partial["ensemble"]["confused_vs_solo_max_abs_diff"] is None
  report = open(os.path.join(copy, "report.md")).read()
  row = next(line for line in report.splitlines() if line.startswith("| 8 | local |"))
  assert row.count("missing") >= 3, row
  assert f"Missing: {local['trial']}." in report
  assert "sync_vs_devices/" + local["trial"] in report.split("## ")[0]  # listed up front


def test_unknown_experiments_and_scales_are_one_line_errors(tmp_path):
  with pytest.raises(ConfigError, match=r"--only names unknown experiments \['bogus'\]; choose from sync_vs"):
    study.run_study(str(tmp_path), "tiny", experiments_dir=EXPERIMENTS, only=["bogus"])
  with pytest.raises(ConfigError, match=r"--scale=huge is unknown; choose one of small, full, tiny"):
    study.run_study(str(tmp_path), "huge", experiments_dir=EXPERIMENTS)
  assert not os.listdir(tmp_path)
  with pytest.raises(ConfigError, match=r"holds no report.md to publish; run the study there first"):
    study.publish_report(str(tmp_path), str(tmp_path / "published"))


def test_the_progress_bar_counts_runs_and_measurements(monkeypatch, capsys):
  terminal = io.StringIO()
  terminal.isatty = lambda: True
  monkeypatch.setattr("sys.stderr", terminal)
  progress = study.study.StudyProgress(total=3, done=1)
  with progress.showing():
    progress.finished(study.Task("ghost_batch", "bn_group_size=8", done=lambda: True, run=lambda: ""), "ok", 1.0)
  shown = terminal.getvalue()
  assert "BatchNorm study" in shown and "2/3" in shown, shown
  assert "[2/3] ghost_batch / bn_group_size=8: ok" in shown + capsys.readouterr().err


def test_seed_statistics_are_the_t_interval_of_the_mean():
  stats = study.plan.seed_statistics("eval_accuracy", [0.1, 0.2, 0.3])
  assert stats["eval_accuracy"] == pytest.approx(0.2) and stats["eval_accuracy_std"] == pytest.approx(0.1)
  # Student's t with 2 degrees of freedom: 4.303 standard errors.
  assert stats["eval_accuracy_ci95"] == pytest.approx(4.3027 * 0.1 / np.sqrt(3), rel=1e-4)
  single = study.plan.seed_statistics("eval_accuracy", [0.5])
  assert single["eval_accuracy"] == 0.5 and single["eval_accuracy_std"] is None and single["eval_accuracy_ci95"] is None


def record_of(values):
  return study.plan.seed_statistics("eval_accuracy", values)


def test_differences_are_findings_only_beyond_the_seed_spread():
  base = record_of([0.90, 0.91, 0.92])
  far, near = record_of([0.80, 0.81, 0.82]), record_of([0.905, 0.915, 0.925])
  assert study.report.beyond_seeds(far, base) is True and study.report.beyond_seeds(near, base) is False
  assert study.report.compared(far, base).startswith("-10.00 points (95% interval")
  assert study.report.compared(far, base).endswith("beyond the seed spread")
  assert study.report.compared(near, base).endswith("within the seed spread")
  assert study.report.beyond_seeds(record_of([0.9]), base) is None
  assert "not comparable" in study.report.compared(record_of([0.9]), base)
  # Welch's interval: by hand for these two groups (equal variances 1e-4, n = 3, 4 degrees of freedom).
  difference, half_width = study.report.difference_interval(near, base, "eval_accuracy")
  assert difference == pytest.approx(0.005) and half_width == pytest.approx(2.7764 * np.sqrt(2e-4 / 3), rel=1e-4)


def test_the_readme_summary_is_spliced_between_its_markers_only():
  begin, end = study.report.SUMMARY_BEGIN, study.report.SUMMARY_END
  readme = f"intro\n{begin}\nold\nlines\n{end}\noutro\n"
  spliced = study.report.splice_summary(readme, "new summary\n\n* a bullet\n")
  assert spliced == f"intro\n{begin}\nnew summary\n\n* a bullet\n{end}\noutro\n"
  assert study.report.splice_summary(spliced, "new summary\n\n* a bullet") == spliced  # rerunning changes nothing
  for broken in ("no markers", f"{begin}\n{begin}\n{end}", f"{end}\n{begin}", f"{begin} only"):
    with pytest.raises(ConfigError, match=r"^NOTES.md must hold the lines .* once each, in that order"):
      study.report.splice_summary(broken, "summary", "NOTES.md")
  # The study's page holds the block, so that `--readme=docs/bn_study.md` can rewrite it.
  study.report.read_readme(os.path.join(REPO_ROOT, "docs", "bn_study.md"))


def test_a_readme_without_markers_is_a_one_line_error_before_anything_runs(tmp_path):
  readme = tmp_path / "README.md"
  readme.write_text("# A README without the study's markers\n")
  workdir = tmp_path / "study"
  failed = run_cli("bn_study", f"--workdir={workdir}", "--scale=tiny", f"--readme={readme}", wrapper=SCRIPT)
  assert failed.returncode == 2, failed.stderr[-2000:]
  assert failed.stderr.strip().splitlines() == [
      f"error: {readme} must hold the lines {study.report.SUMMARY_BEGIN!r} and {study.report.SUMMARY_END!r} "
      "once each, in that order, around the study's summary"]
  assert readme.read_text() == "# A README without the study's markers\n" and not workdir.exists()
  absent = run_cli("bn_study", f"--workdir={workdir}", "--scale=tiny", f"--readme={tmp_path / 'nope.md'}",
                   wrapper=SCRIPT)
  assert absent.returncode == 2 and absent.stderr.strip().splitlines() == [
      f"error: cannot read the README {tmp_path / 'nope.md'}: No such file or directory"]


def test_the_study_cost_adds_up_the_invocations_that_did_its_tasks():
  assert study.report.study_cost([]) == "no invocation recorded its cost"
  one = {"tasks_run": 40, "tasks_total": 40, "wall_seconds": 612.4}
  assert study.report.study_cost([one]) == "40 runs and measurements in 612 s wall, in one invocation"
  resumed = [{"tasks_run": 10, "tasks_total": 40, "wall_seconds": 100.2},
             {"tasks_run": 30, "tasks_total": 40, "wall_seconds": 500.0}]
  assert study.report.study_cost(resumed) == ("40 runs and measurements in 2 invocations, 600 s wall in all "
                                             "(100 s, 500 s)")
